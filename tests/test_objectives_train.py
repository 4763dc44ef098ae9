"""Every objective and input transform of issue 6 trains the quickstart model without NaNs."""

import jax
import numpy as np
import pytest

from curriculax.objectives import asft, dft, otr, token_weighted, ul2
from curriculax.train import build, quickstart_config
from curriculax.train.step import jit_steps
from curriculax.transforms import masked_thought, prefix_sampling, scheduled_sampling


def tiny(**over):
    c = quickstart_config()
    c.steps, c.batch_size = 3, 4
    c.data.num_train, c.data.num_eval = 32, 4
    c.data.max_difficulty = c.data.eval_max_difficulty = 1
    c.data.seq_len = 120
    c.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=16)
    c.mesh.num_devices, c.mesh.data = 1, 1
    c.optimizer.warmup_steps = 1
    for k, v in over.items():
        setattr(c, k, v)
    return c


def _with_transform(name, module, **fields):
    cfg = module.default_config()
    cfg.update(fields)
    return {"transforms": (name,), "transform_config": {name: cfg}}


CASES = {
    "dft": dict(objective=dft.default_config()),
    "asft": dict(objective=asft.default_config()),
    "otr": dict(objective=otr.default_config()),
    "token_weighted": dict(objective=token_weighted.default_config("key_tokens")),
    "token_weighted_ref": dict(objective=token_weighted.default_config("ref_confidence")),
    "masked_thought": _with_transform("masked_thought", masked_thought, schedule="constant"),
    "prefix_sampling": _with_transform("prefix_sampling", prefix_sampling),
    "scheduled_sampling": _with_transform("scheduled_sampling", scheduled_sampling,
                                          schedule="constant", p_gold=0.5),
    "ul2": dict(objective=ul2.objective_config(), **_with_transform("ul2", ul2)),
}


def _run(case, steps=3, **extra):
    over = {**CASES[case], **extra}
    c = tiny()
    if "transform_config" in over:
        for name, cfg in over.pop("transform_config").items():
            c.transform_config[name] = cfg
    for k, v in over.items():
        setattr(c, k, v)
    exp = build(c)
    state = exp.init_state()
    before = jax.device_get(state.params)
    state, metrics = jit_steps(exp.train_step(), steps, exp.state_shardings, exp.bank_shardings)(state, exp.bank)
    return before, jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("case", ["asft", "otr", "scheduled_sampling"])
def test_trains_without_nans(case):
    before, state, metrics = _run(case)
    assert np.all(np.isfinite(metrics["loss"])) and np.all(np.isfinite(metrics["grad_norm"]))
    assert np.all(metrics["grad_norm"] > 0)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, state.params)
    assert max(jax.tree.leaves(moved)) > 0
    if case in ("asft", "token_weighted_ref"):  # the reference stays the initial model
        jax.tree.map(np.testing.assert_array_equal, state.ref_params, before)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["otr", "scheduled_sampling"])
def test_grad_accumulation_draws_the_full_batch_samples(case):
    """Random draws are keyed by the example's row in the step's batch, so micro-batches sample
    the tokens (and scheduled sampling's coins) one full batch would: the same step."""
    _, s1, m1 = _run(case, steps=2)
    _, s4, m4 = _run(case, steps=2, grad_accum=4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), s1.params, s4.params)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dft", "token_weighted", "token_weighted_ref", "masked_thought",
                                  "prefix_sampling", "ul2"])
def test_trains_without_nans_slow(case):
    test_trains_without_nans(case)


@pytest.mark.slow
def test_scheduled_sampling_runs_its_sampling_head_like_the_loss_head(monkeypatch):
    """Pass 1's sampling head goes through the step's placement (mesh, rules, shard_map): under
    shard_map on 8 devices, as a Pallas kernel must be, with the 1-device samples."""
    from curriculax.kernels import sharded

    calls, inner = [], sharded.sharded_lm_head

    def spy(*args, **kw):
        calls.append("sample_rng" in kw)
        return inner(*args, **kw)

    monkeypatch.setattr(sharded, "sharded_lm_head", spy)
    objective = quickstart_config().objective
    objective.shard_map = "always"
    _, s1, m1 = _run("scheduled_sampling", steps=1, batch_size=8)
    _, s8, m8 = _run("scheduled_sampling", steps=1, batch_size=8, objective=objective,
                     mesh=_mesh8())
    assert calls.count(True) >= 1 and calls.count(False) >= 1  # pass 1 and the loss
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)


def _mesh8():
    c = quickstart_config().mesh
    c.num_devices, c.data = 8, 8
    return c
