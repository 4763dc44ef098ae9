"""Tests for curriculax.kernels.fused_lm_head (CPU; Pallas kernels in interpret mode).

Reference: ``impl="xla_naive"`` (materialized logits + plain autodiff).

Tolerances
----------
* float32: every statistic and every gradient within ``1e-5`` of the naive
  result, relative to the array's max-abs scale (``max|a-b| <= 1e-5 * max(1,
  max|b|)``).  Observed: ~1e-7 - 5e-7.
* bfloat16 inputs (fp32 accumulation on both paths): statistics still within
  ``1e-5`` (they are fp32 functions of identical bf16 inputs).  Gradients are
  returned in bf16, i.e. rounded to 2^-8 relative, and the fused backward also
  rounds ``dlogits`` to bf16 before its two GEMMs (as CCE/Liger do), so we
  require (a) relative Frobenius error vs naive-bf16 <= 1e-2 and (b) error vs
  an fp32 ground truth no worse than 1.5x the naive-bf16 path's own error
  (+4e-3).  Observed: ~3e-3, i.e. one bf16 ulp.
* Pallas (interpret) vs xla_chunked: same blockwise math, so 1e-5 as well.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculax.kernels import IMPLS, LMHeadStats, fused_lm_head, resolve_impl
from curriculax.kernels import gumbel, xla

N, D, V = 45, 40, 333  # none is a multiple of any block size used below
D_REF = 24
FLOAT_STATS = ("target_logprob", "lse", "entropy", "kl_to_ref", "sampled_logprob")

# small blocks so that every impl runs several (ragged) blocks
BLOCKS = {
    "xla_chunked": dict(block_v=64),
    "pallas_gpu": dict(block_n=16, block_v=32, block_d=16),
    "pallas_tpu": dict(block_n=16, block_v=128),
}
FUSED = tuple(BLOCKS)

CONFIGS = {
    "plain": dict(),
    "kl_sep_ref_cap": dict(ref=True, ref_hidden=True, logit_softcap=4.0),
    "kl_ref_policy_cap": dict(ref=True, kl_direction="ref_policy", logit_softcap=6.0),
    "sample": dict(sample=True, temperature=0.7),
    "all": dict(ref=True, sample=True, logit_softcap=5.0),
}


def _inputs(dtype=jnp.float32, seed=0, n=N, d=D, v=V):
    k = jax.random.split(jax.random.key(seed), 8)
    h = jax.random.normal(k[0], (n, d))
    w = jax.random.normal(k[1], (d, v)) * (2.0 / np.sqrt(d))  # logits ~ N(0, 4)
    t = jax.random.randint(k[2], (n,), 0, v)
    t = t.at[7].set(-100).at[11].set(v + 5).at[12].set(v - 1).at[13].set(0)
    where = jnp.ones((n,), bool).at[3].set(False)
    return dict(
        h=h.astype(dtype),
        w=w.astype(dtype),
        t=t,
        where=where,
        ref_w=(w + 0.5 * jax.random.normal(k[3], (d, v)) / np.sqrt(d)).astype(dtype),
        ref_h=jax.random.normal(k[4], (n, D_REF)).astype(dtype),
        ref_w_sep=(jax.random.normal(k[5], (D_REF, v)) * (2.0 / np.sqrt(D_REF))).astype(dtype),
        rng=k[6],
        cts={name: jax.random.normal(kk, (n,)) for name, kk in zip(FLOAT_STATS, jax.random.split(k[7], 5))},
    )


def _kwargs(inp, cfg):
    kw = dict(where=inp["where"])
    if cfg.get("ref"):
        if cfg.get("ref_hidden"):
            kw.update(ref_weight=inp["ref_w_sep"], ref_hidden=inp["ref_h"])
        else:
            kw.update(ref_weight=inp["ref_w"])
    for key in ("logit_softcap", "kl_direction", "temperature"):
        if key in cfg:
            kw[key] = cfg[key]
    if cfg.get("sample"):
        kw["sample_rng"] = inp["rng"]
    return kw


def _run(impl, inp, cfg, extra=None):
    """Stats and per-statistic VJPs ``{stat: (d_h, d_w)}`` (one compile per impl)."""
    kw = _kwargs(inp, cfg)
    kw.update(extra if extra is not None else BLOCKS.get(impl, {}))

    def stats_fn(h, w):
        return fused_lm_head(h, w, inp["t"], impl=impl, interpret=True, **kw)

    @jax.jit
    def fwd_vjp(h, w, ct):
        out, vjp = jax.vjp(stats_fn, h, w)
        return out, vjp(ct)

    base = stats_fn(inp["h"], inp["w"])
    zeros = jax.tree.map(
        lambda x: np.zeros(x.shape, jax.dtypes.float0) if x.dtype == jnp.int32 else jnp.zeros_like(x), base
    )
    grads = {}
    for name in FLOAT_STATS:
        if getattr(base, name) is None:
            continue
        ct = zeros.replace(**{name: inp["cts"][name]})
        out, grads[name] = fwd_vjp(inp["h"], inp["w"], ct)
    return out, grads


def _close(a, b, tol, what):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err = np.max(np.abs(a - b))
    scale = max(1.0, float(np.max(np.abs(b))))
    assert err <= tol * scale, f"{what}: max err {err:.3e} > {tol:.0e} * {scale:.3g}"


def _relnorm(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------
# values and gradients vs the naive reference (float32)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inp32():
    return _inputs(jnp.float32)


@pytest.fixture(scope="module")
def naive32(inp32):
    return {name: _run("xla_naive", inp32, cfg) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("impl", FUSED)
def test_fp32_matches_naive(impl, cfg_name, inp32, naive32):
    cfg = CONFIGS[cfg_name]
    out, grads = _run(impl, inp32, cfg)
    ref_out, ref_grads = naive32[cfg_name]
    for name in FLOAT_STATS:
        a, b = getattr(out, name), getattr(ref_out, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == jnp.float32 and a.shape == (N,)
            _close(a, b, 1e-5, f"{impl}/{cfg_name}/{name}")
    _close(out.max_logprob, ref_out.max_logprob, 1e-5, f"{impl}/{cfg_name}/max_logprob")
    if cfg.get("sample"):
        assert out.sampled_token.dtype == jnp.int32
        np.testing.assert_array_equal(out.sampled_token, ref_out.sampled_token)
    assert set(grads) == set(ref_grads)
    for name, (dh, dw) in grads.items():
        rdh, rdw = ref_grads[name]
        assert dh.dtype == jnp.float32 and dw.dtype == jnp.float32
        _close(dh, rdh, 1e-5, f"{impl}/{cfg_name}/d_hidden[{name}]")
        _close(dw, rdw, 1e-5, f"{impl}/{cfg_name}/d_weight[{name}]")


def test_naive_reference_is_right(inp32):
    """Independent float64 numpy check of the reference itself (softcap + KL + sampling)."""
    cfg = CONFIGS["all"]
    out, _ = _run("xla_naive", inp32, cfg)
    h = np.asarray(inp32["h"], np.float64)
    z = 5.0 * np.tanh(h @ np.asarray(inp32["w"], np.float64) / 5.0)
    zr = 5.0 * np.tanh(h @ np.asarray(inp32["ref_w"], np.float64) / 5.0)
    lse = np.log(np.exp(z).sum(-1))
    logp = z - lse[:, None]
    logq = zr - np.log(np.exp(zr).sum(-1))[:, None]
    p = np.exp(logp)
    valid = np.asarray(inp32["where"]) & (np.asarray(inp32["t"]) >= 0) & (np.asarray(inp32["t"]) < V)
    t = np.where(valid, np.asarray(inp32["t"]), 0)
    g = np.asarray(gumbel.gumbel_noise(inp32["rng"], N, V), np.float64)
    tok = np.argmax(z + g, -1)
    want = dict(
        lse=lse, entropy=-(p * logp).sum(-1), target_logprob=logp[np.arange(N), t],
        kl_to_ref=(p * (logp - logq)).sum(-1), sampled_logprob=logp[np.arange(N), tok], max_logprob=logp.max(-1),
    )
    for k, v in want.items():
        np.testing.assert_allclose(getattr(out, k), np.where(valid, v, 0), rtol=2e-5, atol=2e-5, err_msg=k)
    np.testing.assert_array_equal(out.sampled_token, np.where(valid, tok, 0))


# ----------------------------------------------------------------------------
# bfloat16
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_case():
    inp = _inputs(jnp.bfloat16, seed=1)
    cfg = CONFIGS["all"]
    naive = _run("xla_naive", inp, cfg)
    # fp32 ground truth on the *same* (bf16-representable) values
    inp_up = dict(inp, **{k: inp[k].astype(jnp.float32) for k in ("h", "w", "ref_w")})
    truth = _run("xla_naive", inp_up, cfg)
    return inp, cfg, naive, truth


@pytest.mark.parametrize("impl", FUSED)
def test_bf16_matches_naive(impl, bf16_case):
    inp, cfg, (ref_out, ref_grads), (_, true_grads) = bf16_case
    out, grads = _run(impl, inp, cfg)
    for name in FLOAT_STATS:
        _close(getattr(out, name), getattr(ref_out, name), 1e-5, f"{impl}/bf16/{name}")
    np.testing.assert_array_equal(out.sampled_token, ref_out.sampled_token)
    for name, (dh, dw) in grads.items():
        assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
        for i, (g, r, tr) in enumerate(zip((dh, dw), ref_grads[name], true_grads[name])):
            what = f"{impl}/bf16/{'d_hidden' if i == 0 else 'd_weight'}[{name}]"
            assert np.all(np.isfinite(np.asarray(g, np.float32))), what
            assert _relnorm(g, r) <= 1e-2, (what, _relnorm(g, r))
            assert _relnorm(g, tr) <= 1.5 * _relnorm(r, tr) + 4e-3, (what, _relnorm(g, tr), _relnorm(r, tr))


@pytest.mark.parametrize("rows", [15, 16])
@pytest.mark.parametrize("impl", ["xla_chunked", "pallas_gpu"])
def test_backward_row_groups_match_naive(impl, rows, inp32, naive32):
    """``bwd_rows``: 45 rows in 3 groups of 15 (a scan over groups) or of 16 (the last group
    shifted over rows already done)."""
    cfg = CONFIGS["all"]
    _, grads = _run(impl, inp32, cfg, dict(BLOCKS[impl], bwd_rows=rows))
    _, ref_grads = naive32["all"]
    for name, (dh, dw) in grads.items():
        _close(dh, ref_grads[name][0], 1e-5, f"{impl}/bwd_rows/d_hidden[{name}]")
        _close(dw, ref_grads[name][1], 1e-5, f"{impl}/bwd_rows/d_weight[{name}]")


def test_backward_row_groups_bf16(bf16_case):
    """Each group adds one bf16 rounding of ``d_weight``; 3 groups stay within the bf16 bound."""
    inp, cfg, (_, ref_grads), (_, true_grads) = bf16_case
    _, grads = _run("xla_chunked", inp, cfg, dict(block_v=64, bwd_rows=16))
    for name, (dh, dw) in grads.items():
        for g, r, tr in zip((dh, dw), ref_grads[name], true_grads[name]):
            assert g.dtype == jnp.bfloat16
            assert _relnorm(g, tr) <= 1.5 * _relnorm(r, tr) + 4e-3, (name, _relnorm(g, tr), _relnorm(r, tr))


def _backward_case(dtype):
    inp = _inputs(dtype, seed=3)
    opts = xla.HeadOpts(softcap=5.0, with_kl=True)
    h, w, wr = inp["h"], inp["w"], inp["ref_w"]
    valid = inp["where"] & (inp["t"] >= 0) & (inp["t"] < V)
    t = jnp.where(valid, inp["t"], -1)
    st = xla.finalize(xla.chunked_forward(h, w, None, wr, t[:, None], None, opts, block_v=64), opts)
    cts = {k: inp["cts"][k] for k in ("target_logprob", "entropy", "kl_to_ref")}
    return h, w, wr, xla.row_grad(st, cts, t, None, valid, opts), opts


@pytest.mark.parametrize("vd", [False, True])
@pytest.mark.parametrize("rows", [None, 15, 16])
def test_inplace_gemm_update_matches_xla(rows, vd):
    """``pallas_gpu.pallas_update`` (interpret): the in-place GEMM kernels, with tiles smaller than
    every dimension, give the XLA GEMM updates' gradients, with and without row groups."""
    from curriculax.kernels import pallas_gpu

    h, w, wr, rg, opts = _backward_case(jnp.float32)
    if vd:
        w, wr, opts = w.T, wr.T, dataclasses.replace(opts, w_vd=True)
    want = xla.chunked_backward(h, w, None, wr, rg, opts, block_v=64, bwd_rows=rows)
    small = pallas_gpu.pallas_update(interpret=True, blocks=(16, 16, 16))
    got = xla.chunked_backward(h, w, None, wr, rg, opts, block_v=64, bwd_rows=rows, update_fn=small)
    full = pallas_gpu.backward(h, w, None, wr, rg, opts, block_n=16, block_v=32, block_d=16, chunk_v=64,
                               bwd_rows=rows, gemm="pallas", interpret=True)
    for g, f, r in zip(got, full, want):
        _close(g, r, 1e-5, f"in-place update, rows={rows}")
        _close(f, r, 1e-5, f"pallas_gpu gemm=pallas, rows={rows}")


