"""Uniform sampling with replacement: the baseline every curriculum is compared against.

State: nothing but a counter of draws per example (useful for coverage plots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from curriculax.curriculum.base import BankMeta, Curriculum, Feedback, register, uniform_weights


@struct.dataclass
class UniformState:
    counts: jax.Array  # [E] int32 how often each example was drawn


def init(config, meta: BankMeta) -> UniformState:
    del config
    return UniformState(counts=jnp.zeros((meta.num_examples,), jnp.int32))


def sample(state: UniformState, rng, meta: BankMeta, batch_size: int):
    del state
    idx = jax.random.randint(rng, (batch_size,), 0, meta.num_examples, dtype=jnp.int32)
    return idx, uniform_weights(batch_size)


def update(state: UniformState, feedback: Feedback) -> UniformState:
    return UniformState(counts=state.counts.at[feedback.indices].add(1))


def summarize(state: UniformState):
    return {"coverage": jnp.mean(state.counts > 0)}


uniform = register("uniform", Curriculum(init, sample, update, summarize, pool_safe=True))
