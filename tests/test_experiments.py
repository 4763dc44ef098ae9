"""Smoke tests: the scripts in experiments/ still run, with their smallest settings.

Each script runs once as ``python experiments/<script>.py`` in a subprocess (its own JAX: one CPU
device, not the 8 simulated devices of conftest.py) with outputs under ``tmp_path``; the test
checks the exit code and that the markdown it writes holds a table row. Sizes are picked so that
the whole file takes a few minutes on 2 CPU cores; what is not here and why:

- ``triton_compile.py``: its compile step needs the ``triton`` package (not in the test extra);
  only its capture step (JAX lowering every kernel to Triton IR) is tested here.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", SPARSITY_JAX_CACHE="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("XLA_FLAGS", None)  # conftest's 8 simulated devices are for the in-process tests
    return env


def _run(script: str, *args) -> None:
    cmd = [sys.executable, str(REPO / "experiments" / script), *map(str, args)]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=TIMEOUT_S, check=False)
    assert out.returncode == 0, (f"{' '.join(cmd)} exited {out.returncode}\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}")


def _has_table_row(path: pathlib.Path) -> None:
    assert path.is_file(), f"{path} was not written"
    rows = [ln for ln in path.read_text().splitlines()
            if ln.startswith("|") and not ln.startswith("|---")]
    assert len(rows) >= 2, f"{path} has no table row (header + data):\n{path.read_text()}"


@pytest.mark.slow  # ~20 s: 2 methods x 2 steps, training + greedy eval + plots
def test_compare_curricula(tmp_path):
    out = tmp_path / "res" / "curricula_arith.md"  # the results folder does not exist yet
    _run("compare_curricula.py", "--seeds", 1, "--steps", 2, "--methods", "uniform,sec",
         "--workdir", tmp_path / "runs", "--out", out)
    _has_table_row(out)
    assert (tmp_path / "res" / "curricula_arith_accuracy.png").is_file()


@pytest.mark.slow  # ~20 s: base + 2 objectives, 2 steps each, tiny model
def test_compare_objectives(tmp_path):
    _run("compare_objectives.py", "--seeds", 1, "--base-steps", 2, "--steps", 2,
         "--batch-size", 4, "--hidden", 32, "--layers", 1, "--num-train", 64, "--num-eval", 4,
         "--max-new-tokens", 8, "--methods", "sft,dft", "--out", tmp_path)
    _has_table_row(tmp_path / "objectives_table.md")
    assert "- date: " in (tmp_path / "objectives_table.md").read_text()  # results carry their date
    # 2 steps is not a multiple of the script's 10-step chunk: it must still train (it ran no
    # step at all before, and reported the mean of no losses)
    runs = json.loads((tmp_path / "objectives.json").read_text())["results"]
    assert all(math.isfinite(runs[m]["0"]["final_loss"]) for m in ("sft", "dft"))


@pytest.mark.slow  # ~20 s: every method, 2 steps each, tiny model, no GSM8K
def test_compare_sparsity(tmp_path):
    _run("compare_sparsity.py", "--seeds", 1, "--base-steps", 2, "--steps", 2, "--batch-size", 4,
         "--hidden", 32, "--layers", 1, "--num-train", 32, "--num-eval", 4, "--lift-ranks", 2,
         "--rank", 2, "--filter-rank", 4, "--refresh-every", 1, "--max-new-tokens", 8,
         "--no-gsm8k", "--out", tmp_path)  # --no-gsm8k: ../shared is not needed
    _has_table_row(tmp_path / "sparsity_table.md")


@pytest.mark.slow  # ~50 s: every method compiled once, 1 round of 10 steps, tiny model
def test_compare_sparsity_time_only(tmp_path):
    _run("compare_sparsity.py", "--time-only", "--rounds", 1, "--batch-size", 4, "--hidden", 32,
         "--layers", 1, "--num-train", 32, "--num-eval", 4, "--lift-ranks", 2, "--rank", 2,
         "--filter-rank", 4, "--out", tmp_path)
    _has_table_row(tmp_path / "sparsity_timing.md")
    text = (tmp_path / "sparsity_timing.md").read_text()
    assert "- date: " in text and "- machine: " in text and "- versions: " in text


@pytest.mark.slow  # ~25 s: 10 edit runs (one compilation each), depth-first ones included
def test_locft_edit(tmp_path):
    _run("locft_edit.py", "--seeds", 1, "--edits", 2, "--hidden", 32, "--layers", 1,
         "--base-steps", 2, "--epochs", 1, "--batch", 2, "--out", tmp_path)
    text = (tmp_path / "locft_edit.md").read_text()
    _has_table_row(tmp_path / "locft_edit.md")
    assert "| DF |" in text  # the depth-first pipeline ran


@pytest.mark.slow  # ~10 s: one tiny shape, one timed iteration
def test_bench_fused_loss(tmp_path):
    out = tmp_path / "fused_loss.md"
    _run("bench_fused_loss.py", "--device", "cpu", "--shapes", "128x32x256", "--iters", 1,
         "--impls", "xla_naive,xla_chunked", "--out", out)
    _has_table_row(out)


def test_triton_compile_captures_every_kernel():
    """The capture hooks JAX internals (``jax._src.pallas.triton``): a JAX upgrade that moves them
    fails here, not in a GPU session. ~3 s: lowering only, no ``triton`` package."""
    code = ("import json, sys; sys.path.insert(0, 'experiments'); import triton_compile as tc; "
            "print(json.dumps([[k['label'], k['name'], k['asm'].split('{')[0]] for k in tc._capture()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=TIMEOUT_S, check=False)
    assert out.returncode == 0, out.stderr[-6000:]
    kernels = json.loads(out.stdout.splitlines()[-1])
    by_case = {}
    for label, name, head in kernels:
        assert head.strip() == f"module @{name}", head  # the IR captured is that kernel's own module
        by_case.setdefault(label, set()).add(name)
    assert all(by_case[c] == {"lm_head_stats_fwd"} for c in by_case if c.startswith("forward"))
    assert by_case["backward, one group (cuBLAS GEMMs)"] == {"lm_head_dlogits"}
    assert by_case["backward, grad_filter_eps, bwd_rows=2048"] == {
        "lm_head_dlogits", "lm_head_dh_update", "lm_head_dw_update"}


@pytest.mark.slow  # ~5 s: one small shape, one 128-row tile row
def test_grad_filter(tmp_path):
    out = tmp_path / "grad_filter.md"
    _run("grad_filter.py", "--shapes", "1024x64x1000", "--rows", 128, "--scales", "1", "--out", out)
    _has_table_row(out)
    assert "1024x64x1000" in out.read_text()


@pytest.mark.slow  # ~5 s (compiles, runs nothing); no size flag
def test_head_layout_memory(tmp_path):
    out = tmp_path / "head_layout_memory.md"
    _run("head_layout_memory.py", "--out", out)
    _has_table_row(out)


@pytest.mark.slow  # ~40 s: the micro model, and every curriculum alone on 1024 rows
def test_bench_curriculum_overhead(tmp_path):
    out = tmp_path / "curriculum_overhead.md"
    _run("bench_curriculum_overhead.py", "--steps", 1, "--rounds", 1, "--examples", 256,
         "--models", "micro", "--micro-sizes", 1024, "--micro-reps", 2, "--out", out)
    _has_table_row(out)
    assert "sec, host round trip" in out.read_text()


@pytest.mark.slow  # ~30 s: the tiny model only, on 1 and 8 simulated devices (two workers)
def test_bench_step(tmp_path):
    out = tmp_path / "step.md"
    _run("bench_step.py", "--models", "tiny", "--out", out)
    _has_table_row(out)


@pytest.mark.slow  # ~15 s: the tiny model in JAX and in transformers, one timed repeat
def test_bench_forward(tmp_path):
    out = tmp_path / "forward.md"
    _run("bench_forward.py", "--models", "tiny", "--repeats", 1, "--out", out)
    _has_table_row(out)


@pytest.mark.slow  # ~60 s: warm-up + 3 curricula, 1 step each, 4 held-out puzzles, 8 new tokens
def test_sec_rl(tmp_path):
    out = tmp_path / "res" / "sec_rl.md"
    _run("sec_rl.py", "--seeds", 1, "--warmup-steps", 1, "--rl-steps", 1, "--num-eval", 4,
         "--max-new-tokens", 8, "--workdir", tmp_path / "runs", "--out", out)
    _has_table_row(out)
    assert (tmp_path / "res" / "sec_rl_q.png").is_file()


def test_suite_timing(tmp_path):
    log = tmp_path / "ci.log"
    log.write_text("1.50s call     tests/test_a.py::test_x\n0.50s setup    tests/test_a.py::test_x\n"
                   "30.00s call     tests/test_b.py::test_slow\n"
                   "===== 2 passed, 1 skipped, 3 warnings in 40.00s (0:00:40) =====\n")
    slow = tmp_path / "slow.txt"
    slow.write_text("tests/test_b.py::test_slow\n")
    out = tmp_path / "timing.md"
    _run("suite_timing.py", "--ci-log", log, "--slow-ids", slow, "--out", out)
    text = out.read_text()
    assert "| `.ci/run` (every test) | 2 passed, 1 skipped | 0.6667 |" in text
    assert "| `make test`'s tests inside the `.ci/run` log | 1 timed | 0.03333 |" in text
    assert "| slow tests inside the `.ci/run` log | 1 timed | 0.5 |" in text
