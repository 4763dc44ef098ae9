"""The training spine end to end: masking, accumulation, devices, resume, CLI, preemption."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from curriculax.train import build, checkpoint, metrics, quickstart_config
from curriculax.train import train as train_loop
from curriculax.train.step import jit_steps

REPO = pathlib.Path(__file__).resolve().parents[1]


TINY_FLAGS = {"steps": 8, "batch_size": 8, "data.num_train": 64, "data.num_eval": 8,
              "data.max_difficulty": 1, "data.eval_max_difficulty": 1, "data.seq_len": 112,
              "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2,
              "model.head_dim": 16, "log_every": 1, "eval_every": 4, "checkpoint_every": 4,
              "eval.batch_size": 8, "eval.max_new_tokens": 4, "progress_bar": False,
              "mesh.num_devices": 1, "mesh.data": 1}


def tiny_config(**over):
    """The quickstart config shrunk by TINY_FLAGS, as the CLI tests pass them on the command line."""
    c = quickstart_config()
    for k, v in {**TINY_FLAGS, "plots": False, "async_checkpoints": False, "eval_at_start": False,
                 **over}.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def one_step(cfg, bank=None):
    exp = build(cfg)
    state = exp.init_state()
    step = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    return step(state, exp.bank if bank is None else bank), exp


@pytest.mark.slow
def test_loss_ignores_prompt_targets_but_not_response_targets():
    cfg = tiny_config()
    (_, m0), exp = one_step(cfg)
    bank = exp.bank
    prompt_pos = ~bank.loss_mask & (np.arange(bank.tokens.shape[1]) < bank.prompt_len[:, None])
    changed_prompt = bank.replace(targets=np.where(prompt_pos, 7, bank.targets))
    (_, m1), _ = one_step(cfg, changed_prompt)
    np.testing.assert_array_equal(m0["loss"], m1["loss"])
    changed_resp = bank.replace(targets=np.where(bank.loss_mask, 7, bank.targets))
    (_, m2), _ = one_step(cfg, changed_resp)
    assert abs(float(m2["loss"][0]) - float(m0["loss"][0])) > 1e-3


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch():
    (s1, m1), _ = one_step(tiny_config())
    (s2, m2), _ = one_step(tiny_config(grad_accum=4))
    (s3, m3), _ = one_step(tiny_config(grad_accum=4, **{"mesh.num_devices": 8, "mesh.data": 8}))
    np.testing.assert_allclose(m1["loss"], m3["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s2.params)


def test_micro_batches_keep_every_device_busy():
    """8-way data parallel, 4 micro-batches: each micro-batch spreads over all 8 devices."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from curriculax.train.step import micro_batches

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    x = jax.device_put(jnp.arange(32 * 3).reshape(32, 3), NamedSharding(mesh, P("data")))
    mb = jax.jit(micro_batches, static_argnums=1)(x, 4)
    np.testing.assert_array_equal(mb[1, :, 0], np.arange(1, 32, 4) * 3)  # rows 1, 5, 9, ...
    per_device = {s.data.shape for s in mb.addressable_shards}
    assert per_device == {(4, 1, 3)}, per_device  # 1 row of each micro-batch on every device


def _step_flops_per_device(cfg):
    exp = build(cfg)
    compiled = exp.step_fn(1).lower(exp.abstract_state, exp.bank).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_fsdp_shards_the_batch_not_the_hidden_states():
    """8-way FSDP splits the batch like 8-way data parallelism (and all-gathers weights): the
    hidden states are not laid out like the embed-sharded embedding table, which would leave
    every device the whole batch's attention and activation all-reduces (~3x the work here)."""
    data = _step_flops_per_device(tiny_config(**{"mesh.num_devices": 8, "mesh.data": 8}))
    fsdp = _step_flops_per_device(
        tiny_config(**{"mesh.num_devices": 8, "mesh.data": 1, "mesh.fsdp": 8}))
    assert fsdp < 1.25 * data, (fsdp, data)


def test_micro_batches_the_batch_shards_do_not_divide_are_named():
    cfg = tiny_config(**{"mesh.num_devices": 8, "mesh.data": 8, "batch_size": 8, "grad_accum": 2})
    with pytest.warns(UserWarning, match=r"\[\(.batch., 4\)\] do not split over the mesh axes"):
        _step_flops_per_device(cfg)


