"""Shared in-jit building blocks for curricula: row sampling, grouping, tracked losses.

Every function is pure, shape-static and at most O(E) per call (E = bank rows), so it runs
inside the jitted step on any mesh. Where a method needs an ordering of the bank (easy to hard,
rows grouped by arm), the ordering is computed once (``init`` or a rare ``lax.cond`` branch)
and each step then costs O(B) gathers: ``order[randint(0, count)]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct


def with_defaults(config, defaults: ml_collections.ConfigDict, *, strict: bool = True,
                  field: str = "config.curriculum") -> ml_collections.ConfigDict:
    """``defaults`` overridden by the fields ``config`` sets (``config`` may be ``None``).

    ``strict``: a field ``defaults`` does not know is an error naming it (a typo such as
    ``alpah`` would otherwise fall back to the default silently); ``name`` and the trainer's
    ``total_steps`` are always allowed."""
    merged = defaults.to_dict()
    if config is not None:
        given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        unknown = sorted(set(given) - set(merged) - {"name", "total_steps"})
        if strict and unknown:
            name = given.get("name") or merged.get("name", "")
            raise ValueError(f"{field} has keys {unknown} unknown to {name!r}; known: "
                             f"{sorted(set(merged) - {'name'})}.")
        merged.update(given)
    return ml_collections.ConfigDict(merged)


def require_total_steps(cfg, method: str) -> int:
    total = int(cfg.get("total_steps", 0) or 0)
    if total <= 0:
        raise ValueError(
            f"curriculum {method!r} needs config.curriculum.total_steps > 0. The trainer fills it "
            "with config.steps when it is 0 or absent; outside the trainer pass it explicitly.")
    return total


def random_ranks(rng, n: int) -> jax.Array:
    """A uniformly random permutation of ``0..n-1`` used as a tie-break key [n] int32."""
    return jax.random.permutation(rng, jnp.arange(n, dtype=jnp.int32))


def sort_order(*keys) -> jax.Array:
    """Row order sorting by ``keys`` (first key primary), as int32 [E]. Keys must break all ties
    (pass :func:`random_ranks` or ``arange`` last) so the order is deterministic."""
    return jnp.lexsort(tuple(reversed(keys))).astype(jnp.int32)


def uniform_prefix(rng, order, count, batch_size: int) -> jax.Array:
    """``batch_size`` rows drawn uniformly with replacement from ``order[:count]`` (O(B))."""
    count = jnp.maximum(count, 1)
    pos = jax.random.randint(rng, (batch_size,), 0, count, dtype=jnp.int32)
    return order[pos]


def _draw(u01_B, w):
    """Inverse-CDF positions of ``u01_B`` in ``[0, 1)`` over weights ``w`` [n] or [B, n] (>= 0,
    positive totals). ``u * total`` is kept below the total, where float32 rounding could put it
    and draw a trailing zero-weight entry."""
    cdf = jnp.cumsum(w, axis=-1)
    total = cdf[..., -1]
    u = jnp.minimum(u01_B * total, jnp.nextafter(total, 0.0))
    if w.ndim == 1:
        return jnp.searchsorted(cdf, u, side="right")
    return jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u)


def categorical_rows(rng, weights, batch_size: int, *, block: int = 4096) -> jax.Array:
    """Rows drawn with replacement with probability proportional to ``weights`` [E] >= 0.

    Inverse-CDF sampling; past ``block`` rows in two levels, a block of ``block`` rows by its
    weight sum, then a row inside it. One float32 cumulative sum over all ``E`` rows would stop
    growing past 2^24 (later rows never drawn) and put each row's interval off by ~``E * 2^-24``
    of its width (6% at a million rows); per level the error is ``max(E / block, block) * 2^-24``.
    O(E) for the block sums, O(B * block) for the draws. A row of zero weight is never drawn; if
    all weights are zero it draws uniformly.
    """
    w = jnp.maximum(weights.astype(jnp.float32), 0.0)
    w = jnp.where(jnp.sum(w) > 0, w, jnp.ones_like(w))
    e = w.shape[0]
    if e <= block:
        return _draw(jax.random.uniform(rng, (batch_size,), jnp.float32), w).astype(jnp.int32)
    k_block, k_row = jax.random.split(rng)
    w_KxS = jnp.pad(w, (0, -e % block)).reshape(-1, block)
    chosen_B = _draw(jax.random.uniform(k_block, (batch_size,), jnp.float32), w_KxS.sum(-1))
    within_B = _draw(jax.random.uniform(k_row, (batch_size,), jnp.float32), w_KxS[chosen_B])
    return (chosen_B * block + within_B).astype(jnp.int32)


def gumbel_top_k(rng, logits, k: int) -> jax.Array:
    """``k`` distinct rows, sampled without replacement with probability ∝ ``exp(logits)``
    (the Gumbel-top-k trick: the same law as sequential weighted draws without replacement).
    Rows with ``-inf`` logits come last."""
    g = jax.random.gumbel(rng, logits.shape, jnp.float32)
    _, idx = jax.lax.top_k(logits + g, k)
    return idx.astype(jnp.int32)


@struct.dataclass
class Groups:
    """Rows sorted by group (shuffled within a group): group ``a`` is
    ``order[start[a] : start[a] + size[a]]``. Rows with ``group == -1`` sort last."""

    order: jax.Array  # [E] int32
    start: jax.Array  # [K] int32
    size: jax.Array  # [K] int32


def make_groups(rng, group, num_groups: int) -> Groups:
    e = group.shape[0]
    key = jnp.where(group < 0, num_groups, group).astype(jnp.int32)
    order = sort_order(key, random_ranks(rng, e))
    size = jax.ops.segment_sum(jnp.ones((e,), jnp.int32), key, num_segments=num_groups + 1)
    size = size[:num_groups]
    start = jnp.cumsum(size) - size
    return Groups(order=order, start=start.astype(jnp.int32), size=size.astype(jnp.int32))


def sample_in_groups(rng, groups: Groups, arms, cursor=None) -> jax.Array:
    """One row per entry of ``arms`` [B]: uniform inside the arm, or -- given ``cursor`` [K] --
    the arm's next rows in its (shuffled once) list, wrapping around like an epoch per arm."""
    size = jnp.maximum(groups.size[arms], 1)
    if cursor is None:
        pos = jax.random.randint(rng, arms.shape, 0, size, dtype=jnp.int32)
    else:
        onehot = arms[:, None] == jnp.arange(groups.size.shape[0])[None, :]
        earlier = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # rank within arm
        pos = (cursor[arms] + earlier) % size
    return groups.order[groups.start[arms] + pos]


