"""One-Token Rollout (OTR): a one-step policy gradient at every teacher-forced position.

Paper: Ming, Wu, Hu, He, Yu, "One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with
Policy Gradient", 2025 (arXiv 2509.26313). No official code was found; the exact reward values,
number of samples, temperature and any baseline are **unverified** (shared/methods/otr.md), so
every one of them is a config field.

Each response position ``t`` (ground-truth prefix ``s_t``) is a one-step episode: draw a token
``a_t ~ softmax(z_t / tau)`` from the *current* policy (in-kernel Gumbel-max, no ``[N, V]``
buffer, ``needs=("sample",)``), reward it by agreement with the ground truth and take the
REINFORCE step on its log-probability::

    r(a) = reward_correct      if a == y_t
         = -penalty_incorrect  otherwise
    l_t  = -(r(a_t) - b_t) * log pi_theta(a_t | s_t)

``b_t`` is a baseline that does not depend on ``a_t`` (so the estimator stays unbiased):
``baseline="none"`` (``b=0``, the note's framework spec) or ``"expected"``
(``b = sg(r_c p_t - beta (1 - p_t))`` = the exact expected reward at ``tau = 1``, a
variance reduction). The kernel draws one sample per position per step (``K = 1``); over steps
this is the note's ``K``-sample average.

Expectation (``tau = 1``, own derivation, tested by Monte Carlo): ``E_a[grad l_t] =
-(r_c + beta) * grad p_t`` -- OTR is an unbiased, sampled estimate of ``(r_c + beta)`` times
the DFT gradient; with ``beta = 0`` it is exactly DFT's. ``tau != 1`` samples off-policy with
no importance correction (the paper's handling is unverified), so the estimator is then biased.

Defaults (``default_config``): ``reward_correct=1.0``, ``penalty_incorrect=0.1``,
``temperature=1.0``, ``baseline="none"``, token-mean normalization.

Usage::

    c.objective = otr.default_config()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.objectives.base import Objective, register

BASELINES = ("none", "expected")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="otr", normalization="token", impl="auto", reward_correct=1.0,
        penalty_incorrect=0.1, temperature=1.0, baseline="none"))


def otr_token_loss(sampled_token, sampled_logprob, targets, target_logprob, *,
                   reward_correct: float = 1.0, penalty_incorrect: float = 0.1,
                   baseline: str = "none") -> jax.Array:
    """``-(r(a) - b) * log pi(a)`` per position; ``a`` = the sampled token (no gradient)."""
    if baseline not in BASELINES:
        raise ValueError(f"objective.baseline={baseline!r}: choose one of {BASELINES}.")
    correct = (sampled_token == targets).astype(jnp.float32)
    reward = correct * reward_correct - (1.0 - correct) * penalty_incorrect
    if baseline == "expected":
        p = jnp.exp(jax.lax.stop_gradient(target_logprob))
        reward = reward - (reward_correct * p - penalty_incorrect * (1.0 - p))
    return -jax.lax.stop_gradient(reward) * sampled_logprob


def token_loss(stats, batch, config):
    if stats.sampled_token is None:
        raise ValueError("otr needs stats.sampled_token: run it through the train step "
                         "(needs=('sample',)) or pass sample_rng to the LM-head kernel.")
    return otr_token_loss(stats.sampled_token, stats.sampled_logprob, batch.targets,
                          stats.target_logprob,
                          reward_correct=float(config.get("reward_correct", 1.0)),
                          penalty_incorrect=float(config.get("penalty_incorrect", 0.1)),
                          baseline=config.get("baseline", "none"))


def kernel_options(config) -> dict:
    return {"temperature": float(config.get("temperature", 1.0))}


otr = register("otr", Objective(token_loss, needs=("sample",), kernel_options=kernel_options))