def test_parameters_the_mesh_cannot_shard_are_named(caplog):
    """4 query / 2 KV heads on tensor=8: the attention weights are replicated, not split."""
    with caplog.at_level("WARNING", logger="curriculax.train.setup"):
        build(tiny_config(**{"mesh.num_devices": 8, "mesh.data": 1, "mesh.tensor": 8}))
    assert "8 parameter(s) cannot be sharded" in caplog.text, caplog.text
    assert "layers/0/attn/k (64, 2, 16)" in caplog.text and "(and 5 more)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="curriculax.train.setup"):
        build(tiny_config(**{"mesh.num_devices": 2, "mesh.data": 1, "mesh.tensor": 2}))
    assert "cannot be sharded" not in caplog.text


def _decode_flops_per_device(exp, mesh):
    from curriculax.models.generate import _decode

    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          exp.abstract_state.params, exp.state_shardings.params)
    prompts, mask = jax.ShapeDtypeStruct((16, 12), jnp.int32), jax.ShapeDtypeStruct((16, 12), bool)
    compiled = _decode.lower(exp.graphdef, params, prompts, mask, jax.random.key(0),
                             max_new_tokens=4, temperature=0.0, top_p=1.0, eos_id=None, pad_id=0,
                             mesh=mesh, rules=exp.rules).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_eval_decoding_splits_the_rows_over_the_batch_axes():
    """Decoding on the run's mesh follows the train step's activation layout: each of 8 devices
    decodes 1/8 of the rows, on a data or an fsdp mesh. Without the mesh, a data-parallel run
    decoded every row on every device (replicated weights, nothing to split by)."""
    data = build(tiny_config(**{"mesh.num_devices": 8, "mesh.data": 8}))
    fsdp = build(tiny_config(**{"mesh.num_devices": 8, "mesh.data": 1, "mesh.fsdp": 8}))
    whole = _decode_flops_per_device(data, None)
    assert _decode_flops_per_device(data, data.mesh) < 0.25 * whole
    assert _decode_flops_per_device(fsdp, fsdp.mesh) < 0.25 * whole


def _losses(workdir):
    return np.array([r["loss"] for r in metrics.read(workdir) if "loss" in r])


@pytest.mark.slow
def test_one_device_vs_eight_devices_same_loss_curve(tmp_path):
    assert len(jax.devices()) >= 8
    kw = {"steps": 20, "eval_every": 20, "checkpoint_every": 20}
    train_loop(tiny_config(**kw), tmp_path / "one")
    train_loop(tiny_config(**kw, **{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 2,
                                    "mesh.tensor": 2}), tmp_path / "eight")
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(one) == len(eight) == 20
    np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)
    assert one[-1] < one[0]  # it trains


