"""The method modules used outside the trainer, as the docs describe them: pure functions over
hand-built arrays and configs, under ``jax.jit`` / ``lax.scan``, with the registries filled by
importing the package alone."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from curriculax import curriculum as C
from curriculax.curriculum import ordering, pacing, skill_it
from curriculax.curriculum.base import BankMeta, Feedback


def _meta(e=30, k=3, levels=4):
    cat = np.arange(e, dtype=np.int32) % k
    diff = np.arange(e, dtype=np.int32) % levels + 1
    return BankMeta(jnp.asarray(cat), jnp.asarray(diff), num_examples=e,
                    category_names=tuple(f"c{i}" for i in range(k)), difficulty_min=1,
                    difficulty_max=levels)


def test_rl_package_registers_every_policy_loss():
    # `import curriculax.rl` alone (no trainer import) must know the losses docs/rl.md names; a
    # fresh interpreter, since another test of the session may have imported the trainer.
    code = ("import curriculax.rl as rl; assert {'grpo', 'nft'} <= set(rl.names()), rl.names(); "
            "assert rl.get('nft').token_loss is rl.nft.token_loss")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_transforms_all_lists_every_registered_transform():
    import curriculax.transforms as T

    assert set(T.names()) <= set(T.__all__)


def test_ordering_staged_init_under_jit_with_meta_argument():
    # base.py / docs/curricula.md: init runs under jax.jit; meta may be a jit argument.
    cfg = C.config("ordering", kind="staged", total_steps=10,
                   stages=({"end": 0.5, "max_difficulty": 1}, {"end": 1.0}))
    meta = _meta()
    state = jax.jit(lambda m: ordering.init(cfg, m))(meta)
    assert state.stages == ordering.init(cfg, meta).stages
    idx, _ = ordering.sample(state, jax.random.key(0), meta, 16)
    assert np.all(np.asarray(meta.difficulty)[np.asarray(idx)] == 1)


def test_pacing_fraction_exponential_default_start_is_hacohen_weinshall():
    # docs/curricula.md: exponential pacing defaults start=0.04, inc=1.9, step_length=100
    assert float(pacing.fraction("exponential", 0, 1000)) == np.float32(0.04)
    assert float(pacing.fraction("exponential", 100, 1000)) == np.float32(0.04 * 1.9)
    assert float(pacing.fraction("linear", 0, 1000)) == np.float32(0.1)


def test_token_weighted_key_token_ids_accept_a_float_loss_mask():
    from curriculax.objectives import token_weighted

    targets = jnp.array([[3, 5, 7, 5]])
    mask_bool = jnp.array([[False, True, True, True]])
    stats = types.SimpleNamespace(target_logprob=jnp.full((1, 4), -1.0))
    cfg = token_weighted.default_config("key_tokens")
    cfg.update(key_tokens="ids", key_token_ids=(5,), param_token_ids=(7,))
    want = token_weighted.token_weights(
        stats, types.SimpleNamespace(targets=targets, loss_mask=mask_bool), cfg)
    got = token_weighted.token_weights(
        stats, types.SimpleNamespace(targets=targets, loss_mask=mask_bool.astype(jnp.float32)),
        cfg)
    np.testing.assert_array_equal(got, want)


def test_skill_it_state_dtypes_do_not_follow_feedback_dtype():
    # float64 losses (x64 mode) must not turn the float32 state into float64 inside lax.scan.
    meta = _meta(levels=1)
    cfg = C.config("skill_it", total_steps=9, rounds=2, holdout_per_skill=2,
                   graph="estimated", graph_steps=1)
    with jax.enable_x64(True):
        state = skill_it.init(cfg, meta)

        def body(s, t):
            idx, w = skill_it.sample(s, jax.random.fold_in(jax.random.key(0), t), meta, 4)
            probe = skill_it.probe(s, jax.random.key(1), meta)
            fb = Feedback(indices=idx, loss=jnp.ones(4, jnp.float64),
                          token_accuracy=jnp.zeros(4, jnp.float64), category=meta.category[idx],
                          difficulty=meta.difficulty[idx], weights=w, step=t,
                          probe_indices=probe,
                          probe_loss=jnp.linspace(1.0, 2.0, probe.shape[0], dtype=jnp.float64))
            return skill_it.update(s, fb), None

        out, _ = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(9, dtype=jnp.int32)))(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(out)):
        assert a.dtype == b.dtype
