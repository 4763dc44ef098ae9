"""Every snippet in docs/rl.md runs: ``train`` is swapped for building the experiment and
running one jitted step on the tiny test config (``model.init_from`` paths are dropped)."""

from __future__ import annotations

import os
import pathlib
import re

import jax
import numpy as np
import pytest
from test_train import tiny_config  # tests/ is on sys.path under pytest

from curriculax.train import build
from curriculax.train.step import jit_steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "rl.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def fake_train(cfg, workdir):
    del workdir
    cfg.model.init_from = ""
    cfg.required_fields = tuple(f for f in cfg.required_fields if f != "model.init_from")
    for key, value in {"batch_size": 2, "rl.group_size": 2, "rl.max_new_tokens": 4}.items():
        section, *field = key.split(".")
        (cfg[section].__setitem__(field[0], value) if field else cfg.__setitem__(section, value))
    exp = build(cfg)
    state = exp.init_state()
    step = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    _, metrics = step(state, exp.bank)
    assert np.isfinite(np.asarray(metrics["loss"])).all()


@pytest.mark.slow  # ~1 min: one compile per snippet
@pytest.mark.parametrize("i", range(1, len(BLOCKS)))
def test_doc_snippet_runs(i, tmp_path, monkeypatch):
    assert "quickstart_config()" in BLOCKS[0]
    monkeypatch.chdir(ROOT)  # snippets name configs/ relative to the repo
    code = BLOCKS[i].replace("from curriculax.train import quickstart_config, train\n", "")
    if "pairs.jsonl" in code:  # the DPO snippet reads preference pairs
        from test_rl_train import _pairs_file

        train_file, eval_file = _pairs_file(tmp_path), _pairs_file(tmp_path, 8, seed=1)
        code = code.replace('"pairs.jsonl"', repr(str(train_file))).replace(
            '"pairs_eval.jsonl"', repr(str(eval_file)))
        code += "\nc.data.num_train = 0\n"
    if "s3ft.prepare" in code:  # S3FT generates with the starting model first
        code = code.replace('c.model.init_from = "runs/quickstart"\n', "").replace(
            '"runs/s3ft"', repr(str(tmp_path / "s3ft")))
    scope = {"train": fake_train, "c": tiny_config(**{"data.max_difficulty": 1}), "jax": jax,
             "os": os}
    exec(compile(code, f"{DOC.name}[{i}]", "exec"), scope)  # noqa: S102