def _cli(*args, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "curriculax.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _flags(cfg):
    return [f"--config.{k}={v}" for k, v in cfg.items()]


def _final_state(workdir, cfg):
    exp = build(cfg)
    mngr = checkpoint.manager(workdir, async_save=False)
    state, _ = checkpoint.restore(mngr, exp.abstract_state, exp.state_shardings)
    return jax.device_get(state)


@pytest.mark.slow
def test_exact_resume_after_process_exit(tmp_path):
    """k steps in a process that exits (stop_at), then k more: bitwise equal to 2k straight."""
    cfg_file = "configs/quickstart.py"
    flags = _flags(TINY_FLAGS) + ["--config.plots=False"]
    first = _cli("train", f"--config={cfg_file}", f"--workdir={tmp_path/'resumed'}", *flags,
                 "--config.stop_at=3")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert [r["step"] for r in metrics.read(tmp_path / "resumed") if "loss" in r] == [1, 2, 3]
    # The same command without stop_at resumes from step 3.
    cfg = tiny_config()
    train_loop(cfg, tmp_path / "resumed")
    train_loop(cfg, tmp_path / "straight")
    resumed, straight = _final_state(tmp_path / "resumed", cfg), _final_state(tmp_path / "straight", cfg)
    assert int(resumed.step) == int(straight.step) == 8
    for name in ("params", "opt_state", "curriculum", "rng"):
        a, b = getattr(resumed, name), getattr(straight, name)
        assert jax.tree.structure(a) == jax.tree.structure(b), name
        jax.tree.map(np.testing.assert_array_equal, a, b)
    steps = [r["step"] for r in metrics.read(tmp_path / "resumed") if "loss" in r]
    assert steps == list(range(1, 9))


def test_cli_rejects_unknown_config_key(tmp_path):
    cases = {("--config=configs/quickstart.py", "--config.no_such_key=1"): "'no_such_key'",
             ("--config=configs/quickstart.py", "--config.data.seqlen=64"):
                 "unknown config key 'data.seqlen' in the command line: did you mean 'data.seq_len'?",
             ("--config.optimizer.lrr=1",):  # the built-in config: overrides apply at import
                 "unknown config key 'optimizer.lrr' in the command line: did you mean 'optimizer.lr'?",
             ("--config=configs/nonexist.py",):
                 "--config=configs/nonexist.py: cannot load it ([Errno 2] No such file or directory"}
    for args, message in cases.items():
        proc = _cli("train", f"--workdir={tmp_path}", *args)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and message in out and "Traceback" not in out, (args, out)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path):
    # far more steps than run before the signal lands (400 once finished first on a fast machine)
    flags = _flags({**TINY_FLAGS, "steps": 5000, "eval_every": 5000, "checkpoint_every": 5000})
    proc = _cli("train", "--config=configs/quickstart.py", f"--workdir={tmp_path}", *flags,
                "--config.plots=False")
    deadline = time.time() + 240
    while time.time() < deadline and not any("loss" in r for r in metrics.read(tmp_path)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    mngr = checkpoint.manager(tmp_path, async_save=False)
    saved = mngr.latest_step()
    assert saved is not None and 0 < saved < 5000


@pytest.mark.slow
def test_preemption_on_a_checkpoint_step_and_misaligned_resume(tmp_path, monkeypatch):
    """A preemption flagged right at a checkpoint step saves once (it used to raise
    StepAlreadyExistsError), and a resume from a stop_at that is not a multiple of
    steps_per_dispatch falls back onto its grid: logs and checkpoints at 4, 6, 8 as usual."""
    from curriculax.train import distributed

    kw = {"steps_per_dispatch": 2, "log_every": 2, "eval_every": 8, "checkpoint_every": 4}
    # the loop reports dispatch counts: the 2nd dispatch of 2 steps ends at the checkpoint step 4
    monkeypatch.setattr(distributed, "reached_preemption", lambda dispatches: dispatches == 2)
    train_loop(tiny_config(**kw), tmp_path / "pre")
    assert checkpoint.manager(tmp_path / "pre", async_save=False).all_steps() == [4]
    monkeypatch.undo()

    train_loop(tiny_config(**kw, stop_at=3), tmp_path / "odd")
    train_loop(tiny_config(**kw), tmp_path / "odd")
    steps = [r["step"] for r in metrics.read(tmp_path / "odd") if "loss" in r]
    assert steps == [2, 3, 4, 6, 8]
    assert checkpoint.manager(tmp_path / "odd", async_save=False).all_steps() == [3, 4, 8]


@pytest.mark.slow
def test_quickstart_command_end_to_end(tmp_path):
    proc = _cli("quickstart", f"--workdir={tmp_path}", *_flags(TINY_FLAGS))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "Quickstart finished at step 8" in out
    records = metrics.read(tmp_path)
    assert all("step" in r for r in records)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 4, 8]
    assert (tmp_path / "training.png").stat().st_size > 0
    assert (tmp_path / "curriculum.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").iterdir())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 8 and np.isfinite(summary["loss"])


@pytest.mark.slow
def test_train_command_prints_vector_curriculum_metrics(tmp_path):
    """`curriculax train` with SEC (per-arm `curriculum/q`) trained, then died in a traceback
    printing its result: json.dump's `default=float` cannot convert a vector."""
    proc = _cli("train", f"--workdir={tmp_path}", "--config=configs/quickstart.py",
                *_flags({**TINY_FLAGS, "steps": 2, "eval_every": 2, "checkpoint_every": 2,
                         "plots": False}), "--config.curriculum.name=sec")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in out, out
    result = json.loads(out[out.index("{"):])
    assert result["step"] == 2 and isinstance(result["curriculum/q"], list)


