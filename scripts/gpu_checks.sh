#!/usr/bin/env bash
# One-shot GPU session: fused LM-head check + benchmark (+ train-step benchmark). Writes under $OUT.
# Packages the GPU image lacks travel as wheels in .whl/ (git-ignored via .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl liger-kernel cut-cross-entropy tokamax grain \
#     ml-collections array-record dm-tree immutabledict einshape qwix tensorboardx portpicker \
#     pydantic pydantic-core annotated-types typing-inspection
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # tokamax imports xprof for its own benchmarking helpers only; a stub keeps a 31 MB wheel off the wire
  mkdir -p /tmp/site/xprof/cli && touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
  echo "get_kernel_stats_tool = None" > /tmp/site/xprof/cli/tools.py
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import jax, flax, torch, triton; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/device.txt"
run() { echo "== ${*:2}"; timeout "$1" "${@:2}" 2>&1 | tee -a "$OUT/log.txt"; echo "rc=${PIPESTATUS[0]} ${*:2}" | tee -a "$OUT/log.txt"; }
# BENCH_ARGS narrows a re-run, e.g. BENCH_ARGS="--impls xla_naive,pallas --no-torch --no-all-stats"
run ${BENCH_S:-540} python3 experiments/bench_fused_loss.py --device=gpu --pallas-blocks "" --sweep bwd --profile ${BENCH_ARGS:-} --out "$OUT/fused_loss.md"
[ "${STEP_S:-0}" -gt 0 ] && run ${STEP_S} python3 experiments/bench_step.py --device=gpu --out "$OUT/step_gpu.md"
