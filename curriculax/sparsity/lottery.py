"""LT-SFT — Lottery-Ticket Sparse Fine-Tuning (Ansell et al., ACL 2022, arXiv 2110.07560).

One run, two phases (the official ``composable-sft`` code with ``n_ft_iterations = 1``):

1. **Full** fine-tuning for ``full_steps`` steps from ``θ₀`` (all maskable entries train);
2. score every maskable scalar by ``|θ₁ − θ₀|``; ``τ`` = the K-th largest score over *all*
   maskable parameters (one global budget, ``K = density · N``, default ``density = 0.01`` as
   ``ft_params_proportion``); the mask is ``score ≥ τ`` (ties may add entries);
3. reset the parameters to ``θ₀`` and the optimizer state to its initial value, then **sparse**
   fine-tuning (gradients and updates zeroed outside the mask) for the remaining steps.

This happens inside the jitted step: after step ``full_steps`` the refresh computes the mask,
resets params and optimizer state. ``TrainState.masks`` holds ``{"select": per-entry booleans,
"theta0": θ₀}`` (θ₀ is needed for the reset and the scores). The learning-rate schedule restarts
with the reset optimizer state (the paper runs the two phases as separate fine-tunings), still
planned for ``config.steps``. ``full_steps = 0`` means ``steps // 2``. Maskable: every
parameter matching ``include`` (default: every attention/MLP projection; embeddings, head and
norms frozen in the sparse phase as in the paper's options). L1 regularisation toward θ₀ (0 by
default in the code) is not implemented.

:func:`select_mask` is the selection on its own (e.g. ``lt_sft_grafting.md``'s example).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from curriculax.sparsity import base


def default_config() -> dict:
    return dict(density=0.01, full_steps=0,
                include=r"layers/\d+/(attn/[qkvo]|mlp/(gate|up|down))$")


def select_mask(theta1, theta0, k: int, maskable=None):
    """Per-entry booleans: ``|θ₁ − θ₀| ≥ τ`` with ``τ`` the ``k``-th largest score over all
    maskable leaves (``maskable``: params-shaped python booleans, default all)."""
    scores = jax.tree.map(lambda a, b: jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)),
                          theta1, theta0)
    if maskable is None:
        maskable = jax.tree.map(lambda _: True, theta0)
    flat = [s.reshape(-1) for s, m in zip(jax.tree.leaves(scores), jax.tree.leaves(maskable)) if m]
    allscores = jnp.concatenate(flat)
    tau = jax.lax.top_k(allscores, k)[0][-1]
    return jax.tree.map(lambda s, m: (s >= tau) if m else jnp.zeros(s.shape, bool), scores,
                        maskable)


def build(config, abstract_params) -> base.Sparsity:
    cfg = base.method_config(config)
    inner = base.base_optimizer(config.optimizer, config.steps)
    maskable = base.map_with_path(lambda path, p: base.matches(cfg.include, path) and p.ndim >= 2,
                                  abstract_params)
    n = sum(p.size for p, m in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(maskable))
            if m)
    if n == 0:
        raise ValueError(f"sparsity.include={cfg.include!r} matches no parameter.")
    k = max(1, int(round(cfg.density * n)))
    full_steps = cfg.full_steps or config.steps // 2
    optimizer = base.masked_dense(inner)

    def init_masks(params, rng):
        del rng
        return {"select": jax.tree.map(lambda p: jnp.ones(p.shape, bool), params),
                "theta0": params}

    def refresh(masks, params, opt_state, step):
        def switch(args):
            masks, params, opt_state = args
            sel = select_mask(params, masks["theta0"], k, maskable)
            theta0 = masks["theta0"]
            return {"select": sel, "theta0": theta0}, theta0, inner.init(theta0)

        return jax.lax.cond(step == full_steps, switch, lambda a: a, (masks, params, opt_state))

    def mask_shardings(abstract_masks, param_shardings, replicated):
        return {"select": param_shardings, "theta0": param_shardings}

    return base.Sparsity(
        optimizer=_select_view(optimizer), init_masks=init_masks, refresh=refresh,
        mask_shardings=mask_shardings)


def _select_view(optimizer):
    """The masked optimizer reading ``masks["select"]``."""
    import optax

    def update(updates, state, params=None, *, masks=None, **extra):
        return optimizer.update(updates, state, params,
                                masks=None if masks is None else masks["select"])

    return optax.GradientTransformationExtraArgs(optimizer.init, update)


base.register("lt_sft", build, default_config)