@pytest.mark.parametrize("rows", [15, 16])
def test_row_groups_read_ref_hidden_in_place(rows):
    """Row groups with a separate reference hidden state: the dlogits kernel reads both hidden
    arrays at the group's first row (no per-group copies) and matches one group."""
    from curriculax.kernels import pallas_gpu

    h, w, wr, _, opts = _backward_case(jnp.float32)
    hr = jnp.flip(h, axis=0) * 0.5
    inp = _inputs(jnp.float32, seed=3)
    valid = inp["where"] & (inp["t"] >= 0) & (inp["t"] < V)
    t = jnp.where(valid, inp["t"], -1)
    st = xla.finalize(xla.chunked_forward(h, w, hr, wr, t[:, None], None, opts, block_v=64), opts)
    rg = xla.row_grad(st, {k: inp["cts"][k] for k in ("target_logprob", "kl_to_ref")}, t, None, valid, opts)
    want = xla.chunked_backward(h, w, hr, wr, rg, opts, block_v=64)
    got = pallas_gpu.backward(h, w, hr, wr, rg, opts, block_n=16, block_v=32, block_d=16, chunk_v=64,
                              bwd_rows=rows, interpret=True)
    for g, r in zip(got, want):
        _close(g, r, 1e-5, f"pallas_gpu ref_hidden, rows={rows}")


