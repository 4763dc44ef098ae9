"""LocFT-BF: down-projection masks, bitwise-frozen rest, breadth-first epochs, a tiny edit run;
the synthetic fact-editing set and its metrics."""

import jax
import numpy as np
import pytest
from flax import nnx

from curriculax import sparsity
from curriculax.data import facts
from curriculax.data.sources import load_records
from curriculax.sparsity import base, locft
from curriculax.train import build
from curriculax.train.step import jit_steps

from test_train import tiny_config

FACTS = {"data.source": "facts", "data.seq_len": 48, "data.num_train": 16, "data.num_eval": 48,
         "eval.max_new_tokens": 16}


# The layer spec --------------------------------------------------------------------------------

def test_parse_layers():
    assert locft.parse_layers("4-6", 8) == (4, 5, 6)
    assert locft.parse_layers("2,5-6", 8) == (2, 5, 6)
    assert locft.parse_layers([1, "3-4"], 8) == (1, 3, 4)
    assert locft.parse_layers(7, 8) == (7,)
    assert locft.parse_layers("", 32) == (22,)  # Llama-3-8B's official layer, as a depth
    assert locft.parse_layers("", 4) == (2,) and locft.parse_layers("", 1) == (0,)
    for bad in ("8", "3-1", "a", "-1", "1-"):
        with pytest.raises(ValueError):
            locft.parse_layers(bad, 8)


# Masks and frozen parameters --------------------------------------------------------------------

def test_masks_select_exactly_the_chosen_down_projections():
    c = tiny_config(**{"model.num_layers": 4})
    params = jax.eval_shape(lambda: _random_params(c))
    c.sparsity = sparsity.config("locft", layers="1-2")
    masks = sparsity.build(c, params).init_masks(params, jax.random.PRNGKey(0))
    on = sorted(base.path_str(p) for p, m in jax.tree_util.tree_leaves_with_path(masks)
                if bool(m))
    assert on == ["layers/1/mlp/down", "layers/2/mlp/down"]
    assert locft.trained_paths(params, c) == on
    assert locft.trained_count(params, c) == 2 * 128 * 64
    c.sparsity = sparsity.config("locft", layers=[3], module="attn/o")
    assert locft.trained_paths(params, c) == ["layers/3/attn/o"]
    c.sparsity = sparsity.config("locft")  # default depth: int(0.7 * 4) = 2
    assert locft.trained_paths(params, c) == ["layers/2/mlp/down"]
    c.sparsity = sparsity.config("locft", module="mlp/nothing")
    with pytest.raises(ValueError, match="matches no parameter"):
        sparsity.build(c, params)


def _random_params(c):
    from curriculax.train import setup
    from curriculax.train.config import model_config

    return setup._random_params(model_config(c), jax.random.PRNGKey(0))


def test_everything_else_bitwise_unchanged_after_adamw_steps_on_8_devices():
    """AdamW with weight decay 0.1 on a data-parallel mesh over all 8 devices; the 1-device case
    is covered (100 steps) by the end-to-end test below."""
    assert len(jax.devices()) == 8
    c = tiny_config(**{**FACTS, "model.num_layers": 3, "mesh.num_devices": 0, "mesh.data": -1})
    c.optimizer.weight_decay, c.optimizer.warmup_steps = 0.1, 0
    c.sparsity = sparsity.config("locft", layers="2")
    exp = build(c)
    state = exp.init_state()
    before = jax.device_get(state.params)
    step = jit_steps(exp.train_step(), 3, exp.state_shardings, exp.bank_shardings)
    state, m = step(state, exp.bank)
    assert np.all(np.isfinite(m["loss"]))
    for name, a, b in _pairs(state.params, before):
        if name == "layers/2/mlp/down":
            assert np.abs(a - b).max() > 1e-4, "the trained projection must move"
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    # Optimizer moments exist for the trained matrix only (1-entry stand-ins elsewhere).
    big = [x.shape for x in jax.tree.leaves(state.opt_state) if getattr(x, "size", 0) > 1]
    assert big and all(s == (128, 64) for s in big)


# Breadth-first epochs -------------------------------------------------------------------------

def test_breadth_first_config_visits_each_edit_epochs_times():
    c = locft.breadth_first_config(tiny_config(**FACTS), num_edits=16, epochs=3, batch_size=8)
    assert (c.steps, c.batch_size, c.curriculum.name, c.curriculum.kind) == (
        6, 8, "ordering", "random")
    assert c.optimizer.warmup_steps == 0 and c.optimizer.end_lr_factor == 1.0
    c.sparsity = sparsity.config("locft")
    exp = build(c)
    assert exp.bank.num_examples == 16
    state = exp.init_state()
    step = jit_steps(exp.train_step(), 2, exp.state_shardings, exp.bank_shardings)
    for epoch in range(1, 4):  # 2 steps of 8 = one pass: every edit once per epoch
        state, _ = step(state, exp.bank)
        np.testing.assert_array_equal(np.asarray(state.curriculum.counts), epoch)
    # Batch larger than the edit set: one batch of everything (the official chunks).
    small = locft.breadth_first_config(tiny_config(**FACTS), 16, epochs=5, batch_size=100)
    assert (small.batch_size, small.steps) == (16, 5)
    odd = locft.breadth_first_config(tiny_config(**FACTS), 10, epochs=3, batch_size=4)
    assert odd.steps == 8 and odd.data.num_train == 10  # ceil(30 / 4)