def test_training_plot_shows_losses_at_or_below_zero(tmp_path, monkeypatch):
    """GRPO losses are around 0, of either sign: the log-scaled loss panel of training.png
    dropped every value <= 0 (an RL run's panel was empty)."""
    from curriculax.train import plots

    writer = metrics.MetricWriter(tmp_path, tensorboard=False)
    for step, loss in enumerate([0.0, -0.02, 0.01, 0.0], start=1):
        writer.write(step, {"loss": loss})
    writer.close()
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.draw(tmp_path)
    ax = figures[0].axes[0]
    ys = ax.get_lines()[0].get_ydata()
    assert list(ys) == [0.0, -0.02, 0.01, 0.0] and ax.get_yscale() == "linear"


def test_vector_metrics_reach_tensorboard(tmp_path):
    """Per-arm curriculum values (SEC's `curriculum/q`) reached metrics.jsonl and curriculum.png
    but not TensorBoard, which only took ints and floats."""
    writer = metrics.MetricWriter(tmp_path)
    calls = []
    writer._tb.add_scalar = lambda key, value, step: calls.append((key, value, step))
    writer.write(3, {"loss": 1.5, "curriculum/q": np.array([0.25, 0.5])})
    writer.close()
    assert sorted(calls) == [("curriculum/q/0", 0.25, 3), ("curriculum/q/1", 0.5, 3), ("loss", 1.5, 3)]


@pytest.mark.slow
def test_streaming_pools_same_structure_and_exact_resume(tmp_path):
    cfg = tiny_config(**{"data.pool_size": 16, "steps_per_dispatch": 2, "steps": 6,
                         "log_every": 2, "eval_every": 6, "checkpoint_every": 6})
    exp = build(cfg)
    resident = build(tiny_config()).bank
    # same fields and static info, except the overflow counts a lazily tokenized pool cannot know
    assert exp.bank.info.num_truncated == -1
    counted = exp.bank.replace(info=dataclasses.replace(exp.bank.info, num_truncated=0, num_dropped=0))
    assert jax.tree.structure(counted) == jax.tree.structure(resident)
    for f in ("tokens", "targets", "loss_mask", "reasoning_mask", "category", "example_id"):
        assert getattr(exp.bank, f).shape[1:] == getattr(resident, f).shape[1:]
    assert exp.bank.tokens.shape[0] == 16
    pacing = tiny_config(**{"data.pool_size": 16})
    pacing.curriculum.update(name="pacing")
    with pytest.raises(ValueError, match="curriculum.name='pacing' builds its order"):
        build(pacing)  # its init-time order would index rows of a pool it never saw
    # Every category is present in a pool (stratified mixing).
    assert set(np.asarray(exp.bank.category)) == set(range(len(exp.bank.info.category_names)))

    cfg_stop = tiny_config(**{"data.pool_size": 16, "steps_per_dispatch": 2, "steps": 6,
                              "log_every": 2, "eval_every": 6, "checkpoint_every": 6, "stop_at": 2})
    train_loop(cfg_stop, tmp_path / "resumed")
    train_loop(cfg, tmp_path / "resumed")
    train_loop(cfg, tmp_path / "straight")
    train_loop(cfg, tmp_path / "straight")  # relaunching a finished streaming run is a no-op
    a, b = _final_state(tmp_path / "resumed", cfg), _final_state(tmp_path / "straight", cfg)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    np.testing.assert_array_equal(_losses(tmp_path / "resumed")[-1], _losses(tmp_path / "straight")[-1])


def test_relative_workdir_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_loop(tiny_config(steps=2, checkpoint_every=1, eval_every=2, log_every=1), "rel/run")
    assert checkpoint.manager("rel/run", async_save=False).latest_step() == 2


