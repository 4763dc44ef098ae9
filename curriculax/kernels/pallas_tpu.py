"""Pallas Mosaic-TPU implementation of the fused LM-head statistics.

Same algorithm as the GPU backend, written with TPU conventions: BlockSpecs move
``[bn, d]`` hidden blocks and ``[d, bv]`` weight blocks HBM -> VMEM (pipelined by
Mosaic), a logits tile ``[bn, bv]`` is one MXU matmul, and reductions run over
an ``"arbitrary"`` grid axis with the accumulator resident in VMEM.

* forward  grid ``(N/bn, V/bv)``: the online state (``[bn, 1]`` per field) lives
  in the output blocks, which stay resident across the vocabulary axis;
  initialised at ``j == 0`` and merged with each tile's statistics.
* d_hidden grid ``(N/bn, V/bv)``: recompute the tile, ``dr = tile_dlogits``,
  ``acc[bn, d] += dr @ W_blk^T`` in an fp32 VMEM scratch, written at the end.
* d_weight grid ``(V/bv, N/bn)``: recompute, ``acc[d, bv] += h_blk^T @ dr``.

Unlike on GPU, the ``[bn, d]`` / ``[d, bv]`` fp32 accumulators fit in VMEM, so
the backward is fully fused and writes ``d_h`` / ``d_W`` once, in the input
dtype (cost: the logits are recomputed twice in the backward).

Edge blocks (``N % bn``, ``V % bv``) are read with undefined padding, so hidden
rows / weight columns outside the array are zeroed with ``where`` before any
matmul and masked columns are excluded from every statistic.  The per-tile math
is :mod:`curriculax.kernels.xla`'s (shared with ``xla_chunked``).

``interpret=True`` runs the kernels with Pallas' generic interpreter (fast);
``interpret=pltpu.InterpretParams()`` uses the TPU interpreter, which simulates
VMEM/HBM, DMAs and the grid semantics on CPU (~10x slower; one slow test).

Status: validated in TPU interpret mode on CPU, and lowered to Mosaic MLIR via
``jit(...).lower(lowering_platforms=("tpu",))`` (tests do both).  It has never
been compiled by the Mosaic backend nor run on a real TPU: layout problems of the
``[bn, 1]`` per-row blocks or of the int32 hash ops would only show up there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from curriculax.kernels import xla
from curriculax.kernels.xla import HeadOpts, OnlineState, RowGrad

_RG_FIELDS = ("lse", "c0", "g_h", "g_tl", "targets", "lse_r", "g_kl", "g_sl", "sidx")


def _block(requested, default, extent, align):
    b = default if requested is None else requested
    if b <= 0 or b % align:  # 0 passed the modulo test and died in a ZeroDivisionError
        raise ValueError(f"pallas_tpu block size {b} must be a positive multiple of {align}")
    full = -(-extent // align) * align
    return min(b, full)


def _fields(opts: HeadOpts):
    names = ["m", "s", "a", "zt"]
    if opts.with_kl:
        names += ["mr", "sr", "b"]
    if opts.with_sample:
        names += ["best", "idx", "bz"]
    return names


def _pad_col(x, n_pad, fill):
    """``[N] -> [n_pad, 1]`` (per-row vectors enter the kernels as columns)."""
    return jnp.pad(x, (0, n_pad - x.shape[0]), constant_values=fill)[:, None]


def _tiles(x_ref, w_ref, xr_ref, wr_ref, row_ok, col_ok, opts: HeadOpts):
    """Masked operand blocks and the ``(z, zr)`` logits tile; the MXU operands run in the
    activations' dtype (weight blocks ``[d, bv]``, or ``[bv, d]`` for a ``[V, d]`` head)."""
    col_mask = col_ok.T if opts.w_vd else col_ok
    x = jnp.where(row_ok, x_ref[...], 0)
    w = jnp.where(col_mask, w_ref[...], 0).astype(x.dtype)
    z = xla.cap(xla.head_dot(x, w, opts), opts.softcap)
    zr = None
    if opts.with_kl:
        xr = x if xr_ref is None else jnp.where(row_ok, xr_ref[...], 0)
        wr = jnp.where(col_mask, wr_ref[...], 0).astype(xr.dtype)
        zr = xla.cap(xla.head_dot(xr, wr, opts), opts.softcap)
    return x, w, z, zr


