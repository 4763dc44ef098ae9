"""Step time and tokens/s of the full jitted train step (curriculum + loss + AdamW).

    python experiments/bench_step.py [--device=cpu|gpu] [--models tiny,small_50m] [--out PATH]

Each (model, device count) runs in its own process so that the simulated device count
(``--xla_force_host_platform_device_count``) can differ. Tokens/s counts every position of
the ``[batch, seq_len]`` batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(model: str, devices: int, steps: int, batch: int, seq: int, dtype: str) -> dict:
    import jax

    from curriculax.models import ModelConfig, num_params
    from curriculax.train import build, quickstart_config
    from curriculax.train.config import model_fields
    from curriculax.train.step import jit_steps

    cfg = quickstart_config()
    mc = ModelConfig.preset(model, dtype=dtype, param_dtype="float32")
    cfg.model.update(model_fields(mc.replace(max_seq_len=seq)))
    cfg.batch_size = batch
    cfg.data.seq_len = seq
    cfg.data.num_train = 512
    cfg.mesh.num_devices = devices
    cfg.mesh.data = devices
    exp = build(cfg)
    state = exp.init_state()
    run = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    t = time.perf_counter()
    state, m = run(state, exp.bank)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    state, m = run(state, exp.bank)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = run(state, exp.bank)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / steps
    return {"model": model, "params": f"{num_params(mc) / 1e6:.1f}M", "devices": devices,
            "batch x seq": f"{batch}x{seq}", "step ms": dt * 1e3, "tokens/s": batch * seq / dt,
            "compile s": compile_s, "device": jax.devices()[0].device_kind}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--models", default="tiny,small_50m", help="comma-separated, of tiny,small_50m")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    models = args.models.split(",")
    if args.worker:
        print("RESULT " + json.dumps(worker(**json.loads(args.worker))))
        return
    gpu = args.device == "gpu"
    if gpu:
        cases = [("tiny", 1, 20, 64, 256, "bfloat16"), ("small_50m", 1, 20, 32, 1024, "bfloat16")]
    else:
        cases = [("tiny", 1, 10, 32, 128, "float32"), ("tiny", 8, 10, 32, 128, "float32"),
                 ("small_50m", 1, 3, 8, 256, "float32"), ("small_50m", 8, 3, 8, 256, "float32")]
    if unknown := set(models) - {c[0] for c in cases}:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from tiny,small_50m")
    rows = []
    for model, devices, steps, batch, seq, dtype in (c for c in cases if c[0] in models):
        env = dict(os.environ)
        if not gpu:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            env["JAX_PLATFORMS"] = "cpu"
        spec = json.dumps(dict(model=model, devices=devices, steps=steps, batch=batch, seq=seq, dtype=dtype))
        out = subprocess.run([sys.executable, __file__, "--worker", spec], env=env, capture_output=True,
                             text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"worker failed for {model} on {devices} devices")
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    sys.path.insert(0, str(HERE))
    import report

    extra = {"what": "one jitted train step: curriculum sample + gather + forward/backward through "
                     "the fused LM-head loss + optax update + curriculum update"}
    if not gpu:  # the GPU cases run on one real device
        extra["note"] = ("CPU devices beyond the first are simulated on the same cores, so 8 "
                         "'devices' measure sharding overhead, not speed-up")
    text = report.header("Train step throughput (uniform curriculum, SFT, AdamW)", extra)
    report.write(args.out or f"experiments/results/step{'_gpu' if gpu else ''}.md", text + "\n" + report.table(rows))


if __name__ == "__main__":
    main()
