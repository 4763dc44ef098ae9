"""Compare curricula on synthetic arithmetic: same model, data, optimizer and step budget.

    python experiments/compare_curricula.py [--seeds 3] [--methods uniform,sec,...]
        [--workdir runs/compare_arith] [--out experiments/results/curricula_arith.md]

Each (method, seed) trains ``configs/curricula_arith.py:<method>`` with ``config.seed = seed``
(the seed draws the synthetic train/eval sets, the initial weights and the curriculum's own
randomness, so every method sees the same data for a given seed). After training it records the
held-out exact-match accuracy (greedy decoding) overall and per difficulty, and the held-out
teacher-forced loss per difficulty (a smoother signal than exact match at this scale). Finished
runs are skipped when the script is rerun (``result.json`` in the run directory).

Outputs: a markdown table of mean ± 95% CI (t distribution over seeds), the paired difference
to ``uniform`` per seed, a bar plot of accuracy per difficulty and a grid of every method's
curriculum state over time (seed 0), next to the results file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from scipy import stats  # noqa: E402

from curriculax import objectives  # noqa: E402
from curriculax.train import build, checkpoint, metrics  # noqa: E402
from curriculax.train import train as train_loop  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load_config_module():
    spec = importlib.util.spec_from_file_location("curricula_arith",
                                                  ROOT / "configs" / "curricula_arith.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_LOSS_FNS: dict = {}


def _row_loss_fn(graphdef):
    """A jitted per-row response NLL, cached per model structure (compiled once per process)."""
    if graphdef not in _LOSS_FNS:
        @jax.jit
        def row_loss(params, tok, tgt, mask):
            model = nnx.merge(graphdef, params)
            hidden = model(tok)
            st = objectives.lm_head_stats(hidden, model.lm_head_weight(), tgt, mask)
            m = mask.astype(jnp.float32)
            return jnp.sum(-st.target_logprob * m, 1) / jnp.maximum(m.sum(1), 1.0)
        _LOSS_FNS[graphdef] = row_loss
    return _LOSS_FNS[graphdef]


def heldout_loss(cfg, workdir) -> dict[str, float]:
    """Mean teacher-forced response NLL per difficulty on the held-out bank."""
    exp = build(cfg)
    mngr = checkpoint.saved(workdir)
    state, _ = checkpoint.restore(mngr, exp.abstract_state, exp.state_shardings)
    mngr.close()
    row_loss = _row_loss_fn(exp.graphdef)
    bank = exp.eval_data.bank
    losses = []
    n = len(exp.eval_data)
    for lo in range(0, n, 64):
        idx = np.minimum(np.arange(lo, lo + 64), n - 1)  # fixed shapes: one compilation
        out = np.asarray(row_loss(state.params, bank.tokens[idx], bank.targets[idx],
                                  bank.loss_mask[idx]))
        losses.append(out[: min(64, n - lo)])
    losses = np.concatenate(losses)
    diff = np.asarray(bank.difficulty)
    out = {"heldout_loss": float(losses.mean())}
    for d in np.unique(diff):
        out[f"heldout_loss/difficulty/{d}"] = float(losses[diff == d].mean())
    return out


def curriculum_defaults(name: str):
    """The curriculum module's ``default_config()`` (empty for those without options)."""
    module = importlib.import_module(f"curriculax.curriculum.{name}")
    return module.default_config() if hasattr(module, "default_config") else {}


def run_one(mod, method: str, seed: int, root: Path, steps: int | None) -> dict:
    wd = root / f"{method}_s{seed}"
    done = wd / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if wd.exists():  # a half-finished run: start it again from scratch
        import shutil

        shutil.rmtree(wd)
    cfg = mod.get_config(method)
    cfg.seed = seed
    if "seed" in curriculum_defaults(cfg.curriculum.name):  # only those with a fixed permutation
        cfg.curriculum.seed = seed
    if steps:
        cfg.steps = cfg.eval_every = cfg.checkpoint_every = steps
    t0 = time.perf_counter()
    summary = train_loop(cfg, wd)
    result = {"method": method, "seed": seed, "wall_s": time.perf_counter() - t0,
              "train_loss": float(summary["loss"]),
              **{k.removeprefix("eval/"): float(v) for k, v in summary.items()
                 if k.startswith("eval/accuracy")}}
    result.update(heldout_loss(cfg, wd))
    done.write_text(json.dumps(result, indent=2))
    return result


