"""Compare parameter-selection methods on synthetic arithmetic: full FT, LIFT, LoRA, HFT, LT-SFT.

Protocol (one CPU, minutes):

1. **Base model** (per seed): a byte-level Llama-style model trained with full fine-tuning on
   1-step arithmetic (``--base-steps``): the "pretrained" model every method starts from.
2. **Fine-tuning** (per method x seed, same data, batch, learning rate and schedule): difficulty
   1..2 for ``--steps`` steps.
3. **Measured**: optimizer-state bytes (every array in ``opt_state``; masks reported separately),
   trained-parameter count, mean step time after compilation (``block_until_ready`` per step,
   2 shared CPU cores: noisy), final train loss (mean of the last 10 steps) and greedy exact-match
   accuracy on held-out problems of difficulty 1..2 (``config.data.num_eval`` of them).

Budgets are matched roughly: LoRA rank r on every projection, LIFT with the LoRA-equivalent
budget ``(m+n)·r`` per matrix, LT-SFT with the same overall density as LIFT, HFT half of the
matrices. The learning rate is the same for all (tuned for full FT, not per method).

    python experiments/compare_sparsity.py            # ~10-15 min on 2 CPU cores
    python experiments/compare_sparsity.py --quick    # smoke test

Writes ``<out>/sparsity.json`` and ``<out>/sparsity.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from curriculax import sparsity  # noqa: E402
from curriculax.sparsity import lift  # noqa: E402
from curriculax.train import build, evaluate, quickstart_config  # noqa: E402
from curriculax.train.step import jit_steps  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def base_config(args, *, steps, max_difficulty, seed):
    c = quickstart_config()
    c.seed = seed
    c.steps = steps
    c.batch_size = args.batch_size
    c.model.hidden_size, c.model.num_layers = args.hidden, args.layers
    c.model.intermediate_size, c.model.head_dim = 3 * args.hidden, args.hidden // 4
    c.data.num_train = args.num_train
    c.data.num_eval = args.num_eval
    c.data.max_difficulty = c.data.eval_max_difficulty = max_difficulty
    c.optimizer.lr = args.lr
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.mesh.num_devices, c.mesh.data = 1, 1
    c.eval.max_new_tokens = args.max_new_tokens
    c.progress_bar = c.plots = False
    return c


def methods(args, density):
    r = args.rank
    return {
        "full": sparsity.config("none"),
        "lift": sparsity.config("lift", lora_rank=r, filter_rank=args.filter_rank,
                                refresh_every=args.refresh_every),
        "lora": sparsity.config("lora", rank=r, alpha=2.0 * r),
        "hft": sparsity.config("hft"),
        "lt_sft": sparsity.config("lt_sft", density=density),
    }


def run(cfg, params, steps):
    exp = build(cfg)
    exp._init_params = params
    state = exp.init_state()
    fn = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    losses, times = [], []
    for i in range(steps):
        t = time.perf_counter()
        state, m = fn(state, exp.bank)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t)
        losses.append(float(m["loss"][0]))
    return exp, state, np.array(losses), np.array(times[1:])


def nbytes(tree):
    return 0 if tree is None else lift.state_bytes(tree)


def trained_count(name, state, exp):
    p = state.params
    if name == "full":
        return sum(x.size for x in jax.tree.leaves(p))
    if name == "lora":
        return sum(x.size for x in jax.tree.leaves(p["lora"]))
    if name == "lift":
        return sum(m.size if m.ndim else 0 for m in jax.tree.leaves(state.masks))
    if name == "hft":
        return int(sum(x.size * bool(m) for x, m in zip(jax.tree.leaves(p),
                                                         jax.tree.leaves(state.masks))))
    return int(sum(int(np.sum(m)) for m in jax.tree.leaves(state.masks["select"])))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--base-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--num-eval", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--filter-rank", type=int, default=16)
    ap.add_argument("--refresh-every", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--methods", default="full,lift,lora,hft,lt_sft")
    ap.add_argument("--out", default=str(REPO / "experiments" / "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--time-only", action="store_true",
                    help="only step times, methods interleaved round-robin (fairer on a shared CPU)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.quick:
        args.base_steps, args.steps, args.num_train, args.num_eval = 10, 10, 256, 8
        args.hidden, args.layers, args.batch_size, args.refresh_every = 64, 2, 8, 4
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.time_only:
        return time_only(args, out)
    t0 = time.time()
    results = {}
    for seed in range(args.seeds):
        base_cfg = base_config(args, steps=args.base_steps, max_difficulty=1, seed=seed)
        exp, state, losses, _ = run(base_cfg, None, args.base_steps)
        base_params = jax.device_get(state.params)
        ft_cfg = base_config(args, steps=args.steps, max_difficulty=2, seed=seed)
        base_acc = evaluate(build(ft_cfg), base_params)["eval/accuracy"]
        results.setdefault("base", {})[seed] = {"accuracy": base_acc}
        print(f"seed {seed} base: loss {losses[-10:].mean():.4f} acc(1..2) {base_acc:.3f}",
              flush=True)
        lift_cfg = base_config(args, steps=args.steps, max_difficulty=2, seed=seed)
        lift_cfg.sparsity = methods(args, 0.0)["lift"]
        density = lift.fraction(build(lift_cfg).abstract_state.params, lift_cfg)
        for name, sp in methods(args, density).items():
            if name not in args.methods.split(","):
                continue
            cfg = base_config(args, steps=args.steps, max_difficulty=2, seed=seed)
            cfg.sparsity = sp
            t = time.time()
            exp, state, losses, times = run(cfg, base_params, args.steps)
            acc = evaluate(exp, state.params)["eval/accuracy"]
            total = sum(x.size for x in jax.tree.leaves(base_params))
            row = dict(accuracy=acc, final_loss=float(losses[-10:].mean()),
                       opt_state_bytes=nbytes(state.opt_state), mask_bytes=nbytes(state.masks),
                       trained=trained_count(name, state, exp), total_params=total,
                       step_ms=1e3 * float(np.median(times)), seconds=time.time() - t)
            results.setdefault(name, {})[seed] = row
            print(f"seed {seed} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()),
                  flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.time() - t0,
            "machine": f"{platform.machine()} {os.cpu_count()} cpu(s) (shared)",
            "jax": jax.__version__, "args": vars(args)}
    (out / "sparsity.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                  default=str))
    lines = ["| method | trained params | opt-state bytes | mask bytes | step ms (median) | "
             "final loss | held-out acc (diff 1-2) |", "|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        rows = list(per_seed.values())
        mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
        if name == "base":
            lines.append(f"| base (before FT) | - | - | - | - | - | {mean('accuracy'):.3f} |")
            continue
        share = mean("trained") / mean("total_params")
        lines.append(f"| {name} | {int(mean('trained')):,} ({share:.1%}) | "
                     f"{int(mean('opt_state_bytes')):,} | {int(mean('mask_bytes')):,} | "
                     f"{mean('step_ms'):.1f} | {mean('final_loss'):.4f} | {mean('accuracy'):.3f} |")
    (out / "sparsity_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def time_only(args, out):
    """Median step time per method; each round runs 10 steps of every method in turn, so that
    load from other processes hits all methods alike."""
    cfg0 = base_config(args, steps=args.steps, max_difficulty=2, seed=0)
    lift_cfg = base_config(args, steps=args.steps, max_difficulty=2, seed=0)
    lift_cfg.sparsity = methods(args, 0.0)["lift"]
    density = lift.fraction(build(lift_cfg).abstract_state.params, lift_cfg)
    runs = {}
    for name, sp in methods(args, density).items():
        if name not in args.methods.split(","):
            continue
        cfg = base_config(args, steps=args.steps, max_difficulty=2, seed=0)
        cfg.sparsity = sp
        exp = build(cfg)
        fn = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
        state = exp.init_state()
        state, _ = fn(state, exp.bank)  # compile
        jax.block_until_ready(state.params)
        runs[name] = [exp, fn, state, []]
    del cfg0
    for _ in range(args.rounds):
        for name, r in runs.items():
            exp, fn, state, times = r
            for _ in range(10):
                t = time.perf_counter()
                state, _ = fn(state, exp.bank)
                jax.block_until_ready(state.params)
                times.append(time.perf_counter() - t)
            r[2] = state
    lines = ["| method | step ms (median) | p10-p90 ms |", "|---|---|---|"]
    for name, (_, _, _, times) in runs.items():
        ms = 1e3 * np.array(times)
        lines.append(f"| {name} | {np.median(ms):.1f} | {np.percentile(ms, 10):.1f}-"
                     f"{np.percentile(ms, 90):.1f} |")
    (out / "sparsity_timing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
