"""Metric sinks: ``metrics.jsonl`` (one record per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def to_python(value):
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()


class MetricWriter:
    """Appends to ``workdir/metrics.jsonl`` and TensorBoard; only process 0 should own one."""

    def __init__(self, workdir, *, tensorboard: bool = True, resume_step: int | None = None):
        """``resume_step``: the run restarts from this checkpointed step, so records logged after
        it by a process that died without checkpointing are dropped (they will be logged again)."""
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            # a last line without its newline is a write the killed process never finished
            whole = lines if not lines or lines[-1].endswith("\n") else lines[:-1]
            kept = [ln for ln in whole if not ln.strip() or json.loads(ln).get("step", 0) <= resume_step]
            if len(kept) < len(lines):
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(kept))
                tmp.replace(self.path)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, list) and np.asarray(v).dtype.kind in "biuf":
                    # a vector (per-arm values): one scalar each, k/0, k/1, ... (as curriculum.png)
                    for j, x in enumerate(np.ravel(v).tolist()):
                        self._tb.add_scalar(f"{k}/{j}", x, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read(workdir) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``, also while a run writes it or after one was
    killed mid-write (a torn last line is left out)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines if line.strip()]
