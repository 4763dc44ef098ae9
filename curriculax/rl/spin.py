"""Self-Play fIne-tuNing (SPIN): DPO against the model's own previous iterate, on SFT data only.

Paper: Chen, Deng, Yuan, Ji, Gu, "Self-Play Fine-Tuning Converts Weak Language Models to Strong
Language Models", ICML 2024 (arXiv 2401.01335); official code ``uclaml/SPIN``
(``spin/alignment/trainer.py::spin_loss``; ``../shared/methods/dpo_spin.md``).

Iteration scheme (only an SFT set ``{(x, y_real)}`` is needed; ``theta_0`` = the SFT model)::

    for t = 0, 1, 2, ...:
      1. generate y_gen ~ pi_{theta_t}(. | x); pairs: chosen = y_real, rejected = y_gen
      2. start the policy at theta_t, freeze a copy of theta_t as the opponent (reference) and
         minimize L_SPIN over the pairs, giving theta_{t+1}
      3. theta_{t+1} is the next iteration's generator and opponent

Loss: the DPO algebra with the opponent as reference (:func:`curriculax.rl.dpo.loss`), sequence
log-probs summed over response tokens (``average_log_prob=False`` in the repo)::

    z = [s_theta(y_real) - s_t(y_real)] - [s_theta(y_gen) - s_t(y_gen)]
    sigmoid: L = mean -log sigmoid(beta z)        hinge: L = mean max(0, 1 - beta z)

Each iteration starts at ``L = log 2`` (policy == opponent). At ``pi_theta = p_data`` the
expected gradient vanishes (the paper's fixed point), so the scheme stops improving once the
model's samples are indistinguishable from the human data.

Defaults (``default_config``, official configs ``config_iter{1,2}.yaml`` and scripts): beta 0.1,
sigmoid loss, RMSprop lr 5e-7, linear schedule with warmup ratio 0.1, global batch 64,
max length 1024 (prompt 512), 3 epochs per iteration; the paper reports 4 iterations (iter0-3).
The official repo also mixes the previous iteration's synthetic pairs into each iteration's data.
In the training config these are ``rl.spin_beta``, ``rl.spin_loss`` and
``rl.spin_steps_per_iteration`` (the in-jit step, :func:`curriculax.rl.preference.make_spin_step`,
counts iterations in optimizer steps, not epochs, and samples fresh generations every step; its
optimizer state and schedule run on across iterations, where the official scripts restart them).

Usage::

    loss, metrics = spin.loss(s_real, s_gen, sg(opp_real), sg(opp_gen), beta=0.1)
    fresh = spin.is_iteration_start(step, steps_per_iteration)   # opponent <- policy here
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from curriculax.rl import dpo

KINDS = ("sigmoid", "hinge")  # the official spin_loss supports these two


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        beta=0.1,
        kind="sigmoid",
        iterations=4,  # paper: iter0..iter3
        # One iteration = epochs_per_iteration passes over the iteration's pairs in the official
        # scripts (iter1's script overrides 3 -> 6); this repo's step counts optimizer steps.
        steps_per_iteration=100,
        epochs_per_iteration=3,
        learning_rate=5e-7,
        optimizer="rmsprop",
        lr_schedule="linear",
        warmup_ratio=0.1,
        global_batch_size=64,  # 8 per device x 8 GPUs
        max_length=1024,
        max_prompt_length=512,
    ))


def loss(policy_real_B, policy_generated_B, opponent_real_B, opponent_generated_B, *,
         beta: float = 0.1, kind: str = "sigmoid", weights_B=None):
    """SPIN loss over pairs: :func:`dpo.loss` with chosen = gold, rejected = the opponent's sample.

    Sequence log-probs ``[B]``; the opponent's (``theta_t``) should carry no gradient.
    ``weights_B`` and the returned ``(loss, metrics)`` as :func:`dpo.loss`.
    """
    dpo.check_kind(kind, "rl.spin_loss", KINDS)
    return dpo.loss(policy_real_B, policy_generated_B, opponent_real_B, opponent_generated_B,
                    beta=beta, kind=kind, weights_B=weights_B)


def iteration(step, steps_per_iteration: int) -> jax.Array:
    """Index ``t`` of the opponent ``theta_t`` that (0-based) optimizer step ``step`` trains on."""
    return jnp.asarray(step) // steps_per_iteration


def is_iteration_start(step, steps_per_iteration: int) -> jax.Array:
    """True at the first step of an iteration: the opponent must equal the current policy."""
    return jnp.asarray(step) % steps_per_iteration == 0