# The fact-editing set -------------------------------------------------------------------------

def test_fact_records_and_source():
    edits, paras, loc = facts.edit_records(16, 3, locality_per_edit=2)
    assert (len(edits), len(paras), len(loc)) == (16, 16, 32)
    assert {r["category"] for r in edits + paras + loc} == {"edit", "paraphrase", "locality"}
    subjects = [r["subject"] for r in edits]
    assert len(set(subjects)) == 16 and not set(subjects) & {r["subject"] for r in loc}
    for e, p in zip(edits, paras):
        assert e["subject"] == p["subject"] and e["answer"] == p["answer"]
        assert e["prompt"] != p["prompt"] and e["response"] == f"#### {e['answer']}"
        assert len(e["prompt"]) + len(e["response"]) < 60
    world = facts.knowledge_records(16, 3, locality_per_edit=2)
    old = {(r["prompt"], r["answer"]) for r in world}
    assert all((r["prompt"], r["answer"]) in old for r in loc)  # locality = known facts
    assert not any((r["prompt"], r["answer"]) in old for r in edits)  # edits change them
    assert facts.edit_records(16, 3, locality_per_edit=2)[0] == edits  # deterministic
    assert facts.world(5, 3) == facts.world(10, 3)[:5]
    train, held = load_records(tiny_config(**FACTS).data, 0)
    assert [r["category"] for r in train] == ["edit"] * 16
    assert [r["category"] for r in held[:3]] == ["edit", "paraphrase", "locality"]
    assert len(held) == 48  # recall is measured: the edit prompts stay in the held-out set
    assert facts.answer_of(" #### Quell.\nmore") == "Quell" and facts.answer_of("Zan x") == "Zan x"


# A tiny end-to-end edit ------------------------------------------------------------------------

def _run(cfg, params):
    exp = build(cfg)
    exp.load_init_params = lambda: params
    step = jit_steps(exp.train_step(), cfg.steps, exp.state_shardings, exp.bank_shardings)
    state, m = step(exp.init_state(), exp.bank)
    return exp, state, np.asarray(m["loss"])


@pytest.mark.slow
def test_tiny_edit_run_reaches_high_edit_success():
    """Base model memorizes the pre-edit world (200 steps), then LocFT-BF learns 16 edits
    (50 epochs x 2 batches of 8, lr 1e-2). Measured on seeds 0-3: edit success 1.0, paraphrase
    0.12-0.19 and locality 0.0: at this lr, this 2-layer, 64-wide model's one down projection
    does not hold 16 new facts without overwriting the old ones (experiments/locft_edit.py)."""
    world = tiny_config(**{**FACTS, "data.source": "facts_world", "steps": 200, "batch_size": 16})
    world.optimizer.lr, world.optimizer.warmup_steps = 5e-3, 20
    exp, state, _ = _run(world, None)
    base_params = jax.device_get(state.params)
    edits, paras, loc = facts.edit_records(16, 0)
    kw = dict(seq_len=48, max_new_tokens=16)
    pre_model = nnx.merge(exp.graphdef, base_params)
    pre = facts.greedy_answers(pre_model, exp.tokenizer, loc, **kw)
    before = facts.edit_metrics(pre_model, exp.tokenizer, edits, paras, loc, pre, **kw)
    assert before["edit_success"] == 0.0 and before["locality"] == 1.0
    assert before["locality_gold"] >= 0.9  # the base knows the unrelated facts (1.0)

    c = tiny_config(**FACTS)
    c.sparsity = sparsity.config("locft")  # layers="" -> layer 1 of 2
    c = locft.breadth_first_config(c, 16, epochs=50, batch_size=8)
    c.optimizer.lr = 1e-2
    exp, state, losses = _run(c, base_params)
    assert losses[-1] < 0.1 * losses[0]
    out = facts.edit_metrics(nnx.merge(exp.graphdef, state.params), exp.tokenizer, edits, paras,
                             loc, pre, **kw)
    assert out["edit_success"] >= 0.9, out
    assert 0.0 <= out["locality"] <= 1.0 and 0.0 <= out["paraphrase"] <= 1.0
    changed = [name for name, a, b in _pairs(state.params, base_params)
               if not np.array_equal(a, b)]
    assert changed == ["layers/1/mlp/down"]


def _pairs(a, b):
    """``(path, leaf of a, leaf of b)`` for two params trees of one structure."""
    pa, pb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in pa] == [p for p, _ in pb]
    return [(base.path_str(p), np.asarray(x), np.asarray(y)) for (p, x), (_, y) in zip(pa, pb)]