def test_resume_with_an_incompatible_state_names_what_changed(tmp_path):
    """A checkpoint whose per-row curriculum state has another bank size (data.num_train changed)
    or another curriculum fails with the leaves that differ, not Orbax's bare shape error (which
    suggests padding/truncating the state)."""
    from curriculax.train.state import TrainState

    def state(rows, cur):
        return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0),
                          params={"w": jnp.ones((4, 2))}, opt_state=(), curriculum=cur(rows))

    def shardings(tree):
        return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), tree)

    saved = state(64, lambda e: {"counts": jnp.zeros((e,), jnp.int32)})
    mngr = checkpoint.manager(tmp_path, async_save=False)
    checkpoint.save(mngr, 3, saved, {"step": 3})
    mngr.wait_until_finished()
    fewer = jax.eval_shape(lambda: state(48, lambda e: {"counts": jnp.zeros((e,), jnp.int32)}))
    with pytest.raises(ValueError, match=r"curriculum/counts saved with shape \(64,\), now \(48,\)"):
        checkpoint.restore(mngr, fewer, shardings(fewer))
    other = jax.eval_shape(lambda: state(64, lambda e: {"q": jnp.zeros((3,))}))
    with pytest.raises(ValueError, match="curriculum/q is not in the checkpoint"):
        checkpoint.restore(mngr, other, shardings(other))
    same = jax.eval_shape(lambda: saved)
    restored, info = checkpoint.restore(mngr, same, shardings(same))
    assert info["step"] == 3 and restored.curriculum["counts"].shape == (64,)
    mngr.close()


@pytest.mark.slow
def test_resume_on_other_rows_is_refused_and_keeps_the_config(tmp_path):
    """Another data seed gives a bank of the same size whose rows hold other examples: the
    restored per-row curriculum state would silently describe the wrong rows."""
    cfg = tiny_config(**{"curriculum.name": "pacing", "steps": 4, "stop_at": 2,
                         "checkpoint_every": 2})
    train_loop(cfg, tmp_path)
    saved_config = (tmp_path / "config.json").read_text()
    other = tiny_config(**{"curriculum.name": "pacing", "steps": 4, "checkpoint_every": 2,
                           "seed": cfg.seed + 1})
    with pytest.raises(ValueError, match=r"training data differs.*model.init_from="):
        train_loop(other, tmp_path)
    assert (tmp_path / "config.json").read_text() == saved_config  # the saving run's record
    cfg.stop_at = 0
    assert train_loop(cfg, tmp_path)  # the same data resumes