@pytest.mark.parametrize("vocab,hinted", [(320, True), (301, False)])
def test_backward_chunk_offset_alignment_hint(vocab, hinted):
    """The three backward kernels (dlogits and the two in-place GEMMs) tell Triton the chunk
    offset is 16-aligned exactly when every chunk start is (``V % 16 == 0``). Without the hint a
    ``[d, V]`` head loses vector loads: 36 vs 24 ms on an H100 (fused_loss.md)."""
    from curriculax.kernels import pallas_gpu

    n, d, opts = 64, 32, xla.HeadOpts()
    h, w = jnp.ones((n, d), jnp.bfloat16), jnp.ones((d, vocab), jnp.bfloat16)
    t, valid = jnp.zeros((n,), jnp.int32), jnp.ones((n,), bool)
    st = xla.finalize(xla.chunked_forward(h, w, None, None, t[:, None], None, opts, block_v=64), opts)
    rg = xla.row_grad(st, {"target_logprob": jnp.ones((n,))}, t, None, valid, opts)
    jaxpr = str(jax.make_jaxpr(lambda h_, w_: pallas_gpu.backward(h_, w_, None, None, rg, opts, bwd_rows=32,
                                                                  chunk_v=64))(h, w))
    assert jaxpr.count("pallas_call") == 3
    assert jaxpr.count("multiple_of") == (3 if hinted else 0)


