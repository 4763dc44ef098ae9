"""GRPO: group-relative advantages, the clipped surrogate, the k3 KL and loss aggregation.

Paper: Shao et al., "DeepSeekMath", 2024 (arXiv 2402.03300); variants DAPO (arXiv 2503.14476:
clip-higher, token-mean) and Dr. GRPO (arXiv 2503.20783: no std, constant normalizer). Formulas
follow verl's ``core_algos.py`` and TRL's ``grpo_trainer.py`` (``../shared/methods/grpo.md``).

For a group of ``G`` responses to one prompt with rewards ``r``::

    A_i = (r_i - mean(r)) / (std(r) + eps)        std: Bessel (default, as verl/TRL), population, or none
    rho = exp(clip(logp - logp_old, -20, 20))
    l   = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))      per response token
    l   = min(l, -A c)  where A < 0                                  dual clip (c > 0; verl 3.0)
    kl  = exp(d) - d - 1,  d = logp_ref - logp                       k3, added as beta * kl

A group whose rewards are all equal gets ``A = 0`` (no signal, no NaN). Aggregation over
response tokens (``rl.aggregation``): ``token_mean`` (verl default, DAPO), ``seq_mean_token_mean``
(the paper), ``seq_mean_token_sum``, ``dr_grpo`` (``sum / (B * T_max)``) and ``seq_sum_norm``
(``sum / T_max``, ReLIFT's ``loss_remove_token_mean``).

Defaults (``curriculax.train.config.rl_config``): group 8, eps_low = eps_high = 0.2, no dual clip, beta 0.0,
Bessel std with eps 1e-6, token_mean, one inner update per rollout batch.

Usage::

    A = grpo.advantages(rewards_PxG)                       # [P, G]
    l = grpo.clipped_token_loss(logp, logp_old, A.reshape(-1), eps_low=0.2, eps_high=0.28)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from curriculax.rl.base import PolicyLoss, register

STD_MODES = ("bessel", "population", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "dr_grpo",
                "seq_sum_norm")


def advantages(rewards_PxG, eps: float = 1e-6, *, std: str = "bessel") -> jax.Array:
    """Group-normalized advantages ``[P, G]``; all-equal groups give exactly 0.

    A group of one response has ``mu = 0, sigma = 1`` (verl), so ``A = r / (1 + eps)``
    (``A = r`` with ``std="none"``, which divides by nothing).
    """
    if std not in STD_MODES:
        raise ValueError(f"rl.advantage_std={std!r}: choose one of {STD_MODES}.")
    r = rewards_PxG.astype(jnp.float32)
    g = r.shape[-1]
    if g == 1:
        return r if std == "none" else r / (1.0 + eps)
    centered = r - r.mean(-1, keepdims=True)
    if std != "none":
        ddof = 1 if std == "bessel" else 0
        sigma = jnp.sqrt(jnp.sum(centered**2, -1, keepdims=True) / (g - ddof))
        centered = centered / (sigma + eps)
    # float32 rounding leaves r - mean(r) ~ 1e-7 in an all-equal group, and sigma is as small:
    # without this the whole group would get a spurious A of order 0.1
    return jnp.where(jnp.all(r == r[..., :1], -1, keepdims=True), 0.0, centered)


def clipped_token_loss(logp, logp_old, advantage_B, *, eps_low: float = 0.2,
                       eps_high: float = 0.2, dual_clip: float = 0.0):
    """PPO clipped surrogate per token ``[B,T]`` (advantage broadcast over a response's tokens)."""
    if 0.0 < dual_clip <= 1.0:  # verl asserts clip_ratio_c > 1: c <= 1 caps every A < 0 token
        raise ValueError(f"rl.dual_clip={dual_clip}: must be > 1 (verl: 3.0), or 0 to disable.")
    a = advantage_B[:, None]
    ratio = jnp.exp(jnp.clip(logp - logp_old, -20.0, 20.0))
    loss = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    if dual_clip > 0.0:
        loss = jnp.where(a < 0, jnp.minimum(loss, -a * dual_clip), loss)
    return loss


def kl_k3(logp, logp_ref):
    """Low-variance KL estimate ``exp(d) - d - 1`` (verl's ``low_var_kl``, clamps included)."""
    d = jnp.clip(logp_ref - logp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


def aggregate(token_loss_BxT, mask_BxT, mode: str = "token_mean", weights_B=None, t_max=None):
    """Reduces masked per-token losses to the batch loss (see the module docstring).

    ``t_max``: the constant of ``dr_grpo`` / ``seq_sum_norm``, the padded *response* length
    (``rl.max_new_tokens``); None: the mask's width, right only when its columns are the response.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"rl.aggregation={mode!r}: choose one of {AGGREGATIONS}.")
    m = mask_BxT.astype(jnp.float32)
    b = m.shape[0]
    t_max = m.shape[1] if t_max is None else t_max
    w = jnp.ones((b,), jnp.float32) if weights_B is None else weights_B
    per_row = jnp.sum(token_loss_BxT * m, -1) * w
    if mode == "token_mean":
        return per_row.sum() / jnp.maximum(m.sum(), 1.0)
    if mode == "seq_mean_token_mean":
        return jnp.mean(per_row / jnp.maximum(m.sum(-1), 1.0))
    if mode == "seq_mean_token_sum":
        return per_row.mean()
    if mode == "dr_grpo":
        return per_row.sum() / (b * t_max)
    return per_row.sum() / t_max


def token_loss(logp, logp_old, signals, config):
    return clipped_token_loss(logp, logp_old, signals.advantage,
                              eps_low=float(config.get("clip_eps_low", 0.2)),
                              eps_high=float(config.get("clip_eps_high", 0.2)),
                              dual_clip=float(config.get("dual_clip", 0.0)))


grpo = register("grpo", PolicyLoss(token_loss))
