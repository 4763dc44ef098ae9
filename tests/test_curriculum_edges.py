"""Curriculum edge cases: empty categories, zero temperature, duplicate rows in a batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from curriculax.curriculum import designer, ordering, sec, skill_it
from curriculax.curriculum.base import BankMeta, Feedback


def make_meta(category, difficulty, names):
    category = np.asarray(category, np.int32)
    difficulty = np.asarray(difficulty, np.int32)
    return BankMeta(jnp.asarray(category), jnp.asarray(difficulty), num_examples=len(category),
                    category_names=tuple(names), difficulty_min=int(difficulty.min()),
                    difficulty_max=int(difficulty.max()))


def cfg(**kw):
    return ml_collections.ConfigDict(kw)


def test_skill_it_graph_estimation_never_trains_on_held_out_rows_of_an_empty_skill():
    # Skill "c2" has no rows: its estimation segment must not index past the trainable rows
    # (into the held-out validation rows, which sort last).
    meta = make_meta(np.arange(40) % 2, np.ones(40), names=["c0", "c1", "c2"])
    state = skill_it.init(cfg(name="skill_it", graph="estimated", graph_steps=2,
                              holdout_per_skill=4, total_steps=30), meta)
    held = np.asarray(skill_it.held_out_mask(state, 40))
    assert held.sum() == 8
    smp = jax.jit(lambda s, r: skill_it.sample(s, r, meta, 64))
    for t in range(6):  # segments 0, 1 (skills c0, c1) and 2 (the empty skill c2)
        idx = np.asarray(smp(state.replace(t=jnp.int32(t)), jax.random.PRNGKey(t))[0])
        assert not held[idx].any(), t
        if t < 4:
            assert np.all(np.asarray(meta.category)[idx] == t // 2)


def test_sec_rejects_a_non_positive_temperature():
    meta = make_meta([0, 0, 1, 1], [1, 2, 1, 2], names=["a", "b"])
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="tau"):
            sec.init(cfg(name="sec", tau=tau), meta)
    state = sec.init(cfg(name="sec", tau=0.4), meta)
    assert np.all(np.isfinite(np.asarray(sec.policy(state))))


def test_sec_progress_memory_of_a_row_drawn_twice_is_its_batch_mean():
    meta = make_meta([0, 0, 1, 1], [1, 2, 1, 2], names=["a", "b"])
    state = sec.init(cfg(name="sec", reward="progress"), meta)
    idx = jnp.asarray([0, 3, 0, 0], jnp.int32)
    loss = jnp.asarray([1.0, 2.0, 3.0, 5.0], jnp.float32)
    fb = Feedback(indices=idx, loss=loss, token_accuracy=jnp.ones(4), category=meta.category[idx],
                  difficulty=meta.difficulty[idx], weights=jnp.ones(4), step=jnp.int32(0))
    state = jax.jit(sec.update)(state, fb)
    np.testing.assert_allclose(np.asarray(state.last_loss), [3.0, 0.0, 0.0, 2.0])
    np.testing.assert_array_equal(np.asarray(state.seen), [True, False, False, True])


def test_designer_leaves_out_categories_without_rows():
    from flax import nnx

    from curriculax.data.bank import ExampleBank
    from curriculax.data.synthetic import arithmetic
    from curriculax.data.tokenizer import load_tokenizer
    from curriculax.models import ModelConfig, Transformer

    names = ("addsub", "empty", "mixed", "mul")
    data = ExampleBank.build(arithmetic(24, 0, max_steps=1), load_tokenizer("byte"), seq_len=96,
                             category_names=names)
    model = Transformer(ModelConfig.tiny(hidden_size=32, intermediate_size=64, num_layers=1,
                                         num_heads=2, num_kv_heads=1, head_dim=16,
                                         max_seq_len=96), rngs=nnx.Rngs(0))
    conf, ranking, sim = designer.design(model, data, max_per_category=4, total_steps=30)
    assert sim.shape == (4, 4) and len(ranking) == 6
    assert all(1 not in order for _, order in ranking)
    assert len(conf.stages) == 3 and all("empty" not in s["categories"] for s in conf.stages)
    state = ordering.init(conf, data.bank.meta())  # every stage admits rows of the bank
    assert state.stages.ends == (10, 20, 30)


def test_ordering_random_shuffles_whatever_the_tie_break():
    """kind="random" with tie_break="index" sorted the rows by index: the identity, not a shuffle."""
    meta = make_meta(np.zeros(32), np.ones(32), names=["c0"])
    perms = {tb: np.asarray(ordering.init(cfg(name="ordering", kind="random", tie_break=tb, seed=3),
                                          meta).perm) for tb in ("index", "random")}
    np.testing.assert_array_equal(perms["index"], perms["random"])
    assert sorted(perms["index"]) == list(range(32)) and (perms["index"] != np.arange(32)).any()


def test_skill_it_skill_without_held_out_rows_counts_as_the_mean():
    """Skill c2 has one row, kept for training: no held-out rows.  Its L(0) was the probe loss of
    whatever row its empty pool pointed at (here 9.0), and its round means were 0 ("learned")."""
    meta = make_meta(np.r_[np.arange(20) % 2, 2], np.ones(21), names=["c0", "c1", "c2"])
    state = skill_it.init(cfg(name="skill_it", update_steps=1, holdout_per_skill=4,
                              total_steps=10), meta)
    assert np.asarray(state.pool_size).tolist() == [4, 4, 0]
    idx = jnp.asarray([0, 1], jnp.int32)
    fb = Feedback(indices=idx, loss=jnp.ones(2), token_accuracy=jnp.ones(2),
                  category=meta.category[idx], difficulty=meta.difficulty[idx],
                  weights=jnp.ones(2), step=jnp.int32(0),
                  probe_indices=skill_it.probe(state, None, meta),
                  probe_loss=jnp.asarray([1.0, 3.0, 9.0]))
    state = jax.jit(skill_it.update)(state, fb)
    np.testing.assert_allclose(state.history[-2:], [[1.0, 3.0, 2.0]] * 2)
    np.testing.assert_allclose(state.val_loss, [1.0, 3.0, 2.0])
