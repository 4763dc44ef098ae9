"""Every snippet in docs/curricula.md runs: ``train`` is swapped for building the experiment
and its initial state (the curriculum's ``init`` under jit) on the tiny test config."""

from __future__ import annotations

import pathlib
import re

import pytest
from test_train import tiny_config  # tests/ is on sys.path under pytest

from curriculax.train import build

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "curricula.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def fake_train(cfg, workdir):
    del workdir
    exp = build(cfg)
    state = exp.init_state()
    assert state.curriculum is not None
    return exp


@pytest.mark.slow  # ~50 s: one experiment build per snippet
@pytest.mark.parametrize("i", range(1, len(BLOCKS)))
def test_doc_snippet_runs(i):
    assert "quickstart_config()" in BLOCKS[0]
    scope = {"train": fake_train, "c": tiny_config(**{"data.max_difficulty": 2})}
    code = BLOCKS[i].replace("from curriculax.train import quickstart_config, train\n", "")
    exec(compile(code, f"{DOC.name}[{i}]", "exec"), scope)  # noqa: S102
