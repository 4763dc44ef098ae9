"""The curriculum protocol: a namespace of pure functions over a state pytree.

Like an optax ``GradientTransformation``, a curriculum is three pure functions::

    init(config, meta) -> state
    sample(state, rng, meta, batch_size) -> (indices [B] int32, weights [B] float32)
    update(state, feedback) -> state

plus ``summarize(state) -> {name: scalar or small array}`` for logs and plots, and an optional
``probe`` that asks the step for forward-only losses on chosen rows. They run inside
the jitted train step, so ``state`` must be a pytree of arrays (hyper-parameters read at
``init`` may sit in static dataclass fields) and nothing may call back to the host.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from curriculax.registry import Registry


@struct.dataclass
class BankMeta:
    """What a curriculum may know about the example bank.

    Array fields are per-example and live on the devices next to the bank; the rest is static.
    """

    category: jax.Array  # [E] int32 category index
    difficulty: jax.Array  # [E] int32
    num_examples: int = struct.field(pytree_node=False)
    category_names: tuple[str, ...] = struct.field(pytree_node=False)
    difficulty_min: int = struct.field(pytree_node=False)
    difficulty_max: int = struct.field(pytree_node=False)

    @property
    def num_categories(self) -> int:
        return len(self.category_names)


@struct.dataclass
class Feedback:
    """Per-example signals the train step already computed, for ``update``.

    ``advantage``/``reward`` are ``None`` on supervised steps; RL steps fill them.
    """

    indices: jax.Array  # [B] int32 bank rows of this batch
    loss: jax.Array  # [B] mean token NLL over the loss mask (before the update)
    token_accuracy: jax.Array  # [B] fraction of loss tokens predicted by argmax
    category: jax.Array  # [B] int32
    difficulty: jax.Array  # [B] int32
    weights: jax.Array  # [B] the weights ``sample`` returned
    step: jax.Array  # [] int32 global step
    advantage: jax.Array | None = None  # [B]
    reward: jax.Array | None = None  # [B]
    probe_indices: jax.Array | None = None  # [P] rows the curriculum asked to probe
    probe_loss: jax.Array | None = None  # [P] their mean token NLL (forward only, no update)


class Curriculum(NamedTuple):
    init: Callable[[Any, BankMeta], Any]
    sample: Callable[[Any, jax.Array, BankMeta, int], tuple[jax.Array, jax.Array]]
    update: Callable[[Any, Feedback], Any]
    summarize: Callable[[Any], dict[str, jax.Array]] = lambda state: {}
    # Optional: rows to evaluate (forward only) every step, e.g. held-out rows whose loss
    # drives a mixture (Skill-it). ``probe(state, rng, meta) -> indices [P]``; their losses
    # arrive in ``Feedback.probe_loss``.
    probe: Callable[[Any, jax.Array, BankMeta], jax.Array] | None = None
    # Whether it works on streamed pools (config.data.pool_size > 0), where every step's bank
    # holds other rows: only methods that keep no per-row state and build no order at init.
    pool_safe: bool = False


_REGISTRY: Registry[Curriculum] = Registry("curriculum", "curriculum.name")
register = _REGISTRY.register
get = _REGISTRY.get  # the curriculum registered under a name (config field curriculum.name)
names = _REGISTRY.names


def uniform_weights(batch_size: int) -> jax.Array:
    return jnp.ones((batch_size,), jnp.float32)
