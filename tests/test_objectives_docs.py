"""Every python snippet in docs/objectives.md runs: ``train`` is swapped for building the
experiment and one jitted step on the tiny test config (a config a snippet leaves untrained, like the
composition example's, is built and stepped the same way)."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
from test_train import tiny_config  # tests/ is on sys.path under pytest

from curriculax.train import build
from curriculax.train.step import jit_steps

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "objectives.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def fake_train(cfg, workdir=None):
    del workdir
    exp = build(cfg)
    step = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    state, metrics = step(exp.init_state(), exp.bank)
    assert int(state.step) == 1 and np.isfinite(np.asarray(metrics["loss"])).all()
    return exp


@pytest.mark.slow  # one experiment build + compile per snippet
@pytest.mark.parametrize("i", range(1, len(BLOCKS)))
def test_doc_snippet_runs(i):
    assert "quickstart_config()" in BLOCKS[0]
    scope = {"train": fake_train, "c": tiny_config()}
    exec(compile(BLOCKS[i], f"{DOC.name}[{i}]", "exec"), scope)  # noqa: S102
    if not BLOCKS[i].strip().splitlines()[-1].startswith("train("):  # configured after training
        fake_train(scope["c"])