def _w_spec(w, bv, opts: HeadOpts, index):
    """The weight's ``(d, bv)`` block at vocab block ``j`` (``(bv, d)`` for a ``[V, d]`` head)."""
    if opts.w_vd:
        return pl.BlockSpec((bv, w.shape[1]), lambda *ij: (index(*ij), 0))
    return pl.BlockSpec((w.shape[0], bv), lambda *ij: (0, index(*ij)))


def _iotas(i, j, bn, bv, n_rows, vocab):
    rows = i * bn + lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
    cols = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    return rows < n_rows, cols, cols < vocab


def _unpack_inputs(refs, opts, shares_x):
    it = iter(refs)
    x_ref, w_ref = next(it), next(it)
    xr_ref = wr_ref = None
    if opts.with_kl:
        xr_ref = None if shares_x else next(it)
        wr_ref = next(it)
    return it, x_ref, w_ref, xr_ref, wr_ref


def _fwd_kernel(*refs, n_rows, vocab, bn, bv, shares_x, opts: HeadOpts):
    it, x_ref, w_ref, xr_ref, wr_ref = _unpack_inputs(refs, opts, shares_x)
    t_ref = next(it)
    rh_ref = next(it) if opts.with_sample else None
    out_refs = dict(zip(_fields(opts), it))
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for name, val in xla.init_state(bn, opts)._asdict().items():
            if val is not None:
                out_refs[name][...] = val

    row_ok, cols, col_ok = _iotas(i, j, bn, bv, n_rows, vocab)
    _, _, z, zr = _tiles(x_ref, w_ref, xr_ref, wr_ref, row_ok, col_ok, opts)
    rh = rh_ref[...] if opts.with_sample else None
    tile = xla.tile_state(z, zr, col_ok, cols, t_ref[...], rh, opts)
    old = OnlineState(**{k: r[...] for k, r in out_refs.items()})
    new = xla.merge(old, tile, opts)
    for name, ref in out_refs.items():
        ref[...] = getattr(new, name)


def _params(semantics, vmem_limit_bytes):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit_bytes)


def forward(
    h, w, hr, wr, targets, row_hash, opts: HeadOpts, *,
    block_n=None, block_v=None, interpret=False, vmem_limit_bytes=None,
) -> OnlineState:
    n, d = h.shape
    vocab = w.shape[xla.vocab_axis(opts)]
    bn = _block(block_n, 256, n, 16)
    bv = _block(block_v, 256, vocab, 128)
    nb, nvb = pl.cdiv(n, bn), pl.cdiv(vocab, bv)
    n_pad = nb * bn
    shares_x = hr is None

    args = [h, w]
    specs = [pl.BlockSpec((bn, d), lambda i, j: (i, 0)), _w_spec(w, bv, opts, lambda i, j: j)]
    if opts.with_kl:
        if not shares_x:
            args.append(hr)
            specs.append(pl.BlockSpec((bn, hr.shape[1]), lambda i, j: (i, 0)))
        args.append(wr)
        specs.append(_w_spec(wr, bv, opts, lambda i, j: j))
    row_spec = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    args.append(_pad_col(targets.astype(jnp.int32), n_pad, -1))
    specs.append(row_spec)
    if opts.with_sample:
        args.append(_pad_col(row_hash, n_pad, 0))
        specs.append(row_spec)
    names = _fields(opts)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, n_rows=n, vocab=vocab, bn=bn, bv=bv, shares_x=shares_x, opts=opts),
        grid=(nb, nvb),
        in_specs=specs,
        out_specs=[row_spec for _ in names],
        out_shape=[jax.ShapeDtypeStruct((n_pad, 1), jnp.int32 if f == "idx" else jnp.float32) for f in names],
        compiler_params=_params(("parallel", "arbitrary"), vmem_limit_bytes),
        interpret=interpret,
        name="lm_head_stats_fwd_tpu",
    )(*args)
    return OnlineState(**{f: o[:n] for f, o in zip(names, outs)})