def test_inplace_gemm_update_bf16_and_lowering():
    from curriculax.kernels import pallas_gpu

    h, w, wr, rg, opts = _backward_case(jnp.bfloat16)
    want = xla.chunked_backward(h, w, None, wr, rg, opts, block_v=64, bwd_rows=16)
    got = pallas_gpu.backward(h, w, None, wr, rg, opts, block_n=16, block_v=32, block_d=16, chunk_v=64,
                              bwd_rows=16, gemm="pallas", interpret=True)
    for g, r in zip(got, want):
        assert g.dtype == jnp.bfloat16 and _relnorm(g, r) <= 1e-2, _relnorm(g, r)
    fn = jax.jit(lambda h_, w_, wr_, rg_: pallas_gpu.backward(h_, w_, None, wr_, rg_, opts, bwd_rows=16,
                                                              gemm="pallas"))
    text = fn.trace(h, w, wr, rg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 3  # dlogits + the two update kernels


@pytest.mark.parametrize("gemm", ["xla", "pallas"])
def test_bf16_dh_accumulator(gemm):
    """``acc_dtype=bf16`` (CCE-style, opt-in): ``d_h`` is summed over vocab chunks in its own dtype;
    each chunk adds one rounding, so it stays within a small multiple of the float32 path's error."""
    from curriculax.kernels import pallas_gpu

    h, w, wr, rg, opts = _backward_case(jnp.bfloat16)
    true = xla.chunked_backward(h.astype(jnp.float32), w.astype(jnp.float32), None, wr.astype(jnp.float32), rg,
                                opts, block_v=64)
    f32 = xla.chunked_backward(h, w, None, wr, rg, opts, block_v=64)
    got = pallas_gpu.backward(h, w, None, wr, rg, opts, block_n=16, block_v=32, block_d=16, chunk_v=32,
                              gemm=gemm, acc_dtype=jnp.bfloat16, unroll=2, interpret=True)
    err_f32, err_bf16 = _relnorm(f32[0], true[0]), _relnorm(got[0], true[0])
    assert got[0].dtype == jnp.bfloat16 and err_f32 < err_bf16 <= 3 * err_f32 + 2e-3, (err_bf16, err_f32)
    assert _relnorm(got[1], true[1]) <= 1.5 * _relnorm(f32[1], true[1]) + 1e-3


@pytest.mark.parametrize("impl,extra", [
    ("xla_naive", {}), ("xla_chunked", {}), ("xla_chunked", dict(bwd_rows=16)), ("pallas_gpu", {}),
    ("pallas_gpu", dict(bwd_rows=15)), ("pallas_tpu", {}),
])
def test_vd_layout_matches_dv(impl, extra, inp32, naive32):
    """``weight_layout="vd"``: the head (and reference head) stored ``[V, d]``, as a tied
    embedding is, gives the ``[d, V]`` results, with ``d_weight`` in the ``[V, d]`` layout."""
    cfg = CONFIGS["all"]
    inp = dict(inp32, w=inp32["w"].T, ref_w=inp32["ref_w"].T)
    out, grads = _run(impl, inp, cfg, dict(BLOCKS.get(impl, {}), weight_layout="vd", **extra))
    ref_out, ref_grads = naive32["all"]
    for name in FLOAT_STATS:
        _close(getattr(out, name), getattr(ref_out, name), 1e-5, f"{impl}/vd/{name}")
    np.testing.assert_array_equal(out.sampled_token, ref_out.sampled_token)
    for name, (dh, dw) in grads.items():
        assert dw.shape == (V, D)
        _close(dh, ref_grads[name][0], 1e-5, f"{impl}/vd/d_hidden[{name}]")
        _close(dw.T, ref_grads[name][1], 1e-5, f"{impl}/vd/d_weight[{name}]")


# ----------------------------------------------------------------------------
# Pallas (interpret) == xla_chunked
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_matches_chunked(impl, dtype):
    inp = _inputs(dtype, seed=2, n=29, d=48, v=200)
    cfg = dict(ref=True, sample=True, kl_direction="ref_policy", logit_softcap=3.0, temperature=1.3)
    out_c, grads_c = _run("xla_chunked", inp, cfg, dict(block_v=48))
    out_p, grads_p = _run(impl, inp, cfg)
    for name in FLOAT_STATS:
        _close(getattr(out_p, name), getattr(out_c, name), 1e-5, f"{impl} vs chunked {name}")
    np.testing.assert_array_equal(out_p.sampled_token, out_c.sampled_token)
    for name in grads_c:
        for g, r in zip(grads_p[name], grads_c[name]):
            if dtype == jnp.float32:
                _close(g, r, 1e-5, f"{impl} vs chunked grad[{name}]")
            else:
                assert _relnorm(g, r) <= 1e-2


# ----------------------------------------------------------------------------
# masking, sampling, worked examples, API
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["xla_naive", "xla_chunked", "pallas_gpu"])
def test_masked_rows_are_zero_with_zero_grad(impl, inp32):
    cfg = CONFIGS["all"]
    out, grads = _run(impl, inp32, cfg)
    masked = np.array([3, 7, 11])  # where=False, target -100, target >= V
    for name in FLOAT_STATS + ("max_logprob",):
        np.testing.assert_array_equal(np.asarray(getattr(out, name))[masked], 0.0)
    np.testing.assert_array_equal(np.asarray(out.sampled_token)[masked], 0)
    assert np.all(np.asarray(out.lse)[[12, 13]] != 0)  # targets V-1 and 0 are valid
    for name, (dh, _) in grads.items():
        np.testing.assert_array_equal(np.asarray(dh)[masked], 0.0)
        assert np.any(np.asarray(dh)[[0, 1, 2]] != 0), name


def test_gumbel_max_sampling_distribution():
    """Counter-based Gumbel-max samples follow softmax(z / T)."""
    n, v, temp = 20000, 6, 0.8
    z = jnp.array([1.5, 0.0, -1.0, 0.7, 2.0, -3.0])
    w = jnp.tile(z[None, :], (1, 1))  # hidden = 1 -> logits = z for every row
    h = jnp.ones((n, 1))
    out = fused_lm_head(h, w, jnp.zeros((n,), jnp.int32), sample_rng=jax.random.key(3), temperature=temp,
                        impl="xla_chunked", block_v=4)
    freq = np.bincount(np.asarray(out.sampled_token), minlength=v) / n
    want = np.asarray(jax.nn.softmax(z / temp))
    tol = 4 * np.sqrt(want * (1 - want) / n) + 1e-3  # 4 sigma
    assert np.all(np.abs(freq - want) <= tol), (freq, want)
    np.testing.assert_allclose(out.sampled_logprob, np.asarray(jax.nn.log_softmax(z))[np.asarray(out.sampled_token)],
                               atol=1e-6)
    # different keys -> different samples; same key -> same samples
    again = fused_lm_head(h[:100], w, jnp.zeros((100,), jnp.int32), sample_rng=jax.random.key(3), temperature=temp)
    other = fused_lm_head(h[:100], w, jnp.zeros((100,), jnp.int32), sample_rng=jax.random.key(4), temperature=temp)
    np.testing.assert_array_equal(again.sampled_token, out.sampled_token[:100])
    assert np.any(np.asarray(other.sampled_token) != np.asarray(again.sampled_token))


