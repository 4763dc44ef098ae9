"""Gradient filtering (``grad_filter_eps``) of the Pallas backwards, in interpret mode.

The rule (CCE's ``filter_eps``, generalized to every statistic): a dlogits tile whose softmax
probabilities are all ``< eps`` -- the reference head's too when a KL is asked for -- and which
holds no target or sampled token is dropped.  The reference below applies that rule to
materialized dlogits in numpy, on the kernel's tile grid (row groups x clamped vocab chunks x
``[block_n, block_v]`` tiles), and does the two GEMMs densely.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from curriculax.kernels import fused_lm_head, lm_head, pallas_gpu, xla

N, D, V = 64, 40, 333
BN, BV, CHUNK = 16, 32, 64  # dlogits tiles; V is not a multiple of the chunk: the last one overlaps
EPS = 0.1


def _case(with_sample=False, vd=False, seed=0, v=V):
    k = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(k[0], (N, D))
    w = jax.random.normal(k[1], (D, v)) * (2.0 / np.sqrt(D))
    wr = w + 0.5 * jax.random.normal(k[2], (D, v)) / np.sqrt(D)
    t = jax.random.randint(k[3], (N,), 0, v).at[5].set(-1)
    valid = t >= 0
    opts = xla.HeadOpts(softcap=6.0, with_kl=True, with_sample=with_sample)
    row_hash = jax.random.randint(k[4], (N, 1), 0, 2**31 - 1, jnp.int32) if with_sample else None
    st = xla.finalize(xla.chunked_forward(h, w, None, wr, t[:, None], row_hash, opts, block_v=64), opts)
    cts = {name: jax.random.normal(kk, (N,)) for name, kk in
           zip(("target_logprob", "entropy", "kl_to_ref", "sampled_logprob"), jax.random.split(k[5], 4))}
    sidx = st.get("sampled_token")
    rg = xla.row_grad(st, cts, t, sidx, valid, opts)
    if vd:
        w, wr, opts = w.T, wr.T, dataclasses.replace(opts, w_vd=True)
    return h, w, wr, rg, opts


def _gpu_tiles(rows, bn=BN, bv=BV, chunk=CHUNK):
    """``pallas_gpu``'s dlogits tiles: row groups x clamped vocab chunks (the last one overlaps
    the previous one; its already-done columns are excluded) x ``[bn, bv]`` tiles."""
    for r0 in range(0, N, rows):  # groups (rows divides N here)
        for i in range(-(-V // chunk)):
            start, lo = min(i * chunk, V - chunk), i * chunk
            for a in range(r0, r0 + rows, bn):
                for b in range(start, start + chunk, bv):
                    if max(b, lo) < min(b + bv, V):
                        yield slice(a, min(a + bn, r0 + rows)), slice(max(b, lo), min(b + bv, V))


def _grid_tiles(bn, bv, v):
    """``pallas_tpu``'s tiles: a plain ``[bn, bv]`` grid."""
    for a in range(0, N, bn):
        for b in range(0, v, bv):
            yield slice(a, a + bn), slice(b, min(b + bv, v))


def _filtered_reference(h, w, wr, rg, opts, tiles, eps):
    """Dense float64 gradients of the dlogits with the dead tiles zeroed; and the dead share."""
    wd, wrd = (w.T, wr.T) if opts.w_vd else (w, wr)
    z, zr = xla.cap(h @ wd, opts.softcap), xla.cap(h @ wrd, opts.softcap)
    cols = jnp.arange(wd.shape[1])[None, :]
    dz = np.asarray(xla.tile_dlogits(z, zr, cols >= 0, cols, rg, opts), np.float64)
    hot = np.asarray((z - rg.lse >= np.log(eps)) | (zr - rg.lse_r >= np.log(eps)) | (cols == rg.targets))
    if opts.with_sample:
        hot = hot | np.asarray(cols == rg.sidx)
    keep, dead, total = np.zeros_like(hot), 0, 0
    for rs, cs in tiles:
        live = hot[rs, cs].any()
        keep[rs, cs] = live
        dead, total = dead + (not live), total + 1
    dzk = dz * keep
    hd, wd = np.asarray(h, np.float64), np.asarray(wd, np.float64)
    dw = hd.T @ dzk
    return (dzk @ wd.T, dw.T if opts.w_vd else dw), dead / total


