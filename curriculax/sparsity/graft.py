"""Model grafting / skill localization (Panigrahi et al., ICML 2023, arXiv 2302.06600).

Given pre-trained ``θ_pre`` and fine-tuned ``θ_ft`` (``Δ = θ_ft − θ_pre``), a graft is a binary
``γ`` with ``θ(γ) = θ_pre + γ ⊙ Δ``: a tiny set of entries that carries the fine-tuned skill.

- **Magnitude baseline** (``highest_movement``): ``B_j = 1`` for the top ``s · N`` entries of
  ``|Δ|`` over all grafted tensors (``≥`` the k-th largest: the intended top-k; the official code's
  strict ``>`` selects one fewer).
- **Learned graft** (relaxed mask, optimised on a few training examples)::

      σ_j = sigmoid(S_j − b),   γ_j = B_j + (1 − 2 B_j) σ_j
      ∂L/∂S_j = (1 − 2 B_j) · ∇_θ L(θ(γ))_j · Δ_j · σ_j (1 − σ_j)
      S ← S − lr · ∂L/∂S

  evaluated with ``round(γ)``, keeping the ``S`` whose graft scores best (``select``).
  Defaults (official RoBERTa SST-2 script): ``lr = 1e7``, sparsity ``s = 1e-7``, 10 epochs;
  ``S₀ ~ U[0, 1)``; the sigmoid bias ``b`` is unverified (``5.0`` here keeps ``γ ≈ B`` at the
  start). Gradients come from ``jax.grad`` through ``θ(γ(S))``, which is the chain rule above.

This is a post-hoc tool over two parameter pytrees (not a trainer method): ``magnitude_mask`` →
``learn`` → ``graft``.
"""

from __future__ import annotations

from typing import Callable

import jax

from curriculax.sparsity.lottery import select_mask


def default_config() -> dict:
    return dict(sparsity=1e-7, lr=1e7, steps=10, bias=5.0, seed=0)


def magnitude_mask(theta_pre, theta_ft, k: int, graftable=None):
    """Boolean pytree: the ``k`` largest ``|Δ|`` entries (ties at the threshold included)."""
    return select_mask(theta_ft, theta_pre, k, graftable)


def gamma(scores, base_mask, bias: float):
    """Relaxed graft ``γ = B + (1 − 2B) · sigmoid(S − b)``."""
    def one(s, b):
        sig = jax.nn.sigmoid(s - bias)
        bf = b.astype(sig.dtype)
        return bf + (1 - 2 * bf) * sig
    return jax.tree.map(one, scores, base_mask)


def graft(theta_pre, theta_ft, g):
    """``θ_pre + γ ⊙ (θ_ft − θ_pre)`` (``γ`` boolean or real)."""
    return jax.tree.map(lambda p, f, m: (p + m.astype(p.dtype) * (f - p)).astype(p.dtype),
                        theta_pre, theta_ft, g)


def init_scores(base_mask, key):
    leaves, tree = jax.tree.flatten(base_mask)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.uniform(k, x.shape) for k, x in zip(keys, leaves)])


def learn(theta_pre, theta_ft, loss: Callable, base_mask, *, steps: int, lr: float,
          bias: float, scores=None, key=None, select: Callable | None = None):
    """Optimises the graft scores ``S`` on ``loss(params)`` by plain gradient descent; returns
    ``(scores, rounded graft mask)``.

    ``select(grafted params) -> float`` (higher is better; the paper's train + validation
    accuracy): each step's rounded graft is scored and the best scores are returned (the earliest
    on ties), not the last ones."""
    scores = init_scores(base_mask, key if key is not None else jax.random.PRNGKey(0)) \
        if scores is None else scores

    def objective(s):
        return loss(graft(theta_pre, theta_ft, gamma(s, base_mask, bias)))

    def rounded(s):
        return jax.tree.map(lambda x: x >= 0.5, gamma(s, base_mask, bias))

    step = jax.jit(lambda s: jax.tree.map(lambda x, g: x - lr * g, s, jax.grad(objective)(s)))
    best = None
    for _ in range(steps):
        scores = step(scores)
        if select is not None:
            value = float(select(graft(theta_pre, theta_ft, rounded(scores))))
            if best is None or value > best[0]:
                best = (value, scores)
    scores = scores if best is None else best[1]
    return scores, rounded(scores)
