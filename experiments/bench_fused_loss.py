"""Fused LM-head loss: forward+backward time and extra memory, naive vs fused.

    python experiments/bench_fused_loss.py --device=gpu --out experiments/results/fused_loss.md
    python experiments/bench_fused_loss.py --device=cpu --out experiments/results/fused_loss.md

What is timed: ``jax.value_and_grad`` w.r.t. (hidden, weight) of the mean token
cross-entropy ``-mean(target_logprob)`` from ``fused_lm_head`` (bf16 inputs,
fp32 accumulation), jitted, median of ``--iters`` runs after 2 warm-ups.  With
``--all-stats`` a second objective also uses entropy, KL to a frozen reference
head and Gumbel sampling (our implementations only; the references cannot).

Memory: "extra" = XLA's compiled ``temp + output`` bytes (everything the step
allocates beyond its inputs, gradients included), reported as a ratio to the
``(N*d + V*d) * itemsize`` storage of (d_hidden, d_weight) -- the GPU target is
<= 1.05.  For the PyTorch references: ``max_memory_allocated`` minus the inputs.

References, each skipped with a note when not installed: Liger's
``LigerFusedLinearCrossEntropyLoss``, Apple's CCE ``linear_cross_entropy``
(both PyTorch, run in a subprocess so that JAX and torch don't share the GPU
allocator) and tokamax's ``linear_softmax_cross_entropy_loss`` (JAX; its
``chunked_xla`` implementation, the memory-efficient one off TPU).

``weight_layout=vd`` rows: the same head stored ``[V, d]`` (a tied embedding), read in place.

``--bwd-rows``: extra CE rows of each fused impl with ``fused_lm_head(bwd_rows=...)``
(backward in row groups: smaller float32 ``d_hidden`` accumulator, one more
bf16 rounding of ``d_weight`` per group).

``--profile`` (GPU): per-kernel device time of the pallas_gpu step with one
group and with ``bwd_rows="auto"`` from a ``jax.profiler`` trace (busy vs idle
span, launches per step, the costliest kernels).

On ``--device=gpu`` a correctness check of ``pallas_gpu`` (compiled, not
interpreted) against ``xla_naive`` runs first (``--no-check`` skips it).
On CPU the shapes are divided by ``--cpu-scale`` (default 8 for N and V, 4 for
d) and Pallas (interpret mode only) is skipped; the table says so.
The output file keeps one section per device: a CPU run does not erase the GPU
section and vice versa.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = ((8192, 2048, 128256), (16384, 1536, 151936))  # Llama-3.2-1B, Qwen2.5-1.5B heads


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--out", default=None, help="markdown file (section for this device is replaced)")
    ap.add_argument("--shapes", default=None, help="comma list NxDxV (default: the issue's two shapes)")
    ap.add_argument("--cpu-scale", default="8,4,8", help="divide N,d,V by these on CPU")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--impls", default="xla_naive,xla_chunked,pallas")
    ap.add_argument("--all-stats", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--pallas-blocks", default="128,128,64;64,256,32",
                    help="GPU only: extra pallas_gpu CE rows for these 'block_n,block_v,block_d;...' (first shape)")
    ap.add_argument("--bwd-rows", default="auto,1024",
                    help="extra CE rows of each fused impl with fused_lm_head(bwd_rows=...) for these values")
    ap.add_argument("--grad-filter-eps", type=float, default=2.0**-12,
                    help="extra pallas_gpu CE rows with fused_lm_head(grad_filter_eps=...) (0: none); "
                         "2**-12 is CCE's filter_eps='auto' for bf16")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--sweep", nargs="?", const="all", default=None, choices=["all", "bwd"],
                    help="GPU tuning: time pallas_gpu forward/backward block configs and xla_chunked chunk "
                         "widths (bwd: the pallas backward configs only)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False,
                    help="GPU: per-kernel device time of the pallas_gpu step (one group vs bwd_rows=auto) "
                         "from a jax.profiler trace: where the row groups lose time")
    ap.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------
# PyTorch references (subprocess)
# ----------------------------------------------------------------------------


def _torch_worker(spec: str) -> None:
    """Run Liger / CCE on one shape; print one JSON line per reference."""
    n, d, v, iters = (int(x) for x in spec.split("x"))
    import torch

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(n, d, device=dev, generator=g) / d**0.25).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, d, device=dev, generator=g) / d**0.25).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device=dev, generator=g)

    refs = {}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        refs["liger (torch)"] = lambda: liger(w, h, t)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"impl": "liger (torch)", "error": f"not available: {type(e).__name__}: {e}"[:200]}))
    try:
        from cut_cross_entropy import linear_cross_entropy

        refs["cce (torch)"] = lambda: linear_cross_entropy(h, w, t, reduction="mean")
        # its default filter_eps="auto" skips the update GEMMs of near-zero tiles (grad_filter.md)
        refs["cce (torch) filter_eps=None"] = lambda: linear_cross_entropy(h, w, t, reduction="mean",
                                                                           filter_eps=None)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"impl": "cce (torch)", "error": f"not available: {type(e).__name__}: {e}"[:200]}))

    def naive():
        return torch.nn.functional.cross_entropy((h @ w.T).float(), t)

    refs["torch naive (eager)"] = naive
    base = torch.cuda.memory_allocated()
    for name, fn in refs.items():
        try:
            h.grad = w.grad = None
            for _ in range(2):
                fn().backward()
                h.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(iters):
                h.grad = w.grad = None
                t0 = time.perf_counter()
                fn().backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() - base
            print(json.dumps({"impl": name, "ms": 1e3 * sorted(times)[len(times) // 2], "extra_bytes": peak}))
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"impl": name, "error": f"{type(e).__name__}: {e}"[:200]}))
        torch.cuda.empty_cache()


def _run_torch_refs(n, d, v, iters):
    try:
        out = subprocess.run(
            [sys.executable, __file__, f"--torch-worker={n}x{d}x{v}x{iters}"],
            capture_output=True, text=True, timeout=240,
        )
    except Exception as e:  # noqa: BLE001
        return [{"impl": "torch references", "error": f"{type(e).__name__}: {e}"[:200]}], None
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 and not rows:
        rows = [{"impl": "torch references", "error": out.stderr.strip().splitlines()[-1][:200] if out.stderr else "failed"}]
    version = None
    try:
        version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return rows, version


# ----------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------


def _jax_cases(jax, jnp, n, d, v, all_stats, impls, on_gpu, sweep=(), bwd_rows=(), grad_filter=None):
    from curriculax.kernels import fused_lm_head

    cases = []
    for bn, bv, bk in sweep:

        def ce_blocks(h, w, t, bn=bn, bv=bv, bk=bk):
            s = fused_lm_head(h, w, t, impl="pallas_gpu", interpret=False, block_n=bn, block_v=bv, block_d=bk)
            return -jnp.mean(s.target_logprob)

        cases.append((f"pallas_gpu[bn={bn},bv={bv},bd={bk}]", ce_blocks, None))
    for impl in impls:
        name = ("pallas_gpu" if on_gpu else None) if impl == "pallas" else impl
        if name is None:
            cases.append((impl, None, "skipped: Pallas runs on CPU only in interpret mode (not a benchmark)"))
            continue

        def ce(h, w, t, name=name):
            s = fused_lm_head(h, w, t, impl=name, interpret=False)
            return -jnp.mean(s.target_logprob)

        cases.append((f"{name}", ce, None))
        for rows in bwd_rows if name != "xla_naive" else ():

            def ce_rows(h, w, t, name=name, rows=rows):
                s = fused_lm_head(h, w, t, impl=name, interpret=False, bwd_rows=rows)
                return -jnp.mean(s.target_logprob)

            cases.append((f"{name} bwd_rows={rows}", ce_rows, None))
        for rows in (None, *bwd_rows) if (grad_filter and name == "pallas_gpu") else ():

            def ce_filtered(h, w, t, rows=rows):
                s = fused_lm_head(h, w, t, impl="pallas_gpu", interpret=False, bwd_rows=rows,
                                  grad_filter_eps=grad_filter)
                return -jnp.mean(s.target_logprob)

            label = "" if rows is None else f" bwd_rows={rows}"
            cases.append((f"pallas_gpu{label} grad_filter_eps={grad_filter:.3g}", ce_filtered,
                          "approximate, like CCE's default"))
        if name != "xla_naive":

            def ce_vd(h, w_vd, t, name=name):  # the head stored [V, d] (a tied embedding), read in place
                s = fused_lm_head(h, w_vd, t, impl=name, interpret=False, weight_layout="vd")
                return -jnp.mean(s.target_logprob)

            cases.append((f"{name} weight_layout=vd", ce_vd, None))
        if all_stats:

            def full(h, w, t, wr, name=name):
                s = fused_lm_head(h, w, t, impl=name, interpret=False, ref_weight=wr, sample_rng=jax.random.key(0),
                                  kl_direction="ref_policy")
                return jnp.mean(-s.target_logprob - 0.01 * s.entropy + 0.05 * s.kl_to_ref - 0.1 * s.sampled_logprob)

            cases.append((f"{name} +ent+KL+sample", full, None))
    try:
        import tokamax  # noqa: F401

        lsce = getattr(tokamax, "linear_softmax_cross_entropy_loss")

        def tok(h, w, t):  # its memory-efficient impl off TPU ("xla", the default there, materializes)
            return lsce(h, t, w, reduction="mean", implementation="chunked_xla")

        cases.append(("tokamax chunked_xla (jax)", tok, None))
    except Exception as e:  # noqa: BLE001
        cases.append(("tokamax (jax)", None, f"not available: {type(e).__name__}"))
    return cases


def _time(jax, compiled, args, iters):
    import numpy as np

    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _bench_one(jax, fn, args, iters, fwd_too=False):
    fwd_ms = _time(jax, jax.jit(fn).lower(*args).compile(), args, iters) if fwd_too else None
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    extra = None if mem is None else mem.temp_size_in_bytes + mem.output_size_in_bytes
    return _time(jax, compiled, args, iters), extra, compile_s, fwd_ms


def _gpu_check(jax, jnp):
    """pallas_gpu (compiled Triton) vs xla_naive on the GPU; returns markdown lines."""
    import numpy as np

    from curriculax.kernels import fused_lm_head, pallas_gpu, xla

    lines = []
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        for dtype in (jnp.float32, jnp.bfloat16):
            n, d, v = 1000, 320, 5003
            k = jax.random.split(jax.random.key(1), 6)
            h = jax.random.normal(k[0], (n, d)).astype(dtype)
            w = (jax.random.normal(k[1], (d, v)) * 2 / d**0.5).astype(dtype)
            wr = (w + 0.3 * jax.random.normal(k[2], (d, v)).astype(dtype) / d**0.5).astype(dtype)
            t = jax.random.randint(k[3], (n,), 0, v).at[5].set(-100)
            cts = jax.random.normal(k[4], (5, n))

            def loss(h_, w_, impl, rows):
                s = fused_lm_head(h_, w_, t, impl=impl, ref_weight=wr, sample_rng=k[5], logit_softcap=20.0,
                                  interpret=False, bwd_rows=rows)
                stats = (s.target_logprob, s.lse, s.entropy, s.kl_to_ref, s.sampled_logprob)
                return sum(jnp.sum(c * x) for c, x in zip(cts, stats)), s

            res = {}
            variants = {"xla_naive": ("xla_naive", None), "pallas_gpu": ("pallas_gpu", None),
                        "pallas_gpu bwd_rows=256": ("pallas_gpu", 256), "xla_chunked": ("xla_chunked", None)}
            # the filtered backward: compiled skip loops (gemm=pallas; dead tiles neither stored nor
            # read) against cuBLAS on zeroed dead tiles (gemm=xla); logits here have std 2, so it
            # takes eps=0.05 to leave some (~17%) of the 64x128 tiles dead
            opts = xla.HeadOpts(softcap=20.0)
            ok = t >= 0
            st = xla.finalize(xla.chunked_forward(h, w, None, None, t[:, None], None, opts, block_v=1024), opts)
            rg = xla.row_grad(st, {"target_logprob": cts[0]}, jnp.where(ok, t, -1), None, ok, opts)
            filt = {gemm: jax.jit(functools.partial(pallas_gpu.backward, hr=None, wr=None, rg=rg, opts=opts,
                                                    bwd_rows=256, gemm=gemm, grad_filter_eps=0.05))(h, w)
                    for gemm in ("pallas", "xla")}
            ferr = [float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                          / np.linalg.norm(np.asarray(b, np.float64))) for a, b in zip(filt["pallas"], filt["xla"])]
            lines.append(f"- check pallas_gpu grad_filter_eps=0.05 (~17% of tiles dead): skip loops vs zeroed "
                         f"tiles through cuBLAS ({jnp.dtype(dtype).name}): rel err d_h {ferr[0]:.2e} d_W {ferr[1]:.2e}")
            print(lines[-1], flush=True)
            for key, (impl, rows) in variants.items():
                res[key] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                                   static_argnums=(2, 3))(h, w, impl, rows)
            (_, s0), g0 = res["xla_naive"]
            for impl in list(variants)[1:]:
                (_, s1), g1 = res[impl]
                stat_err = max(
                    float(jnp.max(jnp.abs(getattr(s1, f) - getattr(s0, f))) / jnp.maximum(1, jnp.max(jnp.abs(getattr(s0, f)))))
                    for f in ("target_logprob", "lse", "entropy", "kl_to_ref", "sampled_logprob")
                )
                same = bool(jnp.all(s1.sampled_token == s0.sampled_token))
                gerr = [
                    float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                          / np.linalg.norm(np.asarray(b, np.float64)))
                    for a, b in zip(g1, g0)
                ]
                lines.append(
                    f"- check {impl} vs xla_naive ({jnp.dtype(dtype).name}, N={n} d={d} V={v}, softcap+KL+sampling): "
                    f"max rel stat err {stat_err:.2e}, same samples {same}, "
                    f"rel grad err d_h {gerr[0]:.2e} d_W {gerr[1]:.2e}"
                )
                print(lines[-1], flush=True)
    except Exception as e:  # noqa: BLE001
        lines.append(f"- check FAILED: {type(e).__name__}: {str(e)[:500]}")
        print(lines[-1], flush=True)
    finally:
        jax.config.update("jax_default_matmul_precision", None)
    return lines


def _sweep(jax, jnp, n, d, v, iters, which="all"):
    """Component timings (bf16, CE statistics only) for choosing the GPU defaults."""
    from curriculax.kernels import pallas_gpu, xla

    opts = xla.HeadOpts()
    k = jax.random.split(jax.random.key(0), 3)
    h = (jax.random.normal(k[0], (n, d)) / d**0.25).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], (d, v)) / d**0.25).astype(jnp.bfloat16)
    t = jax.random.randint(k[2], (n,), 0, v)
    valid = jnp.ones((n,), bool)
    stats = xla.finalize(xla.chunked_forward(h, w, None, None, t[:, None], None, opts, block_v=2048), opts)
    rg = xla.row_grad(stats, {"target_logprob": jnp.full((n,), -1.0 / n)}, t, None, valid, opts)
    rows = []
    grad_bytes = (n * d + v * d) * 2

    def timed(label, fn):
        try:
            compiled = jax.jit(fn).lower(h, w).compile()
            mem = compiled.memory_analysis()
            ms = _time(jax, compiled, (h, w), iters)
            rows.append({"component": label, "ms": ms,
                         "temp MiB": mem.temp_size_in_bytes / 2**20 if mem is not None else "n/a",
                         "1 + temp / (Nd+Vd)": 1 + mem.temp_size_in_bytes / grad_bytes if mem is not None else "n/a"})
        except Exception as e:  # noqa: BLE001
            rows.append({"component": label, "ms": f"failed: {type(e).__name__}: {str(e)[:120]}"})
        print(rows[-1], flush=True)

    for bv in (1024, 2048, 4096) if which == "all" else ():
        timed(f"fwd xla_chunked block_v={bv}",
              lambda h_, w_, bv=bv: xla.chunked_forward(h_, w_, None, None, t[:, None], None, opts, block_v=bv).s)
    fwd_cfgs = [(64, 128, 64, 4, 2), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
                (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 32, 8, 4),
                (256, 128, 64, 8, 3)]
    for bn, bv, bk, nw, ns in fwd_cfgs if which == "all" else ():
        timed(f"fwd pallas bn={bn} bv={bv} bd={bk} warps={nw} stages={ns}",
              lambda h_, w_, c=(bn, bv, bk, nw, ns): pallas_gpu.forward(
                  h_, w_, None, None, t, None, opts, block_n=c[0], block_v=c[1], block_d=c[2], num_warps=c[3],
                  num_stages=c[4]).s)
    for bv in (512, 1024, 2048) if which == "all" else ():
        timed(f"bwd xla_chunked block_v={bv}",
              lambda h_, w_, bv=bv: xla.chunked_backward(h_, w_, None, None, rg, opts, block_v=bv))
    for bn, bv, bk, nw, ns, ch in [(64, 128, 64, 4, 2, 2048), (64, 128, 64, 4, 3, 2048), (128, 128, 64, 8, 3, 2048),
                                   (128, 128, 64, 8, 3, 1024), (128, 128, 64, 8, 3, 512), (128, 256, 64, 8, 3, 1024),
                                   (128, 256, 64, 8, 3, 2048), (128, 256, 64, 8, 3, 4096)] if which == "all" else ():
        timed(f"bwd pallas bn={bn} bv={bv} bd={bk} warps={nw} stages={ns} chunk={ch}",
              lambda h_, w_, c=(bn, bv, bk, nw, ns, ch): pallas_gpu.backward(
                  h_, w_, None, None, rg, opts, block_n=c[0], block_v=c[1], block_d=c[2], num_warps=c[3],
                  num_stages=c[4], chunk_v=c[5]))
    # The in-place Pallas GEMM updates: tiles first (one group), then row groups and the bf16 d_h
    # accumulator with the fastest tiles; the cuBLAS updates alongside.
    def bwd(label, **kw):
        timed(f"bwd pallas {label}", lambda h_, w_: pallas_gpu.backward(h_, w_, None, None, rg, opts, **kw))
        return rows[-1]["ms"]

    bwd("gemm=xla (default)")
    gemm_ms = {}
    for bm, bn, bk, nw, ns in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3)]:
        cfg = dict(blocks=(bm, bn, bk), num_warps=nw, num_stages=ns)
        gemm_ms[(bm, bn, bk, nw, ns)] = bwd(f"gemm=pallas tiles={bm},{bn},{bk} warps={nw} stages={ns}", gemm="pallas",
                                            gemm_config=cfg)
    ok = {k: v for k, v in gemm_ms.items() if isinstance(v, float)}
    if ok:
        bm, bn, bk, nw, ns = min(ok, key=ok.get)
        # the end-to-end rows below then use the sweep's fastest tiles (recorded in the table)
        pallas_gpu.GEMM_CONFIG.update(blocks=(bm, bn, bk), num_warps=nw, num_stages=ns)
    best = f"tiles={pallas_gpu.GEMM_CONFIG['blocks']}"
    bwd("gemm=xla bwd_rows=2048", gemm="xla", bwd_rows=2048)
    for r in (1024, 2048):
        bwd(f"gemm=pallas {best} bwd_rows={r}", gemm="pallas", bwd_rows=r)
    bwd(f"gemm=pallas {best} acc=bf16 chunk=1024", gemm="pallas", acc_dtype=jnp.bfloat16, chunk_v=1024)
    # Candidates for a faster memory-bound (row-group) backward, all within the 1.05x budget:
    # fewer, wider steps; smaller GEMM tiles for the [R, d] / [d, chunk] updates; big dlogits tiles.
    bwd("gemm=pallas bwd_rows=1024 chunk=4096", gemm="pallas", bwd_rows=1024, chunk_v=4096)
    bwd("gemm=pallas bwd_rows=2048 chunk=1024", gemm="pallas", bwd_rows=2048, chunk_v=1024)
    # (128, 256) GEMM tiles spill registers (384 / 224 B of stack, Triton 3.6: triton_compile.md); these do not
    for bm, bn, bk, nw, ns in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3)]:
        bwd(f"gemm=pallas tiles={bm},{bn},{bk} warps={nw} stages={ns} bwd_rows=2048", gemm="pallas", bwd_rows=2048,
            gemm_config=dict(blocks=(bm, bn, bk), num_warps=nw, num_stages=ns))
    # 2048-row groups take (128, 256) dlogits tiles since 2026-11-27 (pallas_gpu.bwd_blocks); the
    # (64, 128) ones they took before, for comparison
    bwd("gemm=pallas bwd_rows=2048 dlogits bn=64 bv=128", gemm="pallas", bwd_rows=2048, block_n=64, block_v=128)
    # CCE's approximation: skip the update GEMMs of tiles whose probabilities are all < 2**-12
    for r in (None, 2048):
        bwd(f"gemm=pallas {best} bwd_rows={r} grad_filter_eps=2**-12", gemm="pallas", bwd_rows=r,
            grad_filter_eps=2.0**-12)
    return rows


def _device_kernels(trace_dir):
    """``(kernel events, span)`` of the device streams in a ``jax.profiler`` perfetto trace:
    events ``(name, ts, dur)`` in microseconds, span from the first start to the last end."""
    import glob
    import gzip

    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        ev = json.load(f)
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    procs = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
    dev = [e for e in ev if e.get("ph") == "X" and "dur" in e and "GPU" in procs.get(e["pid"], "")]
    # a GPU process also has per-module / per-op summary rows; the kernels are on the "Stream" rows
    streams = [e for e in dev if threads.get((e["pid"], e.get("tid")), "").startswith("Stream")]
    kern = [(e["name"], float(e["ts"]), float(e["dur"])) for e in (streams or dev)]
    if not kern:
        return [], 0.0
    return kern, max(t + d for _, t, d in kern) - min(t for _, t, _ in kern)


def _kernel_summary(kern, span, calls):
    """Per call: device span, busy time (union of kernel intervals), launches, top kernels."""
    busy, end = 0.0, -1e30
    for _, t, d in sorted(kern, key=lambda k: k[1]):
        busy += max(0.0, t + d - max(t, end))
        end = max(end, t + d)
    by = {}
    for name, _, d in kern:
        base = re.sub(r"[._]\d+$", "", name)  # fusion.12 / loop_fusion_3: one row per kind
        n, tot = by.get(base, (0, 0.0))
        by[base] = (n + 1, tot + d)
    top = sorted(by.items(), key=lambda kv: -kv[1][1])[:6]
    return {"span ms": span / calls / 1e3, "busy ms": busy / calls / 1e3, "idle %": 100 * (1 - busy / span),
            "launches": len(kern) / calls,
            "top kernels (launches, ms per call)": "; ".join(
                f"{k} ({n / calls:.0f}, {tot / calls / 1e3:.2f})" for k, (n, tot) in top)}


def _profile(jax, jnp, shapes, iters):
    """Device-side breakdown of the pallas_gpu step, one group vs ``bwd_rows="auto"``."""
    import tempfile

    from curriculax.kernels import fused_lm_head

    rows = []
    for n, d, v in shapes:
        k = jax.random.split(jax.random.key(0), 3)
        h = (jax.random.normal(k[0], (n, d)) / d**0.25).astype(jnp.bfloat16)
        w = (jax.random.normal(k[1], (d, v)) / d**0.25).astype(jnp.bfloat16)
        t = jax.random.randint(k[2], (n,), 0, v)
        for rows_ in (None, "auto"):
            def ce(h_, w_, rows_=rows_):
                return -jnp.mean(fused_lm_head(h_, w_, t, impl="pallas_gpu", interpret=False,
                                               bwd_rows=rows_).target_logprob)

            step = jax.jit(jax.value_and_grad(ce, argnums=(0, 1)))
            label = {"N x d x V": f"{n}x{d}x{v}", "config": f"bwd_rows={rows_}"}
            try:
                jax.block_until_ready(step(h, w))
                with tempfile.TemporaryDirectory() as tmp:
                    with jax.profiler.trace(tmp, create_perfetto_trace=True):  # back to back: no host gaps
                        jax.block_until_ready([step(h, w) for _ in range(iters)])
                    kern, span = _device_kernels(tmp)
                row = {**label, **_kernel_summary(kern, span, iters)} if kern else {
                    **label, "top kernels (launches, ms per call)": "no device kernel events in the trace"}
            except Exception as e:  # noqa: BLE001
                row = {**label, "top kernels (launches, ms per call)": f"failed: {type(e).__name__}: {str(e)[:160]}"}
            rows.append(row)
            print(row, flush=True)
            jax.clear_caches()
    return rows


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _table(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
                   + " |")
    return "\n".join(out)


def _write_section(path, device, text):
    path = Path(path)
    begin, end = f"<!-- bench:{device} -->", f"<!-- /bench:{device} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# Fused LM-head loss benchmark (`experiments/bench_fused_loss.py`)\n\n"
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main(argv=None):
    args = _parse_args(argv)
    if args.torch_worker:
        return _torch_worker(args.torch_worker)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # naive 16384x1536x151936 asks for 27.8 GiB at once; the default 75% cap refused it on an H100
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

    wall0 = time.perf_counter()
    # torch references first, in a subprocess, before JAX holds any GPU memory
    device = args.device
    if device == "auto":
        import jax

        device = "gpu" if jax.default_backend() == "gpu" else "cpu"
    on_gpu = device == "gpu"
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        scaled = False
    elif on_gpu:
        shapes, scaled = list(SHAPES), False
    else:
        sn, sd, sv = (int(x) for x in args.cpu_scale.split(","))
        shapes, scaled = [(n // sn, d // sd, v // sv) for n, d, v in SHAPES], True
    iters = args.iters or (10 if on_gpu else 3)

    torch_rows, torch_version = {}, None
    if on_gpu and args.torch:
        for shape in shapes:
            torch_rows[shape], torch_version = _run_torch_refs(*shape, iters)
            print(shape, torch_rows[shape], flush=True)

    import jax
    import jax.numpy as jnp
    import jaxlib

    if on_gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--device=gpu but JAX backend is {jax.default_backend()}")
    check_lines = _gpu_check(jax, jnp) if (on_gpu and args.check) else []
    sweeps = []  # (shape, rows): "bwd" sweeps every shape, "all" the first
    for shape in (shapes if args.sweep == "bwd" else shapes[:1]) if (on_gpu and args.sweep) else ():
        sweeps.append((shape, _sweep(jax, jnp, *shape, iters, args.sweep)))

    profile_rows = _profile(jax, jnp, shapes, min(iters, 3)) if (on_gpu and args.profile) else []

    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    rows = []
    for n, d, v in shapes:
        k = jax.random.split(jax.random.key(0), 4)
        h = (jax.random.normal(k[0], (n, d)) / d**0.25).astype(jnp.bfloat16)
        w = (jax.random.normal(k[1], (d, v)) / d**0.25).astype(jnp.bfloat16)
        wr = (w.astype(jnp.float32) + 0.1 * jax.random.normal(k[2], (d, v)) / d**0.25).astype(jnp.bfloat16)
        w_vd = w.T.copy()  # the same head stored [V, d]
        t = jax.random.randint(k[3], (n,), 0, v)
        grad_bytes = (n * d + v * d) * 2
        shape_s = f"{n}x{d}x{v}"
        base = {}
        sweep = []
        if on_gpu and (n, d, v) == shapes[0] and args.pallas_blocks:
            sweep = [tuple(int(x) for x in c.split(",")) for c in args.pallas_blocks.split(";") if c.strip()]
        bwd_rows = [r if r == "auto" else int(r) for r in args.bwd_rows.split(",") if r.strip()]
        for name, fn, note in _jax_cases(jax, jnp, n, d, v, args.all_stats, impls, on_gpu, sweep, bwd_rows,
                                         args.grad_filter_eps or None):
            row = {"N x d x V": shape_s, "impl": name}
            if fn is None:
                rows.append({**row, "note": note})
                continue
            objective = "full" if "+ent" in name else "ce"
            fargs = (h, w, t, wr) if objective == "full" else (h, w_vd if "=vd" in name else w, t)
            try:
                ms, extra, comp, fwd_ms = _bench_one(jax, fn, fargs, iters, fwd_too=objective == "ce")
            except Exception as e:  # noqa: BLE001
                rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e)[:160]}"})
                print(rows[-1], flush=True)
                continue
            if name == "xla_naive" or name.startswith("xla_naive "):
                base[objective] = (ms, extra)
            b_ms, b_extra = base.get(objective, (None, None))
            row.update({
                "fwd ms": fwd_ms if fwd_ms is not None else "",
                "fwd+bwd ms": ms,
                "time / naive": ms / b_ms if b_ms else "",
                "extra MiB": extra / 2**20 if extra is not None else "n/a",
                "extra / naive": extra / b_extra if (b_extra and extra is not None) else "",
                "extra / (Nd+Vd)": extra / grad_bytes if extra is not None else "n/a",
                "compile s": comp,
                "note": "objective uses entropy+KL+sampling" if objective == "full" else "",
            })
            rows.append(row)
            print(row, flush=True)
            jax.clear_caches()
        for tr in torch_rows.get((n, d, v), []):
            row = {"N x d x V": shape_s, "impl": tr["impl"]}
            if "error" in tr:
                rows.append({**row, "note": tr["error"]})
                continue
            b_ms = base.get("ce", (None, None))[0]
            rows.append({**row, "fwd+bwd ms": tr["ms"], "time / naive": tr["ms"] / b_ms if b_ms else "",
                         "extra MiB": tr["extra_bytes"] / 2**20, "extra / (Nd+Vd)": tr["extra_bytes"] / grad_bytes,
                         "note": "PyTorch, max_memory_allocated - inputs"})

    dev = jax.devices()[0]
    cols = ["N x d x V", "impl", "fwd ms", "fwd+bwd ms", "time / naive", "extra MiB", "extra / naive", "extra / (Nd+Vd)",
            "compile s", "note"]
    lines = [
        f"## {device.upper()} run",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {_cpu_model()}, {os.cpu_count()} cores; device: {dev.device_kind} ({dev.platform})",
        f"- versions: python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}"
        + (f", torch {torch_version}" if torch_version else ""),
        f"- inputs bf16, fp32 accumulation; loss = mean CE from `fused_lm_head` unless noted; "
        f"time = median of {iters} jitted value_and_grad calls after 2 warm-ups",
        "- extra = compiled temp + output bytes (gradients included); `extra / (Nd+Vd)` is relative to the "
        "bf16 size of (d_hidden, d_weight); GPU target <= 1.05, time <= 0.9x naive",
    ]
    if scaled:
        lines.append(
            f"- **reduced CPU shapes**: the issue's shapes {', '.join('x'.join(map(str, s)) for s in SHAPES)} "
            f"divided by (N, d, V) = ({args.cpu_scale}); Pallas kernels only run in interpret mode on CPU "
            "and are not timed"
        )
    lines += check_lines
    for shape, sweep_rows in sweeps:
        lines += ["", f"Component sweep ({'x'.join(map(str, shape))}, CE statistics only):", "",
                  _table(sweep_rows, ["component", "ms", "temp MiB", "1 + temp / (Nd+Vd)"])]
    if sweeps:
        from curriculax.kernels import pallas_gpu

        lines.append(f"\nIn-place GEMM tiles of the `gemm=pallas` rows below (the sweep's fastest): "
                     f"`{pallas_gpu.GEMM_CONFIG}`")
    if profile_rows:
        lines += ["", "Device kernels of the pallas_gpu step (fwd+bwd, CE; `jax.profiler` trace, per call; "
                  "idle = span not covered by any kernel):", "",
                  _table(profile_rows, ["N x d x V", "config", "span ms", "busy ms", "idle %", "launches",
                                        "top kernels (launches, ms per call)"])]
    lines += ["", _table(rows, cols), "", f"(total wall time {time.perf_counter() - wall0:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        _write_section(args.out, device, text)


if __name__ == "__main__":
    main()
