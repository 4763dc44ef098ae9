"""Pallas (Triton) GPU implementation of the fused LM-head statistics.

Forward -- one fused kernel, grid ``(token blocks, vocab splits)``::

    program (i, j): rows [i*bn, (i+1)*bn), vocab blocks [j*per, (j+1)*per)
      state = init
      for vb in vocab blocks of split j:              (lax.fori_loop)
        acc[bn, bv] = sum_k h[rows, k-chunk] @ W[k-chunk, vb]   (fori_loop over d,
                                                  bf16 x bf16 -> fp32 dot)
        z = softcap(acc); state = merge(state, tile_state(z, ...))
      write state (m, s, a, zt, [mr, sr, b], [best, idx, bz]) -> [splits, N]

The logits tile only ever lives in registers.  Splitting the vocabulary over a
second grid axis keeps the GPU full when ``N / bn`` is smaller than the number
of SMs (flash-decoding style); the ``[splits, N]`` partial states are merged
exactly in JAX (:func:`xla.merge_splits`), then finalized.  Loads are masked
(``other=0``) so neither ``N`` nor ``V`` nor ``d`` need to be multiples of the
block sizes and no input is padded (padding ``W`` would copy ``V*d``).

Backward -- a hybrid, chunked over the vocabulary (``lax.scan``)::

    for each vocab chunk c (width vc, a multiple of bv):
      dr_c[N, vc] = Pallas kernel: recompute logits tile-by-tile (as above) and
                    apply xla.tile_dlogits in registers; store in the input dtype
      d_h += dr_c @ W_c^T          (XLA/cuBLAS GEMM, fp32 accumulator [N, d])
      d_W[:, c] = h^T @ dr_c       (XLA/cuBLAS GEMM, written once, weight dtype)

Why not a fully fused backward?  The natural "own your output tile" kernels
need a ``[bn, d]`` (for d_h) or ``[d, bv]`` (for d_W) float32 accumulator in
registers; with ``d`` = 1.5k-4k that does not fit, and tiling ``d`` instead
multiplies the logit recomputation by ``d / bd``.  CCE / tokamax resolve it with
atomic adds into ``d_h``/``d_W`` (bf16 lock-adds or an fp32 copy of ``d_W``);
here the two big GEMMs go to cuBLAS and Pallas does the part XLA cannot fuse
(matmul + softmax-gradient epilogue).  Extra memory: ``[N, vc]`` for ``dr_c``
plus the fp32 ``d_h`` accumulator.

Row groups (``bwd_rows``) walk the rows in groups of ``R`` so the accumulator
is ``[R, d]``; there the two GEMMs are in-place Pallas kernels
(:func:`pallas_update`, ``input_output_aliases``) and every kernel reads the
group's rows of ``h`` at an offset, so the backward's only temporaries are the
``[R, d]`` accumulator and one ``[R, vc]`` dlogits chunk (1.045x the gradients
on the first bench shape).  With one group cuBLAS stays: it was ~9% faster.

Gradient filtering (``grad_filter_eps``, CCE's approximation, off by default): the dlogits
kernel also writes one live flag per tile and does not store dead tiles; the in-place GEMMs
run a dynamic-length K loop over the live tiles only (:func:`_live_steps`).

The chunk offset is a runtime value; :func:`_chunk_start` tells Triton it is
16-aligned, without which a ``[d, V]`` head is read without vector loads (the
H100 backward took 36 ms instead of 24 ms).

All per-tile math is shared with ``xla_chunked`` (``curriculax.kernels.xla``),
so under ``interpret=True`` this backend reproduces ``xla_chunked`` to
rounding.  Block sizes must be powers of two >= 16 (Triton ``tl.dot``); the
pipelining depth / inner ``block_d`` are reduced automatically to fit shared
memory (:func:`_fit_smem`).

Measured on one H100 in one run (2026-11-27; jax 0.11.2, Triton 3.6; bf16, mean-CE objective,
fwd+bwd; ``experiments/results/fused_loss.md``):
- N=8192 d=2048 V=128256:
  - default: 33.5 ms vs 44.4 ms xla_naive (0.75x), extra memory 1.21x the gradients;
  - ``bwd_rows="auto"``: 39.4 ms at 1.045x;
  - references: exact CCE 74.5 ms, CCE's filtered default 48.4 ms, Liger 34.6 ms.
- N=16384 d=1536 V=151936:
  - default: 64.2 ms vs 84.7 ms, 1.35x;
  - ``"auto"``: 78.9 ms at 1.040x, or 65.4 ms with ``grad_filter_eps=2**-12``;
  - references: exact CCE 129 ms, filtered 67.5 ms.

Compiled kernels match ``xla_naive`` to ~1e-6 (fp32) with identical samples.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from curriculax.kernels import xla
from curriculax.kernels.xla import HeadOpts, OnlineState, RowGrad

_TARGET_PROGRAMS = 264  # ~2 waves on a 132-SM H100/H200

# Default (block_n, block_v, block_d), 8 warps, 3 stages: picked by the component
# sweep of experiments/bench_fused_loss.py on an H200 (bf16, N=8192, d=2048,
# V=128256): forward 19.0 ms with (64, 128, 64, 4 warps, 2 stages) -> 9.5 ms;
# dlogits+GEMM backward 27.3 ms -> 22.9 ms (vocab chunk 2048).
FWD_BLOCKS = (64, 256, 64)
BWD_BLOCKS = (128, 256, 64)
# With KL and/or sampling the tile epilogue (second logits tile, Gumbel hash)
# is much heavier: at the sizes above the full objective (CE + entropy + KL +
# sampling) took 192 ms instead of 63 ms on the H200.  Measured there (fwd /
# fwd+bwd, same blocks for both kernels): (64,128,64) 25.6 / 63.3 ms,
# (64,64,64) 28.8 / 63.2, (32,128,64) 36.6 / 82.9, (128,128,64) 21.3 ms / not
# measured (the device time ran out).  So: the faster forward tile, and the
# measured backward one (xla_naive: 56.4 ms, xla_chunked 55.8 ms).
EXTRA_FWD_BLOCKS = (128, 128, 64)
EXTRA_BWD_BLOCKS = (64, 128, 64)
# Backward tiles when the rows (of a group) are too few to give (128, 256) tiles half a wave
# (_SMALL_BWD_PROGRAMS).  Not sooner: on an H100 2048-row groups of both bench shapes run 128
# programs of (128, 256) tiles per chunk step, and those beat 512 of (64, 128) in the
# row-group backward: 28.0 vs 30.9 ms (N=8192 d=2048 V=128256), 56.3 vs 61.6 ms (N=16384
# d=1536 V=151936; experiments/results/fused_loss.md, 2026-11-27 sweep).
SMALL_BWD_BLOCKS = (64, 128, 64)
_SMALL_BWD_PROGRAMS = 66


def _defaults(opts: HeadOpts, plain, extra):
    return extra if (opts.with_kl or opts.with_sample) else plain


def _pow2_block(requested: Optional[int], default: int, extent: int) -> int:
    b = default if requested is None else requested
    if b < 16 or b & (b - 1):
        raise ValueError(f"pallas_gpu block sizes must be powers of two >= 16, got {b}")
    # do not use blocks (much) larger than the array
    return max(16, min(b, pl.next_power_of_2(extent)))


_SMEM_BUDGET = 150 * 1024  # bytes of pipelined operand buffers (H100/H200 max 227 KiB, A100 164 KiB)


def _fit_smem(bn, bv, bk, stages, itemsize, n_weights):
    """Shrink ``block_d`` then ``num_stages`` until the pipelined operand tiles
    (``stages * (bn*bk + n_weights*bk*bv) * itemsize``) fit the SMEM budget.

    Without this the KL variant (two weight tiles per step) or fp32 inputs ask
    Triton for more shared memory than the SM has (seen on an H200: 245760 >
    232448 bytes with bf16 + KL at 3 stages).
    """

    def need(bk_, st):
        return st * (bn * bk_ + n_weights * bk_ * bv) * itemsize

    while need(bk, stages) > _SMEM_BUDGET and bk > 16:
        bk //= 2
    while need(bk, stages) > _SMEM_BUDGET and stages > 1:
        stages -= 1
    return bk, stages


def _warps(num_warps, bn, bv):
    return num_warps or (8 if bn * bv >= 128 * 128 else 4)


def _tile_dot(a, b, dims, dtype=None):
    """float32 ``dot_general`` of two tiles with one operand dtype (``a``'s unless given)."""
    c = dtype or a.dtype
    return lax.dot_general(a.astype(c), b.astype(c), (dims, ((), ())), preferred_element_type=jnp.float32)


def _pad_rows(x: jax.Array, n_pad: int, fill) -> jax.Array:
    return jnp.pad(x, (0, n_pad - x.shape[0]), constant_values=fill)


def _logit_tiles(x_ref, w_ref, xr_ref, wr_ref, row_ok, c0, col_ok, *, bn, bv, bk, shares_x, opts, row0=None):
    """``(z, zr)`` for one ``[bn, bv]`` tile; d-loop with masked loads, fp32 acc.  ``x_ref`` /
    ``xr_ref`` are the ``[bn, d]`` row blocks, or (``row0`` given) whole arrays read from ``row0``."""
    x_rows = slice(None) if row0 is None else pl.ds(row0, bn)

    def load_x(ref, k, dx):
        kk = k * bk + jnp.arange(bk)
        return plgpu.load(ref.at[x_rows, pl.ds(k * bk, bk)], mask=row_ok[:, None] & (kk < dx)[None, :], other=0.0)

    def load_w(ref, k, dx):  # [bk, bv], or [bv, bk] for a [V, d] head
        kk = k * bk + jnp.arange(bk)
        if opts.w_vd:
            return plgpu.load(
                ref.at[pl.ds(c0, bv), pl.ds(k * bk, bk)], mask=col_ok[:, None] & (kk < dx)[None, :], other=0.0
            )
        return plgpu.load(
            ref.at[pl.ds(k * bk, bk), pl.ds(c0, bv)], mask=(kk < dx)[:, None] & col_ok[None, :], other=0.0
        )

    def dot(a, b):  # one operand dtype for Triton: the activations' (weight tiles cast on load)
        return _tile_dot(a, b, ((1,), (1 if opts.w_vd else 0,)))

    zeros = jnp.zeros((bn, bv), jnp.float32)
    hdim = 1 - xla.vocab_axis(opts)
    d = w_ref.shape[hdim]
    nk = pl.cdiv(d, bk)
    if opts.with_kl and shares_x:
        # one pass over the shared hidden block feeds both heads

        def body(k, accs):
            xb = load_x(x_ref, k, d)
            return accs[0] + dot(xb, load_w(w_ref, k, d)), accs[1] + dot(xb, load_w(wr_ref, k, d))

        acc, accr = lax.fori_loop(0, nk, body, (zeros, zeros))
        return xla.cap(acc, opts.softcap), xla.cap(accr, opts.softcap)

    def single(xref, wref):
        dx = wref.shape[hdim]
        return lax.fori_loop(
            0, pl.cdiv(dx, bk), lambda k, acc: acc + dot(load_x(xref, k, dx), load_w(wref, k, dx)), zeros
        )

    z = xla.cap(single(x_ref, w_ref), opts.softcap)
    zr = xla.cap(single(xr_ref, wr_ref), opts.softcap) if opts.with_kl else None
    return z, zr


def _state_fields(opts: HeadOpts):
    names = ["m", "s", "a", "zt"]
    if opts.with_kl:
        names += ["mr", "sr", "b"]
    if opts.with_sample:
        names += ["best", "idx", "bz"]
    return names


def _fwd_kernel(*refs, n_rows, vocab, n_vblocks, per_split, bn, bv, bk, shares_x, opts: HeadOpts):
    it = iter(refs)
    x_ref, w_ref = next(it), next(it)
    xr_ref = wr_ref = None
    if opts.with_kl:
        xr_ref = None if shares_x else next(it)
        wr_ref = next(it)
    t_ref = next(it)
    rh_ref = next(it) if opts.with_sample else None
    out_refs = list(it)

    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bn + jnp.arange(bn)
    row_ok = rows < n_rows
    targets = t_ref[...][:, None]
    row_hash = rh_ref[...][:, None] if opts.with_sample else None

    def vbody(vb, st):
        c0 = vb * bv
        cols = c0 + jnp.arange(bv, dtype=jnp.int32)
        col_ok = cols < vocab
        z, zr = _logit_tiles(
            x_ref, w_ref, xr_ref, wr_ref, row_ok, c0, col_ok, bn=bn, bv=bv, bk=bk, shares_x=shares_x, opts=opts
        )
        tile = xla.tile_state(z, zr, col_ok[None, :], cols[None, :], targets, row_hash, opts)
        return xla.merge(st, tile, opts)

    lo = j * per_split
    hi = jnp.minimum(lo + per_split, n_vblocks)
    st = lax.fori_loop(lo, hi, vbody, xla.init_state(bn, opts))
    for ref, name in zip(out_refs, _state_fields(opts)):
        ref[...] = getattr(st, name)[:, 0]


def _tiles(h, w, hr, opts: HeadOpts, defaults, block_n, block_v, block_d, num_stages):
    """Power-of-two tile sizes (user's or tuned defaults) shrunk to fit shared memory."""
    n, d = h.shape
    dn, dv, dk = _defaults(opts, *defaults)
    bn = _pow2_block(block_n, dn, n)
    bv = _pow2_block(block_v, dv, w.shape[xla.vocab_axis(opts)])
    bk = _pow2_block(block_d, dk, max(d, hr.shape[1] if hr is not None else d))
    itemsize = max(h.dtype.itemsize, w.dtype.itemsize)
    bk, num_stages = _fit_smem(bn, bv, bk, num_stages, itemsize, 2 if (opts.with_kl and hr is None) else 1)
    return bn, bv, bk, num_stages


def forward(
    h, w, hr, wr, targets, row_hash, opts: HeadOpts, *,
    block_n=None, block_v=None, block_d=None, num_splits=None, interpret=False, num_warps=None, num_stages=3,
) -> OnlineState:
    """Online state ``[N, 1]`` per field, computed by the fused Triton kernel."""
    n, d = h.shape
    vocab = w.shape[xla.vocab_axis(opts)]
    bn, bv, bk, num_stages = _tiles(h, w, hr, opts, (FWD_BLOCKS, EXTRA_FWD_BLOCKS), block_n, block_v,
                                    block_d, num_stages)
    nb = pl.cdiv(n, bn)
    nvb = pl.cdiv(vocab, bv)
    splits = num_splits or pl.cdiv(_TARGET_PROGRAMS, nb)
    splits = max(1, min(splits, nvb))
    per = pl.cdiv(nvb, splits)
    splits = pl.cdiv(nvb, per)  # no empty split
    n_pad = nb * bn
    shares_x = hr is None

    args = [h, w]
    in_specs = [pl.BlockSpec((bn, d), lambda i, j: (i, 0)), pl.no_block_spec]
    if opts.with_kl:
        if not shares_x:
            args.append(hr)
            in_specs.append(pl.BlockSpec((bn, hr.shape[1]), lambda i, j: (i, 0)))
        args.append(wr)
        in_specs.append(pl.no_block_spec)
    args.append(_pad_rows(targets.astype(jnp.int32), n_pad, -1))
    in_specs.append(pl.BlockSpec((bn,), lambda i, j: (i,)))
    if opts.with_sample:
        args.append(_pad_rows(row_hash, n_pad, 0))
        in_specs.append(pl.BlockSpec((bn,), lambda i, j: (i,)))

    names = _state_fields(opts)
    out_shape = [jax.ShapeDtypeStruct((splits, n_pad), jnp.int32 if f == "idx" else jnp.float32) for f in names]
    out_specs = [pl.BlockSpec((None, bn), lambda i, j: (j, i)) for _ in names]
    kernel = functools.partial(
        _fwd_kernel, n_rows=n, vocab=vocab, n_vblocks=nvb, per_split=per, bn=bn, bv=bv, bk=bk,
        shares_x=shares_x, opts=opts,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(nb, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=_warps(num_warps, bn, bv), num_stages=num_stages),
        interpret=interpret,
        name="lm_head_stats_fwd",
    )(*args)
    parts = OnlineState(**{f: o[:, :n, None] for f, o in zip(names, outs)})
    return xla.merge_splits(parts, opts)


# ----------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------

_RG_FIELDS = ("lse", "c0", "g_h", "g_tl", "targets", "lse_r", "g_kl", "g_sl", "sidx")


def _chunk_start(off_ref, vocab):
    """The chunk's first column, with Triton told its alignment.

    Chunks start at ``min(i * vc, V - vc)`` with ``vc`` a multiple of 16, so every start is a
    multiple of ``gcd(V, 16)``.  Without the hint a ``[d, V]`` head is read (and ``d_W`` written)
    through a column offset Triton cannot prove aligned: no vector loads, and on an H100 the
    backward took 36 ms instead of ~24 ms (N=8192, d=2048, V=128256; a ``[V, d]`` head, offset on
    the row axis, was unaffected).
    """
    align = math.gcd(vocab, 16)
    start = off_ref[0]
    return pl.multiple_of(start, align) if align > 1 else start


def _dlogits_kernel(*refs, n_rows, vocab, chunk, bn, bv, bk, shares_x, rg_present, opts: HeadOpts,
                    log_eps=None):
    it = iter(refs)
    x_ref, w_ref = next(it), next(it)
    xr_ref = wr_ref = None
    if opts.with_kl:
        xr_ref = None if shares_x else next(it)
        wr_ref = next(it)
    off_ref = next(it)
    rg = RowGrad(**{f: (next(it)[...][:, None] if f in rg_present else None) for f in _RG_FIELDS})
    o_ref = next(it)
    live_ref = next(it, None)

    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bn + jnp.arange(bn)
    row_ok = rows < n_rows
    start, lo, r0 = _chunk_start(off_ref, vocab), off_ref[1], off_ref[2]
    local = j * bv + jnp.arange(bv, dtype=jnp.int32)
    in_chunk = local < chunk
    cols = start + local
    z, zr = _logit_tiles(  # W and the group's rows are read in place (no [d, chunk] / [rows, d] copies)
        x_ref, w_ref, xr_ref, wr_ref, row_ok, start + j * bv, in_chunk, bn=bn, bv=bv, bk=bk, shares_x=shares_x,
        opts=opts, row0=r0 + i * bn,
    )
    valid = (in_chunk & (cols >= lo) & (cols < vocab))[None, :]
    dr = xla.tile_dlogits(z, zr, valid, cols[None, :], rg, opts)
    store = row_ok[:, None] & in_chunk[None, :]
    if log_eps is not None:
        live = xla.tile_is_live(z, zr, valid & row_ok[:, None], cols[None, :], rg, opts, log_eps)
        if live_ref is None:  # cuBLAS reads every tile: write zeros
            dr = jnp.where(live > 0, dr, 0.0)
        else:  # the GEMMs skip dead tiles: write nothing (saves N*V*2 bytes of traffic at most)
            live_ref[...] = jnp.full((1, 1), live, jnp.int32)
            store = store & (live > 0)
    plgpu.store(o_ref.at[pl.ds(i * bn, bn), pl.ds(j * bv, bv)], dr.astype(o_ref.dtype), mask=store)


def _load2(ref, r0, nr, r_ok, c0, nc, c_ok):
    """The ``[nr, nc]`` tile of ``ref`` at ``(r0, c0)``, zero outside ``r_ok x c_ok``."""
    return plgpu.load(ref.at[pl.ds(r0, nr), pl.ds(c0, nc)], mask=r_ok[:, None] & c_ok[None, :], other=0)


def _k_loop(body, acc, n_steps, live):
    """``fori_loop`` of ``body(k, acc)`` over the K steps, or (``live = (n, k_of)`` from
    :func:`_live_steps`) over the steps of live dlogits tiles only."""
    if live is None:
        return lax.fori_loop(0, n_steps, body, acc)
    n_live, k_of = live
    return lax.fori_loop(0, n_live, lambda s, a: body(k_of(s), a), acc)


def _live_steps(live_ref, lane_axis, other, steps_per):
    """``(n, k_of)``: the GEMM's K steps that fall in live dlogits tiles.

    ``live_ref`` holds one flag per dlogits tile (``[row tiles, column tiles]``); the K axis runs
    along ``lane_axis`` and the output tile lies in flag ``other`` of the other axis (its rows or
    columns fit in one dlogits tile).  Each live tile spans ``steps_per`` K steps; ``k_of(s)`` is
    the ``s``-th live step (a running count picks the tile), so the loop is one pipelined ``for``
    with a dynamic trip count and dead tiles are never read."""
    n_lane = live_ref.shape[lane_axis]
    p = pl.next_power_of_2(n_lane)
    lane_ok, one = jnp.arange(p) < n_lane, jnp.ones((1,), bool)
    if lane_axis == 1:
        live = _load2(live_ref, other, 1, one, 0, p, lane_ok)[0]
    else:
        live = _load2(live_ref, 0, p, lane_ok, other, 1, one)[:, 0]
    seen = jnp.cumsum(live)

    def k_of(s):  # lax.div / rem: jnp's floor division does not lower to Triton here
        per = jnp.int32(steps_per)
        tile = jnp.sum((seen <= lax.div(s, per)).astype(jnp.int32))
        return tile * per + lax.rem(s, per)

    return jnp.sum(live) * steps_per, k_of


def _dh_update_kernel(*refs, rows, d, vocab, chunk, bm, bn, bk, w_vd, live_tile):
    """``acc[R, d] += dr[R, chunk] @ W_chunk^T`` on one ``[bm, bn]`` tile, in place (float32 sum,
    one rounding to ``acc``'s dtype).  With ``live_tile`` (the dlogits tile) the K loop visits
    only the live tiles' columns."""
    dr_ref, w_ref, off_ref, *live_ref, _, acc_ref = refs
    i, j = pl.program_id(0), pl.program_id(1)
    r_ok = (i * bm + jnp.arange(bm)) < rows
    c_ok = (j * bn + jnp.arange(bn)) < d
    start = _chunk_start(off_ref, vocab)

    def body(k, acc):
        k_ok = (k * bk + jnp.arange(bk)) < chunk
        a = _load2(dr_ref, i * bm, bm, r_ok, k * bk, bk, k_ok)
        if w_vd:  # W [V, d]: a [bk, bn] tile
            return acc + _tile_dot(a, _load2(w_ref, start + k * bk, bk, k_ok, j * bn, bn, c_ok), ((1,), (0,)))
        return acc + _tile_dot(a, _load2(w_ref, j * bn, bn, c_ok, start + k * bk, bk, k_ok), ((1,), (1,)))

    live = None
    if live_tile is not None:  # K = the chunk's columns; this tile's rows lie in one flag row
        fr, fc = live_tile
        live = _live_steps(live_ref[0], 1, (i * bm) // fr, fc // bk)
    acc = _load2(acc_ref, i * bm, bm, r_ok, j * bn, bn, c_ok).astype(jnp.float32)
    acc = _k_loop(body, acc, pl.cdiv(chunk, bk), live)
    plgpu.store(acc_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], acc.astype(acc_ref.dtype),
                mask=r_ok[:, None] & c_ok[None, :])


def _dw_update_kernel(*refs, rows, d, vocab, chunk, bm, bn, bk, w_vd, live_tile):
    """``dW_chunk += h^T @ dr`` on one ``[bm (d), bn (vocab)]`` tile (stored transposed for a
    ``[V, d]`` head), in place; float32 sum over the group's rows, one rounding to the weight
    dtype.  With ``live_tile`` the K loop (the rows) visits only the live dlogits tiles."""
    h_ref, dr_ref, off_ref, *live_ref, _, dw_ref = refs
    i, j = pl.program_id(0), pl.program_id(1)
    d_ok = (i * bm + jnp.arange(bm)) < d
    c_ok = (j * bn + jnp.arange(bn)) < chunk
    start, g0 = _chunk_start(off_ref, vocab), off_ref[1]  # g0: the row group's first row in h

    def body(k, acc):
        k_ok = (k * bk + jnp.arange(bk)) < rows
        a = _load2(h_ref, g0 + k * bk, bk, k_ok, i * bm, bm, d_ok)
        b = _load2(dr_ref, k * bk, bk, k_ok, j * bn, bn, c_ok)
        return acc + (_tile_dot(b, a, ((0,), (0,))) if w_vd else _tile_dot(a, b, ((0,), (0,))))

    live = None
    if live_tile is not None:  # K = the group's rows; this tile's columns lie in one flag column
        fr, fc = live_tile
        live = _live_steps(live_ref[0], 0, (j * bn) // fc, fr // bk)
    # the tile sits at (d, vocab) in a [d, V] head, at (vocab, d) in a [V, d] one
    d_side, v_side = (i * bm, bm, d_ok), (start + j * bn, bn, c_ok)
    (r0, nr, r_ok), (c0, nc, col_ok) = (v_side, d_side) if w_vd else (d_side, v_side)
    acc = _load2(dw_ref, r0, nr, r_ok, c0, nc, col_ok).astype(jnp.float32)
    acc = _k_loop(body, acc, pl.cdiv(rows, bk), live)
    plgpu.store(dw_ref.at[pl.ds(r0, nr), pl.ds(c0, nc)], acc.astype(dw_ref.dtype), mask=r_ok[:, None] & col_ok[None, :])


# (block_m, block_n, block_k), warps, stages of the in-place update GEMMs: the fastest of five
# configs on an H100 for both bench shapes (`--sweep bwd`; e.g. N=8192 d=2048 V=128256, one
# group: 26.6 ms vs 26.9 / 30.1 / 32.4 ms and (64, 128, 32) at 4 warps).
GEMM_CONFIG = dict(blocks=(128, 256, 64), num_warps=8, num_stages=3)


def pallas_update(*, interpret=False, blocks=None, num_warps=None, num_stages=None, live_tile=None):
    """An ``update_fn`` for :func:`xla.chunked_backward` that does both GEMM updates in place
    (``input_output_aliases``): no ``[d, chunk]`` product or weight-slice temporaries.
    Unset tile options come from :data:`GEMM_CONFIG`.  ``live_tile``: the ``(rows, columns)`` of
    the dlogits tiles whose live flags come with ``dr`` as ``(dr, flags)`` (gradient filtering);
    the GEMMs then skip the K steps of dead tiles, which the dlogits kernel left unwritten, and
    their tiles shrink to stay inside one dlogits tile along the dlogits axes."""
    bm, bn, bk = blocks or GEMM_CONFIG["blocks"]
    num_warps = num_warps or GEMM_CONFIG["num_warps"]
    num_stages = num_stages or GEMM_CONFIG["num_stages"]
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)

    def update(dh, dw, h, dr, w, start, r0, opts: HeadOpts):
        live = ()
        if isinstance(dr, tuple):  # (dr, live flags) from a filtering dlogits kernel
            dr, live = dr[0], (dr[1],)
        rows, chunk = dr.shape
        d = h.shape[1]
        off = jnp.stack([start, r0]).astype(jnp.int32)
        geo = dict(rows=rows, d=d, vocab=w.shape[xla.vocab_axis(opts)], chunk=chunk, w_vd=opts.w_vd,
                   live_tile=live_tile if live else None)

        def in_place(kernel, name, x, y, acc, tiles, grid):  # acc, the last operand, is updated in place
            args = (x, y, off, *live, acc)
            return pl.pallas_call(
                functools.partial(kernel, **dict(zip(("bm", "bn", "bk"), tiles)), **geo), grid=grid,
                in_specs=[pl.no_block_spec] * len(args), out_specs=pl.no_block_spec,
                out_shape=jax.ShapeDtypeStruct(acc.shape, acc.dtype), input_output_aliases={len(args) - 1: 0},
                compiler_params=params, interpret=interpret, name=name,
            )(*args)

        dh_tiles, dw_tiles = (bm, bn, bk), (bm, bn, bk)
        if live:  # whole dlogits tiles only (dead ones are never written): the K step and the
            fr, fc = live_tile  # dlogits-side extent of an output tile stay inside one tile
            dh_tiles, dw_tiles = (min(bm, fr), bn, min(bk, fc)), (bm, min(bn, fc), min(bk, fr))
        dh = in_place(_dh_update_kernel, "lm_head_dh_update", dr, w, dh, dh_tiles,
                      (pl.cdiv(rows, dh_tiles[0]), pl.cdiv(d, dh_tiles[1])))
        dw = in_place(_dw_update_kernel, "lm_head_dw_update", h, dr, dw, dw_tiles,
                      (pl.cdiv(d, dw_tiles[0]), pl.cdiv(chunk, dw_tiles[1])))
        return dh, dw

    return update


def default_chunk_v(num_rows: int, vocab: int) -> int:
    """Backward vocab chunk: ``dlogits`` is stored in bf16, so ``N * chunk <= 2**25`` (64 MiB),
    at most 2048.  Measured on an H100 (bf16, default tiles, backward only): N=16384, d=1536,
    V=151936: chunk 1024 / 2048 / 4096 -> 52.2 / 45.9 / 43.9 ms (temp 143 / 172 / 248 MiB);
    N=8192, d=2048, V=128256 on an H200: 2048 beat 1024 and 512."""
    return xla.default_block_v(num_rows, vocab, max_elems=1 << 25, max_width=2048)


def bwd_blocks(rows: int, chunk_v: int, vocab: int, filtered: bool = False) -> tuple[int, int, int]:
    """Default CE dlogits tiles for ``rows`` (per group) and a ``chunk_v``-wide vocab chunk:
    ``BWD_BLOCKS`` unless they give fewer than half a wave of programs (see ``SMALL_BWD_BLOCKS``).
    With gradient filtering, fewer than two waves: finer tiles skip more of the update work
    (experiments/results/grad_filter.md), and 2048-row groups with (64, 128) tiles are what the
    H100 timed (16384x1536x151936: 65.4 ms fwd+bwd)."""
    programs = pl.cdiv(rows, BWD_BLOCKS[0]) * pl.cdiv(min(chunk_v, vocab), BWD_BLOCKS[1])
    return SMALL_BWD_BLOCKS if programs < (_TARGET_PROGRAMS if filtered else _SMALL_BWD_PROGRAMS) else BWD_BLOCKS


def backward(
    h, w, hr, wr, rg: RowGrad, opts: HeadOpts, *,
    block_n=None, block_v=None, block_d=None, chunk_v=None, bwd_rows=None, gemm=None, gemm_config=None,
    grad_filter_eps=None, acc_dtype=jnp.float32, unroll=1, interpret=False, num_warps=None, num_stages=3,
):
    """``(d_hidden, d_weight)``: Pallas-fused ``dlogits`` per vocab chunk + two GEMM updates.

    ``bwd_rows``, ``acc_dtype``, ``unroll``: see :func:`xla.chunked_backward`.
    ``gemm``: ``"xla"`` (cuBLAS through XLA) or ``"pallas"`` (:func:`pallas_update`: in place,
    for the smallest footprint); None: ``"pallas"`` when row groups or gradient filtering are
    asked for, else ``"xla"``.  ``gemm_config``: ``pallas_update`` keyword arguments.

    ``grad_filter_eps``: CCE-style gradient filtering.  A dlogits tile whose probabilities are
    all ``< eps`` (both heads' with a KL) and which holds no target or sampled token is dropped:
    with the in-place GEMMs it is neither stored nor read; with ``gemm="xla"`` it is stored as
    zeros, which cuBLAS multiplies all the same.  Approximate: see
    :func:`curriculax.kernels.fused_lm_head`.
    """
    n, d = h.shape
    vocab = w.shape[xla.vocab_axis(opts)]
    rows = n if bwd_rows is None else max(1, min(int(bwd_rows), n))
    gemm = gemm or ("pallas" if rows < n or grad_filter_eps is not None else "xla")
    if gemm not in ("xla", "pallas"):
        raise ValueError(f"gemm must be 'xla' or 'pallas', got {gemm!r}")
    if chunk_v is None:  # chosen for all N rows: a row group's [rows, chunk] dlogits stay as small
        chunk_v = default_chunk_v(n, vocab)
    defaults = (BWD_BLOCKS if block_n is not None or block_v is not None
                else bwd_blocks(rows, chunk_v, vocab, filtered=grad_filter_eps is not None))
    bn, bv, bk, num_stages = _tiles(h, w, hr, opts, (defaults, EXTRA_BWD_BLOCKS), block_n, block_v,
                                    block_d, num_stages)
    nb = pl.cdiv(rows, bn)
    n_pad = nb * bn
    chunk = min(vocab, max(bv, (chunk_v // bv) * bv))
    shares_x = hr is None
    cdt = h.dtype  # dlogits in the compute dtype, like the GEMMs that read them
    present = tuple(f for f in _RG_FIELDS if getattr(rg, f) is not None)
    log_eps = None if grad_filter_eps is None else math.log(grad_filter_eps)
    flags = log_eps is not None and gemm == "pallas"  # live flags only help a GEMM that can skip
    grid = (nb, pl.cdiv(chunk, bv))
    kernel = functools.partial(
        _dlogits_kernel, n_rows=rows, vocab=vocab, chunk=chunk, bn=bn, bv=bv, bk=bk, shares_x=shares_x,
        rg_present=present, opts=opts, log_eps=log_eps,
    )
    out_shape, out_specs = jax.ShapeDtypeStruct((rows, chunk), cdt), pl.no_block_spec
    if flags:
        out_shape = (out_shape, jax.ShapeDtypeStruct(grid, jnp.int32))
        out_specs = (out_specs, pl.BlockSpec((1, 1), lambda i, j: (i, j)))

    def dlogits(h_, hr_, rg_, start, lo, r0):
        args = [h_, w]  # the whole of h: the kernel reads the group's rows from r0
        in_specs = [pl.no_block_spec, pl.no_block_spec]
        if opts.with_kl:
            if not shares_x:
                args.append(hr_)
                in_specs.append(pl.no_block_spec)
            args.append(wr)
            in_specs.append(pl.no_block_spec)
        args.append(jnp.stack([start, lo, r0]).astype(jnp.int32))
        in_specs.append(pl.no_block_spec)
        args += [_pad_rows(getattr(rg_, f)[:, 0], n_pad, -1 if f in ("targets", "sidx") else 0) for f in present]
        in_specs += [pl.BlockSpec((bn,), lambda i, j: (i,)) for _ in present]
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=_warps(num_warps, bn, bv), num_stages=num_stages),
            interpret=interpret,
            name="lm_head_dlogits",
        )(*args)

    update = None
    if gemm == "pallas":
        update = pallas_update(interpret=interpret, live_tile=(bn, bv) if flags else None, **(gemm_config or {}))
    return xla.chunked_backward(h, w, hr, wr, rg, opts, block_v=chunk, bwd_rows=rows, dlogits_fn=dlogits,
                                update_fn=update, acc_dtype=acc_dtype, unroll=unroll)