def test_metrics_after_the_resumed_checkpoint_are_not_duplicated(tmp_path):
    """A process killed after step 5 but checkpointed at 3 resumes at 3: steps 4-5 are logged
    again, so the writer drops the first copies."""
    writer = metrics.MetricWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    writer = metrics.MetricWriter(tmp_path, tensorboard=False, resume_step=3)
    writer.write(4, {"loss": 0.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in metrics.read(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 0.5)]


def test_hf_path_weights_are_loaded_into_their_shardings_at_init_not_kept(tmp_path):
    from flax import nnx

    from curriculax.models import Transformer, hf, load_hf

    eight = {"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    model_config = build(tiny_config()).model_config.replace(dtype="bfloat16", param_dtype="bfloat16")
    hf.save_hf(Transformer(model_config, rngs=nnx.Rngs(7)), model_config, tmp_path / "hf",
               max_shard_size=20_000)  # several shards: the index path
    exp = build(tiny_config(**eight, **{"model.hf_path": str(tmp_path / "hf")}))
    embed = exp.abstract_state.params["embed"].shape
    assert not [x for v in vars(exp).values() for x in jax.tree.leaves(v)
                if isinstance(x, jax.Array) and x.shape == embed]  # no resident copy of the weights
    loaded = exp.load_init_params()  # straight into the shards, not first onto one device
    assert loaded["layers"][0]["mlp"]["up"].sharding == exp.state_shardings.params["layers"][0]["mlp"]["up"]
    state = exp.init_state()
    # a bfloat16 checkpoint trains as float32 weights (config.model.param_dtype) computing in
    # config.model.dtype
    assert exp.model_config.param_dtype == exp.model_config.dtype == "float32"
    want = nnx.to_pure_dict(nnx.state(load_hf(tmp_path / "hf")[0], nnx.Param))
    assert {x.dtype for x in jax.tree.leaves(want)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y, np.float32)) or
                 (x.dtype == jnp.float32 or pytest.fail(str(x.dtype))), state.params, want)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 state.params, exp.state_shardings.params)
    assert exp.state_shardings.params["layers"][0]["mlp"]["up"].spec != (None, None)  # sharded
    # a checkpoint that does not fit the model fails in build, naming the tensors
    (tmp_path / "hf" / "config.json").write_text(
        (tmp_path / "hf" / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(hf.CheckpointError, match="missing tensor"):
        build(tiny_config(**{"model.hf_path": str(tmp_path / "hf")}))


def test_torn_last_metrics_line_does_not_block_the_resume(tmp_path):
    """A process killed mid-write leaves half a line: the resume drops it (it is logged again)
    instead of failing with a bare JSONDecodeError."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    writer = metrics.MetricWriter(tmp_path, tensorboard=False, resume_step=1)
    writer.write(2, {"loss": 0.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in metrics.read(tmp_path)] == [(1, 1.0), (2, 0.5)]


def test_reading_a_killed_runs_metrics_skips_the_torn_line(tmp_path):
    """plots.draw and the experiment scripts read a killed run's file as it was left."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert metrics.read(tmp_path) == [{"step": 1, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}')  # complete, newline pending
    assert metrics.read(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_restart_before_the_first_checkpoint_does_not_duplicate_metrics(tmp_path):
    """A run killed before its first checkpoint restarts from step 0: its step-0 eval (and any
    train record) are logged again, so the first copies go (the writer kept step <= 0)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n'
                                            '{"step": 1, "loss": 9.0}\n')
    train_loop(tiny_config(steps=1, log_every=1, eval_every=1, checkpoint_every=1,
                           eval_at_start=True), tmp_path)
    records = metrics.read(tmp_path)
    assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 1]
    assert [r["step"] for r in records if "loss" in r] == [1] and records[0]["eval/accuracy"] != 0.5


@pytest.mark.parametrize("field,value", [("grad_accum", 0), ("batch_size", 0), ("eval.batch_size", 0),
                                         ("eval.reward", "countdwon"), ("data.num_train", -1),
                                         ("data.num_eval", -3)])
def test_bad_sizes_and_eval_judge_fail_before_training(field, value, tmp_path):
    """grad_accum=0 was a ZeroDivisionError, batch_size=0 trained on empty batches, and a bad
    eval.batch_size / eval.reward failed only at the first eval, after the steps since the last
    checkpoint were computed (and lost)."""
    with pytest.raises(ValueError, match=f"config.{field}"):
        train_loop(tiny_config(**{field: value}), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path):
    """The same command again after the last step restores, runs nothing, and used to overwrite
    summary.json with only {step, workdir}: the final loss and accuracy were gone."""
    cfg = tiny_config(steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    first = train_loop(cfg, tmp_path)
    again = train_loop(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 2 and summary["loss"] == pytest.approx(first["loss"])
    assert summary["eval/accuracy"] == first["eval/accuracy"] and again["loss"] == summary["loss"]


def test_cli_config_argument_errors_are_one_line(tmp_path):
    """A bad ``FILE:ARG`` used to print the whole traceback ml_collections embeds in its error."""
    cases = {"--config=configs/sec_countdown.py:nosuch":
                 "ValueError: configs/sec_countdown.py:nosuch: choose warmup or one of",
             "--config=configs/gsm8k_sft.py:foo": "TypeError: get_config() takes 0 positional arguments"}
    for arg, message in cases.items():
        proc = _cli("train", f"--workdir={tmp_path}", arg)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and message in out and "Traceback" not in out, (arg, out)
        assert len(out.strip().splitlines()) == 1, out


def test_cli_eval_without_a_checkpoint_is_one_line(tmp_path):
    """It used to print the module docstring and every flag's help (a UsageError) before the
    one line that mattered, and only after building the whole experiment."""
    proc = _cli("eval", f"--workdir={tmp_path / 'typo'}", "--config=configs/quickstart.py")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and out.strip().splitlines() == [
        f"curriculax eval: No checkpoint in {tmp_path / 'typo'}/checkpoints: train first (or check --workdir).",
        "(set CURRICULAX_DEBUG=1 for the traceback)"], out
    assert not (tmp_path / "typo").exists()  # it used to leave an empty typo/checkpoints/ behind


def test_eval_does_not_require_the_starting_weights(tmp_path):
    """A config that requires model.init_from (the RL configs) evaluates a trained workdir
    without it: eval restores the workdir's own checkpoint."""
    from curriculax import cli

    cfg = tiny_config(steps=2, checkpoint_every=2, eval_every=2)
    train_loop(cfg, tmp_path)
    cfg.required_fields = ("model.init_from",)
    out = cli._eval(cfg, str(tmp_path))
    assert out["step"] == 2 and "eval/accuracy" in out


def test_bf16_weights_grad_norm_metric_is_float32():
    """optax.tree.norm sums the leaves' squares in their dtype: with bfloat16 weights the logged
    grad_norm was a bfloat16 sum over the leaves (~5% off at 300 leaves)."""
    (_, m), _ = one_step(tiny_config(**{"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"}))
    assert m["grad_norm"].dtype == jnp.float32 and np.isfinite(m["grad_norm"]).all()
    from curriculax.train.step import global_norm

    leaves = [(1e-3 * jax.random.normal(jax.random.key(i), (64, 64))).astype(jnp.bfloat16)
              for i in range(300)]
    want = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves))
    assert abs(float(global_norm(leaves)) - want) / want < 1e-5


