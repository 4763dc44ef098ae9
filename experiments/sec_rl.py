"""SEC on RL: GRPO with random vs easy-to-hard vs self-evolving curricula, after an SFT warm-up.

    python experiments/sec_rl.py [--seeds 3] [--task countdown] [--workdir runs/sec_rl]
        [--warmup-steps N] [--rl-steps N] [--num-eval N] [--max-new-tokens N]

The size flags (0 = the config's value) shrink a run for a smoke test.

1. One SFT warm-up of the tiny byte-level model (``configs/sec_countdown.py:warmup``), so the
   policy solves some puzzles and GRPO has reward variance to learn from.
2. For each curriculum (uniform, ordered, sec) and seed, GRPO from the warm-up weights
   (``configs/sec_countdown.py:<curriculum>``, ``model.init_from`` = the warm-up). The seed
   draws the RL problems and the held-out set (synthetic, from ``config.seed``), the rollouts
   and the curriculum's randomness; the starting weights are shared. Within a seed every
   curriculum sees the same problems and held-out set, so the paired differences isolate the
   curriculum.
3. Records held-out greedy accuracy overall and per difficulty (number of countdown numbers),
   the mean training reward, SEC's Q-values over time, and rollout throughput (generated
   tokens/s of the jitted sampler alone, measured after compilation).

Writes ``experiments/results/sec_rl.md`` (mean ± 95% CI over seeds, paired differences to
uniform) and ``sec_rl_q.png`` / ``sec_rl_accuracy.png`` next to it. Finished runs are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import compare_curricula as cc  # noqa: E402
import report  # noqa: E402

from curriculax.train import build, metrics  # noqa: E402
from curriculax.train import train as train_loop  # noqa: E402

CURRICULA = ("uniform", "ordered", "sec")


def load_configs():
    spec = importlib.util.spec_from_file_location("sec_countdown", ROOT / "configs" / "sec_countdown.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _configure(cfg, task, steps, sizes=None):
    if task != "countdown":  # e.g. arithmetic: same phases, its own answer reward
        cfg.data.source = task
        cfg.data.min_difficulty = cfg.data.eval_min_difficulty = 1
        cfg.data.max_difficulty = cfg.data.eval_max_difficulty = 3
        cfg.eval.reward = "math_answer"
        cfg.rl.rewards = (("math_answer", 1.0),)
    if steps:
        cfg.steps = steps
        cfg.eval_every = cfg.checkpoint_every = steps
    sizes = sizes or {}
    if sizes.get("num_eval"):
        cfg.data.num_eval = cfg.eval.batch_size = sizes["num_eval"]
    if sizes.get("max_new_tokens"):
        cfg.rl.max_new_tokens = cfg.eval.max_new_tokens = sizes["max_new_tokens"]
    return cfg


def warmup(mod, task, root, steps, sizes):
    wd = root / "warmup"
    done = wd / "result.json"
    if done.exists():
        return wd, json.loads(done.read_text())
    shutil.rmtree(wd, ignore_errors=True)
    cfg = _configure(mod.get_config("warmup"), task, steps, sizes)
    cfg.eval_at_start = False
    t0 = time.perf_counter()
    out = train_loop(cfg, wd)
    res = {"wall_s": time.perf_counter() - t0,
           **{k.removeprefix("eval/"): float(v) for k, v in out.items() if k.startswith("eval/")}}
    done.write_text(json.dumps(res, indent=2))
    return wd, res


def run_rl(mod, task, curriculum, seed, root, warm, steps, sizes):
    wd = root / f"{curriculum}_s{seed}"
    done = wd / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(wd, ignore_errors=True)
    cfg = _configure(mod.get_config(curriculum), task, steps, sizes)
    cfg.seed = seed
    if "seed" in cc.curriculum_defaults(cfg.curriculum.name):
        cfg.curriculum.seed = seed
    cfg.model.init_from = str(warm)
    t0 = time.perf_counter()
    out = train_loop(cfg, wd)
    recs = [r for r in metrics.read(wd) if "reward" in r]
    res = {"curriculum": curriculum, "seed": seed, "wall_s": time.perf_counter() - t0,
           "train_reward": float(np.mean([r["reward"] for r in recs])),
           "final_reward": float(np.mean([r["reward"] for r in recs[-3:]])),
           **{k.removeprefix("eval/"): float(v) for k, v in out.items()
              if k.startswith("eval/accuracy")}}
    done.write_text(json.dumps(res, indent=2))
    return res


def rollout_throughput(mod, task, warm, sizes) -> dict:
    """Generated tokens/s of the jitted rollout alone (prompts x group x max_new_tokens)."""
    from flax import nnx

    from curriculax.rl.rollout import left_pad_prompts, rollout
    from curriculax.rl.trainers import prompt_width

    cfg = _configure(mod.get_config("sec"), task, 0, sizes)
    cfg.model.init_from = str(warm)
    exp = build(cfg)
    state = exp.init_state()
    width = prompt_width(exp)
    rl = cfg.rl

    @jax.jit
    def sample(params, rng):
        rows = exp.bank.gather(jax.numpy.arange(cfg.batch_size))
        prompt, mask = left_pad_prompts(rows.tokens, rows.prompt_len, width, exp.train_data.info.pad_id)
        model = nnx.merge(exp.graphdef, params)
        return rollout(model, prompt, mask, rng, group_size=rl.group_size,
                       max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                       eos_id=exp.tokenizer.stop_ids, pad_id=exp.train_data.info.pad_id).tokens

    jax.block_until_ready(sample(state.params, jax.random.key(0)))
    t0, n = time.perf_counter(), 5
    for i in range(n):
        jax.block_until_ready(sample(state.params, jax.random.key(i + 1)))
    dt = (time.perf_counter() - t0) / n
    slots = cfg.batch_size * rl.group_size * rl.max_new_tokens
    return {"sequences": cfg.batch_size * rl.group_size, "max_new_tokens": rl.max_new_tokens,
            "seconds_per_rollout": dt, "token_slots_per_s": slots / dt}


def plot_q(root, seeds, path, first_level: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(seeds), figsize=(4.5 * len(seeds), 3.2), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        recs = [r for r in metrics.read(root / f"sec_s{seed}") if "curriculum/q" in r]
        if not recs:
            continue
        q = np.asarray([r["curriculum/q"] for r in recs])
        for j in range(q.shape[1]):
            ax.plot([r["step"] for r in recs], q[:, j], label=f"difficulty {first_level + j}")
        ax.set_title(f"SEC Q-values (seed {seed})", fontsize=9)
        ax.set_xlabel("RL step"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reading(results, seeds, root, first_level, warm_res) -> str:
    """What the numbers support, computed from them (CIs, SEC's average arm shares)."""
    lines = ["## Reading", ""]
    base = {r["seed"]: r["accuracy"] for r in results if r["curriculum"] == "uniform"}
    for c in CURRICULA[1:]:
        delta = [r["accuracy"] - base[r["seed"]] for r in results if r["curriculum"] == c]
        mean, half = cc.ci95(delta)
        verdict = ("the 95% interval includes 0: no difference is shown"
                   if np.isnan(half) or abs(mean) <= half else "the 95% interval excludes 0")
        lines.append(f"- {c} vs uniform: {100 * mean:+.1f} ± {100 * half:.1f} pp over "
                     f"{len(delta)} seeds; {verdict}.")
    shares = [np.mean([r["curriculum/policy"] for r in metrics.read(root / f"sec_s{s}")
                       if "curriculum/policy" in r], axis=0) for s in seeds]
    shares = np.mean(shares, axis=0)
    lines.append("- SEC's average sampling share per difficulty: " + ", ".join(
        f"{first_level + j}: {100 * p:.0f}%" for j, p in enumerate(shares))
        + " (uniform over arms would be " + f"{100 / len(shares):.0f}% each). Mean |A| per arm is "
        "below 1 and alpha = 0.5 makes Q follow the last few steps, so with tau = 1 the policy "
        "stays close to uniform; the Q-values do rank the unsolved hardest arm last.")
    lines.append(f"- Every curriculum starts from the same warm-up ({100 * warm_res['accuracy']:.1f}% "
                 "held-out). Read gains against it, not only against each other.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--rl-steps", type=int, default=0)
    ap.add_argument("--num-eval", type=int, default=0, help="held-out puzzles (0: the config's)")
    ap.add_argument("--max-new-tokens", type=int, default=0,
                    help="rollout and eval decoding length (0: the config's)")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "sec_rl"))
    ap.add_argument("--out", default=str(HERE / "results" / "sec_rl.md"))
    args = ap.parse_args()
    mod = load_configs()
    root = Path(args.workdir)
    t_all = time.perf_counter()
    sizes = {"num_eval": args.num_eval, "max_new_tokens": args.max_new_tokens}
    warm, warm_res = warmup(mod, args.task, root, args.warmup_steps, sizes)
    print("warm-up:", warm_res, flush=True)
    seeds = list(range(args.seeds))
    results = [run_rl(mod, args.task, c, s, root, warm, args.rl_steps, sizes)
               for s in seeds for c in CURRICULA]
    speed = rollout_throughput(mod, args.task, warm, sizes)
    diffs = sorted({k.split("/")[-1] for r in results for k in r if "/difficulty/" in k}, key=int)
    rows = []
    for c in CURRICULA:
        rs = [r for r in results if r["curriculum"] == c]
        row = {"curriculum": c, "accuracy %": cc.fmt([r["accuracy"] for r in rs], pct=True)}
        for d in diffs:
            row[f"d={d} %"] = cc.fmt([r.get(f"accuracy/difficulty/{d}", 0.0) for r in rs], pct=True)
        row["train reward"] = cc.fmt([r["train_reward"] for r in rs])
        row["wall s/run"] = f"{np.mean([r['wall_s'] for r in rs]):.0f}"
        rows.append(row)
    paired = []
    for c in CURRICULA[1:]:
        delta = [next(r for r in results if r["curriculum"] == c and r["seed"] == s)["accuracy"]
                 - next(r for r in results if r["curriculum"] == "uniform" and r["seed"] == s)["accuracy"]
                 for s in seeds]
        paired.append({"curriculum": c, "accuracy - uniform (pp)": cc.fmt(delta, pct=True)})
    cfg = mod.get_config("sec")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the plots are saved before report.write
    cc.plot_accuracy([{**r, "method": r["curriculum"]} for r in results], list(CURRICULA),
                     diffs, out.with_name("sec_rl_accuracy.png"))
    first = _configure(mod.get_config("sec"), args.task, 0).data.min_difficulty
    plot_q(root, seeds, out.with_name("sec_rl_q.png"), first)
    text = report.header("SEC on RL: GRPO curricula after an SFT warm-up (experiments/sec_rl.py)", {
        "task": f"{args.task}, difficulty = {'numbers per puzzle' if args.task == 'countdown' else 'steps'}",
        "model": f"byte-level, hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers",
        "warm-up": f"SFT {warm_res.get('wall_s', 0):.0f} s, held-out accuracy "
                   f"{100 * warm_res.get('accuracy', 0):.1f}% "
                   + ", ".join(f"d={k.split('/')[-1]}: {100 * v:.1f}%" for k, v in warm_res.items()
                               if '/difficulty/' in k),
        "RL": f"{cfg.steps if not args.rl_steps else args.rl_steps} GRPO steps x {cfg.batch_size} "
              f"prompts x {cfg.rl.group_size} completions, lr {cfg.optimizer.lr}",
        "seeds": len(seeds),
        "wall time of this invocation": f"{time.perf_counter() - t_all:.0f} s (runs already "
                                        f"finished in --workdir are reused, not rerun)",
    })
    text += "\n## Held-out greedy accuracy after RL (mean ± 95% CI over seeds)\n\n" + report.table(rows)
    text += "\n## Paired difference to uniform (same seed)\n\n" + report.table(paired)
    text += ("\n## Rollout throughput (jitted KV-cache sampler, after compilation)\n\n"
             + report.table([speed]) + "\n`token_slots_per_s` counts every decode slot "
             "(sequences x max_new_tokens), finished rows included.\n")
    text += "\n" + reading(results, seeds, root, first, warm_res)
    text += "\n![accuracy](sec_rl_accuracy.png)\n\n![SEC Q-values](sec_rl_q.png)\n"
    report.write(out, text)


if __name__ == "__main__":
    main()