def test_gumbel_noise_is_blocking_invariant():
    key = jax.random.key(11)
    full = gumbel.gumbel_noise(key, 10, 50)
    rh = gumbel.noise_row_hash(key, 10)[:, None]
    part = gumbel.gumbel_from_hash(rh[3:7], jnp.arange(20, 35, dtype=jnp.int32)[None, :])
    np.testing.assert_array_equal(part, full[3:7, 20:35])
    u = np.exp(-np.exp(-np.asarray(gumbel.gumbel_noise(key, 200, 500))))
    assert 0.49 < u.mean() < 0.51 and 0.0 < u.min() and u.max() < 1.0  # ~uniform


@pytest.mark.parametrize("impl", ["xla_naive", "xla_chunked"])
def test_asft_dft_worked_example(impl):
    """shared/methods/asft.md example 1: z = [2, 1, 0], uniform reference, y = 0."""
    h = jnp.ones((1, 1))
    w = jnp.array([[2.0, 1.0, 0.0]])
    ref = jnp.ones((1, 3))
    t = jnp.array([0])

    def f(w_):
        return fused_lm_head(h, w_, t, ref_weight=ref, kl_direction="ref_policy", impl=impl)

    s = f(w)
    np.testing.assert_allclose(s.target_logprob, [-0.407606], atol=1e-6)
    np.testing.assert_allclose(s.kl_to_ref, [0.308994], atol=1e-6)  # KL(ref || theta)
    np.testing.assert_allclose(jnp.exp(s.target_logprob) * -s.target_logprob, [0.271156], atol=1e-6)  # DFT
    dkl = jax.grad(lambda w_: f(w_).kl_to_ref.sum())(w)  # h = 1 -> d_W = dKL/dz
    np.testing.assert_allclose(dkl[0], [0.331908, -0.088605, -0.243303], atol=1e-6)
    # at theta == ref both directions are 0 with 0 gradient
    for direction in ("policy_ref", "ref_policy"):
        g = jax.grad(lambda w_: fused_lm_head(h, w_, t, ref_weight=w, kl_direction=direction, impl=impl)
                     .kl_to_ref.sum())(w)
        np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_api_pytree_jit_and_validation(inp32):
    stats = jax.jit(lambda h, w, t: fused_lm_head(h, w, t))(inp32["h"], inp32["w"], inp32["t"])
    assert isinstance(stats, LMHeadStats)
    assert stats.kl_to_ref is None and stats.sampled_token is None and stats.sampled_logprob is None
    assert len(jax.tree.leaves(stats)) == 4  # target_logprob, lse, entropy, max_logprob
    assert resolve_impl("auto") == "xla_chunked"  # CPU default
    assert set(IMPLS) == {"auto", "xla_naive", "xla_chunked", "pallas_gpu", "pallas_tpu"}
    with pytest.raises(ValueError):
        fused_lm_head(inp32["h"], inp32["w"], inp32["t"], impl="cuda_magic")
    with pytest.raises(ValueError):
        fused_lm_head(inp32["h"], inp32["w"][:, :10].T, inp32["t"])
    with pytest.raises(ValueError):
        fused_lm_head(inp32["h"], inp32["w"], inp32["t"], ref_hidden=inp32["ref_h"])
    with pytest.raises(ValueError):
        fused_lm_head(inp32["h"], inp32["w"], inp32["t"], ref_weight=inp32["w"], kl_direction="forward")
    # max_logprob is a metric: no gradient on any impl
    for impl in ("xla_naive", "xla_chunked"):
        g = jax.grad(lambda w: fused_lm_head(inp32["h"], w, inp32["t"], impl=impl).max_logprob.sum())(inp32["w"])
        np.testing.assert_array_equal(g, 0.0)
    # the reference head gets no gradient, even when it is the policy's own weight
    g_ref = jax.grad(lambda r: fused_lm_head(inp32["h"], inp32["w"], inp32["t"], ref_weight=r).kl_to_ref.sum())(
        inp32["ref_w"]
    )
    np.testing.assert_array_equal(g_ref, 0.0)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_second_order_through_pallas_names_the_fix(impl):
    h = jax.random.normal(jax.random.key(0), (16, 8))
    w = jax.random.normal(jax.random.key(1), (8, 40))
    t = jnp.arange(16) % 40

    def loss(h, impl):
        return -fused_lm_head(h, w, t, impl=impl, interpret=True).target_logprob.sum()

    g = jax.grad(loss)(h, impl)  # first order works
    np.testing.assert_allclose(g, jax.grad(loss)(h, "xla_chunked"), rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="impl='xla_chunked'"):
        jax.grad(lambda h: jax.grad(loss)(h, impl).sum())(h)
    with pytest.raises(NotImplementedError, match="impl='xla_chunked'"):
        jax.hessian(loss)(h, impl)
    assert jax.hessian(loss)(h, "xla_chunked").shape == (16, 8, 16, 8)


# ----------------------------------------------------------------------------
# memory: no [N, V] temporary
# ----------------------------------------------------------------------------

_MN, _MD, _MV = 1024, 32, 65536  # N*V*4 = 256 MiB >> W (8 MiB)


