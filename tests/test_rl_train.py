"""The RL trainers end to end: GRPO with SEC on countdown, learning a toy reward, ReLIFT, SPIN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculax.rl import relift, rewards
from curriculax.train import build, metrics
from curriculax.train import train as train_loop
from curriculax.train.step import jit_steps
from test_train import tiny_config  # tests/ is on sys.path under pytest


def _starts_with_digit(text, record):
    """Toy reward a random byte model can learn in a few steps (has variance from step 0)."""
    return float(bool(text) and text[0].isdigit())


def _coin_on_hard_rows(text, record):
    """A fair coin per completion on difficulty-2 rows, 0 elsewhere: only that arm has |A| > 0."""
    import zlib

    return float(record["difficulty"] == 2 and zlib.crc32(text.encode()) % 2 == 1)


if "test_starts_with_digit" not in rewards.names():
    rewards.register("test_starts_with_digit", _starts_with_digit)
    rewards.register("test_never", lambda text, record: 0.0)
    rewards.register("test_coin_on_hard_rows", _coin_on_hard_rows)

RL = {"trainer": "rl", "batch_size": 4, "rl.group_size": 4, "rl.max_new_tokens": 8,
      "log_every": 1, "eval_every": 100, "checkpoint_every": 100, "steps": 3}


def rl_config(**over):
    return tiny_config(**{**RL, **over})


def _run_steps(cfg, n):
    exp = build(cfg)
    state = exp.init_state()
    step = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    history = []
    for _ in range(n):
        state, m = step(state, exp.bank)
        history.append({k: np.asarray(v)[-1] for k, v in jax.device_get(m).items()})
    return exp, state, history


@pytest.mark.slow
def test_grpo_with_sec_on_countdown_under_8_devices(tmp_path):
    cfg = rl_config(**{"data.source": "countdown", "data.min_difficulty": 2,
                       "data.seq_len": 240, "model.max_seq_len": 256,
                       "data.max_difficulty": 3, "data.eval_min_difficulty": 2,
                       "data.eval_max_difficulty": 3, "mesh.num_devices": 0, "mesh.data": -1,
                       "rl.rewards": (("countdown", 1.0), ("test_starts_with_digit", 0.5)),
                       "eval.reward": "countdown", "rl.kl_coef": 0.04})
    cfg.curriculum.name = "sec"
    assert jax.device_count() == 8
    out = train_loop(cfg, tmp_path)
    rows = [r for r in metrics.read(tmp_path) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss", "reward", "advantage_abs", "kl", "grad_norm", "response_length"):
            assert np.isfinite(r[key]), (key, r)
        assert 0.0 <= r["reward"] <= 1.5 and 0 < r["response_length"] <= 8
    assert "eval/accuracy" in out
    q = np.asarray(out["curriculum/q"])
    assert q.shape == (2,) and np.all(np.isfinite(q))


@pytest.mark.slow
def test_grpo_learns_a_toy_reward_and_feeds_sec():
    cfg = rl_config(**{"rl.rewards": (("test_starts_with_digit", 1.0),), "rl.group_size": 8,
                       "rl.max_new_tokens": 2, "optimizer.lr": 1e-2, "optimizer.warmup_steps": 1,
                       "data.max_difficulty": 2, "data.eval_max_difficulty": 2, "steps": 30})
    cfg.curriculum.name = "sec"
    cfg.curriculum.reward = "advantage"
    _, state, hist = _run_steps(cfg, 30)
    first = np.mean([h["reward"] for h in hist[:5]])
    last = np.mean([h["reward"] for h in hist[-5:]])
    assert last > first + 0.3, (first, last)
    # SEC's Q-values are the TD average of mean |A|, which is positive while groups disagree.
    assert np.all(np.asarray(state.curriculum.q) >= 0) and np.asarray(state.curriculum.q).max() > 0


@pytest.mark.slow
def test_sec_q_moves_toward_the_arm_with_larger_advantages():
    cfg = rl_config(**{"rl.rewards": (("test_coin_on_hard_rows", 1.0),), "rl.group_size": 4,
                       "data.max_difficulty": 2, "data.eval_max_difficulty": 2, "steps": 6})
    cfg.curriculum.name = "sec"
    cfg.curriculum.reward = "advantage"
    _, state, hist = _run_steps(cfg, 6)
    q = np.asarray(state.curriculum.q)  # arms: difficulty 1, 2
    assert q[0] == 0.0 and q[1] > 0.2, q  # a drawn arm with all-equal rewards has |A| = 0
    from curriculax.curriculum import sec
    p = np.asarray(sec.policy(state.curriculum))
    assert p[1] > 0.5 > p[0]


@pytest.mark.slow
def test_rl_step_with_remat_equals_without():
    """Rollouts decode inside the jitted step; remat must not break them (it once raised
    TraceContextError from the decode loop) nor change the update."""
    cfg = rl_config(**{"rl.rewards": (("test_starts_with_digit", 1.0),), "steps": 1})
    outs = []
    for remat in (False, True):
        cfg.model.remat = remat
        _, state, hist = _run_steps(cfg, 1)
        outs.append((jax.device_get(state.params), hist[0]))
    (p0, m0), (p1, m1) = outs
    assert m0["reward"] == m1["reward"] and m0["response_length"] == m1["response_length"]
    np.testing.assert_allclose(m0["loss"], m1["loss"], rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p0, p1)


@pytest.mark.slow
def test_loramoe_balancing_loss_joins_the_rl_and_relift_losses():
    """The RL update and ReLIFT's SFT pass add LoRAMoE's sown balancing loss, as the SFT step
    does. No reward (zero advantages) and lr 0: the RL loss is the balancing loss alone and the
    SFT pass sees the same parameters with and without it."""
    from curriculax import sparsity

    out = {}
    for lbc in (0.0, 0.1):
        cfg = rl_config(**{"rl.rewards": (("test_never", 1.0),), "rl.relift": True,
                           "rl.relift_sft_size": 4, "rl.relift_capacity": 16, "steps": 1,
                           "optimizer.lr": 0.0})
        cfg.sparsity = sparsity.config("loramoe", experts=4, lbc_weight=lbc, lbc_delta=0.1)
        out[lbc] = _run_steps(cfg, 1)[2][0]
    assert out[0.0]["loss"] == 0.0 and out[0.1]["loss"] > 1e-3
    assert out[0.1]["relift/sft_updates"] == out[0.0]["relift/sft_updates"] == 1
    assert out[0.1]["relift/sft_loss"] > out[0.0]["relift/sft_loss"] + 1e-3


def test_relift_buffer_worked_example():
    s = relift.init(6)
    s = relift.push(s, jnp.array([10, 11, 12, 13]), jnp.array([True, False, False, True]))
    np.testing.assert_array_equal(s.buffer[:2], [10, 13])  # batch order kept
    s = relift.init(6)
    s = relift.push(s, jnp.array([0, 1]), jnp.array([True, True]))  # A, B
    s = relift.push(s, jnp.array([2, 3]), jnp.array([True, True]))  # C, D prepended
    np.testing.assert_array_equal(s.buffer[:4], [2, 3, 0, 1])
    rows, s = relift.pop(s, 3)
    np.testing.assert_array_equal(rows, [2, 3, 0])
    assert int(s.count) == 1 and int(s.buffer[0]) == 1 and int(s.sft_updates) == 1
    loss = relift.sft_loss(jnp.log(jnp.array([[np.exp(-0.5), np.exp(-1.0), np.exp(-1.5)]])),
                           jnp.array([[2.0, 1.0, 0.0]]), jnp.ones((1, 3), bool), 0.001)
    np.testing.assert_allclose(loss, 0.999, rtol=1e-6)


@pytest.mark.slow
def test_relift_interleaves_sft_on_unsolved_prompts():
    # Nothing is ever solved: every prompt is "hardest".
    cfg = rl_config(**{"rl.relift": True, "rl.rewards": (("test_never", 1.0),), "rl.relift_sft_size": 6, "rl.relift_capacity": 16,
                       "optimizer.lr": 3e-3})
    _, state, hist = _run_steps(cfg, 4)
    assert [int(h["relift/collected"]) for h in hist] == [4, 8, 12, 16]
    # 4 rows per step, SFT on 6 as soon as 6 are buffered: after steps 2 and 3, and 4.
    assert [int(h["relift/sft_updates"]) for h in hist] == [0, 1, 2, 2]
    assert [int(h["relift/buffer"]) for h in hist] == [4, 2, 0, 4]
    sft = [h["relift/sft_loss"] for h in hist if h["relift/sft_loss"] > 0]
    assert len(sft) == 2 and sft[1] < sft[0]


@pytest.mark.slow
def test_spin_starts_at_log2_and_swaps_the_opponent():
    cfg = rl_config(**{"trainer": "spin", "rl.spin_steps_per_iteration": 2,
                       "optimizer.warmup_steps": 0, "optimizer.lr": 1e-2,
                       "rl.temperature": 1.0})
    _, state, hist = _run_steps(cfg, 3)
    np.testing.assert_allclose(hist[0]["loss"], np.log(2.0), rtol=1e-5)  # policy == opponent
    assert [int(h["spin/iteration"]) for h in hist] == [0, 0, 1]
    assert hist[1]["loss"] != pytest.approx(np.log(2.0), rel=1e-4)  # the policy moved
    # After step 2 the opponent became the policy: a new iteration starts at log 2 again.
    np.testing.assert_allclose(hist[2]["loss"], np.log(2.0), rtol=1e-5)


def test_nft_loss_runs_in_the_rl_step(monkeypatch):
    from curriculax.rl import grpo

    seen, aggregate = [], grpo.aggregate

    def spy(tok, mask, mode, weights=None, t_max=None):
        seen.append((mode, t_max, mask.shape))
        return aggregate(tok, mask, mode, weights, t_max=t_max)

    monkeypatch.setattr(grpo, "aggregate", spy)
    cfg = rl_config(**{"rl.loss": "nft", "rl.rewards": (("test_starts_with_digit", 1.0),),
                       "rl.aggregation": "dr_grpo", "rl.inner_steps": 2, "rl.minibatches": 2})
    _, _, hist = _run_steps(cfg, 2)
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in hist)
    # Dr. GRPO's constant is the response length, not the prompt + response width it is scored on
    mode, t_max, (_, width) = seen[0]
    assert (mode, t_max) == ("dr_grpo", cfg.rl.max_new_tokens) and width > t_max


@pytest.mark.slow
def test_lr_schedule_counts_train_steps_with_several_updates_per_step():
    """inner_steps x minibatches optimizer updates per train step must not run the warmup-cosine
    schedule that many times faster: every update of train step s uses the SFT schedule's lr(s)."""
    from curriculax.train import optim

    steps = 4
    cfg = rl_config(**{"rl.inner_steps": 2, "rl.minibatches": 2, "steps": steps,
                       "optimizer.warmup_steps": 2, "optimizer.end_lr_factor": 0.0,
                       "optimizer.weight_decay": 0.0})
    exp = build(cfg)
    per_step = optim.schedule(cfg.optimizer, steps)  # one update per step: the plain schedule
    # Adam on a constant gradient moves each entry by exactly lr (bias-corrected m / sqrt(v) = 1)
    p = {"w": jnp.zeros((2, 3))}
    opt_state = exp.optimizer.init(p)
    for s in range(steps):
        for _ in range(4):
            upd, opt_state = exp.optimizer.update({"w": jnp.full((2, 3), 1e-3)}, opt_state, p)
            np.testing.assert_allclose(-upd["w"], per_step(s), rtol=1e-4, atol=1e-9)
    _, _, hist = _run_steps(cfg, steps)
    np.testing.assert_allclose([h["lr"] for h in hist], [per_step(s) for s in range(steps)], rtol=1e-6)