def segment_mean(values, segments, num_segments: int, where=None):
    """Per-segment ``(mean, count)`` of ``values`` [B] (mean 0 where the count is 0)."""
    w = jnp.ones_like(values, jnp.float32) if where is None else where.astype(jnp.float32)
    total = jax.ops.segment_sum(values.astype(jnp.float32) * w, segments, num_segments=num_segments)
    count = jax.ops.segment_sum(w, segments, num_segments=num_segments)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0), count


def track_loss(ema, seen, indices, loss, decay: float):
    """Exponential moving average of each row's loss; rows drawn twice in a batch use their
    batch mean; a row's first value is taken as is. Returns ``(ema, seen)``.

    O(B^2 + B): the batch's rows are gathered, updated and scattered back (duplicates write the
    same value), so nothing of size E is rebuilt per step."""
    loss = loss.astype(jnp.float32)
    same = (indices[:, None] == indices[None, :]).astype(jnp.float32)  # [B, B]
    batch_mean = jnp.sum(same * loss[None, :], axis=1) / jnp.sum(same, axis=1)  # no matmul: exact
    new = jnp.where(seen[indices], decay * ema[indices] + (1.0 - decay) * batch_mean, batch_mean)
    return ema.at[indices].set(new), seen.at[indices].set(True)


def fill_unseen(ema, seen):
    """``ema`` with unseen rows set to the mean over seen rows (or 0 when none is seen)."""
    n = jnp.sum(seen)
    mean = jnp.sum(jnp.where(seen, ema, 0.0)) / jnp.maximum(n, 1)
    return jnp.where(seen, ema, mean)


def masked_quantile(values, mask, q, iters: int = 32):
    """The ``q``-quantile (lower; no interpolation) of ``values[mask]`` by bisection: ``iters``
    masked counts over E rows instead of a sort. Returns the smallest ``x`` found with
    ``#{v <= x} >= q * n``."""
    n = jnp.sum(mask)
    big = jnp.finfo(jnp.float32).max
    lo = jnp.min(jnp.where(mask, values, big))
    hi = jnp.max(jnp.where(mask, values, -big))
    target = jnp.ceil(q * n)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = jnp.sum(mask & (values <= mid)) >= target
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return hi
