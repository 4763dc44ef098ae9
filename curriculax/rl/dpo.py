"""Direct Preference Optimization (DPO): a logistic loss on the policy/reference log-ratio margin.

Paper: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model", NeurIPS 2023 (arXiv 2305.18290). Options follow TRL's ``DPOTrainer``
(``../shared/methods/dpo_spin.md``).

For a pair (chosen ``y_w``, rejected ``y_l``) and a frozen reference ``pi_ref``, with
``s(y) = sum_t m_t log pi(y_t | x, y_<t)`` summed over response tokens only (no length average)::

    z = [s_theta(y_w) - s_ref(y_w)] - [s_theta(y_l) - s_ref(y_l)]
    sigmoid: L = -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)   (eps: label smoothing)
    hinge:   L = max(0, 1 - beta z)
    ipo:     L = (z - 1 / (2 beta))^2

averaged over pairs. ``dL/dz = -beta sigmoid(-beta z)`` for plain DPO, so the policy starts at
``L = log 2`` (policy == reference) and pairs the model already ranks well weigh little.
Implicit rewards ``r = beta (s_theta - s_ref)`` are reported detached (logging only).
TRL's IPO length-averages the log-probs; here the caller decides what ``s`` is.

Defaults (``default_config``): beta 0.1, label_smoothing 0.0, kind "sigmoid" (TRL ``DPOConfig``).
Paper training defaults (not enforced here): RMSprop, lr 1e-6, 150-step warmup, batch 64.

Usage::

    s_w = dpo.sequence_logprob(token_logprob_w, mask_w)     # [B], with gradient
    loss, metrics = dpo.loss(s_w, s_l, sg(ref_w), sg(ref_l), beta=0.1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

KINDS = ("sigmoid", "hinge", "ipo")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0, kind="sigmoid"))


def sequence_logprob(token_logprob_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """``[B]`` sum of response-token log-probs; prompt and padding (mask 0) contribute nothing."""
    # where, not multiply: a masked position holding -inf/NaN must not poison the sum or its grad.
    lp = jnp.where(mask_BxT.astype(bool), token_logprob_BxT.astype(jnp.float32), 0.0)
    return lp.sum(-1)


def check_kind(kind: str, field: str = "kind (config rl.dpo_kind; rl.spin_loss for SPIN)",
               kinds=KINDS) -> str:
    """Fails with the offending field and the choices (call before tracing: ``kind`` is static)."""
    if kind not in kinds:
        raise ValueError(f"Preference loss {field}={kind!r}: choose one of {kinds}.")
    return kind


def pair_losses(z_B: jax.Array, *, beta: float = 0.1, label_smoothing: float = 0.0,
                kind: str = "sigmoid") -> jax.Array:
    """``[B]`` per-pair losses from the log-ratio margin ``z`` (see the module docstring)."""
    check_kind(kind)
    bz = beta * z_B
    if kind == "sigmoid":
        # log_sigmoid stays finite for large |beta z| where log(sigmoid(.)) underflows to -inf.
        return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(bz)
                - label_smoothing * jax.nn.log_sigmoid(-bz))
    if kind == "hinge":
        return jax.nn.relu(1.0 - bz)
    return (z_B - 1.0 / (2.0 * beta)) ** 2


def loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, *, beta: float = 0.1,
         label_smoothing: float = 0.0, kind: str = "sigmoid", weights_B=None):
    """Mean preference loss over pairs and detached metrics.

    Inputs are sequence log-probs ``[B]`` (:func:`sequence_logprob`); the reference ones should
    carry no gradient (the caller stop-gradients them). ``weights_B``: per-pair loss weights (a
    curriculum's, mean ~1), ``mean(w * loss)``; None: all 1. Returns ``(loss, metrics)`` with
    ``reward_chosen``, ``reward_rejected`` (mean implicit rewards), ``reward_accuracy``
    (fraction with ``r_w > r_l``) and ``reward_margin`` (mean ``r_w - r_l``).
    """
    check_kind(kind)
    chosen = policy_chosen_B.astype(jnp.float32) - ref_chosen_B.astype(jnp.float32)
    rejected = policy_rejected_B.astype(jnp.float32) - ref_rejected_B.astype(jnp.float32)
    losses = pair_losses(chosen - rejected, beta=beta, label_smoothing=label_smoothing, kind=kind)
    r_w = jax.lax.stop_gradient(beta * chosen)
    r_l = jax.lax.stop_gradient(beta * rejected)
    metrics = {"reward_chosen": r_w.mean(), "reward_rejected": r_l.mean(),
               "reward_accuracy": (r_w > r_l).astype(jnp.float32).mean(),
               "reward_margin": (r_w - r_l).mean()}
    if weights_B is not None:
        losses = losses * weights_B.astype(jnp.float32)
    return losses.mean(), metrics