def test_rl_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rl.rewards"):
        build(rl_config(**{"rl.rewards": (("no_such_reward", 1.0),)}))
    with pytest.raises(ValueError, match="rl.temperature=0.0 must be > 0"):
        build(rl_config(**{"rl.temperature": 0.0}))
    with pytest.raises(ValueError, match="pool_size"):
        build(rl_config(**{"data.pool_size": 16}))
    with pytest.raises(ValueError, match="rl.minibatches"):
        build(rl_config(**{"rl.minibatches": 3})).train_step()


def test_init_from_restores_the_warmup_params(tmp_path):
    sft = tiny_config(steps=2, checkpoint_every=2, eval_every=2)
    train_loop(sft, tmp_path / "sft")
    warm = build(sft)
    from curriculax.train import checkpoint
    mngr = checkpoint.manager(tmp_path / "sft")
    saved, _ = checkpoint.restore(mngr, warm.abstract_state, warm.state_shardings)
    cfg = rl_config(**{"model.init_from": str(tmp_path / "sft")})
    exp, loaded = build(cfg), []
    load = exp.load_init_params
    exp.load_init_params = lambda: loaded.append(load()) or loaded[-1]
    state = exp.init_state()
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    # donated to init: the loaded copy is not held beside the state's params and ref_params
    assert all(x.is_deleted() for x in jax.tree.leaves(loaded))
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        build(rl_config(**{"model.init_from": str(tmp_path / "missing")}))


