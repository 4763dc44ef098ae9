"""Counter-based Gumbel noise: a pure function of (rng key, row, column).

Why not ``jax.random.gumbel``?  The fused LM-head kernels never hold a full
``[N, V]`` logits row in memory: they walk the vocabulary in blocks whose size
depends on the implementation (XLA chunks, Triton tiles, TPU tiles).  For
Gumbel-max sampling to give *the same token* on every path, the noise added to
logit ``(n, v)`` must not depend on how the ``[N, V]`` grid was tiled.  A
counter-based hash of ``(key, n, v)`` has that property; ``jax.random`` does
not expose such a per-element counter inside Pallas kernels.

Construction (all arithmetic on int32 with two's-complement wraparound, so it
lowers unchanged to XLA, Triton and Mosaic, none of which need unsigned types):

* ``k0, k1 = jax.random.bits(key, (2,), uint32)`` -- one key derivation per call.
* row hash   ``r(n)   = fmix32((n * 0x9E3779B1 + k1) ^ k0)``      (``[N]``, host side)
* cell hash  ``x(n,v) = fmix32(r(n) ^ (v * 0x85EBCA77))``           (in the kernels)
* uniform    ``u = min(((x >>> 8) + 0.5) * 2**-24, 1 - 2**-24)``  in the open interval (0, 1)
  (in float32 the top value would round to exactly 1, i.e. ``g = +inf``)
* Gumbel     ``g = -log(-log(u))``

``fmix32`` is MurmurHash3's 32-bit finalizer (a bijection with full avalanche).
The 24-bit uniform resolution bounds ``g`` to about [-2.8, 16.6]; that is far
outside the range that matters for sampling from a softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["fmix32", "noise_row_hash", "gumbel_from_hash", "gumbel_noise", "token_rows"]


def _i32(c: int) -> int:
    """Reinterpret an unsigned 32-bit constant as a signed int32 Python int."""
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= (1 << 31) else c


_M1 = _i32(0x85EBCA6B)
_M2 = _i32(0xC2B2AE35)
_GOLDEN = _i32(0x9E3779B1)
_COL = _i32(0x85EBCA77)


def _shr(x: jax.Array, s: int) -> jax.Array:
    return lax.shift_right_logical(x, jnp.asarray(s, x.dtype))


def fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3 fmix32 on int32 bit patterns (wraparound multiply)."""
    x = x ^ _shr(x, 16)
    x = x * jnp.int32(_M1)
    x = x ^ _shr(x, 13)
    x = x * jnp.int32(_M2)
    x = x ^ _shr(x, 16)
    return x


def noise_row_hash(rng: jax.Array, num_rows: int, rows: jax.Array | None = None) -> jax.Array:
    """Per-row hash ``r(n)`` (int32 ``[num_rows]``) derived from a PRNG key.

    ``rows`` (int32 ``[num_rows]``, default ``arange(num_rows)``) are the counters ``n``: give
    each row its index in a larger batch and any subset of that batch draws the noise the
    whole batch would (gradient-accumulation micro-batches). Accepts typed keys
    (``jax.random.key``) and raw uint32 keys (``jax.random.PRNGKey``).
    """
    kbits = jax.random.bits(rng, (2,), jnp.uint32)
    k = lax.bitcast_convert_type(kbits, jnp.int32)
    if rows is None:
        rows = jnp.arange(num_rows, dtype=jnp.int32)
    elif rows.shape != (num_rows,):
        raise ValueError(f"sample_rows must have shape ({num_rows},), got {rows.shape}")
    rows = rows.astype(jnp.int32)
    return fmix32((rows * jnp.int32(_GOLDEN) + k[1]) ^ k[0])


def gumbel_from_hash(row_hash: jax.Array, cols: jax.Array) -> jax.Array:
    """Gumbel(0, 1) noise for the broadcast grid ``row_hash x cols`` (float32).

    ``row_hash`` is int32 ``[R, 1]`` (from :func:`noise_row_hash`), ``cols`` is
    the int32 *global* vocabulary index, ``[1, C]``.  Only elementwise int32 /
    float32 ops: usable inside Pallas kernels.
    """
    x = fmix32(row_hash ^ (cols * jnp.int32(_COL)))
    u = (_shr(x, 8).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-24)
    # 2**24 - 0.5 is not a float32 (it rounds to 2**24): without the clamp the top hash value gives
    # u == 1 and g = +inf, which wins the argmax whatever the logit (p = 2**-24 per cell)
    u = jnp.minimum(u, jnp.float32(1.0 - 2.0**-24))
    return -jnp.log(-jnp.log(u))


def gumbel_noise(rng: jax.Array, num_rows: int, num_cols: int) -> jax.Array:
    """Materialized ``[num_rows, num_cols]`` noise (reference / tests only)."""
    rh = noise_row_hash(rng, num_rows)[:, None]
    cols = jnp.arange(num_cols, dtype=jnp.int32)[None, :]
    return gumbel_from_hash(rh, cols)


def token_rows(rows_B: jax.Array, seq_len: int) -> jax.Array:
    """``[B,T]`` noise counters of the tokens of batch rows ``rows_B``: ``row * T + t``, the
    flattened position in the full batch (``fused_lm_head(sample_rows=...)``)."""
    return rows_B.astype(jnp.int32)[:, None] * seq_len + jnp.arange(seq_len, dtype=jnp.int32)
