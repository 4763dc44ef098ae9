"""Pure-JAX LM-head statistics: the blockwise math, the naive reference and the
chunked (memory-light) implementation.

Notation (one token row; ``V`` vocabulary columns)::

    r = h @ W                       raw logits (float32 accumulation)
    z = c * tanh(r / c)             capped logits (identity when no softcap)
    lse = logsumexp(z),  p = softmax(z),  log p = z - lse
    target_logprob = z[y] - lse
    entropy        = -sum p log p = lse - sum p z
    kl (policy_ref) = KL(p || q) = sum p (log p - log q)      q = softmax(z_ref)
    kl (ref_policy) = KL(q || p) = sum q (log q - log p)
    sampled        = argmax_v (z_v / T + g_v)               g = counter Gumbel noise
    sampled_logprob = log p[sampled]   (temperature-1 policy, capped logits)

**Online (blockwise) form.**  Walking the vocabulary in blocks, each row keeps
an :class:`OnlineState` relative to its running max ``m``::

    s = sum e^{z-m}              a = sum e^{z-m} (z-m)       zt = z[y] (if seen)
    mr, sr                       (same for the reference logits)
    b = sum e^{z-m} ((z-m) - (zr-mr))     [policy_ref]
      = sum e^{zr-mr} ((zr-mr) - (z-m))   [ref_policy]
    best, idx, bz                (running Gumbel-max score, its column, its z)

Two states are combined exactly by :func:`merge` (rescale by ``e^{m_old - m}``
and shift the ``(z - m)`` terms), which is also how per-split partial states of
the GPU kernel are reduced.  At the end (:func:`finalize`)::

    lse = m + log s,   H = log s - a/s,   KL = b/s - log s + log sr  (policy_ref)

Keeping ``a`` and ``b`` *relative to the running maxima* avoids the
cancellation of ``lse - sum p z`` when logits are large (softcap 30, say).

**Backward.**  For per-row cotangents ``g_*`` the gradient w.r.t. the capped
logits is (see :func:`tile_dlogits`)::

    dz = p * (c0 - g_H log p + g_kl (log p - log q))        [policy_ref term]
         + g_tl 1[v = y] + g_sl 1[v = sampled] - g_kl q      [ref_policy term]
    c0 = g_lse - g_tl - g_sl - g_H H - g_kl KL (policy_ref) + g_kl (ref_policy)

then ``dr = dz * (1 - (z/c)^2)`` through the softcap, ``d_h = dr @ W^T`` and
``d_W = h^T @ dr``.  Each fused backend recomputes ``z`` blockwise and applies
this per tile; none ever holds ``[N, V]``.

The functions on tiles take ``[R, C]`` logits and ``[R, 1]`` per-row vectors
and use only elementwise ops, row reductions and ``where`` so that the *same
code* runs inside the Pallas GPU / TPU kernels (results then agree to rounding
with ``xla_chunked``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from curriculax.kernels.gumbel import gumbel_from_hash

# Finite stand-in for -inf on masked columns: exp(NEG - m) == 0 and
# 0 * (NEG - m) == 0 (no inf - inf / 0 * inf NaNs).
NEG = -1e30
_INT_MAX = 2**31 - 1

KL_DIRECTIONS = ("policy_ref", "ref_policy")


@dataclasses.dataclass(frozen=True)
class HeadOpts:
    """Static (hashable) options shared by all implementations."""

    softcap: Optional[float] = None
    temperature: float = 1.0
    with_kl: bool = False
    kl_direction: str = "policy_ref"
    with_sample: bool = False
    # the head (and reference head) stored [V, d] -- e.g. a tied embedding -- instead of [d, V]
    w_vd: bool = False


class OnlineState(NamedTuple):
    """Per-row running statistics; every field ``[R, 1]`` (None if unused)."""

    m: jax.Array
    s: jax.Array
    a: jax.Array
    zt: jax.Array
    mr: Optional[jax.Array] = None
    sr: Optional[jax.Array] = None
    b: Optional[jax.Array] = None
    best: Optional[jax.Array] = None
    idx: Optional[jax.Array] = None
    bz: Optional[jax.Array] = None


class RowGrad(NamedTuple):
    """Per-row inputs of the backward tile computation; every field ``[R, 1]``."""

    lse: jax.Array
    c0: jax.Array
    g_h: jax.Array
    g_tl: jax.Array
    targets: jax.Array  # int32, -1 for masked rows
    lse_r: Optional[jax.Array] = None
    g_kl: Optional[jax.Array] = None
    g_sl: Optional[jax.Array] = None
    sidx: Optional[jax.Array] = None  # int32


# ----------------------------------------------------------------------------
# Blockwise math (shared with the Pallas kernels)
# ----------------------------------------------------------------------------


def cap(r: jax.Array, softcap: Optional[float]) -> jax.Array:
    """Gemma-2 style logit softcap ``c * tanh(r / c)`` (identity if None)."""
    if softcap is None:
        return r
    return softcap * jnp.tanh(r * (1.0 / softcap))


def init_state(rows: int, opts: HeadOpts) -> OnlineState:
    f = lambda v: jnp.full((rows, 1), v, jnp.float32)  # noqa: E731
    kl = opts.with_kl
    smp = opts.with_sample
    return OnlineState(
        m=f(NEG), s=f(0.0), a=f(0.0), zt=f(0.0),
        mr=f(NEG) if kl else None, sr=f(0.0) if kl else None, b=f(0.0) if kl else None,
        best=f(-jnp.inf) if smp else None,
        idx=jnp.zeros((rows, 1), jnp.int32) if smp else None,
        bz=f(0.0) if smp else None,
    )


def _rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _rowmax(x):
    return jnp.max(x, axis=1, keepdims=True)


def tile_state(z, zr, valid, cols, targets, row_hash, opts: HeadOpts) -> OnlineState:
    """Statistics of one ``[R, C]`` tile of capped logits.

    ``valid`` masks columns (``[1, C]`` or ``[R, C]``; False = padding or
    already covered), ``cols`` are global vocab ids ``[1, C]``, ``targets``
    ``[R, 1]`` (int32, -1 = none), ``row_hash`` ``[R, 1]`` (sampling only).
    """
    zs = jnp.where(valid, z, NEG)
    m = _rowmax(zs)
    e = jnp.where(valid, jnp.exp(zs - m), 0.0)
    zm = zs - m
    st = dict(
        m=m, s=_rowsum(e), a=_rowsum(e * zm),
        zt=_rowsum(jnp.where(valid & (cols == targets), zs, 0.0)),
    )
    if opts.with_kl:
        zrs = jnp.where(valid, zr, NEG)
        mr = _rowmax(zrs)
        er = jnp.where(valid, jnp.exp(zrs - mr), 0.0)
        diff = zm - (zrs - mr)
        b = _rowsum(e * diff) if opts.kl_direction == "policy_ref" else _rowsum(er * (-diff))
        st.update(mr=mr, sr=_rowsum(er), b=b)
    if opts.with_sample:
        g = gumbel_from_hash(row_hash, cols)
        score = jnp.where(valid, zs * (1.0 / opts.temperature) + g, -jnp.inf)
        best = _rowmax(score)
        # first column attaining the max (same tie rule as jnp.argmax)
        idx = jnp.min(jnp.where(score == best, cols, _INT_MAX), axis=1, keepdims=True)
        bz = _rowsum(jnp.where(cols == idx, zs, 0.0))
        st.update(best=best, idx=idx, bz=bz)
    return OnlineState(**st)


def merge(x: OnlineState, y: OnlineState, opts: HeadOpts) -> OnlineState:
    """Exact combination of the states of two disjoint column sets (x before y)."""
    m = jnp.maximum(x.m, y.m)
    ax, ay = jnp.exp(x.m - m), jnp.exp(y.m - m)
    dx, dy = x.m - m, y.m - m
    out = dict(
        m=m,
        s=ax * x.s + ay * y.s,
        a=ax * (x.a + dx * x.s) + ay * (y.a + dy * y.s),
        zt=x.zt + y.zt,
    )
    if opts.with_kl:
        mr = jnp.maximum(x.mr, y.mr)
        bx, by = jnp.exp(x.mr - mr), jnp.exp(y.mr - mr)
        drx, dry = x.mr - mr, y.mr - mr
        if opts.kl_direction == "policy_ref":
            b = ax * (x.b + (dx - drx) * x.s) + ay * (y.b + (dy - dry) * y.s)
        else:
            b = bx * (x.b + (drx - dx) * x.sr) + by * (y.b + (dry - dy) * y.sr)
        out.update(mr=mr, sr=bx * x.sr + by * y.sr, b=b)
    if opts.with_sample:
        take = y.best > x.best  # strict: earlier columns win ties
        out.update(
            best=jnp.where(take, y.best, x.best),
            idx=jnp.where(take, y.idx, x.idx),
            bz=jnp.where(take, y.bz, x.bz),
        )
    return OnlineState(**out)


def merge_splits(parts: OnlineState, opts: HeadOpts) -> OnlineState:
    """Fold states stacked on a leading split axis ``[S, R, 1]`` (in column order)."""
    num = parts.m.shape[0]
    acc = jax.tree.map(lambda x: x[0], parts)
    for k in range(1, num):
        acc = merge(acc, jax.tree.map(lambda x, k=k: x[k], parts), opts)
    return acc


def finalize(st: OnlineState, opts: HeadOpts) -> dict:
    """Row statistics (``[R]`` float32 / int32) from a complete state."""
    logs = jnp.log(st.s)
    lse = st.m + logs
    # max_logprob = max_v z_v - lse, computed exactly as target_logprob (z_t - lse): when the
    # target is the argmax, z_t == m bitwise and the two agree, so ``target_logprob >=
    # max_logprob`` is argmax accuracy. (``-log(s)`` equals it in exact arithmetic only: m + log s
    # rounds, and about half of the argmax hits compared as misses.)
    out = dict(lse=lse, target_logprob=st.zt - lse, entropy=logs - st.a / st.s,
               max_logprob=st.m - lse)
    if opts.with_kl:
        logsr = jnp.log(st.sr)
        out["lse_ref"] = st.mr + logsr
        if opts.kl_direction == "policy_ref":
            out["kl_to_ref"] = st.b / st.s - logs + logsr
        else:
            out["kl_to_ref"] = st.b / st.sr - logsr + logs
    if opts.with_sample:
        out["sampled_token"] = st.idx
        out["sampled_logprob"] = st.bz - lse
    return {k: v[:, 0] for k, v in out.items()}


def tile_dlogits(z, zr, valid, cols, rg: RowGrad, opts: HeadOpts) -> jax.Array:
    """Gradient w.r.t. the *raw* logits ``r`` of one ``[R, C]`` tile (float32)."""
    logp = jnp.where(valid, z - rg.lse, 0.0)
    p = jnp.where(valid, jnp.exp(logp), 0.0)
    inner = rg.c0 - rg.g_h * logp
    extra = jnp.where(cols == rg.targets, rg.g_tl, 0.0)
    if opts.with_kl:
        logq = jnp.where(valid, zr - rg.lse_r, 0.0)
        if opts.kl_direction == "policy_ref":
            inner = inner + rg.g_kl * (logp - logq)
        else:
            extra = extra - rg.g_kl * jnp.where(valid, jnp.exp(logq), 0.0)
    if opts.with_sample:
        extra = extra + jnp.where(cols == rg.sidx, rg.g_sl, 0.0)
    dz = p * inner + extra
    if opts.softcap is not None:
        t = z * (1.0 / opts.softcap)
        dz = dz * (1.0 - t * t)
    return jnp.where(valid, dz, 0.0)


def tile_is_live(z, zr, valid, cols, rg: RowGrad, opts: HeadOpts, log_eps: float) -> jax.Array:
    """Gradient filtering (``grad_filter_eps``): int32 1 if the tile's dlogits matter, else 0.

    CCE's rule (``filter_eps``), generalized to every statistic: some softmax probability (of
    either head when a KL is asked for) is ``>= eps``, or the tile holds a row's target or sampled
    token (their one-hot terms).  Every other term of :func:`tile_dlogits` is a multiple of
    ``p`` (or ``p_ref``).  ``valid``: the tile's real rows and columns."""
    hot = (z - rg.lse >= log_eps) | (cols == rg.targets)
    if opts.with_kl:
        hot = hot | (zr - rg.lse_r >= log_eps)
    if opts.with_sample:
        hot = hot | (cols == rg.sidx)
    hot = (hot & valid).astype(jnp.int32)
    return jnp.max(jnp.max(hot, axis=1), axis=0)


