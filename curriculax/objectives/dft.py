"""Dynamic Fine-Tuning (DFT): SFT with each token's loss scaled by its detached probability.

Paper: Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with
Reward Rectification", 2025 (arXiv 2508.05629); code ``yongliang-wu/DFT``.

Formula (per response token ``t``, ``p_t = softmax(z_t)[y_t]``, ``sg`` = stop-gradient)::

    l_t = -sg(p_t) * log p_t              (dft.md; gradient -grad p_t, i.e. p_t * (softmax - onehot))

The stop-gradient matters: the value equals ``-p log p`` but the gradient is ``-p * grad log p``,
not ``-(1 + log p) * grad p``. Normalization is the token mean over response tokens, exactly as
SFT (``normalization="token"``).

Defaults (``default_config``): ``prob_exponent=1.0`` (plain DFT). ``prob_exponent=a`` gives
``sg(p_t)**a``; the official repo's "SA-DFT" uses per-token exponents (0.3 for digit tokens,
1.0 for stop words, 0.7 otherwise), which needs tokenizer classes and is not implemented.
Paper training defaults (not enforced here): AdamW, lr 5e-5, global batch 256, cosine.

Usage::

    c.objective = dft.default_config()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.objectives.base import Objective, register


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="dft", normalization="token", impl="auto",
                                          prob_exponent=1.0))


def dft_token_loss(target_logprob: jax.Array, prob_exponent: float = 1.0) -> jax.Array:
    """``-sg(p)**prob_exponent * log p`` elementwise (0 where ``target_logprob`` is 0/masked)."""
    weight = jnp.exp(prob_exponent * jax.lax.stop_gradient(target_logprob))
    return -weight * target_logprob


def token_loss(stats, batch, config):
    del batch
    return dft_token_loss(stats.target_logprob, float(config.get("prob_exponent", 1.0)))


dft = register("dft", Objective(token_loss))