def test_init_from_a_run_with_another_model_names_the_leaf_and_the_field(tmp_path):
    """A warm-up trained at another size failed with Orbax's own error (two shapes, advice to
    enable padding), naming neither the parameter nor config.model.init_from."""
    train_loop(tiny_config(steps=2, checkpoint_every=2, eval_every=2), tmp_path / "sft")
    cfg = rl_config(**{"model.init_from": str(tmp_path / "sft"), "model.hidden_size": 32})
    with pytest.raises(ValueError, match=r"model.init_from=.*params/.* saved with shape .*64.*, now .*32"):
        build(cfg).init_state()


def _pairs_file(tmp_path, n=24, seed=0):
    """Arithmetic records with a wrong answer as the rejected response."""
    import json

    from curriculax.data import synthetic

    recs = synthetic.arithmetic(n, seed, max_steps=1)
    path = tmp_path / f"pairs{seed}.jsonl"
    with path.open("w") as f:
        for r in recs:
            wrong = r["response"].rsplit("####", 1)[0] + f"#### {int(r['answer']) + 1}"
            f.write(json.dumps({**r, "rejected": wrong}) + "\n")
    return path


def test_dpo_trainer_on_pairs(tmp_path, monkeypatch):
    from curriculax.curriculum.base import Feedback
    from curriculax.rl import dpo, preference

    weights, loss, accuracy = [], dpo.loss, []

    def spy(*args, weights_B=None, **kw):
        weights.append(weights_B)
        return loss(*args, weights_B=weights_B, **kw)

    def feedback(**kw):
        jax.debug.callback(lambda a: accuracy.append(np.asarray(a)), kw["token_accuracy"])
        return Feedback(**kw)

    monkeypatch.setattr(dpo, "loss", spy)
    monkeypatch.setattr(preference, "Feedback", feedback)
    path, held_out = _pairs_file(tmp_path), _pairs_file(tmp_path, 8, seed=1)
    cfg = rl_config(**{"trainer": "dpo", "data.source": "jsonl", "data.path": str(path),
                       "data.eval_path": str(held_out), "data.num_train": 0, "data.num_eval": 8,
                       "optimizer.warmup_steps": 0, "optimizer.lr": 3e-3})
    exp, state, hist = _run_steps(cfg, 6)
    assert weights[0].shape == (cfg.batch_size,)  # the curriculum's loss weights reach the loss
    np.testing.assert_allclose(hist[0]["loss"], np.log(2.0), rtol=1e-5)  # policy == reference
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["dpo/reward_accuracy"] > 0.5 and hist[-1]["dpo/reward_margin"] > 0
    # curricula see the chosen response's teacher-forced accuracy (it was 0 for every row)
    acc = np.stack(accuracy)
    assert acc.shape == (6, cfg.batch_size) and acc.max() > 0 and acc.min() >= 0 and acc.max() <= 1
    # Pairs share row indices: chosen and rejected differ only after the '####'.
    ch, rj = exp.bank.chosen, exp.bank.rejected
    np.testing.assert_array_equal(ch.prompt_len, rj.prompt_len)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().replace('"rejected"', '"other"', 1))
    with pytest.raises(ValueError, match="rejected"):
        build(rl_config(**{"trainer": "dpo", "data.source": "jsonl", "data.path": str(bad),
                           "data.eval_path": str(held_out), "data.num_train": 0}))