def row_grad(stats: dict, cts: dict, targets, sidx, valid, opts: HeadOpts) -> RowGrad:
    """Fold the per-row cotangents into the coefficients of :func:`tile_dlogits`.

    Masked rows get all-zero coefficients, hence zero gradient.
    """
    zero = jnp.zeros_like(stats["lse"])

    def ct(name):
        c = cts.get(name)
        if c is None or c.dtype == jax.dtypes.float0:
            return zero
        return jnp.where(valid, c.astype(jnp.float32), 0.0)

    g_tl, g_lse, g_h = ct("target_logprob"), ct("lse"), ct("entropy")
    c0 = g_lse - g_tl - g_h * stats["entropy"]
    col = lambda x: None if x is None else x[:, None]  # noqa: E731
    g_kl = g_sl = None
    if opts.with_kl:
        g_kl = ct("kl_to_ref")
        c0 = c0 + (-g_kl * stats["kl_to_ref"] if opts.kl_direction == "policy_ref" else g_kl)
    if opts.with_sample:
        g_sl = ct("sampled_logprob")
        c0 = c0 - g_sl
    return RowGrad(
        lse=col(stats["lse"]), c0=col(c0), g_h=col(g_h), g_tl=col(g_tl),
        targets=col(targets), lse_r=col(stats.get("lse_ref")), g_kl=col(g_kl),
        g_sl=col(g_sl), sidx=col(sidx),
    )


