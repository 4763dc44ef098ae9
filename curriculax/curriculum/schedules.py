"""Step schedules as pure ``jnp`` functions of the step, for transforms and objectives.

* :func:`zerosearch` -- ZeroSearch (Sun et al. 2025, arXiv 2505.04588; code
  ``Alibaba-NLP/ZeroSearch``, ``dynamic_threshold``) exponential curriculum of the noise
  probability: ``p_i = p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s)`` for ``i < m`` and
  ``p_e`` for ``i >= m``. Defaults ``p_s = 0, p_e = 0.5, b = 4`` (README commands; ``m`` = the
  run's total steps). ``b -> 1`` is the linear limit (used when ``|b - 1| < 1e-6``).
  A rollout's search call is *noisy* when ``u <= p_i`` for ``u ~ U(0, 1)``: :func:`noisy`.
* :func:`linear`, :func:`cosine` -- ``start -> end`` over ``total_steps`` (held after).
* :func:`window` -- 1.0 while ``a <= step / total_steps <= b`` else 0.0: CLIMB's objective
  curriculum (each task unit is active in its window; the loss sums the active units).
* :func:`schedule` -- the same by name (``"zerosearch" | "linear" | "cosine" | "constant"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("zerosearch", "linear", "cosine", "constant")


def _progress(step, total_steps):
    t = jnp.asarray(step, jnp.float32)
    return jnp.clip(t / max(float(total_steps), 1e-9), 0.0, 1.0)


def zerosearch(step, total_steps: int, start: float = 0.0, end: float = 0.5,
               base: float = 4.0) -> jax.Array:
    """ZeroSearch ``p_i`` (float32); ``i >= m`` gives ``end``."""
    x = _progress(step, total_steps)
    if abs(base - 1.0) < 1e-6:
        frac = x
    else:
        frac = (jnp.power(jnp.float32(base), x) - 1.0) / (base - 1.0)
    return jnp.asarray(start + frac * (end - start), jnp.float32)


def linear(step, total_steps: int, start: float = 0.0, end: float = 1.0) -> jax.Array:
    return jnp.asarray(start + _progress(step, total_steps) * (end - start), jnp.float32)


def cosine(step, total_steps: int, start: float = 0.0, end: float = 1.0) -> jax.Array:
    """Half-cosine from ``start`` to ``end``: ``start + (end - start)(1 - cos(pi x)) / 2``."""
    x = _progress(step, total_steps)
    return jnp.asarray(start + (end - start) * 0.5 * (1.0 - jnp.cos(jnp.pi * x)), jnp.float32)


def window(step, total_steps: int, begin: float, end: float) -> jax.Array:
    """1.0 while ``begin <= step / total_steps <= end`` (CLIMB objective units), else 0.0."""
    x = jnp.asarray(step, jnp.float32) / max(float(total_steps), 1e-9)
    return ((x >= begin) & (x <= end)).astype(jnp.float32)


def noisy(u, p) -> jax.Array:
    """ZeroSearch's decision: a simulated search result is noisy iff ``u <= p``."""
    return jnp.asarray(u) <= jnp.asarray(p)


def schedule(kind: str, step, total_steps: int, start: float, end: float, **kw) -> jax.Array:
    if kind == "zerosearch":
        return zerosearch(step, total_steps, start, end, **kw)
    if kind == "linear":
        return linear(step, total_steps, start, end)
    if kind == "cosine":
        return cosine(step, total_steps, start, end)
    if kind == "constant":
        return jnp.full((), end, jnp.float32)
    raise ValueError(f"schedule kind {kind!r}: choose one of {KINDS}.")
