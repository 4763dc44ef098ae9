"""Forward+backward throughput of the curriculax model vs the same shapes in transformers.

    python experiments/bench_forward.py [--device=cpu|gpu] [--models tiny,small_50m] [--repeats 5]
        [--out experiments/results/forward.md]

Both sides compute the same thing: logits of a [B,T] batch, mean cross-entropy, gradients of
every parameter. JAX is timed after compilation on a jitted value_and_grad; torch is timed
eagerly (the way transformers trains by default), fp32 on CPU and bf16 on GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

from curriculax.models import ModelConfig, Transformer, num_params  # noqa: E402
from curriculax.models.hf import config_to_hf  # noqa: E402


def time_it(fn, repeats):
    fn()  # warm-up (compilation / allocator)
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def bench_jax(cfg: ModelConfig, batch, seq, repeats):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)

    @jax.jit
    def step(params, tokens):
        def loss(p):
            m = nnx.merge(graphdef, p)
            logits = m.logits(m(tokens[:, :-1]))
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return jax.value_and_grad(loss)(params)

    return time_it(lambda: jax.block_until_ready(step(params, tokens)), repeats)


def bench_torch(cfg: ModelConfig, batch, seq, repeats, device):
    try:
        import torch
        import transformers
    except ImportError:
        return None
    hf = config_to_hf(cfg)
    arch = hf["architectures"][0]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    hf_cfg = config_cls(**{k: v for k, v in hf.items() if k not in ("architectures",)})
    hf_cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(device=device, dtype=dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(tokens[:, :-1], labels=None)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return time_it(step, repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="tiny,small_50m", help="comma-separated, of tiny,small_50m")
    args = ap.parse_args()
    models = args.models.split(",")
    gpu = args.device == "gpu"
    dtype = "bfloat16" if gpu else "float32"
    cases = [
        ("tiny", ModelConfig.tiny(dtype=dtype, param_dtype="float32"), 8, 128),
        ("small_50m", ModelConfig.small_50m(dtype=dtype, param_dtype="float32"), 8 if not gpu else 32, 256 if not gpu else 1024),
    ]
    if unknown := set(models) - {c[0] for c in cases}:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from tiny,small_50m")
    rows = []
    for name, cfg, batch, seq in (c for c in cases if c[0] in models):
        tokens = batch * seq
        t_jax = bench_jax(cfg, batch, seq, args.repeats)
        t_torch = bench_torch(cfg, batch, seq, args.repeats, "cuda" if gpu else "cpu")
        row = {"model": name, "params": f"{num_params(cfg) / 1e6:.1f}M", "batch x seq": f"{batch}x{seq}",
               "curriculax tok/s": tokens / t_jax, "transformers tok/s": tokens / t_torch if t_torch else "n/a",
               "ratio": (t_torch / t_jax) if t_torch else "n/a"}
        rows.append(row)
        print(row, flush=True)
    import torch
    text = report.header("Forward+backward throughput (model only, LM head + CE included)",
                         {"torch": torch.__version__, "compute dtype": dtype,
                          "method": "mean of repeated steps after 2 warm-ups; ratio = curriculax speed / transformers speed"})
    text += "\n" + report.table(rows)
    out = args.out or f"experiments/results/forward{'_gpu' if gpu else ''}.md"
    report.write(out, text)


if __name__ == "__main__":
    main()
