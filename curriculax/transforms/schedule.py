"""Scheduled scalars for input-side transforms: a ratio that follows the step or the curriculum.

A transform's config names its scalar's ``schedule``; :func:`scheduled_value` evaluates it
inside the jitted step from ``ctx.step`` / ``ctx.total_steps``:

* ``"constant"``: ``value``.
* ``"linear_warmup"``: the Masked Thought rule ``min(value * step / (total * warmup_ratio + 1), value)``.
* ``"linear"``, ``"cosine"``, ``"zerosearch"``: the shared library
  :func:`curriculax.curriculum.schedules.schedule` from ``start`` to ``value`` over the first
  ``warmup_ratio * total`` steps (then held), with the config's ``schedule_kwargs``
  (e.g. ``base`` for ZeroSearch).

``from_curriculum`` (non-empty) instead reads the scalar from the curriculum state
(``ctx.curriculum[key]`` or ``ctx.curriculum.key``), so a curriculum may learn it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

LOCAL = ("constant", "linear_warmup")


def _from_state(state, key: str):
    if state is None:
        raise ValueError(f"from_curriculum={key!r} but the curriculum has no state.")
    if isinstance(state, Mapping):
        return state[key]
    return getattr(state, key)


def scheduled_value(value: float, step, total_steps: int, *, schedule: str = "constant",
                    start: float = 0.0, warmup_ratio: float = 1.0, schedule_kwargs=None,
                    curriculum=None, from_curriculum: str = "") -> jnp.ndarray:
    """The scalar at ``step`` (float32 ``[]``); see the module docstring."""
    if from_curriculum:
        return jnp.asarray(_from_state(curriculum, from_curriculum), jnp.float32)
    if schedule == "constant":
        return jnp.asarray(value, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    if schedule == "linear_warmup":
        return jnp.minimum(value * step / (total_steps * warmup_ratio + 1.0), value)
    from curriculax.curriculum import schedules  # shared library, imported lazily

    horizon = max(total_steps * warmup_ratio, 1.0)
    return schedules.schedule(schedule, step, horizon, start, value, **dict(schedule_kwargs or {}))


def from_config(cfg, value_key: str, ctx) -> jnp.ndarray:
    """``scheduled_value`` with every field read from a transform config."""
    return scheduled_value(
        float(cfg[value_key]), ctx.step, ctx.total_steps, schedule=cfg.get("schedule", "constant"),
        start=float(cfg.get("start", 0.0)), warmup_ratio=float(cfg.get("warmup_ratio", 1.0)),
        schedule_kwargs=cfg.get("schedule_kwargs", None), curriculum=ctx.curriculum,
        from_curriculum=cfg.get("from_curriculum", ""))
