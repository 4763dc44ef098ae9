"""Curriculum engine: worked numbers from /work/shared/methods, sampling laws, in-jit updates.

Each curriculum is driven here directly (``init`` / ``sample`` / ``update`` under ``jax.jit``) on
small synthetic ``BankMeta``s; the trainer-level tests (checkpoint/resume on 8 devices) are in
``tests/test_curriculum_train.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from curriculax import curriculum as C
from curriculax.curriculum import (climb, cyclical, designer, ordering, pacing, reweight,
                                   sampling, schedules, sec, self_paced, skill_it, stat_sel)
from curriculax.curriculum.base import BankMeta, Feedback


def make_meta(category, difficulty, names=None):
    category = np.asarray(category, np.int32)
    difficulty = np.asarray(difficulty, np.int32)
    k = int(category.max()) + 1
    return BankMeta(jnp.asarray(category), jnp.asarray(difficulty), num_examples=len(category),
                    category_names=tuple(names or [f"c{i}" for i in range(k)]),
                    difficulty_min=int(difficulty.min()), difficulty_max=int(difficulty.max()))


def cfg(**kw):
    return ml_collections.ConfigDict(kw)


def draw(cur, state, meta, n, seed=0):
    """``n`` rows sampled in one call (a big batch has the same law per slot)."""
    idx, w = jax.jit(lambda s, r: cur.sample(s, r, meta, n))(state, jax.random.PRNGKey(seed))
    return np.asarray(idx), np.asarray(w)


def feedback(meta, idx, loss, step, acc=None, probe_idx=None, probe_loss=None, advantage=None,
             reward=None):
    idx = jnp.asarray(idx, jnp.int32)
    loss = jnp.asarray(loss, jnp.float32)
    return Feedback(indices=idx, loss=loss,
                    token_accuracy=jnp.ones_like(loss) if acc is None else jnp.asarray(acc),
                    category=meta.category[idx], difficulty=meta.difficulty[idx],
                    weights=jnp.ones_like(loss), step=jnp.int32(step),
                    advantage=None if advantage is None else jnp.asarray(advantage, jnp.float32),
                    reward=None if reward is None else jnp.asarray(reward, jnp.float32),
                    probe_indices=probe_idx,
                    probe_loss=None if probe_loss is None else jnp.asarray(probe_loss, jnp.float32))


def assert_law(samples, probs, support=None):
    """Chi-square goodness of fit of ``samples`` against ``probs`` (fixed seed: deterministic)."""
    probs = np.asarray(probs, np.float64)
    support = np.arange(len(probs)) if support is None else np.asarray(support)
    counts = np.array([np.sum(samples == s) for s in support])
    assert counts.sum() == len(samples), "samples outside the support"
    keep = probs > 0
    assert counts[~keep].sum() == 0
    p = stats.chisquare(counts[keep], probs[keep] / probs[keep].sum() * counts.sum()).pvalue
    assert p > 1e-3, (counts, probs)


def test_registry_has_every_method_and_default_configs():
    expected = {"uniform", "pacing", "cyclical", "sec", "skill_it", "ordering", "reweight",
                "self_paced", "stat_sel", "climb"}
    assert expected <= set(C.names())
    for mod in (pacing, cyclical, sec, skill_it, ordering, reweight, self_paced, stat_sel, climb):
        c = mod.default_config()
        assert C.get(c.name) is not None and mod.__doc__ and len(mod.__doc__) > 200


def test_with_total_steps_fills_only_unset():
    c = ml_collections.ConfigDict({"steps": 77, "curriculum": {"name": "pacing"}})
    c.lock()
    filled = C.with_total_steps(c)
    assert filled.curriculum.total_steps == 77 and "total_steps" not in c.curriculum
    c2 = ml_collections.ConfigDict({"steps": 77, "curriculum": {"name": "x", "total_steps": 5}})
    assert C.with_total_steps(c2).curriculum.total_steps == 5
    meta = make_meta([0, 1], [1, 2])
    with pytest.raises(ValueError, match="total_steps"):
        pacing.init(cfg(name="pacing"), meta)


# ----------------------------------------------------------------------------- pacing

def test_pacing_platanios_and_geometric_worked_numbers():
    f = pacing.fraction
    for t, want in [(0, 0.01), (250, 0.500075), (500, 0.707142), (1000, 1.0), (1500, 1.0)]:
        np.testing.assert_allclose(f("root", t, 1000, 0.01, 1.0), want, atol=1e-5)
    np.testing.assert_allclose(f("linear", 250, 1000, 0.01, 1.0), 0.2575, atol=1e-6)
    np.testing.assert_allclose(f("linear", 500, 1000, 0.01, 1.0), 0.505, atol=1e-6)
    for t, want in [(0, 0.1), (500, 0.316228), (1000, 1.0)]:
        np.testing.assert_allclose(f("geometric", t, 1000, 0.1, 1.0), want, atol=1e-6)


def test_pacing_hacohen_exponential_counts():
    # Ex B2: N=2500, p0=0.04, inc=1.9, L=100 -> g(i) = ceil(N min(p0 inc^floor(i/L), 1)).
    for i, want in [(0, 100), (99, 100), (100, 190), (250, 361), (500, 2477), (600, 2500)]:
        g = pacing.fraction("exponential", i, 10_000, 0.04, 1.0, inc=1.9, step_length=100)
        assert int(pacing.eligible_count(g, 2500, "ceil")) == want, i
    # through the curriculum: exponential pacing starts at p0 = 0.04 and rounds up
    meta = make_meta([0] * 2500, np.arange(2500) % 7)
    state = pacing.init(cfg(name="pacing", kind="exponential", total_steps=10_000), meta)
    assert state.pace.start == 0.04 and state.pace.rounding == "ceil"
    for i, want in [(0, 100), (250, 361)]:
        assert int(pacing.num_eligible(state.replace(t=jnp.int32(i)))) == want, i


def test_pacing_wu_shapes_with_ramp():
    # Ex B4: N=1000, T=1000, a=0.8, b=0.2; g = int(N * fraction), as many rows as the sampler admits
    want = {"linear": (200, 600, 1000), "quad": (200, 400, 1000), "sqrt": (200, 765, 1000),
            "step": (200, 200, 1000)}
    meta = make_meta([0] * 1000, np.arange(1000) % 5)
    for kind, counts in want.items():
        state = pacing.init(cfg(name="pacing", kind=kind, start=0.2, ramp=0.8, total_steps=1000), meta)
        got = tuple(int(pacing.num_eligible(state.replace(t=jnp.int32(t)))) for t in (0, 400, 800))
        assert got == counts, kind
    assert int(pacing.eligible_count(0.7654, 1000)) == 765 and int(pacing.eligible_count(0.6, 1000)) == 600


def test_pacing_deepspeed_discrete_and_root():
    lv = dict(levels=(0.2, 0.5, 1.0), boundaries=(5, 10))
    got = [float(pacing.fraction("discrete", t, 100, **lv)) for t in (0, 5, 6, 10, 11, 99)]
    np.testing.assert_allclose(got, [0.2, 0.2, 0.5, 0.5, 1.0, 1.0], atol=1e-7)
    def ds(kind, t, r=1):
        return int(pacing.deepspeed_difficulty(kind, t, 30000, 8, 1024, 8, r))

    assert [ds("fixed_root", t, 2) for t in (0, 100, 7500, 15000, 30000)] == [8, 64, 512, 720, 1024]
    assert [ds("fixed_linear", t) for t in (100, 7500, 15000)] == [8, 256, 512]


def _tied_meta(e=1000, levels=10):
    return make_meta(np.arange(e) % 3, np.arange(e) % levels)


def test_pacing_samples_uniformly_from_the_easiest_fraction():
    meta = _tied_meta()
    state = pacing.init(cfg(name="pacing", kind="linear", start=0.3, total_steps=100), meta)
    idx, w = draw(pacing.pacing, state, meta, 60_000)
    assert np.all(w == 1.0)
    d = np.asarray(meta.difficulty)[idx]
    assert d.max() == 2  # exactly difficulties 0, 1, 2 (300 rows) are eligible at t=0
    eligible = np.flatnonzero(np.asarray(meta.difficulty) <= 2)
    assert_law(idx, np.ones(len(eligible)), support=eligible)
    # Half-way: 0.3 + 0.7 * 0.5 = 0.65 -> 650 rows; anti: the hardest 30% first.
    mid = state.replace(t=jnp.int32(50))
    assert int(pacing.num_eligible(mid)) == 650
    anti = pacing.init(cfg(name="pacing", start=0.3, anti=True, total_steps=100), meta)
    assert np.asarray(meta.difficulty)[draw(pacing.pacing, anti, meta, 5000)[0]].min() == 7


def test_pacing_tie_break_is_seeded_and_value_mode():
    meta = _tied_meta()
    rows = {}
    for seed in (0, 0, 1):
        st = pacing.init(cfg(name="pacing", start=0.25, seed=seed, total_steps=10), meta)
        rows.setdefault(seed, []).append(set(np.asarray(st.order)[:250].tolist()))
    assert rows[0][0] == rows[0][1] != rows[1][0]
    assert all(np.asarray(meta.difficulty)[sorted(r)].max() == 2 for r in rows[0] + rows[1])
    # value mode: eligible iff difficulty <= 0 + 0.3 * 9 = 2.7
    st = pacing.init(cfg(name="pacing", start=0.3, mode="value", total_steps=10), meta)
    assert int(pacing.num_eligible(st)) == 300
    # given scores override difficulty
    scores = tuple(float(-i) for i in range(1000))
    st = pacing.init(cfg(name="pacing", start=0.1, scores=scores, total_steps=10), meta)
    assert set(np.asarray(st.order)[:100].tolist()) == set(range(900, 1000))
    # the logged frontier is the hardest eligible key, in the scores' own sign
    assert float(pacing.pacing.summarize(st)["frontier"]) == -900.0
    anti = pacing.init(cfg(name="pacing", start=0.3, anti=True, total_steps=10), meta)
    assert float(pacing.pacing.summarize(anti)["frontier"]) == 7.0


# ----------------------------------------------------------------------------- schedules

def test_zerosearch_schedule_worked_numbers():
    z = schedules.zerosearch
    for i, want in [(0, 0.0), (25, 0.0690356), (50, 0.1666667), (75, 0.3047379), (100, 0.5),
                    (150, 0.5)]:
        np.testing.assert_allclose(z(i, 100, 0.0, 0.5, 4.0), want, atol=1e-6)
    np.testing.assert_allclose(z(1, 203), 0.0011421, atol=1e-6)
    np.testing.assert_allclose(z(101, 203), 0.1655304, atol=1e-6)
    np.testing.assert_allclose(z(50, 100, 0.1, 0.7, 2.0), 0.3485281, atol=1e-6)
    np.testing.assert_allclose(z(50, 100, 0.0, 1.0, 1.0), 0.5, atol=1e-6)  # b -> 1: linear
    assert bool(schedules.noisy(0.25, 0.3)) and not bool(schedules.noisy(0.31, 0.3))
    assert bool(schedules.noisy(0.3, 0.3))  # a tie is noisy
    np.testing.assert_allclose(schedules.cosine(50, 100, 0.0, 1.0), 0.5, atol=1e-6)
    np.testing.assert_allclose(schedules.linear(25, 100, 1.0, 0.0), 0.75, atol=1e-6)
    jitted = jax.jit(lambda t: schedules.schedule("zerosearch", t, 100, 0.0, 0.5))
    np.testing.assert_allclose(jitted(jnp.int32(50)), 0.1666667, atol=1e-6)


# ----------------------------------------------------------------------------- cyclical

def test_cyclical_size_schedule_worked_examples():
    s = cyclical.cycle_sizes(0.25, 1.0, 0.5, 5)
    np.testing.assert_allclose(s, [0.25, 0.5, 1.0, 0.5, 0.25, 0.5, 1.0, 0.5, 0.25, 0.5])
    assert sum(s) == 5.25
    np.testing.assert_allclose(cyclical.cycle_sizes(0.2, 0.9, 0.5, 3),
                               [0.2, 0.4, 0.8, 0.9, 0.45, 0.225, 0.2], atol=1e-12)
    s30 = cyclical.cycle_sizes(0.25, 1.0, 0.5, 30)
    assert len(s30) == 54 and sum(s30) == 30.0


def test_cyclical_soft_selection_law():
    # Ex4: losses [0.5, 1, 2, 4] -> P = [0.533333, 0.266667, 0.133333, 0.066667]; with 25% of
    # N=4 one row is drawn per phase: its law is P (Gumbel-top-k == sequential weighted draws).
    ema = jnp.asarray([0.5, 1.0, 2.0, 4.0])
    seen = jnp.ones(4, bool)
    pick = jax.jit(jax.vmap(lambda k: cyclical._select(ema, seen, jnp.float32(0.25), k, False,
                                                       True)[0][0]))
    firsts = np.asarray(pick(jax.random.split(jax.random.PRNGKey(0), 20_000)))
    assert_law(firsts, [0.533333, 0.266667, 0.133333, 0.066667])
    order, count = cyclical._select(ema, seen, jnp.float32(0.5), jax.random.PRNGKey(1), False, True)
    assert int(count) == 2 and len(set(np.asarray(order)[:2].tolist())) == 2
    order, _ = cyclical._select(ema, seen, jnp.float32(0.5), jax.random.PRNGKey(1), True, False)
    assert set(np.asarray(order)[:2].tolist()) == {2, 3}  # hard-first, deterministic top


def test_cyclical_phases_follow_the_schedule_in_jit():
    e, b = 64, 8
    meta = make_meta(np.arange(e) % 2, np.arange(e) % 4)
    state = cyclical.init(cfg(name="cyclical", total_steps=40), meta)
    # budget 40 * 8 / 64 = 5 epochs -> Ex1's S; phase lengths round(64 S / 8) = 2, 4, 8, 4, 2, ...
    fracs, ends = cyclical.phase_table(tuple(cyclical.cycle_sizes(0.25, 1.0, 0.5, 5)), e, b)
    assert ends.tolist()[:5] == [2, 6, 14, 18, 20]
    upd = jax.jit(cyclical.update)
    smp = jax.jit(lambda s, r: cyclical.sample(s, r, meta, b))
    rs = np.random.default_rng(0)
    losses = rs.uniform(0.5, 3.0, e).astype(np.float32)
    seen_fracs = []
    for t in range(20):
        idx, _ = smp(state, jax.random.PRNGKey(t))
        subset = set(np.asarray(state.order)[: int(state.count)].tolist())
        assert set(np.asarray(idx).tolist()) <= subset
        assert int(state.count) == int(float(state.fraction) * e + 1e-6)  # int(N S_e)
        seen_fracs.append(float(state.fraction))
        state = upd(state, feedback(meta, idx, losses[np.asarray(idx)], t))
    assert seen_fracs == [0.25] * 2 + [0.5] * 4 + [1.0] * 8 + [0.5] * 4 + [0.25] * 2
    # int(N S_e) when N S_e is not whole: 100 rows at S = 0.225 -> 22, 10 rows at 0.45 -> 4
    for n, sp, want in ((100, 0.225, 22), (10, 0.45, 4)):
        small = cyclical.init(cfg(name="cyclical", start=sp, total_steps=10), make_meta([0] * n, [1] * n))
        assert int(small.count) == want
    assert int(state.phase) == 5
    seen = np.asarray(state.seen)
    assert seen.sum() > 0 and np.all(np.asarray(state.ema)[~seen] == 0)


# ----------------------------------------------------------------------------- SEC

def test_sec_td_and_boltzmann_worked_examples():
    # Ex1 -> arm rewards = mean |A|: [1,0,0,0] -> 0.75; [1,1,0,0] -> 0.8660254.
    a_abs = jnp.abs(jnp.asarray([1.5, -0.5, -0.5, -0.5, 0.8660254, -0.8660254, 0.8660254,
                                 -0.8660254]))
    r, n = sec.arm_rewards(a_abs, jnp.asarray([0] * 4 + [1] * 4), 3)
    np.testing.assert_allclose(r, [0.75, 0.8660254, 0.0], atol=1e-6)
    q0 = jnp.zeros(3)
    np.testing.assert_allclose(sec.boltzmann(q0, 1.0), [1 / 3] * 3, atol=1e-7)
    q1 = sec.td_update(q0, r, n, 0.5)
    np.testing.assert_allclose(q1, [0.375, 0.4330127, 0.0], atol=1e-6)
    np.testing.assert_allclose(sec.boltzmann(q1, 1.0), [0.364031, 0.385774, 0.250195], atol=1e-5)
    np.testing.assert_allclose(sec.boltzmann(q1, 0.4), [0.392514, 0.453775, 0.153711], atol=1e-5)
    r2, n2 = jnp.asarray([0.0, 0.0, 0.5]), jnp.asarray([4, 0, 4])  # arm1 not drawn
    q2 = sec.td_update(q1, r2, n2, 0.5)
    np.testing.assert_allclose(q2, [0.1875, 0.2165064, 0.25], atol=1e-6)
    np.testing.assert_allclose(sec.boltzmann(q2, 1.0), [0.323214, 0.332726, 0.344060], atol=1e-5)
    q2p = sec.td_update(q1, r2, n2, 0.5, update_unseen=False)
    np.testing.assert_allclose(q2p, [0.1875, 0.4330127, 0.25], atol=1e-6)
    np.testing.assert_allclose(sec.boltzmann(q2p, 1.0), [0.299153, 0.382400, 0.318447], atol=1e-5)


def _sec_meta():
    # 3 difficulty arms with 10, 20, 0(empty) rows... arm 1..4 -> levels 1,2,3 (3 is empty).
    diff = np.array([1] * 10 + [2] * 20 + [4] * 6)
    return make_meta(np.zeros(len(diff)), diff)


def test_sec_updates_q_in_jit_and_samples_by_policy():
    meta = _sec_meta()  # arms: difficulty 1, 2, 3 (empty), 4
    state = sec.init(cfg(name="sec"), meta)
    assert state.q.shape == (4,) and np.asarray(state.groups.size).tolist() == [10, 20, 0, 6]
    adv = [1.5, -0.5, -0.5, -0.5, 0.8660254, -0.8660254, 0.8660254, -0.8660254]
    fb = feedback(meta, [0, 1, 2, 3, 10, 11, 12, 13], np.ones(8), 0, advantage=adv)
    state = jax.jit(sec.update)(state, fb)
    np.testing.assert_allclose(state.q, [0.375, 0.4330127, 0.0, 0.0], atol=1e-6)
    probs = np.asarray(sec.policy(state))
    assert probs[2] == 0.0  # the empty arm is never drawn
    idx, _ = draw(sec.sec, state.replace(q=jnp.asarray([0.0, 1.0, 5.0, -1.0])), meta, 40_000)
    arms = np.asarray(meta.difficulty)[idx]
    p = np.asarray(sec.boltzmann(jnp.asarray([0.0, 1.0, 5.0, -1.0]), 1.0,
                                 jnp.asarray([True, True, False, True])))
    assert_law(arms, p, support=[1, 2, 3, 4])


def test_sec_queue_visits_each_arm_row_once_per_cycle():
    meta = _sec_meta()
    state = sec.init(cfg(name="sec", within="queue"), meta)
    state = state.replace(q=jnp.asarray([50.0, 0.0, 0.0, 0.0]))  # ~always arm 0 (10 rows)
    upd, smp = jax.jit(sec.update), jax.jit(lambda s, r: sec.sample(s, r, meta, 5))
    got = []
    for t in range(4):
        idx, _ = smp(state, jax.random.PRNGKey(t))
        got += np.asarray(idx).tolist()
        state = upd(state, feedback(meta, idx, np.ones(5), t))
    assert sorted(got[:10]) == list(range(10)) and sorted(got[10:]) == list(range(10))


def test_sec_progress_reward_without_advantages():
    meta = _sec_meta()
    state = sec.init(cfg(name="sec", alpha=1.0), meta)
    upd = jax.jit(sec.update)
    state = upd(state, feedback(meta, [0, 10], [2.0, 3.0], 0))
    np.testing.assert_allclose(state.q, 0.0)  # no row seen before: no progress signal yet
    state = upd(state, feedback(meta, [0, 10, 30], [1.5, 3.5, 1.0], 1))
    np.testing.assert_allclose(state.q, [0.5, -0.5, 0.0, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------- Skill-it

def test_skill_it_mixture_worked_examples():
    a = jnp.asarray([[1.0, 0.5], [0.0, 1.0]])
    np.testing.assert_allclose(skill_it.mixture(a, jnp.ones(2), 0.5), [0.562177, 0.437823],
                               atol=1e-6)
    np.testing.assert_allclose(skill_it.mixture(a, jnp.asarray([3.0, 7.0]), 0.5),
                               [0.437823, 0.562177], atol=1e-6)
    # Ex2 check: p <- p * exp(eta A L(t)) from uniform over L(0), L(1) gives the same.
    p = np.ones(2) / 2
    for loss in ([2.0, 4.0], [1.0, 3.0]):
        p = p * np.exp(0.5 * np.asarray(a) @ np.asarray(loss))
        p /= p.sum()
    np.testing.assert_allclose(p, [0.437823, 0.562177], atol=1e-6)
    np.testing.assert_allclose(skill_it.mixture(a, jnp.asarray([2.5, 4.5]), 0.5),
                               [0.531209, 0.468791], atol=1e-6)  # Ex3 (window 3)
    g = skill_it.given_graph([1, 0, 0, 1, 1, 0, 0, 0, 1], 3)
    np.testing.assert_allclose(g, [[1, 0, 0], [0.5, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(skill_it.mixture(g, jnp.ones(3), 0.1),
                               [0.327732, 0.344535, 0.327732], atol=1e-6)


def test_skill_it_window_history_in_jit():
    """Ex2 / Ex3 through the state: L(0) = [2,4] (the first step's probe), then round means
    [1,3], [1,1], [0.5,0.5]; after round 1 p(Ex2), after round 3 (window 3) p(Ex3)."""
    meta = make_meta(np.arange(40) % 2, np.ones(40))
    c = cfg(name="skill_it", graph="given", graph_matrix=(1, 0.5, 0, 1), update_steps=2,
            holdout_per_skill=4, total_steps=100)
    state = skill_it.init(c, meta)
    np.testing.assert_allclose(state.p, [0.562177, 0.437823], atol=1e-6)  # Ex1 init
    upd = jax.jit(skill_it.update)
    prb = jax.jit(lambda s: skill_it.probe(s, jax.random.PRNGKey(0), meta))
    t = 0
    # update_steps = 2 steps per round, probe 1 row per skill per step
    for steps, mean in ((([2.0, 4.0], [0.0, 2.0]), [1.0, 3.0]), (([1.0, 1.0],) * 2, [1.0, 1.0]),
                        (([0.5, 0.5],) * 2, [0.5, 0.5])):
        for losses in steps:
            fb = feedback(meta, [0, 1], [1.0, 1.0], t, probe_idx=prb(state), probe_loss=losses)
            state = upd(state, fb)
            t += 1
        np.testing.assert_allclose(state.val_loss, mean)
        if t == 2:  # history L(0) = [2,4], L(1) = [1,3]: Ex2 with its graph A = [[1,.5],[0,1]]
            np.testing.assert_allclose(state.p, [0.437823, 0.562177], atol=1e-5)
    np.testing.assert_allclose(state.p, [0.531209, 0.468791], atol=1e-5)
    with pytest.raises(ValueError, match="skill_it.*needs per-skill validation losses"):
        upd(state, feedback(meta, [0, 1], [1.0, 1.0], t))  # a step without probes (RL)


def test_skill_it_holds_out_probe_rows_and_samples_the_mixture():
    meta = make_meta(np.arange(300) % 3, np.ones(300))
    state = skill_it.init(cfg(name="skill_it", holdout_per_skill=8, total_steps=60), meta)
    held = np.asarray(skill_it.held_out_mask(state, 300))
    assert held.sum() == 24 and np.all(np.bincount(np.arange(300)[held] % 3) == 8)
    state = state.replace(p=jnp.asarray([0.6, 0.3, 0.1]))
    idx, _ = draw(skill_it.skill_it, state, meta, 30_000)
    assert not held[idx].any()
    assert_law(np.asarray(meta.category)[idx], [0.6, 0.3, 0.1])
    # The probe rotates through each skill's held-out pool.
    seen = set()
    for t in range(8):
        rows = np.asarray(skill_it.probe(state.replace(t=jnp.int32(t)), None, meta))
        assert rows.shape == (3,) and held[rows].all()
        assert (np.asarray(meta.category)[rows] == [0, 1, 2]).all()
        seen |= set(rows.tolist())
    assert seen == set(np.flatnonzero(held).tolist())


def test_skill_it_estimated_graph_from_loss_drops():
    meta = make_meta(np.arange(60) % 2, np.ones(60))
    c = cfg(name="skill_it", graph="estimated", graph_steps=2, holdout_per_skill=4,
            update_steps=5, total_steps=20)
    state = skill_it.init(c, meta)
    smp = jax.jit(lambda s, r: skill_it.sample(s, r, meta, 16))
    upd = jax.jit(skill_it.update)
    # Segment 0 (steps 0-1) trains skill 0: skill 0 drops 2 -> 1, skill 1 drops 2 -> 1.5.
    # Segment 1 (steps 2-3) trains skill 1: skill 0 stays, skill 1 drops 1.5 -> 0.5.
    probe_losses = {0: [2.0, 2.0], 1: [0.0, 1.0], 2: [1.0, 0.5], 3: [1.0, 0.5]}
    for t in range(4):
        idx, _ = smp(state, jax.random.PRNGKey(t))
        assert np.all(np.asarray(meta.category)[np.asarray(idx)] == t // 2)
        pi = skill_it.probe(state, None, meta)
        state = upd(state, feedback(meta, idx, np.ones(16), t, probe_idx=pi,
                                    probe_loss=probe_losses[t]))
    # baseline [2,2]; seg0 mean [1,1.5] -> drops [1,0.5] -> row0 [1,0.5];
    # seg1 mean [1,0.5] vs [1,1.5] -> drops [0,1] -> row1 [0,1].
    np.testing.assert_allclose(state.graph, [[1.0, 0.5], [0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(state.p, [0.562177, 0.437823], atol=1e-6)


# ----------------------------------------------------------------------------- ordering

# methods/human_orderings.md data: A.90 A.50 A.70 B.60 B.85 B.30 A.75 B.95 A.20
ORD_CAT = [0, 0, 0, 1, 1, 1, 0, 1, 0]
ORD_DIFF = [90, 50, 70, 60, 85, 30, 75, 95, 20]


def _labels(perm):
    return " ".join(f"{'AB'[ORD_CAT[i]]}.{ORD_DIFF[i]}" for i in np.asarray(perm))


@pytest.mark.parametrize("kind,want", [
    ("curriculum", "A.20 B.30 A.50 B.60 A.70 A.75 B.85 A.90 B.95"),
    ("anti", "B.95 A.90 B.85 A.75 A.70 B.60 A.50 B.30 A.20"),
    ("blocked", "A.90 A.50 A.70 A.75 A.20 B.60 B.85 B.30 B.95"),
    ("blocked_curriculum", "A.20 A.50 A.70 A.75 A.90 B.30 B.60 B.85 B.95"),
    ("interleaved_curriculum", "A.20 A.50 B.30 B.60 A.70 A.75 B.85 A.90 B.95"),
    ("interleaved", "A.90 A.50 B.60 B.85 A.70 A.75 B.30 A.20 B.95"),
    ("interleaved_difficulty", "A.20 A.50 B.30 B.60 A.70 A.75 A.90 B.85 B.95"),
])
def test_ordering_worked_examples(kind, want):
    meta = make_meta(ORD_CAT, ORD_DIFF, names=["A", "B"])
    state = ordering.init(cfg(name="ordering", kind=kind, tie_break="index", buckets=(66, 80)),
                          meta)
    assert _labels(state.perm) == want
    # The step streams the permutation: batch t is positions t*B .. t*B+B-1 (wrapping).
    got = []
    for t in range(3):
        idx, _ = ordering.sample(state.replace(t=jnp.int32(t)), None, meta, 3)
        got += np.asarray(idx).tolist()
    assert _labels(got) == want


def test_ordering_corgi_round_robin_and_category_order():
    cat = np.repeat([0, 1, 2], 6)
    diff = np.tile([1, 1, 2, 2, 3, 3], 3)
    meta = make_meta(cat, diff, names=["bio", "hist", "math"])
    perm = np.asarray(ordering.init(cfg(name="ordering", kind="corgi"), meta).perm)
    assert np.all(np.diff(diff[perm]) >= 0)  # level never decreases
    assert cat[perm].tolist() == [0, 1, 2] * 6  # subjects alternate inside each level
    rev = ordering.init(cfg(name="ordering", kind="blocked", category_order=("math", "bio")), meta)
    assert cat[np.asarray(rev.perm)].tolist() == [2] * 6 + [0] * 6 + [1] * 6


def test_ordering_staged_filters_by_step():
    meta = make_meta(np.arange(120) % 3, np.arange(120) % 4 + 1, names=["a", "b", "c"])
    stages = ({"end": 0.3, "categories": ("a",), "max_difficulty": 2},
              {"end_step": 6, "categories": ("a", "c")}, {"end": 1.0})
    state = ordering.init(cfg(name="ordering", kind="staged", stages=stages, total_steps=10), meta)
    assert state.stages.ends == (3, 6, 10)
    cats, diffs = np.asarray(meta.category), np.asarray(meta.difficulty)
    for t, cats_ok, dmax in [(0, {0}, 2), (2, {0}, 2), (3, {0, 2}, 4), (6, {0, 1, 2}, 4),
                             (50, {0, 1, 2}, 4)]:
        idx, _ = draw(ordering.ordering, state.replace(t=jnp.int32(t)), meta, 3000, seed=t)
        assert set(cats[idx].tolist()) == cats_ok and diffs[idx].max() == dmax
    assert int(ordering.summarize(state.replace(t=jnp.int32(4)))["stage"]) == 1
    empty = ({"end": 0.5, "categories": ("a",), "min_difficulty": 5}, {"end": 1.0})
    with pytest.raises(ValueError, match=r"stages\[0\] admits no row"):
        ordering.init(cfg(name="ordering", kind="staged", stages=empty, total_steps=10), meta)
    with pytest.raises(ValueError, match=r"stages\[0\].categories names 'z'"):
        ordering.init(cfg(name="ordering", kind="staged", stages=({"categories": ("z",)},), total_steps=10),
                      meta)


# ----------------------------------------------------------------------------- reweight

def test_unknown_curriculum_keys_are_errors():
    meta = make_meta([0, 0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match=r"config.curriculum has keys \['alpah'\] unknown to 'cyclical'"):
        cyclical.init(cfg(name="cyclical", alpah=0.3, total_steps=10), meta)
    pacing.init(cfg(name="pacing", total_steps=10), meta)  # name and total_steps are always fine


def test_reweight_anneal_worked_example_and_weights():
    q = jnp.asarray([0.5, 0.3, 0.2])
    np.testing.assert_allclose(reweight.anneal(q, 0.0), [0.5, 0.3, 0.2], atol=1e-7)
    np.testing.assert_allclose(reweight.anneal(q, 0.5), [0.416667, 0.316667, 0.266667], atol=1e-6)
    np.testing.assert_allclose(reweight.anneal(q, 1.0), [1 / 3] * 3, atol=1e-7)
    meta = make_meta([0, 0, 0], [1, 2, 3])
    state = reweight.init(cfg(name="reweight", total_steps=10), meta)
    # d = [0, .5, 1] -> f = 1 - d = [1, .5, 0] -> q = [2/3, 1/3, 0] -> N w = [2, 1, 0].
    np.testing.assert_allclose(reweight.weights(state), [2, 1, 0], atol=1e-6)
    np.testing.assert_allclose(reweight.weights(state.replace(t=jnp.int32(5))), [1.5, 1, 0.5],
                               atol=1e-6)
    np.testing.assert_allclose(reweight.weights(state.replace(t=jnp.int32(10))), [1, 1, 1],
                               atol=1e-6)
    idx, w = draw(reweight.reweight, state, meta, 64)
    np.testing.assert_allclose(w, np.asarray([2.0, 1.0, 0.0])[idx])
    hard = reweight.init(cfg(name="reweight", order="hard", floor=0.5, total_steps=10), meta)
    np.testing.assert_allclose(reweight.weights(hard), np.array([0.5, 0.75, 1.0]) / 0.75,
                               atol=1e-6)
    # scores = 1 - c/k from k = 8 sampled answers, c = [6, 4, 2]: d = [.25, .5, .75] as given
    # -> f = [.75, .5, .25] -> q = [1/2, 1/3, 1/6] (not re-stretched to [0, 1])
    scored = reweight.init(cfg(name="reweight", scores=(0.25, 0.5, 0.75), total_steps=10), meta)
    np.testing.assert_allclose(reweight.weights(scored) / 3, [0.5, 1 / 3, 1 / 6], atol=1e-6)
    with pytest.raises(ValueError, match="curriculum.scores has 2 values for a bank of 3 rows"):
        reweight.init(cfg(name="reweight", scores=(0.1, 0.2), total_steps=10), meta)


def test_reweight_sample_mode_law_and_loss_signal():
    meta = make_meta([0, 0, 0], [1, 2, 3])
    state = reweight.init(cfg(name="reweight", mode="sample", total_steps=10), meta)
    idx, w = draw(reweight.reweight, state.replace(t=jnp.int32(5)), meta, 30_000)
    assert np.all(w == 1.0)
    assert_law(idx, [1.5, 1.0, 0.5])
    lossy = reweight.init(cfg(name="reweight", signal="loss", total_steps=10), meta)
    lossy = jax.jit(reweight.update)(lossy, feedback(meta, [0, 1, 2], [1.0, 2.0, 4.0], 0))
    # d = L / max L = [.25, .5, 1] -> f = [.75, .5, 0] -> N q = 3 f / 1.25; lambda = 1/10.
    want = 0.9 * 3 * np.array([0.75, 0.5, 0.0]) / 1.25 + 0.1
    np.testing.assert_allclose(reweight.weights(lossy), want, atol=1e-6)


# ----------------------------------------------------------------------------- self-paced

def test_masked_quantile_matches_numpy_inverted_cdf():
    rs = np.random.default_rng(0)
    v = rs.normal(size=500).astype(np.float32)
    mask = rs.uniform(size=500) < 0.7
    for q in (0.1, 0.5, 0.73, 1.0):
        want = np.quantile(v[mask], q, method="inverted_cdf")
        np.testing.assert_allclose(sampling.masked_quantile(jnp.asarray(v), jnp.asarray(mask), q),
                                   want, atol=1e-5)


def test_self_paced_threshold_and_eligibility():
    e = 100
    meta = make_meta(np.zeros(e), np.ones(e))
    state = self_paced.init(cfg(name="self_paced", start=0.5, end=1.0, ramp=1.0,
                                total_steps=10), meta)
    upd = jax.jit(self_paced.update)
    losses = np.arange(1, 41, dtype=np.float32)  # rows 0..39 seen with losses 1..40
    state = upd(state, feedback(meta, np.arange(40), losses, 0))
    # t=1: g = 0.5 + 0.5 * 0.1 = 0.55 -> lambda = 22nd smallest seen loss = 22.
    np.testing.assert_allclose(state.threshold, 22.0, atol=1e-4)
    elig = np.asarray(self_paced.eligible(state))
    assert elig[:22].all() and not elig[22:40].any() and elig[40:].all()  # unseen: eligible
    idx, _ = draw(self_paced.self_paced, state, meta, 20_000)
    assert_law(idx, elig.astype(float), support=np.arange(e))
    strict = self_paced.init(cfg(name="self_paced", unseen="ineligible", min_seen=10, ramp=1.0,
                                 total_steps=10), meta)
    strict = upd(strict, feedback(meta, np.arange(40), losses, 0))
    assert np.asarray(self_paced.eligible(strict)).sum() == 22
    absolute = self_paced.init(cfg(name="self_paced", threshold="absolute", lambda0=2.0, mu=1.5,
                                   period=5, total_steps=100), meta)
    absolute = upd(absolute, feedback(meta, [0], [1.0], 9))  # t = 10 -> 2 * 1.5^2
    np.testing.assert_allclose(absolute.threshold, 4.5, atol=1e-6)


# ----------------------------------------------------------------------------- STAT-Sel

def test_stat_sel_missing_skill_profile_and_weights():
    meta = make_meta(np.arange(90) % 3, np.arange(90) % 2 + 1)  # skills: 3 cats + 2 levels
    state = stat_sel.init(cfg(name="stat_sel", decay=0.5, uniform_mix=0.1), meta)
    assert state.missing.shape == (5,)
    np.testing.assert_allclose(stat_sel.row_weights(state, meta), 0.1)  # no failures yet
    # rows 0 (cat0, d1), 3 (cat0, d2) fail; 1 (cat1, d2) passes.
    fb = feedback(meta, [0, 3, 1], [1.0, 1.0, 1.0], 0, acc=[0.5, 0.9, 1.0])
    state = jax.jit(stat_sel.update)(state, fb)
    np.testing.assert_allclose(state.missing, [2, 0, 0, 1, 1])
    np.testing.assert_allclose(state.attempts, [2, 1, 0, 1, 2])
    pi = np.array([0.5, 0, 0, 0.25, 0.25])
    np.testing.assert_allclose(stat_sel.profile(state), pi)
    skills = np.concatenate([np.eye(3)[np.arange(90) % 3], np.eye(2)[np.arange(90) % 2]], 1)
    w = 0.1 + skills @ pi
    np.testing.assert_allclose(stat_sel.row_weights(state, meta), w, atol=1e-6)
    idx, _ = draw(stat_sel.stat_sel, state, meta, 40_000)
    assert_law(idx, w, support=np.arange(90))
    state = jax.jit(stat_sel.update)(state, feedback(meta, [1], [1.0], 1, acc=[1.0]))
    np.testing.assert_allclose(state.missing, [1, 0, 0, 0.5, 0.5])  # decay 0.5
    # RL steps: failures from reward < threshold.
    rl = stat_sel.init(cfg(name="stat_sel", skills="category"), meta)
    rl = stat_sel.update(rl, feedback(meta, [0, 1], [1.0, 1.0], 0, reward=[0.0, 1.0]))
    np.testing.assert_allclose(rl.missing, [1, 0, 0])
    # Relative failures: below the running mean of token accuracy (first batch: its own mean).
    rel = stat_sel.init(cfg(name="stat_sel", skills="category", failure="relative", decay=0.5,
                            mean_decay=0.5), meta)
    rel = stat_sel.update(rel, feedback(meta, [0, 1, 2], np.ones(3), 0, acc=[0.1, 0.2, 0.6]))
    np.testing.assert_allclose(rel.missing, [1, 1, 0])  # mean 0.3: rows 0, 1 fail
    np.testing.assert_allclose(rel.mean_score, 0.3, atol=1e-6)
    rel = stat_sel.update(rel, feedback(meta, [2], [1.0], 1, acc=[0.25]))  # 0.25 < 0.3 fails
    np.testing.assert_allclose(rel.missing, [0.5, 0.5, 1])
    np.testing.assert_allclose(rel.mean_score, 0.275, atol=1e-6)


# ----------------------------------------------------------------------------- CLIMB

def test_climb_pacing_table():
    T = 400_000
    want = {106250: (0.325, 0.15625, 0.55, 0.1, 0.100457, 0.87525),
            187500: (0.55, 0.325, 0.736396, 0.1, 0.106024, 0.937625)}
    kinds = ("linear", "quad", "root", "step", "exp", "log")
    for t in (0, 25000):
        for k in kinds:
            np.testing.assert_allclose(climb.pacing_fn(k, t, T), 0.1, atol=1e-6)
    for t, vals in want.items():
        for k, v in zip(kinds, vals):
            np.testing.assert_allclose(climb.pacing_fn(k, t, T), v, atol=1e-5, err_msg=k)
    for t in (350000, 399999):
        for k in kinds:
            np.testing.assert_allclose(climb.pacing_fn(k, t, T), 1.0, atol=1e-6)


def test_climb_vocab_map_transform_and_objective_windows():
    ids = jnp.asarray([3, 500, 819, 820, 5000, 8191])
    np.testing.assert_array_equal(climb.vocab_map(ids, 0.1, 8192, 1), [3, 500, 819, 1, 1, 1])
    from curriculax import transforms
    from curriculax.data.bank import Batch

    tokens = jnp.asarray([[10, 30, 200, 256, 257, 100]])
    z = jnp.zeros_like(tokens)
    batch = Batch(tokens=tokens, targets=tokens, loss_mask=z > 0, reasoning_mask=z > 0,
                  prompt_len=jnp.zeros((1,), jnp.int32), category=jnp.zeros((1,), jnp.int32),
                  difficulty=jnp.zeros((1,), jnp.int32), example_id=jnp.zeros((1,), jnp.int32))
    tr = transforms.get("vocab_curriculum")
    ctx = transforms.TransformContext(step=jnp.int32(0), total_steps=100)  # g = 0.1 -> 25.6
    out = jax.jit(lambda b: tr.apply(b, None, ctx))(batch)
    np.testing.assert_array_equal(out.tokens, [[10, 260, 260, 256, 257, 260]])
    np.testing.assert_array_equal(out.targets, tokens)  # inputs only by default
    late = transforms.TransformContext(step=jnp.int32(90), total_steps=100)
    np.testing.assert_array_equal(tr.apply(batch, None, late).tokens, tokens)
    w = climb.objective_weights(20, 100, climb.POS_NV_MLM)
    assert float(w["pos_nv"]) == 0.0 and float(w["mlm"]) == 1.0
    w = climb.objective_weights(10, 100, climb.MULTITASK)
    assert [float(w[k]) for k in ("pos_nv", "pos_all", "mlm")] == [0.0, 1.0, 0.0]


def test_climb_data_curriculum_percentile_filter():
    scores = [5, 1, 3, 9, 7, 2, 8, 4, 6, 10]
    s = jnp.sort(jnp.asarray(scores, jnp.float32))
    for q, thr in [(0.1, 1.9), (0.5, 5.5), (0.55, 5.95)]:
        np.testing.assert_allclose(climb.percentile_sorted(s, q), thr, atol=1e-5)
        np.testing.assert_allclose(climb.percentile_sorted(s, q),
                                   np.percentile(scores, 100 * q), atol=1e-5)
    meta = make_meta(np.zeros(10), np.ones(10))
    c = cfg(name="climb", kind="step", b=0.5, scores=tuple(float(v) for v in scores),
            total_steps=100)
    state = climb.init(c, meta)
    assert int(climb.num_eligible(state)) == 5
    idx, _ = jax.jit(lambda s, r: climb.sample(s, r, meta, 4))(state, jax.random.PRNGKey(0))
    idx = np.asarray(idx)
    assert len(set(idx.tolist())) == 4 and set(idx.tolist()) <= {0, 1, 2, 5, 7}  # no replacement
    many, _ = jax.jit(lambda s, r: climb.sample(s, r, meta, 8))(state, jax.random.PRNGKey(1))
    assert set(np.asarray(many).tolist()) <= {0, 1, 2, 5, 7}  # fewer eligible than B: refills
    np.testing.assert_allclose(climb.unigram_perplexity([[1, 1], [1, 2]], np.ones((2, 2))),
                               [4 / 3, 1 / np.sqrt(0.75 * 0.25)], rtol=1e-5)
    np.testing.assert_array_equal(climb.data_split_scores(["aochildes", "wikipedia"]), [1, 6])


# ----------------------------------------------------------------------------- designer

def test_designer_ranks_smooth_easy_first_paths_and_emits_stages():
    sim = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.8], [0.1, 0.8, 1.0]])
    ranking = designer.rank_orderings(sim, difficulty=[1.0, 2.0, 3.0])
    assert ranking[0][1] == (0, 1, 2) and ranking[1][1] == (2, 1, 0)
    np.testing.assert_allclose(ranking[0][0], 0.85)
    assert designer.rank_orderings(sim, difficulty=[3.0, 2.0, 1.0])[0][1] == (2, 1, 0)
    big = np.eye(10) + 0.01
    assert len(designer.rank_orderings(big)[0][1]) == 10  # greedy paths beyond 8 categories
    c = designer.staged_config((2, 0, 1), ("a", "b", "c"))
    assert c.kind == "staged" and [s["categories"] for s in c.stages] == [
        ("c",), ("c", "a"), ("c", "a", "b")]
    meta = make_meta(np.arange(30) % 3, np.ones(30), names=["a", "b", "c"])
    state = ordering.init(ml_collections.ConfigDict({**c.to_dict(), "total_steps": 30}), meta)
    assert state.stages.ends == (10, 20, 30)


def test_designer_category_embeddings_from_a_model():
    from flax import nnx

    from curriculax.data.bank import ExampleBank
    from curriculax.data.synthetic import arithmetic
    from curriculax.data.tokenizer import load_tokenizer
    from curriculax.models import ModelConfig, Transformer

    tok = load_tokenizer("byte")
    data = ExampleBank.build(arithmetic(24, 0, max_steps=1), tok, seq_len=96)
    model = Transformer(ModelConfig.tiny(hidden_size=32, intermediate_size=64, num_layers=1,
                                         num_heads=2, num_kv_heads=1, head_dim=16,
                                         max_seq_len=96), rngs=nnx.Rngs(0))
    emb, loss, count = designer.category_embeddings(model, data, max_per_category=4, batch_size=8)
    assert emb.shape == (3, 32) and np.all(count == 4) and np.all(np.isfinite(loss))
    conf, ranking, sim = designer.design(model, data, max_per_category=4)
    assert sim.shape == (3, 3) and len(conf.stages) == 3 and len(ranking) == 6


# categorical_rows -------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [8, 4096])
def test_categorical_rows_frequencies_and_zero_weights(block):
    w = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, 29)).at[jnp.array([3, 10, 28])].set(0.0)
    idx = jax.jit(lambda r: sampling.categorical_rows(r, w, 200_000, block=block))(jax.random.PRNGKey(1))
    counts = np.bincount(np.asarray(idx), minlength=29)
    assert counts[[3, 10, 28]].sum() == 0  # 28: the last row, where u * total may round up
    expect = 200_000 * np.asarray(w) / float(w.sum())
    keep = expect > 0
    assert np.sum((counts[keep] - expect[keep]) ** 2 / expect[keep]) < 60  # chi2, 25 dof: p ~ 1e-4


def test_categorical_rows_gives_rows_past_2_pow_24_their_share():
    # A one-level float32 cumsum of ones is rounded to even numbers past 2^24: half the rows
    # there get an empty interval (in a pattern of period 4), the others a double one.
    e = 2 ** 24 + 2 ** 20
    idx = np.asarray(sampling.categorical_rows(jax.random.PRNGKey(0), jnp.ones(e), 4096))
    late = idx[idx >= 2 ** 24]
    assert 150 < late.size < 350 and idx.max() < e  # expected 4096 / 17 = 241
    assert np.bincount(late % 4, minlength=4).min() > 20