def _config_file(name, arg):
    import pathlib

    from curriculax.train.config import sibling_config

    return sibling_config(str(pathlib.Path(__file__).parents[1] / "configs" / f"{name}.py"),
                          name, arg)


def _shrink(cfg, **over):
    from test_train import TINY_FLAGS

    flags = {**TINY_FLAGS, "plots": False, "async_checkpoints": False, "eval_at_start": False,
             "data.seq_len": cfg.data.seq_len, "data.max_difficulty": cfg.data.max_difficulty,
             "data.eval_max_difficulty": cfg.data.eval_max_difficulty, "steps": 2,
             "checkpoint_every": 2, "eval_every": 2, "log_every": 1, **over}
    for k, v in flags.items():
        target = cfg
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return cfg


@pytest.mark.slow
def test_curr_reft_stages_chain_through_init_from(tmp_path):
    prev = tmp_path / "warmup"
    out = train_loop(_shrink(_config_file("curr_reft", "warmup")), prev)
    assert out["step"] == 2
    for stage in ("judge", "choice"):
        cfg = _shrink(_config_file("curr_reft", stage), **{"model.init_from": str(prev),
                                                            "batch_size": 4,
                                                            "rl.max_new_tokens": 8})
        exp = build(cfg)
        assert all(r["curr_reft_stage"] == stage for r in exp.train_data.records)
        assert exp.eval_data.records[0]["curr_reft_stage"] == stage
        out = train_loop(cfg, tmp_path / stage)
        assert np.isfinite(out["loss"]) and 0.0 <= out["reward"] <= 2.0
        prev = tmp_path / stage