def _backward(h, w, wr, rg, opts, **kw):
    return pallas_gpu.backward(h, w, None, wr, rg, opts, block_n=BN, block_v=BV, block_d=16, chunk_v=CHUNK,
                               interpret=True, **kw)


def _max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


@pytest.mark.parametrize("vd,with_sample,rows,gemm_blocks", [
    (False, False, None, None),
    (True, True, 32, None),
    (False, True, 16, (16, 16, 16)),
    (True, False, 32, (32, 64, 16)),
])
def test_filtered_backward_matches_tile_rule(vd, with_sample, rows, gemm_blocks):
    """The skip-aware in-place GEMMs give exactly the dense gradients of the tile-filtered
    dlogits, for requested GEMM tiles smaller and larger than the dlogits tiles, both head
    layouts, with row groups and with sampling (its one-hot term keeps a tile alive).  Dead
    tiles are never stored, and interpret mode fills unwritten outputs with NaN: a GEMM that
    read one would fail this."""
    h, w, wr, rg, opts = _case(with_sample, vd)
    want, dead = _filtered_reference(h, w, wr, rg, opts, _gpu_tiles(rows or N), EPS)
    assert 0.05 < dead < 0.9, dead  # the case exercises both skipped and kept tiles
    cfg = None if gemm_blocks is None else dict(blocks=gemm_blocks)
    got = _backward(h, w, wr, rg, opts, bwd_rows=rows, grad_filter_eps=EPS, gemm_config=cfg)
    zeroed = _backward(h, w, wr, rg, opts, bwd_rows=rows, grad_filter_eps=EPS, gemm="xla")
    exact = _backward(h, w, wr, rg, opts, bwd_rows=rows)
    for g, zr, r, e in zip(got, zeroed, want, exact):
        assert _max_rel(g, r) <= 1e-5, _max_rel(g, r)
        assert _max_rel(zr, r) <= 1e-5, _max_rel(zr, r)  # zeroing alone (cuBLAS path) agrees
        assert _max_rel(e, r) > 1e-4  # and the filter did change the gradient


@pytest.mark.parametrize("rows", [None, 15])
def test_tiny_eps_is_exact(rows):
    """With nothing below eps the skip loops visit every K step: the exact gradients, including
    ragged row groups (the last one shifted) and the overlapping last vocab chunk."""
    h, w, wr, rg, opts = _case(with_sample=True)
    got = _backward(h, w, wr, rg, opts, bwd_rows=rows, grad_filter_eps=1e-30)
    want = _backward(h, w, wr, rg, opts, bwd_rows=rows, gemm="pallas")
    for g, r in zip(got, want):
        assert _max_rel(g, r) <= 1e-6


@pytest.mark.parametrize("vd", [False, True])
def test_tpu_filtered_backward_matches_tile_rule(vd):
    """``pallas_tpu`` (interpret) skips the update matmul of the same dead tiles, on its grid."""
    from curriculax.kernels import pallas_tpu

    h, w, wr, rg, opts = _case(with_sample=True, vd=vd, v=4000)  # 128-wide tiles: a wider vocab
    want, dead = _filtered_reference(h, w, wr, rg, opts, _grid_tiles(16, 128, 4000), EPS)
    assert 0.05 < dead < 0.9, dead
    got = pallas_tpu.backward(h, w, None, wr, rg, opts, block_n=16, block_v=128, grad_filter_eps=EPS,
                              interpret=True)
    for g, r in zip(got, want):
        assert _max_rel(g, r) <= 1e-5, _max_rel(g, r)


def test_tpu_filtered_backward_lowers_for_mosaic():
    """The skip is a ``pl.when`` on a tile reduction: it lowers to Mosaic (never run on a TPU)."""
    from curriculax.kernels import pallas_tpu

    h, w, wr, rg, opts = _case(with_sample=True)
    h, w, wr = (x.astype(jnp.bfloat16) for x in (h, w, wr))
    fn = jax.jit(functools.partial(pallas_tpu.backward, hr=None, opts=opts, grad_filter_eps=2.0**-12))
    assert "tpu_custom_call" in fn.trace(h, w, wr=wr, rg=rg).lower(lowering_platforms=("tpu",)).as_text()


