"""Input-side transforms: pure functions of ``(batch, rng, context)`` run inside the step.

A transform rewrites the gathered batch before the forward pass (mask reasoning tokens, cut a
response prefix, corrupt spans...). ``context`` carries what a schedule may depend on: the
global step, the planned number of steps, the curriculum state and the transform's own config
(``config.transform_config.<name>``, or ``None`` for the module defaults).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from curriculax.registry import Registry


@struct.dataclass
class TransformContext:
    step: jax.Array  # [] int32 global step
    total_steps: int = struct.field(pytree_node=False)
    curriculum: Any = None  # the curriculum's state (a transform may read e.g. a learned ratio)
    config: Any = struct.field(pytree_node=False, default=None)
    mask_id: int | None = struct.field(pytree_node=False, default=None)
    pad_id: int = struct.field(pytree_node=False, default=0)
    bos_id: int | None = struct.field(pytree_node=False, default=None)
    # [B] int32: the examples' positions in the step's full batch (a gradient-accumulation
    # micro-batch holds a strided subset); None: arange(B). Randomness drawn per row from them
    # (row_uniform, sample_rows) is the same whatever grad_accum.
    rows: Any = None
    # How the step places the LM-head kernel on its mesh (``lm_head_stats``' mesh, rules and
    # shard_map), for transforms that run the head themselves (scheduled sampling's pass 1).
    mesh: Any = struct.field(pytree_node=False, default=None)
    rules: tuple = struct.field(pytree_node=False, default=())
    shard_map: str = struct.field(pytree_node=False, default="auto")


def batch_rows(ctx: TransformContext, batch_size: int) -> jax.Array:
    """``ctx.rows``, or ``arange(batch_size)`` outside gradient accumulation."""
    return jnp.arange(batch_size, dtype=jnp.int32) if ctx.rows is None else ctx.rows


def row_uniform(rng, rows_B, seq_len: int) -> jax.Array:
    """``[B,T]`` uniforms in [0, 1) drawn per batch row from ``fold_in(rng, row)``: a row gets
    the same numbers whichever micro-batch holds it."""
    return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(rng, r), (seq_len,)))(rows_B)


class Transform(NamedTuple):
    apply: Callable[[Any, jax.Array, TransformContext], Any]
    # Optional model-level hook (e.g. scheduled sampling): ``embed(model, batch, rng, ctx) ->
    # inputs_embeds [B,T,d]`` runs inside the loss and replaces the token-embedding lookup of the
    # trained forward pass. At most one configured transform may define it.
    embed: Callable[[Any, Any, jax.Array, TransformContext], jax.Array] | None = None


def transform_config(ctx: TransformContext, defaults, name: str):
    """``config.transform_config.<name>`` over the module's ``defaults``: a partial config keeps
    the other defaults (not the schedule helpers' fallbacks), and an unknown key is an error."""
    from curriculax.curriculum.sampling import with_defaults

    return with_defaults(ctx.config, defaults, field=f"config.transform_config.{name}")


_REGISTRY: Registry[Transform] = Registry("transform", "config.transforms entry")
register = _REGISTRY.register
get = _REGISTRY.get
names = _REGISTRY.names
