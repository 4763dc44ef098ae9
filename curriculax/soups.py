"""Model soups (Wortsman et al., ICML 2022, arXiv 2203.05482): averaged fine-tuned weights.

Ingredients ``θ_1 .. θ_K`` are fine-tuned from the same initialization (other seeds/hparams).

- **Uniform soup**: ``θ = (1/K) Σ_k θ_k`` (accumulated in float32, cast back to each dtype).
- **Greedy soup**: sort ingredients by held-out score, descending (stable: ties keep input
  order); ``soup = [best]``; for each next ingredient ``c``: if
  ``score(mean(soup ∪ {c})) ≥ score(mean(soup))`` add ``c``. Returns ``mean(soup)``, never worse on
  the held-out set than the best ingredient.

:func:`from_checkpoints` restores the final (or given) Orbax checkpoint of several training runs
of one config, and soups their model weights (LoRA adapters merged), scored by the config's
held-out generation accuracy (``eval/accuracy``) for the greedy soup.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def uniform(ingredients: Sequence) -> object:
    """The elementwise mean of the parameter pytrees ``ingredients``."""
    if not ingredients:
        raise ValueError("soups.uniform needs at least one ingredient.")
    k = len(ingredients)

    def mean(*xs):
        total = sum(jnp.asarray(x, jnp.float32) for x in xs)
        return (total / k).astype(jnp.asarray(xs[0]).dtype)

    return jax.tree.map(mean, *ingredients)


def greedy(ingredients: Sequence, score: Callable[[object], float],
           scores: Sequence[float] | None = None):
    """``(soup, chosen indices, held-out score of the soup)``; ``score(params)`` is the held-out
    metric (higher is better); ``scores`` are the ingredients' own scores when already known."""
    if not ingredients:
        raise ValueError("soups.greedy needs at least one ingredient.")
    own = [float(score(p)) for p in ingredients] if scores is None else list(map(float, scores))
    order = sorted(range(len(ingredients)), key=lambda i: -own[i])  # stable on ties
    chosen = [order[0]]
    best = own[order[0]]
    for i in order[1:]:
        candidate = uniform([ingredients[j] for j in chosen + [i]])
        s = float(score(candidate))
        if s >= best:
            chosen.append(i)
            best = s
    return uniform([ingredients[j] for j in chosen]), chosen, best


def from_checkpoints(cfg, workdirs: Sequence, *, method: str = "uniform", step: int | None = None,
                     metric: str = "eval/accuracy"):
    """Soups the model weights of the Orbax checkpoints in ``workdirs`` (runs of ``cfg``).

    Returns ``(params, info)``: model weights (a pure-dict pytree for
    ``nnx.merge(exp.graphdef, params)``) and ``{"scores", "chosen", "soup_score"}`` (scores only
    for ``method="greedy"``).
    """
    from curriculax.train import checkpoint, loop, setup

    exp = setup.build(cfg)
    ingredients = []
    for w in workdirs:
        mngr = checkpoint.saved(w, "the soup's workdirs")
        state, _ = checkpoint.restore(mngr, exp.abstract_state, exp.state_shardings, step)
        ingredients.append(exp.model_params(state.params))
        mngr.close()
    if method == "uniform":
        return uniform(ingredients), {"chosen": list(range(len(ingredients)))}
    if method != "greedy":
        raise ValueError(f"soups method={method!r}; expected 'uniform' or 'greedy'.")
    plain = dataclasses.replace(exp, sparsity=None)  # scores model weights, not LoRA params

    def score(params):
        return loop.evaluate(plain, params)[metric]

    own = [score(p) for p in ingredients]
    soup, chosen, best = greedy(ingredients, score, own)
    return soup, {"scores": own, "chosen": chosen, "soup_score": best}