def _step_gradients(cfg):
    """The float32 copy of the step's gradients, kept by an optimizer that only records them."""
    import optax

    from curriculax.train.step import make_train_step

    record = optax.GradientTransformation(
        lambda p: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g),
                              jax.tree.map(lambda x: x.astype(jnp.float32), g)))
    exp = build(cfg)
    state = exp.init_state()
    state = state.replace(opt_state=record.init(state.params))
    step = make_train_step(graphdef=exp.graphdef, curriculum=exp.curriculum, objective=exp.objective,
                           optimizer=record, lr_schedule=exp.lr_schedule, config=exp.config)
    return jax.tree.leaves(jax.jit(step)(state, exp.bank)[0].opt_state)


@pytest.mark.slow
def test_bf16_weights_accumulate_micro_batches_in_float32():
    """With bfloat16 weights the micro-batch gradients were summed in bfloat16: 64 micro-batches
    were 1.0e-2 (relative) from the full batch's gradient; summed in float32 they are 3.6e-3 (what
    is left is each micro-batch's own bfloat16 rounding)."""
    bf16 = {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16", "batch_size": 64}
    full = _step_gradients(tiny_config(grad_accum=1, **bf16))
    accumulated = _step_gradients(tiny_config(grad_accum=64, **bf16))
    err = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(full, accumulated))
    assert np.sqrt(err / sum(float(jnp.sum(a ** 2)) for a in full)) < 6e-3


def test_clip_by_global_norm_measures_bf16_gradients_in_float32():
    """optax.clip_by_global_norm's threshold is a bfloat16 sum for bfloat16 gradients (~5% off
    with 300 leaves): gradients just above the limit kept a norm off the limit."""
    from curriculax.train import optim

    leaves = [(1e-3 * jax.random.normal(jax.random.key(i), (64, 64))).astype(jnp.bfloat16)
              for i in range(300)]
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves))
    clip = optim.clip_by_global_norm(0.99 * norm)
    clipped, _ = clip.update(leaves, clip.init(leaves))
    got = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in clipped))
    assert {x.dtype for x in clipped} == {jnp.dtype(jnp.bfloat16)}
    assert abs(got / (0.99 * norm) - 1) < 2e-3
    unchanged, _ = optim.clip_by_global_norm(1.01 * norm).update(leaves, clip.init(leaves))
    assert all((a == b).all() for a, b in zip(unchanged, leaves))


def test_stat_sel_trains_on_streamed_pools():
    """STAT-Sel keeps per-skill counts and weighs a pool's rows by their labels, so it runs on
    streamed pools (it was refused like the per-row curricula)."""
    cfg = tiny_config(steps=4, **{"data.pool_size": 16})
    cfg.curriculum = ml_collections.ConfigDict({"name": "stat_sel"})
    exp = build(cfg)
    state = exp.init_state()
    step = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    from curriculax.data import pipeline

    for t in range(2):
        state, m = step(state, pipeline.pool_at(exp.pools, exp.bank.info, t))
    # a weak model fails every row: each category's and level's skill counted a failure
    assert int(state.step) == 2 and np.isfinite(m["loss"]).all()
    assert (np.asarray(state.curriculum.missing) > 0).sum() >= 2
