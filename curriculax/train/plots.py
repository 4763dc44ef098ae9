"""Plots from ``metrics.jsonl``: loss, eval accuracy and the curriculum's state over time."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from curriculax.train import metrics as metrics_lib  # noqa: E402


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw(workdir) -> list[pathlib.Path]:
    """Redraws ``training.png`` and ``curriculum.png`` in ``workdir``; returns their paths."""
    workdir = pathlib.Path(workdir)
    records = metrics_lib.read(workdir)
    if not records:
        return []
    keys = sorted({k for r in records for k in r})
    out = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps, losses = _series(records, "loss")
    axes[0].plot(steps, losses, label="train loss")
    axes[0].set_xlabel("step"), axes[0].set_title("loss")
    if losses and min(losses) > 0:  # a log axis would drop RL's losses at or below 0
        axes[0].set_yscale("log")
    for k in [k for k in keys if k.startswith("eval/accuracy")]:
        if k == "eval/accuracy" or k.startswith("eval/accuracy/difficulty"):
            xs, ys = _series(records, k)
            axes[1].plot(xs, ys, marker="o", label=k.removeprefix("eval/accuracy").strip("/") or "all")
    axes[1].set_xlabel("step"), axes[1].set_title("held-out exact match"), axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(workdir / "training.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)

    cur_keys = [k for k in keys if k.startswith("curriculum/")]
    if cur_keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in cur_keys:
            xs, ys = _series(records, k)
            if ys and isinstance(ys[0], list):  # a vector (e.g. per-arm values): one line each
                for j in range(len(ys[0])):
                    ax.plot(xs, [y[j] for y in ys], label=f"{k.removeprefix('curriculum/')}[{j}]")
            else:
                ax.plot(xs, ys, label=k.removeprefix("curriculum/"))
        ax.set_xlabel("step"), ax.set_title("curriculum state"), ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(workdir / "curriculum.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