@pytest.mark.slow
def test_s3ft_prepare_writes_targets_and_trains(tmp_path):
    import json

    from curriculax.rl import s3ft

    warm = tiny_config(steps=2, checkpoint_every=2, eval_every=2)
    train_loop(warm, tmp_path / "warm")
    cfg = tiny_config(steps=2, checkpoint_every=2, eval_every=2,
                      **{"model.init_from": str(tmp_path / "warm")})
    sft, counts = s3ft.prepare(cfg, tmp_path / "s3ft")
    lines = (tmp_path / "s3ft" / "s3ft_train.jsonl").read_text().splitlines()
    assert sum(counts.values()) == len(lines) == len(build(cfg).train_data)
    assert {json.loads(line)["s3ft_source"] for line in lines} <= {"self", "paraphrase", "gold"}
    assert sft.data.source == "jsonl" and sft.data.eval_source == "arithmetic"
    out = train_loop(sft, tmp_path / "s3ft")
    assert out["step"] == 2 and "eval/accuracy" in out
    assert s3ft.prepare(cfg, tmp_path / "s3ft")[1] == counts  # reused, not regenerated


@pytest.mark.parametrize("trainer", ["rl", "spin"])
def test_rl_trainers_refuse_fields_they_ignore(trainer):
    from curriculax.train import trainers

    for over in ({"grad_accum": 2}, {"transforms": ("masked_thought",)}):
        cfg = rl_config(**{"trainer": trainer, **over})
        with pytest.raises(ValueError, match=next(iter(over))):
            trainers.get(trainer).check(cfg)
    trainers.get(trainer).check(rl_config(trainer=trainer))  # defaults pass


def test_reft_rl_configs_pass_the_trainer_check():
    import pathlib

    from curriculax.train import trainers
    from curriculax.train.config import sibling_config

    for setting in ("tiny", "gsm8k"):
        c = sibling_config(str(pathlib.Path(__file__).parents[1] / "configs" / "reft_rl.py"),
                           "reft_rl", setting)
        trainers.get("rl").check(c)
