"""Multi-host training: two processes over loopback, re-sharding restores, init and mesh.

The two-process runs start real ``jax.distributed`` processes on 127.0.0.1 (a free port,
gloo CPU collectives, 2 simulated devices each) through the CLI, and always kill what they
started.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from curriculax import sharding
from curriculax.train import build, checkpoint, distributed, metrics
from curriculax.train import train as train_loop
from curriculax.train.step import jit_steps
from test_train import TINY_FLAGS, tiny_config  # tests/ is on sys.path under pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The CLI, with gloo CPU collectives selected before JAX starts (as a launcher would).
_CLI = ("import sys, jax; jax.config.update('jax_cpu_collectives_implementation', 'gloo'); "
        "from curriculax.cli import run; run()")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _launch(args, *, devices=2):
    return subprocess.Popen([sys.executable, "-c", _CLI, *args], cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_all(procs, timeout):
    """Waits for every process (killing stragglers on timeout); returns their outputs."""
    outs = [None] * len(procs)
    deadline = time.time() + timeout
    try:
        for i, p in enumerate(procs):
            outs[i], _ = p.communicate(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def _multi_flags(cfg: dict, workdir, port, num_processes, pid, timeout=120):
    return ["train", "--config=configs/quickstart.py", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in cfg.items()],
            f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
            f"--process_id={pid}", f"--distributed_init_timeout={timeout}"]


def _two_process_train(cfg: dict, workdir, timeout=400):
    port = _free_port()
    procs = [_launch(_multi_flags(cfg, workdir, port, 2, pid)) for pid in range(2)]
    outs = _run_all(procs, timeout)
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {pid}:\n{out}"
        assert f"process {pid}/2 (flags): 2 local of 4 global cpu devices" in out
    return outs


def _losses(workdir):
    return np.array([r["loss"] for r in metrics.read(workdir) if "loss" in r])


def _restore(workdir, cfg):
    exp = build(cfg)
    mngr = checkpoint.manager(workdir, async_save=False)
    state, info = checkpoint.restore(mngr, exp.abstract_state, exp.state_shardings)
    mngr.close()
    return exp, state, info


# Data parallel across the two processes (over "DCN": one granule per process), FSDP inside.
_MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}
_RUN = {**TINY_FLAGS, "steps": 4, "eval_every": 4, "checkpoint_every": 4, "plots": False}


@pytest.mark.slow
def test_two_processes_equal_one_process_and_restore_in_one(tmp_path):
    multi = {**_RUN, **_MESH, "mesh.num_devices": 0, "mesh.dcn_data": 2}
    _two_process_train(multi, tmp_path / "two")
    # Only process 0 wrote metrics: each step once.
    assert [r["step"] for r in metrics.read(tmp_path / "two") if "loss" in r] == [1, 2, 3, 4]
    assert (tmp_path / "two" / "summary.json").exists()

    # One process, the same mesh on 4 local devices: the loop's steps without its eval/ckpt.
    exp = build(tiny_config(**{**_RUN, **_MESH, "mesh.num_devices": 4}))
    state, step, one = exp.init_state(), exp.step_fn(1), []
    for _ in range(4):
        state, m = step(state, exp.bank)
        one.append(float(m["loss"][-1]))
    two = _losses(tmp_path / "two")
    assert len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)

    # The checkpoint the two processes wrote together restores in one process on 1 device.
    _, restored, info = _restore(tmp_path / "two", tiny_config())  # mesh.num_devices=1
    assert int(restored.step) == 4 and info["step"] == 4
    reference = jax.device_get(state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 jax.device_get(restored.params), reference.params)
    np.testing.assert_array_equal(jax.device_get(restored.rng), reference.rng)


@pytest.mark.slow
def test_two_processes_train_a_curriculum_that_reads_the_bank_at_init(tmp_path):
    """SEC builds its arms from the bank's categories at init: in two processes the global
    bank spans both, so init_state must take it as an argument (jit cannot embed it), and its
    vector metrics must reach the CLI's JSON result. Tensor parallel inside each process."""
    run = {**_RUN, "steps": 2, "eval_every": 2, "checkpoint_every": 2, "curriculum.name": "sec",
           "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
    _two_process_train({**run, "mesh.num_devices": 0}, tmp_path / "two")
    exp = build(tiny_config(**{**run, "mesh.num_devices": 4}))
    state, step, one = exp.init_state(), exp.step_fn(1), []
    for _ in range(2):
        state, m = step(state, exp.bank)
        one.append(float(m["loss"][-1]))
    np.testing.assert_allclose(_losses(tmp_path / "two"), one, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_processes_streaming_pools_equal_one_process(tmp_path):
    stream = {**_RUN, **_MESH, "data.pool_size": 16, "steps_per_dispatch": 2, "log_every": 2}
    _two_process_train({**stream, "mesh.num_devices": 0}, tmp_path / "two")
    train_loop(tiny_config(**{**stream, "mesh.num_devices": 4}), tmp_path / "one")
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_dispatch", [1, 2])
def test_sigterm_on_one_host_stops_every_host_at_one_checkpoint(tmp_path, steps_per_dispatch):
    """A preemption notice reaching one process only: both agree on a step, checkpoint it
    together and exit cleanly (no host left waiting in a collective). Several steps per
    dispatch too: JAX's sync point is the largest count reported plus one."""
    run = {**_RUN, **_MESH, "mesh.num_devices": 0, "steps": 400, "eval_every": 400,
           "checkpoint_every": 400, "steps_per_dispatch": steps_per_dispatch,
           "log_every": steps_per_dispatch}
    port = _free_port()
    procs = [_launch(_multi_flags(run, tmp_path, port, 2, pid)) for pid in range(2)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any("loss" in r for r in metrics.read(tmp_path)):
            assert all(p.poll() is None for p in procs), "a process ended early"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        outs = _run_all(procs, 240)
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {pid}:\n{out}"
    mngr = checkpoint.manager(tmp_path, async_save=False)
    saved = mngr.latest_step()
    assert saved is not None and 0 < saved < 400
    assert max(r["step"] for r in metrics.read(tmp_path) if "loss" in r) <= saved


def test_checkpoint_saved_on_8_devices_restores_on_4_and_1_bitwise(tmp_path):
    assert len(jax.devices()) >= 8
    eight = tiny_config(**{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 2,
                           "mesh.tensor": 2})
    exp = build(eight)
    step = jit_steps(exp.train_step(), 1, exp.state_shardings, exp.bank_shardings)
    state, _ = step(exp.init_state(), exp.bank)  # a trained step: non-trivial optimizer state
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(state.params))
    mngr = checkpoint.manager(tmp_path, async_save=False)
    checkpoint.save(mngr, 1, state, {"step": 1})
    mngr.wait_until_finished()
    mngr.close()
    saved = jax.device_get(state)

    for over in ({"mesh.num_devices": 4, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2},
                 {"mesh.num_devices": 1, "mesh.data": 1}):
        target, restored, _ = _restore(tmp_path, tiny_config(**over))
        n = over["mesh.num_devices"]
        # Laid out as asked (re-sharded on load) ...
        jax.tree.map(lambda x, s: (assert_sharding(x, s, n)), restored, target.state_shardings)
        # ... and bitwise equal to what was saved.
        host = jax.device_get(restored)
        assert jax.tree.structure(host) == jax.tree.structure(saved)
        jax.tree.map(np.testing.assert_array_equal, host.params, saved.params)
        jax.tree.map(np.testing.assert_array_equal, host.opt_state, saved.opt_state)
        jax.tree.map(np.testing.assert_array_equal, host.curriculum, saved.curriculum)
        np.testing.assert_array_equal(host.rng, saved.rng)


def assert_sharding(x, s, num_devices):
    assert len(x.sharding.device_set) == num_devices
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def test_unreachable_coordinator_fails_fast_with_one_clear_error(tmp_path):
    """num_processes=2 but only one process: process 0 waits for a peer that never comes, a
    process 1 finds no coordinator. Both end with one line within the timeout, no hang."""
    timeout = 3
    procs = [_launch(_multi_flags(TINY_FLAGS, tmp_path / f"p{pid}", _free_port(), 2, pid,
                                  timeout=timeout)) for pid in (0, 1)]
    t0 = time.time()
    outs = _run_all(procs, 120)
    assert time.time() - t0 < 90  # imports included; a hang would run into _run_all's kill
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == distributed.INIT_FAILED_EXIT_CODE, out
        assert out.count("curriculax: distributed init failed") == 1, out
        assert f"process {pid} of 2 gave up after {timeout}s" in out, out
        assert "Check failure stack trace" not in out, out


# --- initialization choices, mesh layout, paths (in-process, no second process) ----------

@pytest.fixture
def fake_init(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_plain_run_stays_single_process(fake_init):
    info = distributed.initialize()
    assert fake_init == [] and info.source == "single" and info.process_count == 1
    assert distributed.initialize(num_processes=1).source == "single"
    assert fake_init == []


def test_slurm_environment_is_auto_detected(fake_init, monkeypatch):
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect_cluster() == "slurm"
    info = distributed.initialize(timeout_s=30)
    # No explicit arguments: JAX reads coordinator, count and rank from SLURM itself.
    assert fake_init == [{"initialization_timeout": 30 + distributed._XLA_GRACE_S}]
    assert info.source == "slurm"
    assert distributed.initialize(auto=False).source == "single"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task (e.g. interactive srun): all its GPUs
    assert distributed.detect_cluster() is None


def test_explicit_flags_are_passed_through_and_checked(fake_init):
    info = distributed.initialize("10.0.0.1:1234", 4, 3, timeout_s=5)
    assert fake_init[-1]["coordinator_address"] == "10.0.0.1:1234"
    assert (fake_init[-1]["num_processes"], fake_init[-1]["process_id"]) == (4, 3)
    assert info.source == "flags"
    with pytest.raises(ValueError, match="--coordinator_address"):
        distributed.initialize(num_processes=2, process_id=1)
    with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        distributed.initialize("10.0.0.1:1234", 2, 2)


def test_make_mesh_keeps_its_signature_and_layout():
    mesh = sharding.make_mesh(2, 2, 2, jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[:8]]
    assert dict(sharding.make_mesh(-1, 2, 1, jax.devices()[:8]).shape)["data"] == 4
    with pytest.raises(ValueError, match="dcn"):  # one process, one slice: no DCN axis
        sharding.make_mesh(2, 2, 2, jax.devices()[:8], dcn_data=2)


def _fake_devices(n, per_process, platform="gpu"):
    return [SimpleNamespace(id=i, process_index=i // per_process, platform=platform,
                            device_kind="fake") for i in range(n)]


def test_hybrid_mesh_puts_dcn_axis_across_hosts():
    # 2 hosts x 4 devices: data=4 spans the hosts (dcn_data=2), fsdp=2 stays inside one.
    grid = sharding.hybrid_device_grid([4, 2, 1], [2, 1, 1], _fake_devices(8, 4))
    procs = np.vectorize(lambda d: d.process_index)(grid)[..., 0]
    np.testing.assert_array_equal(procs, [[0, 0], [0, 0], [1, 1], [1, 1]])
    # One process per GPU (SLURM style), 2 nodes x 4: consecutive ranks form a host.
    grid = sharding.hybrid_device_grid([2, 4, 1], [2, 1, 1], _fake_devices(8, 1))
    procs = np.vectorize(lambda d: d.process_index)(grid)[..., 0]
    np.testing.assert_array_equal(procs, [[0, 1, 2, 3], [4, 5, 6, 7]])
    with pytest.raises(ValueError, match="must divide"):
        sharding.hybrid_device_grid([3, 1, 1], [2, 1, 1], _fake_devices(3, 1))


def test_remote_workdir_paths(monkeypatch, tmp_path):
    seen = []

    class Manager:
        def __init__(self, path, options=None):
            seen.append(path)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Manager)
    checkpoint.manager("gs://bucket/runs/a")
    assert str(seen[-1]) == "gs://bucket/runs/a/checkpoints"  # not pathlib's "gs:/bucket"
    checkpoint.manager(tmp_path)
    assert str(seen[-1]) == str(tmp_path / "checkpoints")
    monkeypatch.setenv("CURRICULAX_LOCAL_DIR", str(tmp_path))
    assert checkpoint.local_dir("gs://bucket/runs/a/") == tmp_path / "gs" / "bucket" / "runs" / "a"
    assert checkpoint.local_dir(tmp_path / "x") == tmp_path / "x"


def test_fingerprint_tells_host_data_apart():
    a = {"x": np.arange(6).reshape(2, 3), "y": np.zeros(2, bool)}
    b = {"x": np.arange(6).reshape(3, 2), "y": np.zeros(2, bool)}
    assert np.array_equal(distributed.fingerprint(a), distributed.fingerprint(dict(a)))
    assert not np.array_equal(distributed.fingerprint(a), distributed.fingerprint(b))
    distributed.check_same_everywhere(a, "x")  # one process: nothing to compare