def _steps(flags, lane_axis, other, steps_per):
    """``_live_steps`` run in a one-program kernel: (count, [k_of(s) for s < count])."""
    cap = flags.shape[lane_axis] * steps_per

    def kernel(f_ref, o_ref):  # `other` is traced in the real kernels (from a program id): here too
        n, k_of = pallas_gpu._live_steps(f_ref, lane_axis, pl.program_id(0) + other, steps_per)
        o_ref[...] = jnp.full((cap + 1,), -1, jnp.int32)
        o_ref[0] = n

        def body(s, _):
            o_ref[1 + s] = k_of(s)
            return 0

        jax.lax.fori_loop(0, n, body, 0)

    out = pl.pallas_call(kernel, grid=(1,), out_shape=jax.ShapeDtypeStruct((cap + 1,), jnp.int32),
                         interpret=True)(flags)
    return int(out[0]), [int(x) for x in out[1:1 + int(out[0])]]


def test_live_steps_visit_only_live_tiles():
    flags = jnp.array([[0, 1, 0, 0, 1],
                       [0, 0, 0, 1, 0],
                       [0, 0, 0, 0, 0]], jnp.int32)
    assert _steps(flags, 1, 0, 2) == (4, [2, 3, 8, 9])  # row 0: live columns 1 and 4, 2 steps each
    assert _steps(flags, 1, 1, 1) == (1, [3])
    assert _steps(flags, 1, 2, 3) == (0, [])
    assert _steps(flags, 0, 3, 2) == (2, [2, 3])  # column 3: row 1 only
    assert _steps(flags, 0, 4, 1) == (1, [0])


def test_fused_lm_head_option():
    """``grad_filter_eps`` reaches the pallas_gpu backward, leaves the forward alone, and the
    XLA impls ignore it (exact gradients)."""
    h, w, wr, _, _ = _case()
    t = jax.random.randint(jax.random.key(1), (N,), 0, V)

    def grads(impl, eps):
        f = lambda h_, w_: fused_lm_head(h_, w_, t, impl=impl, grad_filter_eps=eps, block_n=BN,  # noqa: E731
                                         block_v=BV if impl == "pallas_gpu" else 64, interpret=True)
        loss = lambda h_, w_: -f(h_, w_).target_logprob.mean()  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

    (l_exact, g_exact), (l_filt, g_filt) = grads("pallas_gpu", None), grads("pallas_gpu", EPS)
    assert float(l_exact) == float(l_filt)
    assert 1e-4 < _max_rel(g_filt[0], g_exact[0]) < 0.2
    (_, g_x), (_, g_xf) = grads("xla_chunked", None), grads("xla_chunked", EPS)
    for a, b in zip(g_x, g_xf):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        fused_lm_head(h, w, t, grad_filter_eps=1)
    assert lm_head.resolve_grad_filter_eps("auto", jnp.bfloat16) == 2.0**-12
    assert lm_head.resolve_grad_filter_eps("auto", jnp.float32) == 2.0**-28


def test_filtered_backward_lowers_for_triton():
    """The skip loops (cumsum + dynamic trip count) and the flag output lower to Triton."""
    h, w, wr, rg, opts = _case(with_sample=True)
    h, w, wr = (x.astype(jnp.bfloat16) for x in (h, w, wr))
    fn = jax.jit(functools.partial(pallas_gpu.backward, hr=None, opts=opts, bwd_rows=32, grad_filter_eps=2.0**-12))
    text = fn.trace(h, w, wr=wr, rg=rg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 3


@pytest.mark.slow
def test_train_step_config_key():
    """``config.objective.grad_filter_eps`` reaches the kernel from a train step: the loss is the
    exact one, the gradient moves (a little) with pallas_gpu and not at all with xla_chunked."""
    from test_train import one_step, tiny_config  # tests/ is on sys.path under pytest

    metrics = {}
    for impl in ("xla_chunked", "pallas_gpu"):
        for eps in (None, 0.05):
            (_, m), _ = one_step(tiny_config(**{"objective.impl": impl, "objective.grad_filter_eps": eps}))
            metrics[impl, eps] = (float(m["loss"][0]), float(m["grad_norm"][0]))
    assert metrics["xla_chunked", 0.05] == metrics["xla_chunked", None]
    (loss, gn), (loss_f, gn_f) = metrics["pallas_gpu", None], metrics["pallas_gpu", 0.05]
    assert loss_f == loss and gn_f != gn and gn_f == pytest.approx(gn, rel=0.1)