def _grad_fn(impl, **kw):
    def f(h, w, t):
        def loss(h_, w_):
            s = fused_lm_head(h_, w_, t, impl=impl, ref_weight=w, sample_rng=jax.random.key(0), **kw)
            return (s.target_logprob + s.entropy + s.kl_to_ref + s.sampled_logprob + s.lse).sum()

        return jax.grad(loss, argnums=(0, 1))(h, w)

    return jax.jit(f)


def _shapes():
    return (
        jax.ShapeDtypeStruct((_MN, _MD), jnp.float32),
        jax.ShapeDtypeStruct((_MD, _MV), jnp.float32),
        jax.ShapeDtypeStruct((_MN,), jnp.int32),
    )


def test_chunked_memory_has_no_NxV_temporary():
    nv_bytes = _MN * _MV * 4
    naive = _grad_fn("xla_naive").lower(*_shapes()).compile().memory_analysis()
    chunked = _grad_fn("xla_chunked", block_v=1024).lower(*_shapes()).compile().memory_analysis()
    assert naive.temp_size_in_bytes >= nv_bytes  # the test can fail
    assert chunked.temp_size_in_bytes < nv_bytes / 8, chunked.temp_size_in_bytes


def test_backward_row_groups_shrink_the_accumulator():
    """The float32 ``d_hidden`` accumulator is ``[bwd_rows, d]``, not ``[N, d]``."""
    n, d, v = 4096, 256, 8192
    args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
            jax.ShapeDtypeStruct((n,), jnp.int32))

    def temp(rows):
        def f(h, w, t):
            return jax.grad(lambda h_, w_: fused_lm_head(h_, w_, t, impl="xla_chunked", block_v=512,
                                                         bwd_rows=rows).target_logprob.sum(),
                            argnums=(0, 1))(h, w)
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    one, grouped = temp(None), temp(512)
    assert one - grouped >= 4 * (n - 512) * d * 0.9, (one, grouped)
    assert xla.default_bwd_rows(8192, 2048, 128256, 2) == 2048  # 16 MiB accumulator, 3.0% of the grads
    assert xla.default_bwd_rows(16384, 1536, 151936, 2) == 2048
    assert xla.default_bwd_rows(512, 2048, 128256, 2) == 512  # small: one group
    assert xla.default_bwd_rows(8192, 2048, 128256, 4) == 8192  # float32: no rounding to trade


@pytest.mark.parametrize("impl,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu"), ("xla_chunked", "cpu")])
def test_lowering_has_no_NxV_buffer(impl, platform):
    """Lower fwd+bwd for the real backend (Triton / Mosaic, no device needed) and
    check that no array in the program has ``N*V`` (or more) elements."""
    import re

    lowered = _grad_fn(impl, interpret=False).trace(*_shapes()).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    if platform != "cpu":
        assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
    sizes = [int(np.prod([int(x) for x in m.rstrip("x").split("x")])) for m in re.findall(r"tensor<((?:\d+x)+)", text)]
    assert max(sizes) < _MN * _MV / 4, max(sizes)


@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("impl,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
def test_mixed_dtype_lowering(impl, platform, layout):
    """bf16 activations with a float32 head (and bf16 reference head), as a bf16-compute model with
    float32 params feeds the kernel, in both head layouts: Triton and Mosaic need one operand
    dtype per dot."""
    def f(h, w, wr, t):
        def loss(h_, w_):
            s = fused_lm_head(h_, w_, t, impl=impl, interpret=False, ref_weight=wr, bwd_rows=64,
                              weight_layout=layout)
            return (s.target_logprob + s.kl_to_ref).sum()
        return jax.grad(loss, argnums=(0, 1))(h, w)

    head = (64, 1024) if layout == "dv" else (1024, 64)
    args = (jax.ShapeDtypeStruct((256, 64), jnp.bfloat16), jax.ShapeDtypeStruct(head, jnp.float32),
            jax.ShapeDtypeStruct(head, jnp.bfloat16), jax.ShapeDtypeStruct((256,), jnp.int32))
    jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))


def test_gpu_tiles_fit_shared_memory_and_chunk_defaults():
    from curriculax.kernels import pallas_gpu

    for blocks in (pallas_gpu.FWD_BLOCKS, pallas_gpu.BWD_BLOCKS, pallas_gpu.EXTRA_FWD_BLOCKS,
                   pallas_gpu.EXTRA_BWD_BLOCKS, pallas_gpu.SMALL_BWD_BLOCKS):
        bn, bv, bk = blocks
        for itemsize in (2, 4):
            for n_w in (1, 2):
                k, st = pallas_gpu._fit_smem(bn, bv, bk, 3, itemsize, n_w)
                assert st >= 2 and k >= 16 and st * (bn * k + n_w * k * bv) * itemsize <= pallas_gpu._SMEM_BUDGET
    assert xla.default_block_v(8192, 128256) == 2048  # GPU-tuned (see xla.default_block_v)
    assert xla.default_block_v(1024, 16032) == 2048  # >= 4 chunks
    assert xla.default_block_v(5, 7) == 7
    assert pallas_gpu.default_chunk_v(8192, 128256) == 2048
    assert pallas_gpu.default_chunk_v(16384, 151936) == 2048  # H100 sweep: 45.9 ms vs 52.2 at 1024
    assert pallas_gpu.default_chunk_v(65536, 151936) == 512
    # bwd_rows="auto" on both bench shapes: 2048-row groups keep the big tiles (H100: 9-10% faster)
    for n, d, v in ((8192, 2048, 128256), (16384, 1536, 151936)):
        rows = xla.default_bwd_rows(n, d, v, 2)
        assert rows == 2048
        assert pallas_gpu.bwd_blocks(rows, pallas_gpu.default_chunk_v(n, v), v) == pallas_gpu.BWD_BLOCKS
        assert pallas_gpu.bwd_blocks(rows, 2048, v, filtered=True) == pallas_gpu.SMALL_BWD_BLOCKS
    assert pallas_gpu.bwd_blocks(256, 2048, 128256) == pallas_gpu.SMALL_BWD_BLOCKS  # 16 programs
    assert pallas_gpu.bwd_blocks(8192, 2048, 128256, filtered=True) == pallas_gpu.BWD_BLOCKS