def ci95(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(half)


def fmt(values, pct=False) -> str:
    m, h = ci95(values)
    s = 100.0 if pct else 1.0
    return f"{m * s:.1f} ± {h * s:.1f}" if pct else f"{m:.3f} ± {h:.3f}"


def plot_accuracy(results, methods, difficulties, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["accuracy"] + [f"accuracy/difficulty/{d}" for d in difficulties]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        means, errs = [], []
        for m in methods:
            mu, h = ci95([r.get(key, 0.0) for r in results if r["method"] == m])
            means.append(100 * mu)
            errs.append(100 * (0 if np.isnan(h) else h))
        ax.bar(np.arange(len(methods)) + j * width, means, width, yerr=errs, capsize=2,
               label="all" if key == "accuracy" else key.split("/")[-1].join(["difficulty ", ""]))
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=20)
    ax.set_ylabel("held-out exact match %"), ax.legend(fontsize=8)
    ax.set_title("accuracy per method (mean ± 95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_states(root: Path, methods, seed: int, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, methods):
        recs = metrics.read(root / f"{m}_s{seed}")
        keys = sorted({k for r in recs for k in r if k.startswith("curriculum/")})
        for k in keys:
            pts = [(r["step"], r[k]) for r in recs if k in r]
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            if ys and isinstance(ys[0], list):
                for j in range(len(ys[0])):
                    ax.plot(xs, [y[j] for y in ys], lw=1, label=f"{k[11:]}[{j}]")
            else:
                ax.plot(xs, ys, lw=1, label=k[11:])
        ax.set_title(m, fontsize=9)
        if keys:
            ax.legend(fontsize=5, ncol=2)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle(f"curriculum state over training (seed {seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    mod = load_config_module()
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(mod.METHODS))
    ap.add_argument("--steps", type=int, default=0, help="override the config's steps (250)")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "compare_arith"))
    ap.add_argument("--out", default=str(HERE / "results" / "curricula_arith.md"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    root = Path(args.workdir)
    t_all = time.perf_counter()
    results = []
    for seed in range(args.seeds):
        for m in methods:
            r = run_one(mod, m, seed, root, args.steps or None)
            results.append(r)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in r.items()}), flush=True)
    wall = time.perf_counter() - t_all

    difficulties = sorted({int(k.split("/")[-1]) for r in results for k in r
                           if k.startswith("accuracy/difficulty/")})
    rows, paired = [], []
    for m in methods:
        rs = sorted([r for r in results if r["method"] == m], key=lambda r: r["seed"])
        row = {"method": m, "curriculum": json.dumps(mod.METHODS[m]).replace('"', ""),
               "acc %": fmt([r["accuracy"] for r in rs], pct=True)}
        for d in difficulties:
            row[f"acc d={d} %"] = fmt([r.get(f"accuracy/difficulty/{d}", 0.0) for r in rs], True)
        row["held-out loss"] = fmt([r["heldout_loss"] for r in rs])
        for d in difficulties:
            row[f"loss d={d}"] = fmt([r[f"heldout_loss/difficulty/{d}"] for r in rs])
        rows.append(row)
        if m != "uniform":
            base = {r["seed"]: r for r in results if r["method"] == "uniform"}
            common = [r for r in rs if r["seed"] in base]
            if common:
                paired.append({
                    "method": m,
                    "Δ acc % vs uniform": fmt([r["accuracy"] - base[r["seed"]]["accuracy"]
                                               for r in common], pct=True),
                    "Δ held-out loss vs uniform": fmt(
                        [r["heldout_loss"] - base[r["seed"]]["heldout_loss"] for r in common]),
                    f"Δ loss d={difficulties[-1]}": fmt(
                        [r[f"heldout_loss/difficulty/{difficulties[-1]}"]
                         - base[r["seed"]][f"heldout_loss/difficulty/{difficulties[-1]}"]
                         for r in common])})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the plots are saved before report.write
    plot_accuracy(results, methods, difficulties, out.with_name(out.stem + "_accuracy.png"))
    plot_states(root, methods, 0, out.with_name(out.stem + "_state.png"))
    sys.path.insert(0, str(HERE))
    import report

    cfg = mod.get_config("uniform")
    mean_wall = np.mean([r["wall_s"] for r in results])
    text = report.header("Curricula on synthetic arithmetic", {
        "setup": f"byte-level Llama-style model, hidden {cfg.model.hidden_size}, "
                 f"{cfg.model.num_layers} layers; {args.steps or cfg.steps} steps x batch "
                 f"{cfg.batch_size}, seq_len {cfg.data.seq_len}; {cfg.data.num_train} arithmetic "
                 f"records (1-{cfg.data.max_difficulty} steps = difficulty, 3 operation families "
                 f"= category); {cfg.data.num_eval} held-out problems; AdamW lr "
                 f"{cfg.optimizer.lr}; config `configs/curricula_arith.py`",
        "seeds": f"{args.seeds} per method (seed = data draw + init + curriculum randomness)",
        "budget": f"{len(results)} runs, mean {mean_wall:.0f} s per run (train + eval), "
                  f"{wall / 60:.1f} min in this invocation (reused runs cost 0)",
        "metrics": "held-out greedy exact match (%), held-out teacher-forced response NLL; "
                   "mean ± 95% CI half-width (t, n = seeds)",
    })
    text += "\n## Results\n\n" + report.table(rows)
    if paired:
        text += "\n## Paired difference to uniform (same seed)\n\n" + report.table(paired)
    text += (f"\n![accuracy]({out.stem}_accuracy.png)\n\n![curriculum state]({out.stem}"
             "_state.png)\n")
    report.write(out, text)
    (out.with_name(out.stem + "_runs.json")).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