def _bwd_kernel(*refs, n_rows, vocab, bn, bv, shares_x, rg_present, for_weight, opts: HeadOpts, log_eps=None):
    it, x_ref, w_ref, xr_ref, wr_ref = _unpack_inputs(refs, opts, shares_x)
    rg = RowGrad(**{f: (next(it)[...] if f in rg_present else None) for f in _RG_FIELDS})
    out_ref, acc_ref = next(it), next(it)
    if for_weight:  # grid (vocab block, token block)
        j, i = pl.program_id(0), pl.program_id(1)
        last = pl.num_programs(1) - 1
        inner = i
    else:  # grid (token block, vocab block)
        i, j = pl.program_id(0), pl.program_id(1)
        last = pl.num_programs(1) - 1
        inner = j

    @pl.when(inner == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    row_ok, cols, col_ok = _iotas(i, j, bn, bv, n_rows, vocab)
    x, w, z, zr = _tiles(x_ref, w_ref, xr_ref, wr_ref, row_ok, col_ok, opts)
    dr = xla.tile_dlogits(z, zr, row_ok & col_ok, cols, rg, opts)
    dr = dr.astype(x.dtype)

    def accumulate():
        if for_weight:  # [d, bv] (or [bv, d]) block of d_W
            a, b = (dr, x) if opts.w_vd else (x, dr)
            acc_ref[...] += lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        else:
            contract = 0 if opts.w_vd else 1
            acc_ref[...] += lax.dot_general(dr, w, (((1,), (contract,)), ((), ())),
                                            preferred_element_type=jnp.float32)

    if log_eps is None:
        accumulate()
    else:  # gradient filtering: a dead tile skips its update matmul
        pl.when(xla.tile_is_live(z, zr, row_ok & col_ok, cols, rg, opts, log_eps) > 0)(accumulate)

    @pl.when(inner == last)
    def _write():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def backward(
    h, w, hr, wr, rg: RowGrad, opts: HeadOpts, *,
    block_n=None, block_v=None, grad_filter_eps=None, interpret=False, vmem_limit_bytes=None,
):
    """``(d_hidden, d_weight)`` by two fused kernels (module docstring).  ``grad_filter_eps``:
    skip the update matmul of tiles :func:`xla.tile_is_live` calls dead (approximate, off by
    default; :func:`curriculax.kernels.fused_lm_head`)."""
    n, d = h.shape
    vocab = w.shape[xla.vocab_axis(opts)]
    bn = _block(block_n, 256, n, 16)
    bv = _block(block_v, 256, vocab, 128)
    nb, nvb = pl.cdiv(n, bn), pl.cdiv(vocab, bv)
    n_pad = nb * bn
    shares_x = hr is None
    present = tuple(f for f in _RG_FIELDS if getattr(rg, f) is not None)
    rg_args = [
        _pad_col(getattr(rg, f)[:, 0], n_pad, -1 if f in ("targets", "sidx") else 0) for f in present
    ]

    def call(for_weight):
        # index maps take (i, j) = (token block, vocab block) in both grids
        wrap = (lambda f: (lambda a, b: f(b, a))) if for_weight else (lambda f: f)
        args = [h, w]
        vocab_block = wrap(lambda i, j: j)
        specs = [pl.BlockSpec((bn, d), wrap(lambda i, j: (i, 0))), _w_spec(w, bv, opts, vocab_block)]
        if opts.with_kl:
            if not shares_x:
                args.append(hr)
                specs.append(pl.BlockSpec((bn, hr.shape[1]), wrap(lambda i, j: (i, 0))))
            args.append(wr)
            specs.append(_w_spec(wr, bv, opts, vocab_block))
        args += rg_args
        specs += [pl.BlockSpec((bn, 1), wrap(lambda i, j: (i, 0))) for _ in rg_args]
        if for_weight:
            out_spec = _w_spec(w, bv, opts, vocab_block)
            out_shape = jax.ShapeDtypeStruct(w.shape, w.dtype)
            scratch = pltpu.VMEM(out_spec.block_shape, jnp.float32)
            grid = (nvb, nb)
        else:
            out_spec = pl.BlockSpec((bn, d), wrap(lambda i, j: (i, 0)))
            out_shape = jax.ShapeDtypeStruct(h.shape, h.dtype)
            scratch = pltpu.VMEM((bn, d), jnp.float32)
            grid = (nb, nvb)
        kernel = functools.partial(
            _bwd_kernel, n_rows=n, vocab=vocab, bn=bn, bv=bv, shares_x=shares_x,
            rg_present=present, for_weight=for_weight, opts=opts,
            log_eps=None if grad_filter_eps is None else math.log(grad_filter_eps),
        )
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=specs,
            out_specs=out_spec,
            out_shape=out_shape,
            scratch_shapes=[scratch],
            compiler_params=_params(("parallel", "arbitrary"), vmem_limit_bytes),
            interpret=interpret,
            name="lm_head_dweight_tpu" if for_weight else "lm_head_dhidden_tpu",
        )(*args)

    return call(False), call(True)