def vocab_axis(opts: HeadOpts) -> int:
    return 0 if opts.w_vd else 1


def head_dot(x, w, opts: HeadOpts) -> jax.Array:
    """``x [R, d]`` times the head (``[d, C]``, or ``[C, d]`` with ``w_vd``) -> float32 ``[R, C]``.

    Operands run in ``x``'s dtype (the activations', i.e. the compute dtype), as
    ``Transformer.logits`` does: a float32 head under bf16 compute is cast tile by tile
    inside the kernels, never copied whole."""
    contract = 1 if opts.w_vd else 0
    return lax.dot_general(x, w.astype(x.dtype), (((1,), (contract,)), ((), ())),
                           preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------
# xla_naive: materialized logits (the reference; plain autodiff)
# ----------------------------------------------------------------------------


def naive_stats(h, w, hr, wr, targets, valid, row_hash, opts: HeadOpts) -> dict:
    """Reference statistics from materialized ``[N, V]`` logits (autodiff-able).

    ``targets`` int32 ``[N]`` (-1 on masked rows), ``valid`` bool ``[N]``.
    Returns unmasked row stats (masking is applied by the caller).
    """
    z = cap(head_dot(h, w, opts), opts.softcap)
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = z - lse[:, None]
    p = jnp.exp(logp)
    safe_t = jnp.where(valid, targets, 0)
    out = dict(
        lse=lse,
        target_logprob=jnp.take_along_axis(logp, safe_t[:, None], axis=-1)[:, 0],
        entropy=-jnp.sum(p * logp, axis=-1),
        max_logprob=lax.stop_gradient(jnp.max(logp, axis=-1)),
    )
    if opts.with_kl:
        zr = lax.stop_gradient(cap(head_dot(h if hr is None else hr, wr, opts), opts.softcap))
        logq = jax.nn.log_softmax(zr, axis=-1)
        if opts.kl_direction == "policy_ref":
            out["kl_to_ref"] = jnp.sum(p * (logp - logq), axis=-1)
        else:
            out["kl_to_ref"] = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    if opts.with_sample:
        n, v = z.shape
        g = gumbel_from_hash(row_hash[:, None], jnp.arange(v, dtype=jnp.int32)[None, :])
        tok = jnp.argmax(lax.stop_gradient(z) / opts.temperature + g, axis=-1).astype(jnp.int32)
        out["sampled_token"] = tok
        out["sampled_logprob"] = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    return out


# ----------------------------------------------------------------------------
# xla_chunked: lax.scan over vocabulary chunks
# ----------------------------------------------------------------------------


def default_block_v(num_rows: int, vocab: int, max_elems: int = 1 << 24, max_width: int = 8192) -> int:
    """Default vocab chunk width: a power of two, ``N * chunk <= max_elems`` (one
    float32 ``[N, chunk]`` temporary <= 64 MiB), within [512, max_width], and at
    least 4 chunks so that no temporary is ``[N, V]``-sized. XLA keeps several
    chunk-sized float32 temporaries alive at once (6-10 in a compiled CPU
    forward+backward), so at small N their total can reach about one float32
    ``[N, V]`` (1.14x at N=1024, V=8192 with a KL head); at training sizes the
    ``max_elems`` cap bounds it instead.

    On an H200 (N=8192, d=2048, V=128256, bf16) chunk 2048 was the fastest of
    512/1024/2048 for the backward (23.8 vs 26.4 / 32.5 ms): every chunk costs a
    few kernel launches, so narrower chunks trade time for memory.
    """
    target = max(512, min(max_width, max_elems // max(num_rows, 1)))
    width = 1 << (target.bit_length() - 1)  # power of two <= target
    quarter = -(-vocab // 4)
    width = min(width, max(128, 1 << (quarter.bit_length() - 1)))  # >= 4 chunks
    return min(width, vocab)


def _chunk_geometry(vocab: int, block_v: int):
    """Chunks of a fixed width ``vc``; the last one is shifted left to end at V.

    Chunk ``i`` covers columns ``[start_i, start_i + vc)`` with
    ``start_i = min(i * vc, V - vc)``; columns below ``i * vc`` were already
    seen and are masked out.  This avoids padding (copying) ``W``.
    """
    vc = min(block_v, vocab)
    return vc, -(-vocab // vc)


def _chunk_cols(i, vc, vocab):
    lo = i * vc
    start = jnp.minimum(lo, vocab - vc)
    cols = start + jnp.arange(vc, dtype=jnp.int32)[None, :]
    return start, cols, cols >= lo


def _chunk_logits(h, w, hr, wr, start, vc, opts):
    ax = vocab_axis(opts)
    z = cap(head_dot(h, lax.dynamic_slice_in_dim(w, start, vc, axis=ax), opts), opts.softcap)
    zr = None
    if opts.with_kl:
        wr_c = lax.dynamic_slice_in_dim(wr, start, vc, axis=ax)
        # the reference head gets no gradient, also through a shared ``h``: without the
        # stop_gradient a second derivative (xla_chunked's backward is differentiable) w.r.t.
        # ``hidden`` picked up the reference logits' dependence on it
        zr = cap(head_dot(lax.stop_gradient(h) if hr is None else hr, wr_c, opts), opts.softcap)
    return z, zr


def chunked_forward(h, w, hr, wr, targets, row_hash, opts: HeadOpts, *, block_v: int) -> OnlineState:
    """Online statistics over vocabulary chunks; peak temp ``O(N * block_v)``.

    ``targets`` / ``row_hash`` are ``[N, 1]`` int32 (row_hash None w/o sampling).
    """
    n = h.shape[0]
    vocab = w.shape[vocab_axis(opts)]
    vc, num_chunks = _chunk_geometry(vocab, block_v)

    def body(state, i):
        start, cols, valid = _chunk_cols(i, vc, vocab)
        z, zr = _chunk_logits(h, w, hr, wr, start, vc, opts)
        return merge(state, tile_state(z, zr, valid, cols, targets, row_hash, opts), opts), None

    state, _ = lax.scan(body, init_state(n, opts), jnp.arange(num_chunks, dtype=jnp.int32))
    return state


def default_bwd_rows(num_rows: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Rows per backward group for ``bwd_rows="auto"``: all of them unless the
    float32 ``d_hidden`` accumulator (``4 N d`` bytes) would exceed 3.5% of the
    gradients' own storage ``itemsize (N + V) d``; then the largest power of two
    that fits, but at least 256 (a small head's accumulator can exceed the 3.5%).
    Float32 inputs never split (no rounding to save).

    3.5% leaves room for one ``[R, 2048]`` bf16 dlogits chunk under the 5% of issue
    #7's memory target; both bench shapes get 2048 rows.  Fewer rows cost time:
    on an H100 (N=8192, d=2048, V=128256, pallas_gpu fwd+bwd, 2026-11-27) 1024
    rows took 47.1 ms (1.02x the gradients in all), 2048 rows 39.4 ms (1.045x),
    one group 33.5 ms (1.21x)."""
    budget = 0.035 * itemsize * (num_rows + vocab) * hidden
    if itemsize >= 4 or 4 * num_rows * hidden <= budget:
        return num_rows
    rows = max(256, int(budget // (4 * hidden)))
    return min(num_rows, 1 << (rows.bit_length() - 1))


def _zero_rows(rg: RowGrad, keep) -> RowGrad:
    """Zero the coefficients of rows where ``keep`` [R, 1] is False: ``dlogits`` = 0 there."""
    z = lambda x: None if x is None else jnp.where(keep, x, 0.0)  # noqa: E731
    return rg._replace(c0=z(rg.c0), g_h=z(rg.g_h), g_tl=z(rg.g_tl), g_kl=z(rg.g_kl), g_sl=z(rg.g_sl))


def chunked_backward(h, w, hr, wr, rg: RowGrad, opts: HeadOpts, *, block_v: int, bwd_rows=None, dlogits_fn=None,
                     update_fn=None, acc_dtype=jnp.float32, unroll=1):
    """``(d_hidden, d_weight)`` by recomputing logits chunk by chunk.

    Per vocab chunk ``c``: ``dr_c = dlogits(h, W_c)`` (``[R, vc]``),
    ``d_h += dr_c @ W_c^T`` (float32 carry ``[R, d]``) and
    ``d_W[:, c] += h^T @ dr_c`` in place, in the weight dtype (the GEMM
    accumulates in float32).  ``dlogits_fn(h, hr, rg, start, valid_lo, r0)`` may
    replace the XLA recompute (the Pallas GPU backend fuses it into one kernel
    that reads ``W`` in place), and ``update_fn(dh, dw, h, dr, w, start, r0, opts)``
    the two GEMM updates (default :func:`gemm_update`, the cuBLAS/XLA one).  Both
    get the full ``h`` / ``hr`` and the group's first row ``r0``, the group's
    ``rg`` / ``dh`` and ``dr``: a kernel can read the rows in place.

    ``acc_dtype``: dtype of the ``d_h`` accumulator (float32; ``h.dtype`` saves
    its ``4 N d`` bytes at the cost of one rounding per vocab chunk, as CCE's
    bf16 atomic adds do).  ``unroll``: of the vocab scan (fewer loop steps).

    ``bwd_rows``: rows ``R`` per group (None: all ``N``).  The float32 ``d_h``
    accumulator shrinks to ``[R, d]``; each group adds its ``d_W`` product
    rounded to the weight dtype (exact for float32 weights).  Groups are a
    ``scan`` when ``R`` divides ``N``; otherwise a ``fori_loop`` whose last group
    is shifted up to end at ``N``, its already-done rows getting zero
    coefficients (rows are never padded, like the vocabulary chunks).
    """
    n = h.shape[0]
    rows = n if bwd_rows is None else max(1, min(int(bwd_rows), n))
    vocab_backward = functools.partial(_vocab_backward, block_v=block_v, rows=rows, dlogits_fn=dlogits_fn,
                                       update_fn=update_fn, acc_dtype=acc_dtype, unroll=unroll)
    if rows == n:
        dh, dw = vocab_backward(h, w, hr, wr, rg, opts, jnp.zeros_like(w), jnp.int32(0))
        return dh.astype(h.dtype), dw

    def take(tree, r0):
        return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, r0, rows, axis=0), tree)

    if n % rows == 0:

        def tiled(dw, gi):
            r0 = gi * rows
            dh_g, dw = vocab_backward(h, w, hr, wr, take(rg, r0), opts, dw, r0)
            return dw, dh_g.astype(h.dtype)  # a scan output: written in place into d_h

        dw, dh = lax.scan(tiled, jnp.zeros_like(w), jnp.arange(n // rows, dtype=jnp.int32))
        return dh.reshape(h.shape), dw

    def group(gi, carry):
        dh, dw = carry
        lo = gi * rows
        r0 = jnp.minimum(lo, n - rows)
        keep = (r0 + jnp.arange(rows))[:, None] >= lo
        rg_g, old = take((rg, dh), r0)
        dh_g, dw = vocab_backward(h, w, hr, wr, _zero_rows(rg_g, keep), opts, dw, r0)
        dh_g = jnp.where(keep, dh_g.astype(dh.dtype), old)
        return lax.dynamic_update_slice_in_dim(dh, dh_g, r0, axis=0), dw

    return lax.fori_loop(0, -(-n // rows), group, (jnp.zeros_like(h), jnp.zeros_like(w)))


def _group_rows(x, r0, rows):
    """Rows ``[r0, r0 + rows)`` of ``x`` (None stays None; all rows are not copied)."""
    if x is None or rows == x.shape[0]:
        return x
    return lax.dynamic_slice_in_dim(x, r0, rows, axis=0)


def gemm_update(dh, dw, h, dr, w, start, r0, opts: HeadOpts):
    """``dh += dr @ W_c^T`` (float32 sum, stored in ``dh``'s dtype) and ``dW[:, c] += h^T @ dr``
    for the chunk at ``start`` and the group of rows at ``r0``."""
    (rows, vc), ax = dr.shape, vocab_axis(opts)
    h = _group_rows(h, r0, rows)
    w_c = lax.dynamic_slice_in_dim(w, start, vc, axis=ax).astype(dr.dtype)
    prod = lax.dot_general(dr, w_c, (((1,), (ax,)), ((), ())), preferred_element_type=jnp.float32)
    dh = (dh.astype(jnp.float32) + prod).astype(dh.dtype)
    # in the weight dtype: a float32 [d, vc] product would be the largest temporary
    if opts.w_vd:
        dw_c = lax.dot_general(dr, h, (((0,), (0,)), ((), ())), preferred_element_type=dw.dtype)
    else:
        dw_c = lax.dot_general(h, dr, (((0,), (0,)), ((), ())), preferred_element_type=dw.dtype)
    old = lax.dynamic_slice_in_dim(dw, start, vc, axis=ax)
    return dh, lax.dynamic_update_slice_in_dim(dw, old + dw_c, start, axis=ax)


def _vocab_backward(h, w, hr, wr, rg: RowGrad, opts: HeadOpts, dw, r0, *, block_v, rows, dlogits_fn, update_fn,
                    acc_dtype, unroll):
    """Scan over vocab chunks for the group of ``rows`` rows at ``r0``: (its d_h in ``acc_dtype``,
    updated d_W)."""
    vocab = w.shape[vocab_axis(opts)]
    vc, num_chunks = _chunk_geometry(vocab, block_v)
    # XLA's own recompute / GEMMs take the group's rows once per group (dead code if both are custom)
    hg, hrg = _group_rows(h, r0, rows), _group_rows(hr, r0, rows)

    def body(carry, i):
        dh, dw = carry
        start, cols, valid = _chunk_cols(i, vc, vocab)
        if dlogits_fn is None:
            z, zr = _chunk_logits(hg, w, hrg, wr, start, vc, opts)
            dr = tile_dlogits(z, zr, valid, cols, rg, opts)
            dr = dr.astype(h.dtype)
        else:  # in h's dtype, or a pytree that update_fn unpacks
            dr = dlogits_fn(h, hr, rg, start, i * vc, r0)
        if update_fn is None:
            return gemm_update(dh, dw, hg, dr, w, start, 0, opts), None
        return update_fn(dh, dw, h, dr, w, start, r0, opts), None

    acc = jnp.zeros((rows, h.shape[1]), acc_dtype)
    (dh, dw), _ = lax.scan(body, (acc, dw), jnp.arange(num_chunks, dtype=jnp.int32), unroll=unroll)
    return dh, dw
