"""Every python snippet in docs/sparsity.md runs: ``train`` is swapped for building the
experiment and one jitted step on the tiny test config."""

from __future__ import annotations

import pathlib
import re

import pytest
from test_train import tiny_config

from curriculax.train import build
from curriculax.train.step import jit_steps

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "sparsity.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def fake_train(cfg, workdir):
    del workdir
    exp = build(cfg)
    step = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    state, m = step(exp.init_state(), exp.bank)
    assert int(state.step) == 1
    return exp


@pytest.mark.slow  # one experiment build + compile per snippet
@pytest.mark.parametrize("i", range(1, len(BLOCKS)))
def test_doc_snippet_runs(i, tmp_path, monkeypatch):
    assert "quickstart_config()" in BLOCKS[0]
    monkeypatch.chdir(tmp_path)  # snippets that write files (CorDA's covariances) stay here
    scope = {"train": fake_train, "c": tiny_config()}
    exec(compile(BLOCKS[i], f"{DOC.name}[{i}]", "exec"), scope)  # noqa: S102
