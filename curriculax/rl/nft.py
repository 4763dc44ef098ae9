"""Negative-aware Fine-Tuning (NFT): a likelihood loss that also learns from wrong answers.

Paper: Chen et al. (NVIDIA), "Bridging Supervised Learning and Reinforcement Learning in Math
Reasoning", 2025 (arXiv 2505.18116); code ``NVlabs/NFT`` (``dp_actor.py``, ``train_7B.sh``;
``../shared/methods/token_weighting.md`` section 3).

Online data as in GRPO (K sampled responses per prompt, verifier correctness), but instead of a
policy gradient each token gets a supervised loss. With ``r_q`` the prompt's fraction of correct
responses clamped to ``[0.02, 0.98]`` and the token ratio to the rollout policy
``R_t = exp(min(log pi_theta - log pi_old, 10))``::

    correct response:    l_t = -log R_t
    incorrect response:  l_t = -log clampP((1 - r_q R_t) / (1 - r_q), min=eps_neg) * neg_weight
    every token:         l_t *= (1 - r_q)

The incorrect branch is the likelihood of the implicit *negative* policy
``pi^- = (pi_old - r_q pi_theta) / (1 - r_q)`` (whose ratio to ``pi_old`` is the proxy above), so
maximizing it pushes ``pi_theta`` down on wrong answers. ``clampP`` is the repo's
gradient-preserving clamp ``x + stop_gradient(clamp(x) - x)``: the forward value is clamped, the
backward is ``d/dx`` of the unclamped proxy, so ``d(-log clampP(x)) = -dx / clamp(x)``, i.e. the
gradient divides by the *clamped* value. With the script's ``eps_neg = 1.0`` the negative loss
value is never positive, yet its gradient always flows; a proxy <= 0 (``R_t > 1/r_q``) stays
finite. On-policy (``R = 1``) the gradients are ``-(1 - r_q)`` (correct) and ``+r_q`` (incorrect)
times ``grad log pi``: GRPO's un-normalized ``(1 - r)`` / ``-r`` advantages.

Defaults (``default_config``, ``train_7B.sh``): eps_neg (``clamp_negative``) 1.0, neg_weight 1.0
(0.0 gives RFT: positives only; the repo's -1 switches to the DAPO loss, here ``rl.loss="grpo"``),
max log-ratio 10, r clamp [0.02, 0.98]. Reduction: the repo sums each response's token losses,
divides by the constant 1000 and sums over responses (no per-token or per-response mean); that is
the RL step's constant-normalizer aggregation (``rl.aggregation="seq_sum_norm"``, ``sum / T_max``,
the repo's form with 1000 replaced by the response width; ``"dr_grpo"`` also divides by ``B``).
Training defaults (not set here): Qwen2.5-Math-7B, lr 1e-6 with 10 warmup steps, 512 prompts x 16
responses, mini-batch 32, one update per rollout batch, no KL, dynamic filtering of all-correct /
all-wrong groups (here the ``r_q`` clamp keeps them finite: weight 0.02 or 0.98).

Usage::

    c.trainer = "rl"
    c.rl.update(nft.default_config())      # rl.loss = "nft"; rl.nft_neg_weight = 0.0 for RFT
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.rl.base import PolicyLoss, register


def default_config() -> ml_collections.ConfigDict:
    """Fields of ``config.rl`` that select and tune NFT (merge with ``c.rl.update``)."""
    return ml_collections.ConfigDict(dict(loss="nft", aggregation="seq_sum_norm", nft_eps_neg=1.0,
                                          nft_neg_weight=1.0,
                                          nft_max_log_ratio=10.0, nft_r_min=0.02, nft_r_max=0.98))


def neg_log_clamped(x: jax.Array, min_val) -> jax.Array:
    """``-log clampP(x, min=min_val)``: value ``-log c`` and gradient ``-dx / c``, c = max(x, min).

    Written as ``-log(c) - (x - sg(x)) / c`` with ``c = sg(max(x, min_val))`` rather than
    ``-log(x + sg(c - x))``: identical value and gradient, but the latter rounds to ``log(0)``
    in float32 when ``x`` is a large negative number and ``min_val`` is small.
    """
    c = jax.lax.stop_gradient(jnp.maximum(x, min_val))
    return -jnp.log(c) - (x - jax.lax.stop_gradient(x)) / c


def nft_token_loss(logp, old_logp, correct_B, r_q_B, *, eps_neg=1.0, neg_weight=1.0,
                   max_log_ratio: float = 10.0, r_min: float = 0.02, r_max: float = 0.98):
    """Per-token NFT loss ``[B,T]`` (unmasked; the RL step masks and aggregates).

    ``logp``: policy log-probs (with gradient); ``old_logp``: the rollout policy's; ``correct_B``:
    bool per response; ``r_q_B``: its group's fraction correct (treated as a constant).
    """
    if isinstance(neg_weight, (int, float)) and neg_weight < 0:
        raise ValueError(f"rl.nft_neg_weight={neg_weight}: must be >= 0 (1.0 NFT, 0.0 RFT); "
                         f"for the DAPO loss use rl.loss='grpo'.")
    r = jnp.clip(jax.lax.stop_gradient(r_q_B.astype(jnp.float32)), r_min, r_max)[:, None]
    log_ratio = jnp.minimum(logp.astype(jnp.float32) - old_logp.astype(jnp.float32),
                            max_log_ratio)
    positive = -log_ratio  # -log R_t, without the exp/log round trip
    proxy = (1.0 - r * jnp.exp(log_ratio)) / (1.0 - r)
    # abs as the repo (clamp_negative may be passed negative); the floor keeps log finite at 0.
    floor = jnp.maximum(jnp.abs(jnp.asarray(eps_neg, jnp.float32)), 1e-12)
    negative = neg_weight * neg_log_clamped(proxy, floor)
    # where, not a 0/1 blend: each branch is finite, and the unused one gets no gradient.
    loss = jnp.where(correct_B.astype(bool)[:, None], positive, negative)
    return (1.0 - r) * loss


def token_loss(logp, old_logp, signals, config):
    cfg = default_config() if config is None else config
    return nft_token_loss(logp, old_logp, signals.correct, signals.group_accuracy,
                          eps_neg=float(cfg.get("nft_eps_neg", 1.0)),
                          neg_weight=float(cfg.get("nft_neg_weight", 1.0)),
                          max_log_ratio=float(cfg.get("nft_max_log_ratio", 10.0)),
                          r_min=float(cfg.get("nft_r_min", 0.02)),
                          r_max=float(cfg.get("nft_r_max", 0.98)))


nft = register("nft", PolicyLoss(token_loss, default_config))
