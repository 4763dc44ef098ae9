"""Every registered curriculum on 8 simulated devices, with exact checkpoint resume.

* ``test_sharded_state_roundtrip`` (all curricula, fast): the curriculum alone (``sample`` ->
  synthetic feedback -> ``update``, plus ``probe``) in a jitted ``lax.scan`` with the trainer's
  layout (per-row leaves split over ``data x fsdp``, the rest replicated) on a 2x2x2 mesh;
  3 steps, Orbax save + restore into the shardings, 3 more steps == 6 straight steps, and the
  same rows as on one device.
* ``test_trainer_checkpoint_roundtrip`` (``sec`` fast, the others slow): the trainer's own
  pieces (``build``, the jitted multi-step, ``checkpoint.save``/``restore``) with the model.
* ``test_train_loop_resume_*``: ``train()`` with ``stop_at`` then a resumed ``train()`` equals a
  straight run (process-level resume; slow), for every curriculum, Skill-it with the
  ``vocab_curriculum`` transform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_train import tiny_config  # tests/ is on sys.path under pytest

from curriculax import curriculum as curricula
from curriculax import sharding
from curriculax.curriculum.base import BankMeta, Feedback
from curriculax.train import build, checkpoint
from curriculax.train import train as train_loop
from curriculax.train.step import jit_steps

# Small per-method overrides so that a few steps exercise the dynamics (phase changes, round
# ends, graph estimation, stage switches).
OVERRIDES = {
    "uniform": {},
    "pacing": {"kind": "root", "start": 0.2},
    "cyclical": {"epochs": 2.0},
    "sec": {"arms": "joint"},
    "skill_it": {"holdout_per_skill": 2, "update_steps": 2, "graph": "estimated",
                 "graph_steps": 1},
    "ordering": {"kind": "interleaved_curriculum"},
    "reweight": {"signal": "loss"},
    "self_paced": {"start": 0.3},
    "stat_sel": {"accuracy_threshold": 0.5},
    "climb": {"kind": "root"},
}
EIGHT = {"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def test_every_registered_curriculum_is_covered():
    assert set(curricula.names()) == set(OVERRIDES)


# ------------------------------------------------------------ curriculum-only, 8 devices

E, B = 64, 8


def _harness(name, mesh):
    rs = np.random.default_rng(0)
    cat, diff = rs.integers(0, 3, E).astype(np.int32), rs.integers(1, 4, E).astype(np.int32)
    rows = P(("data", "fsdp")) if mesh is not None else None

    def put(x):
        return jax.device_put(x, NamedSharding(mesh, rows)) if mesh is not None else jnp.asarray(x)

    meta = BankMeta(put(cat), put(diff), num_examples=E, category_names=("a", "b", "c"),
                    difficulty_min=1, difficulty_max=3)
    cur = curricula.get(name)
    cfg = ml_collections.ConfigDict({"name": name, "total_steps": 12, **OVERRIDES[name]})
    abstract = jax.eval_shape(lambda: cur.init(cfg, meta))

    def leaf_sharding(x):
        if mesh is None:
            return None
        if x.ndim and x.shape[0] == E:
            return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (x.ndim - 1))))
        return sharding.replicated(mesh)

    shardings = jax.tree.map(leaf_sharding, abstract)
    init = jax.jit(lambda: cur.init(cfg, meta), out_shardings=shardings)

    def one(carry, _):
        state, key, t = carry
        key, k1, k2 = jax.random.split(key, 3)
        idx, w = cur.sample(state, k1, meta, B)
        # Deterministic synthetic feedback: harder rows have higher loss, which falls over time.
        loss = (meta.difficulty[idx] + 0.1 * (idx % 7)) * (1.0 - t / 24.0)
        probe_idx = cur.probe(state, k2, meta) if cur.probe is not None else None
        fb = Feedback(indices=idx, loss=loss.astype(jnp.float32),
                      token_accuracy=(idx % 3 == 0).astype(jnp.float32),
                      category=meta.category[idx], difficulty=meta.difficulty[idx], weights=w,
                      step=t, probe_indices=probe_idx,
                      probe_loss=None if probe_idx is None else
                      (1.0 + meta.category[probe_idx] - t / 24.0).astype(jnp.float32))
        return (cur.update(state, fb), key, t + 1), (idx, w)

    def steps(state, key, t):
        (state, key, t), out = jax.lax.scan(one, (state, key, t), None, length=3)
        return state, key, t, out

    run = jax.jit(steps, in_shardings=None if mesh is None else (shardings, None, None),
                  out_shardings=None if mesh is None else (shardings, None, None, None))
    return init, run, abstract, shardings


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_sharded_state_roundtrip(name, tmp_path):
    mesh = sharding.make_mesh(2, 2, 2)
    init, run, abstract, shardings = _harness(name, mesh)
    key, t0 = jax.random.PRNGKey(0), jnp.int32(0)
    state, key3, t3, (idx_a, _) = run(init(), key, t0)  # 3 steps
    straight, k, t, (idx_s, w_s) = run(jax.tree.map(jnp.copy, state), key3, t3)  # 3 more
    for leaf in jax.tree.leaves(state):
        if leaf.ndim and leaf.shape[0] == E:
            assert leaf.sharding.spec[0] == ("data", "fsdp"), name
    mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    mngr.save(3, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    restored = mngr.restore(3, args=ocp.args.StandardRestore(target))
    mngr.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    resumed, _, _, (idx_b, _) = run(restored, key3, t3)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))
    np.testing.assert_array_equal(idx_b, idx_s)
    # The same rows as on one device (threefry keys are partitionable).
    init1, run1, _, _ = _harness(name, None)
    s1, k1, t1, (idx_1a, _) = run1(init1(), key, t0)
    _, _, _, (idx_1b, w_1) = run1(s1, k1, t1)
    np.testing.assert_array_equal(np.concatenate([idx_1a, idx_1b]), np.concatenate([idx_a, idx_s]))
    np.testing.assert_allclose(w_1, w_s, rtol=1e-6)
    summary = curricula.get(name).summarize(straight)
    for k, v in summary.items():
        assert np.all(np.isfinite(np.asarray(v, np.float64))), k


# ------------------------------------------------------------ with the model and trainer

def curriculum_config(name, **over):
    c = tiny_config(**{"steps": 6, "checkpoint_every": 3, "eval_every": 6, **EIGHT, **over})
    c.curriculum = ml_collections.ConfigDict({"name": name, **OVERRIDES.get(name, {})})
    c.data.max_difficulty = 3
    c.data.eval_max_difficulty = 3
    c.data.seq_len = 160  # every prompt fits: the bank keeps all 64 rows (8 | 64)
    return c


@pytest.mark.parametrize("name", [n if n == "sec" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(OVERRIDES)])
def test_trainer_checkpoint_roundtrip(name, tmp_path):
    cfg = curriculum_config(name)
    exp = build(cfg)
    assert len(exp.mesh.devices.flat) == 8 and len(exp.train_data) == 64
    step = jit_steps(exp.train_step(), 3, exp.state_shardings, exp.bank_shardings)
    init = exp.init_state()
    rows_spec = exp.bank_shardings.category.spec[0]
    for leaf, sh in zip(jax.tree.leaves(init.curriculum),
                        jax.tree.leaves(exp.state_shardings.curriculum)):
        if leaf.ndim and leaf.shape[0] == 64:
            assert rows_spec is not None and sh.spec[0] == rows_spec, name
    state, m1 = step(init, exp.bank)
    straight, m_a = step(jax.tree.map(jnp.copy, state), exp.bank)
    mngr = checkpoint.manager(tmp_path, async_save=False)
    checkpoint.save(mngr, 3, state, {"step": 3})
    mngr.wait_until_finished()
    restored, _ = checkpoint.restore(mngr, exp.abstract_state, exp.state_shardings)
    mngr.close()
    resumed, m2 = step(restored, exp.bank)
    for part in ("curriculum", "params", "opt_state", "rng", "step"):
        a, b = jax.device_get(getattr(resumed, part)), jax.device_get(getattr(straight, part))
        assert jax.tree.structure(a) == jax.tree.structure(b)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(m2["loss"], m_a["loss"])
    assert any(k.startswith("curriculum/") for k in m2) or name == "uniform"


def _loop_resume(name, tmp_path, **over):
    cfg = curriculum_config(name, **over)
    train_loop(curriculum_config(name, stop_at=3, **over), tmp_path / "resumed")
    train_loop(cfg, tmp_path / "resumed")
    train_loop(cfg, tmp_path / "straight")
    exp = build(cfg)
    states = []
    for d in ("resumed", "straight"):
        mngr = checkpoint.manager(tmp_path / d, async_save=False)
        states.append(jax.device_get(checkpoint.restore(mngr, exp.abstract_state,
                                                        exp.state_shardings)[0]))
        mngr.close()
    assert int(states[0].step) == int(states[1].step) == 6
    for part in ("curriculum", "params", "rng"):
        jax.tree.map(np.testing.assert_array_equal, getattr(states[0], part),
                     getattr(states[1], part))


@pytest.mark.slow  # ~30-50 s: three train() runs with eval
def test_train_loop_resume_skill_it_with_vocab_transform(tmp_path):
    _loop_resume("skill_it", tmp_path, transforms=("vocab_curriculum",))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(OVERRIDES) - {"skill_it"}))
def test_train_loop_resume_every_curriculum(name, tmp_path):
    _loop_resume(name, tmp_path)


def test_setup_fills_total_steps_from_config_steps():
    one = {"mesh.num_devices": 1, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
    cfg = curriculum_config("pacing", steps=12, **one)
    exp = build(cfg)
    assert exp.abstract_state.curriculum.pace.total_steps == 12
    assert "total_steps" not in cfg.curriculum  # the caller's config is left alone
    cfg.curriculum.total_steps = 5
    assert build(cfg).abstract_state.curriculum.pace.total_steps == 5
