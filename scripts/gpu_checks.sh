#!/usr/bin/env bash
# One-shot GPU session: kernel lowering tests + benchmarks. Writes results under $OUT.
# Packages the GPU image lacks travel as wheels in .whl/ (git-ignored via .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grain ml-collections array-record dm-tree portpicker flax==0.12.8 optax treescope \
#     liger-kernel cut-cross-entropy tokamax einshape qwix immutabledict tensorboardx \
#     pydantic pydantic-core annotated-types typing-inspection
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)" | tee -a "$OUT/device.txt"
run() { echo "== $*"; timeout "$1" "${@:2}" 2>&1 | tee -a "$OUT/log.txt"; echo "rc=${PIPESTATUS[0]} $*" | tee -a "$OUT/log.txt"; }
run 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/test_fused_lm_head.py -k "gpu or compiled" -x
run 240 python3 experiments/bench_fused_loss.py --device=gpu --out "$OUT/fused_loss.md"
run 120 python3 experiments/bench_forward.py --device=gpu --out "$OUT/forward_gpu.md"
run 150 python3 experiments/bench_step.py --device=gpu --out "$OUT/step_gpu.md"
