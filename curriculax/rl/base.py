"""The RL policy-loss protocol: per-token losses from log-probs and per-response signals.

A policy loss is ``token_loss(logp, old_logp, signals, config) -> [B,T]`` where ``B`` counts
responses (prompts x group), ``logp`` are the trained policy's log-probs of the sampled tokens
(with gradient), ``old_logp`` the rollout policy's (no gradient) and ``signals`` the per-response
:class:`Signals`. The RL step masks, adds the optional KL term and aggregates
(:func:`curriculax.rl.grpo.aggregate`), so a loss module holds only its formula. Losses are
registered by name (config field ``rl.loss``), like objectives and curricula.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from flax import struct

from curriculax.registry import Registry


@struct.dataclass
class Signals:
    """What the step knows about each sampled response, ``[B]`` each."""

    advantage: jax.Array  # group-normalized advantage (rl.grpo.advantages)
    reward: jax.Array  # the scalar reward
    correct: jax.Array  # bool: reward >= rl.success_threshold
    group_accuracy: jax.Array  # fraction of correct responses in this response's group


class PolicyLoss(NamedTuple):
    token_loss: Callable[[jax.Array, jax.Array, Signals, Any], jax.Array]
    default_config: Callable[[], Any] | None = None


_REGISTRY: Registry[PolicyLoss] = Registry("RL policy loss", "rl.loss")
register = _REGISTRY.register
get = _REGISTRY.get
names = _REGISTRY.names