@pytest.mark.slow
def test_pallas_tpu_under_tpu_interpreter(inp32, naive32):
    """The TPU-faithful interpreter (simulated VMEM / DMAs / grid order)."""
    from jax.experimental.pallas import tpu as pltpu

    cfg = CONFIGS["all"]

    def loss(h, w):
        s = fused_lm_head(h, w, inp32["t"], impl="pallas_tpu", interpret=pltpu.InterpretParams(),
                          **_kwargs(inp32, cfg), **BLOCKS["pallas_tpu"])
        return sum(jnp.sum(inp32["cts"][k] * getattr(s, k)) for k in FLOAT_STATS), s

    (_, out), (dh, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(inp32["h"], inp32["w"])
    ref_out, ref_grads = naive32["all"]
    for name in FLOAT_STATS:
        _close(getattr(out, name), getattr(ref_out, name), 1e-5, name)
    np.testing.assert_array_equal(out.sampled_token, ref_out.sampled_token)
    _close(dh, sum(ref_grads[k][0] for k in FLOAT_STATS), 1e-5, "d_hidden")
    _close(dw, sum(ref_grads[k][1] for k in FLOAT_STATS), 1e-5, "d_weight")


@pytest.mark.slow
@pytest.mark.parametrize("impl", FUSED)
def test_larger_random_shapes(impl):
    """Bigger / odd shapes with default block sizes (slow in interpret mode)."""
    t0 = time.time()
    inp = _inputs(jnp.float32, seed=5, n=300, d=72, v=1500)
    cfg = CONFIGS["all"]
    out, grads = _run(impl, inp, cfg, extra={})
    ref_out, ref_grads = _run("xla_naive", inp, cfg, extra={})
    for name in FLOAT_STATS:
        _close(getattr(out, name), getattr(ref_out, name), 1e-5, name)
    np.testing.assert_array_equal(out.sampled_token, ref_out.sampled_token)
    for name in grads:
        for g, r in zip(grads[name], ref_grads[name]):
            _close(g, r, 1e-5, name)
    assert time.time() - t0 < 600


def test_scale_doc_snippets_run():
    """The ``fused_lm_head`` snippets of docs/scale.md run as written, in order (the gradient
    filtering one reuses the first one's inputs)."""
    import pathlib
    import re
    import textwrap

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "scale.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "fused_lm_head" in b]
    assert len(blocks) == 2
    scope, values = {}, []
    for block in blocks:
        exec(compile(block, "docs/scale.md", "exec"), scope)  # noqa: S102
        assert scope["d_h"].shape == (512, 64) and scope["d_w"].shape == (64, 5000)
        values.append(float(scope["value"]))
    assert np.isfinite(values[0]) and values[1] == pytest.approx(values[0], rel=1e-2)  # same loss


@pytest.mark.parametrize("impl", ["xla_naive", "xla_chunked", "pallas_gpu"])
def test_head_runs_in_the_activation_dtype(impl):
    """bf16 activations with a float32 head (bf16 compute, float32 params): the matmuls run in
    bf16, as ``Transformer.logits`` does, without a bf16 copy of the head; the head's gradient
    comes back in float32."""
    inp = _inputs(jnp.float32, seed=5, n=24, d=16, v=50)
    h, w, t = inp["h"].astype(jnp.bfloat16), inp["w"], jnp.clip(inp["t"], 0, 49)
    kw = dict(impl=impl, interpret=True, **BLOCKS.get(impl, {}))

    def loss(w_):
        return fused_lm_head(h, w_, t, **kw).target_logprob.sum()

    got, g = jax.value_and_grad(loss)(w)
    want, g16 = jax.value_and_grad(loss)(w.astype(jnp.bfloat16))
    assert g.dtype == jnp.float32 and float(got) == pytest.approx(float(want), rel=1e-6)
    _close(g, g16, 1e-2, f"{impl}: float32-head gradient vs bf16-head gradient")


def _fmix32_inverse(y: int) -> int:
    """Inverse of MurmurHash3's fmix32 on uint32 Python ints."""
    m = 0xFFFFFFFF
    y ^= y >> 16
    y = (y * pow(0xC2B2AE35, -1, 1 << 32)) & m
    y ^= (y >> 13) ^ (y >> 26)
    y = (y * pow(0x85EBCA6B, -1, 1 << 32)) & m
    return y ^ (y >> 16)


def test_gumbel_noise_is_finite_at_the_top_hash():
    """The largest hash values must not round u to 1.0 (g = +inf would be sampled whatever its logit)."""
    top = [_fmix32_inverse(x) for x in (0xFFFFFFFF, 0xFFFFFF00)]  # column 0: x = fmix32(row_hash)
    rh = jnp.asarray(np.array(top, np.uint32).view(np.int32))[:, None]
    g = np.asarray(gumbel.gumbel_from_hash(rh, jnp.zeros((1, 1), jnp.int32)))
    assert np.isfinite(g).all() and (g < 17.0).all(), g
    z = jnp.zeros((2, 3)).at[:, 0].set(-1e4)  # column 0 (the top-hash cell) is impossible
    opts = xla.HeadOpts(with_sample=True)
    st = xla.tile_state(z, None, jnp.ones((1, 3), bool), jnp.arange(3, dtype=jnp.int32)[None, :],
                        jnp.full((2, 1), -1, jnp.int32), rh, opts)
    assert (np.asarray(st.idx) != 0).all()


@pytest.mark.parametrize("impl", FUSED)
def test_empty_batch(impl):
    """No tokens (N=0): empty statistics and zero gradients, as xla_naive, not a ZeroDivisionError."""
    h, w, t = jnp.zeros((0, 8)), jnp.ones((8, 40)), jnp.zeros((0,), jnp.int32)
    st = fused_lm_head(h, w, t, impl=impl, ref_weight=w, sample_rng=jax.random.key(0))
    assert st.target_logprob.shape == st.kl_to_ref.shape == st.sampled_token.shape == (0,)
    d_h, d_w = jax.grad(lambda h, w: fused_lm_head(h, w, t, impl=impl).target_logprob.sum(), (0, 1))(h, w)
    assert d_h.shape == (0, 8) and not np.asarray(d_w).any()


@pytest.mark.parametrize("impl", ("xla_naive",) + FUSED)
def test_sample_rows_make_a_row_subset_sample_like_the_full_batch(impl):
    """Gradient accumulation's micro-batch (rows 1, 4, 7, ...) with ``sample_rows`` = those row
    indices draws the tokens the whole batch draws there; without them it draws others."""
    inp = _inputs()
    kw = dict(sample_rng=inp["rng"], impl=impl, interpret=True, **BLOCKS.get(impl, {}))
    full = fused_lm_head(inp["h"], inp["w"], inp["t"], **kw).sampled_token
    rows = jnp.arange(1, N, 3)
    part = fused_lm_head(inp["h"][rows], inp["w"], inp["t"][rows], sample_rows=rows, **kw)
    np.testing.assert_array_equal(part.sampled_token, full[rows])
    plain = fused_lm_head(inp["h"][rows], inp["w"], inp["t"][rows], **kw).sampled_token
    assert (np.asarray(plain) != np.asarray(full[rows])).any()
    with pytest.raises(ValueError, match="sample_rows"):
        fused_lm_head(inp["h"], inp["w"], inp["t"], sample_rows=rows, **kw)


@pytest.mark.parametrize("impl", ["xla_naive", "xla_chunked", "pallas_gpu", "pallas_tpu"])
def test_argmax_target_counts_as_correct(impl):
    """``target_logprob >= max_logprob`` (the trainer's token accuracy) holds whenever the target
    is the argmax: both must be computed the same way, not max_logprob as -log(s)."""
    k = jax.random.split(jax.random.key(3), 2)
    h = jax.random.normal(k[0], (256, D))
    w = jax.random.normal(k[1], (D, V)) * (2.0 / np.sqrt(D)) + 3.0  # lse far from 0: rounding shows
    z = np.asarray(jnp.dot(h, w, precision="highest"))
    top2 = np.sort(z, -1)[:, -2:]
    t = jnp.asarray(z.argmax(-1), jnp.int32)
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3  # rows whose argmax no rounding can change
    kw = {} if impl.startswith("xla") else dict(BLOCKS[impl], interpret=True)
    st = fused_lm_head(h, w, t, impl=impl, **kw)
    hit = np.asarray(st.target_logprob >= st.max_logprob)
    assert hit[clear].all(), f"{impl}: {(~hit[clear]).sum()} of {clear.sum()} argmax targets missed"


def test_second_order_with_shared_hidden_kl_matches_naive():
    """The reference head gets no gradient also in second order: with ``ref_hidden=None`` the
    reference logits ``h @ W_ref`` depend on ``hidden``; xla_chunked's (differentiable) backward
    recomputed them without a stop_gradient, so grad-of-grad w.r.t. ``hidden`` was ~20% off."""
    n, d, v = 5, 6, 13
    k = jax.random.split(jax.random.key(0), 6)
    h, w = jax.random.normal(k[0], (n, d)), jax.random.normal(k[1], (d, v))
    wr = jax.random.normal(k[2], (d, v))
    t = jax.random.randint(k[3], (n,), 0, v).at[0].set(-1)
    cts = jax.random.normal(k[4], (3, n))
    vh = jax.random.normal(k[5], (n, d))

    def loss(h, impl):
        s = fused_lm_head(h, w, t, ref_weight=wr, logit_softcap=3.0, impl=impl,
                          **({"block_v": 4} if impl == "xla_chunked" else {}))
        return jnp.sum(cts[0] * s.kl_to_ref + cts[1] * s.entropy + cts[2] * s.target_logprob)

    def hvp(impl):
        return jax.grad(lambda h: jnp.sum(jax.grad(loss)(h, impl) * vh))(h)

    _close(hvp("xla_chunked"), hvp("xla_naive"), 1e-5, "second-order d_hidden with a shared-hidden KL")


def test_bad_where_and_ref_hidden_shapes_are_named():
    """``where`` of shape [N, 1] died deep in the kernels (or broadcast to [N, N]), one of shape
    [1] silently masked every row, and a 1-D ``ref_hidden`` raised an IndexError."""
    h, w, t = jnp.ones((6, 4)), jnp.ones((4, 10)), jnp.zeros((6,), jnp.int32)
    for where in (jnp.ones((6, 1), bool), jnp.zeros((1,), bool), jnp.ones((3,), bool)):
        with pytest.raises(ValueError, match="where must have shape"):
            fused_lm_head(h, w, t, where=where, impl="xla_chunked")
    with pytest.raises(ValueError, match="ref_hidden"):
        fused_lm_head(h, w, t, ref_weight=w, ref_hidden=h[0], impl="xla_chunked")


def test_pallas_tpu_rejects_zero_blocks():
    h, w, t = jnp.ones((6, 4)), jnp.ones((4, 10)), jnp.zeros((6,), jnp.int32)
    for bad in (dict(block_n=0), dict(block_v=0), dict(block_v=-128)):
        with pytest.raises(ValueError, match="positive multiple"):
            fused_lm_head(h, w, t, impl="pallas_tpu", interpret=True, **bad)
