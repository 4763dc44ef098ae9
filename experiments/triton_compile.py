"""Compile the ``pallas_gpu`` kernels for an H100 (sm_90) on a machine without a GPU.

    pip install triton          # CPU machine is fine: the wheel bundles ptxas and cuobjdump
    python experiments/triton_compile.py [--out experiments/results/triton_compile.md]

JAX lowers each Pallas kernel to Triton IR without a device (``lowering_platforms=("cuda",)``);
this script captures that IR and compiles it with the ``triton`` package down to a cubin, then
reports what the hardware would run: registers and stack (spills) per thread, shared memory,
Hopper ``wgmma`` instructions and the software-pipelined async copies.  It catches kernels that
do not compile before a GPU session, and shows spills and lost pipelining that a timing alone
would not explain.

Caveat: the installed ``triton`` need not be the Triton inside the GPU's jaxlib (which compiles
the kernels there); the numbers are indicative of, not identical to, what runs on the device.
The capture hooks JAX internals (``jax._src.pallas.triton``), so a JAX upgrade may move them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = ((8192, 2048, 128256), (16384, 1536, 151936))  # bench_fused_loss.SHAPES
EPS = 2.0**-12


def _cases():
    """(label, shape, backward kwargs, forward?) of the configurations worth compiling."""
    s1, s2 = SHAPES
    gemm_tiles = [(128, 256, 64, 8, 3), (128, 256, 64, 16, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
                  (64, 256, 64, 8, 3)]
    cases = [("forward (default tiles)", s1, None, True), ("forward (default tiles)", s2, None, True),
             ("backward, one group (cuBLAS GEMMs)", s1, {}, False),
             ("backward, one group (cuBLAS GEMMs)", s2, {}, False),
             ("backward, one group, dlogits 16 warps", s1, dict(num_warps=16), False)]
    for bm, bn, bk, nw, ns in gemm_tiles:
        cfg = dict(blocks=(bm, bn, bk), num_warps=nw, num_stages=ns)
        cases.append((f"backward, bwd_rows=2048, GEMM {bm}x{bn}x{bk} w{nw} s{ns}", s2,
                      dict(bwd_rows=2048, gemm_config=cfg), False))
    cases += [("backward, grad_filter_eps, one group", s1, dict(grad_filter_eps=EPS), False),
              ("backward, grad_filter_eps, bwd_rows=2048", s2, dict(bwd_rows=2048, grad_filter_eps=EPS), False)]
    return cases


def _capture():
    """Lower every case for CUDA; return [(label, shape, kernel name, warps, stages, triton IR)]."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    from curriculax.kernels import pallas_gpu, xla

    seen = []
    lower_module = lowering.lower_jaxpr_to_triton_module

    def module_hook(jaxpr, *a, **k):
        result = lower_module(jaxpr, *a, **k)
        seen.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = module_hook
    out = []
    try:
        for label, (n, d, v), bwd, fwd in _cases():
            opts = xla.HeadOpts()
            h, w = jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
            t = jax.ShapeDtypeStruct((n,), jnp.int32)
            if fwd:
                fn = functools.partial(pallas_gpu.forward, hr=None, wr=None, row_hash=None, opts=opts)
                traced = jax.jit(fn).trace(h, w, targets=t)
            else:
                rg = xla.RowGrad(*[jax.ShapeDtypeStruct((n, 1), jnp.int32 if f == "targets" else jnp.float32)
                                   for f in ("lse", "c0", "g_h", "g_tl", "targets")])
                fn = functools.partial(pallas_gpu.backward, hr=None, wr=None, opts=opts, **bwd)
                traced = jax.jit(fn).trace(h, w, rg=rg)
            del seen[:]
            text = traced.lower(lowering_platforms=("cuda",)).as_text()
            # the kernels' names and launch options, in lowering order, from the custom calls
            calls = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
            assert len(calls) == len(seen), (label, len(calls), len(seen))
            out += [dict(label=label, shape=f"{n}x{d}x{v}", name=name, stages=int(ns), warps=int(nw), asm=asm)
                    for (name, ns, nw), asm in zip(calls, seen)]
    finally:
        lowering.lower_jaxpr_to_triton_module = lower_module
    return out


def _compile_worker(path):
    """Subprocess: compile each captured module with the ``triton`` package; one JSON per line."""
    import triton
    from triton.backends.compiler import GPUTarget

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for k in json.load(open(path)):
        row = {key: k[key] for key in ("label", "shape", "name", "warps", "stages")}
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, f"{k['name']}.ttir")
            Path(src).write_text(k["asm"])
            try:
                c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=k["warps"], num_stages=k["stages"]))
            except Exception as e:  # noqa: BLE001
                print(json.dumps({**row, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
                continue
            cubin = os.path.join(tmp, "k.cubin")
            Path(cubin).write_bytes(c.asm["cubin"])
            usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin],
                                   capture_output=True, text=True).stdout
            reg, stack = (re.search(rf"{f}:(\d+)", usage) for f in ("REG", "STACK"))
            print(json.dumps({**row, "regs": int(reg.group(1)) if reg else None,
                              "stack": int(stack.group(1)) if stack else None, "shared": c.metadata.shared,
                              "wgmma": c.asm["ptx"].count("wgmma.mma_async"),
                              "async copies": c.asm["ttgir"].count("async_copy_global_to_local"),
                              "triton": triton.__version__}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/triton_compile.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _compile_worker(args.worker)
    import report

    kernels = _capture()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernels.json")
        Path(path).write_text(json.dumps(kernels))
        # separate process: the triton package and jaxlib each carry their own LLVM/MLIR
        env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
        run = subprocess.run([sys.executable, __file__, f"--worker={path}"], capture_output=True, text=True, env=env)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise SystemExit(f"the triton compile step failed (is `pip install triton` done?):\n{run.stderr[-2000:]}")
    version = rows[0].get("triton", "?")
    table = [{"config": r["label"], "N x d x V": r["shape"], "kernel": r["name"], "warps/stages":
              f"{r['warps']}/{r['stages']}", "regs": r.get("regs", ""), "stack B": r.get("stack", ""),
              "shared KiB": round(r["shared"] / 1024, 1) if "shared" in r else "", "wgmma": r.get("wgmma", ""),
              "async copies": r.get("async copies", ""), "note": r.get("error", "")} for r in rows]
    text = report.header("Pallas GPU kernels compiled for sm_90 without a GPU", {
        "compiler": f"triton {version} (pip), from the Triton IR that this jax lowers for CUDA",
        "columns": "regs/stack per thread (stack > 0: spills); async copies: cp.async ops in the "
                   "pipelined loop (0: not software-pipelined); wgmma: Hopper tensor-core MMAs",
    }) + "\n" + report.table(table)
    report.write(args.out, text)


if __name__ == "__main__":
    main()
