"""Multi-host training on JAX's multi-controller runtime.

Every host runs the same program on its own devices; ``jax.distributed.initialize`` connects
the processes, after which ``jax.devices()`` lists every device of every host and one
``jax.jit`` over a global :class:`~jax.sharding.Mesh` runs the step everywhere at once.

:func:`initialize` must run before anything else touches JAX (the CLI calls it first). It
decides, in this order:

1. **Explicit flags** -- ``--coordinator_address``, ``--num_processes``, ``--process_id``
   (the arguments of :func:`jax.distributed.initialize`). ``--num_processes=1`` alone means
   a plain single-process run.
2. **A cluster that describes itself** -- Cloud TPU VMs (GCE metadata, GKE env vars) and
   SLURM (``srun`` step variables). These are the environments JAX's own auto-detection
   (``jax._src.clusters``) knows; ``jax.distributed.initialize()`` is then called without
   arguments and reads everything from the environment.
3. **Nothing** -- a laptop or a single GPU box stays a single process; no coordinator.

Data layout across hosts: every process builds the *same* example bank (or streaming pool)
from the same records and seed, and the global array is assembled from it with
:func:`global_array` -- each process copies only the rows of its own devices' shards (see
:func:`global_array`). :func:`check_same_everywhere` fingerprints the host data and fails
loudly if the hosts disagree (a different local file, say), instead of training on silently
inconsistent shards. The curriculum then samples identical indices on every host because it
runs inside the jitted step on the replicated state and rng.

Failure to connect: XLA aborts the process with a C++ fatal error when registration with the
coordinator times out. :func:`initialize` reports the problem itself a moment earlier, as one
line on stderr, and exits with status 1 (:data:`INIT_FAILED_EXIT_CODE`), so a missing or
unreachable peer never hangs a job and never ends in a stack dump.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)

INIT_FAILED_EXIT_CODE = 1
# XLA's own registration deadline is set this much later than ours, so ours fires first.
_XLA_GRACE_S = 10


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands after :func:`initialize`."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    source: str  # "flags", "slurm", "cloud_tpu", "already", or "single"

    @property
    def lead(self) -> bool:
        return self.process_index == 0

    def describe(self) -> str:
        return (f"process {self.process_index}/{self.process_count} ({self.source}): "
                f"{self.local_devices} local of {self.global_devices} global "
                f"{jax.devices()[0].platform} devices")


def detect_cluster() -> str | None:
    """``"slurm"`` or ``"cloud_tpu"`` when JAX's auto-detection would find that environment.

    Only these two are considered (not Open MPI, Kubernetes or mpi4py, which JAX also knows),
    so an unrelated variable on a workstation never turns a plain run into a distributed one.
    A one-task SLURM step (``srun --ntasks=1``, an interactive shell) is not distributed: JAX
    would otherwise restrict that single process to GPU ``SLURM_LOCALID``.
    """
    if os.environ.get("SLURM_NTASKS") == "1":
        return None
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - private module moved: fall back to env vars
        clusters = None
    if clusters is not None:
        for name, env in (("slurm", getattr(clusters, "SlurmCluster", None)),
                          ("cloud_tpu", getattr(clusters, "GkeTpuCluster", None)),
                          ("cloud_tpu", getattr(clusters, "GceTpuCluster", None))):
            try:
                if env is not None and env.is_env_present():
                    return name
            except Exception:  # noqa: BLE001 - a metadata query that fails means "not here"
                log.debug("cluster probe %s failed", name, exc_info=True)
        return None
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    return "slurm" if all(v in os.environ for v in slurm) else None


def _already() -> ProcessInfo:
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                       jax.device_count(), "already")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300,
               local_device_ids=None, auto: bool = True) -> ProcessInfo:
    """Joins the multi-controller runtime if asked to (flags) or if the cluster says so.

    Args:
      coordinator_address: ``host:port`` of process 0 (all processes pass the same value).
      num_processes: total number of processes; ``1`` forces a single-process run.
      process_id: this process's rank in ``[0, num_processes)``.
      timeout_s: how long to wait for every process to register before giving up with one
        clear error (exit status :data:`INIT_FAILED_EXIT_CODE`).
      local_device_ids: restrict this process to these local accelerators (one process per
        GPU); default: all of them (SLURM auto-detection picks ``SLURM_LOCALID``).
      auto: look for Cloud TPU / SLURM when no flag is given.

    Returns the resulting :class:`ProcessInfo` (``source="single"`` when nothing was done).
    """
    if jax.distributed.is_initialized():
        return _already()
    explicit = coordinator_address is not None or process_id is not None or (
        num_processes is not None and num_processes != 1)
    if not explicit:
        if num_processes == 1 or not auto:
            source = None
        else:
            source = detect_cluster()
        if source is None:
            info = ProcessInfo(0, 1, jax.local_device_count(), jax.device_count(), "single")
            log.info("single process: %s", info.describe())
            return info
        kwargs = {}
    else:
        source = "flags"
        missing = [name for name, v in (("--coordinator_address", coordinator_address),
                                        ("--num_processes", num_processes),
                                        ("--process_id", process_id)) if v is None]
        if missing and detect_cluster() is None:
            raise ValueError(
                f"multi-process run needs {', '.join(missing)} as well (or a Cloud TPU / SLURM "
                f"environment that provides them); got coordinator_address="
                f"{coordinator_address!r} num_processes={num_processes} process_id={process_id}.")
        if num_processes is not None and process_id is not None and not (
                0 <= process_id < num_processes):
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                             f"{num_processes}).")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids

    where = (coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
             or f"(the {source} environment's address)")
    who = (f"process {process_id} of {num_processes}"
           if process_id is not None and num_processes is not None else "this process")
    done = threading.Event()

    def watchdog():
        if done.wait(timeout_s):
            return
        sys.stderr.write(
            f"curriculax: distributed init failed: {who} gave up after {timeout_s}s waiting "
            f"for all processes to join the JAX coordinator at {where}. Start every process "
            f"with the same --coordinator_address and --num_processes, give each a distinct "
            f"--process_id, and make sure process 0 runs and its port is reachable from this "
            f"host.\n")
        sys.stderr.flush()
        os._exit(INIT_FAILED_EXIT_CODE)

    threading.Thread(target=watchdog, name="curriculax-dist-init", daemon=True).start()
    try:
        jax.distributed.initialize(initialization_timeout=int(timeout_s) + _XLA_GRACE_S,
                                   **kwargs)
    finally:
        done.set()
    info = ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                       jax.device_count(), source)
    log.info("distributed: %s", info.describe())
    return info


def describe_mesh(mesh) -> str:
    """One line: axis sizes, device count, and how many processes the mesh spans."""
    procs = {d.process_index for d in mesh.devices.flat}
    return (f"mesh {dict(mesh.shape)} over {mesh.size} devices in {len(procs)} process"
            f"{'es' if len(procs) != 1 else ''}")


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """One global ``jax.Array`` from a host array that *every* process holds in full.

    Each process copies only the slices its own devices hold
    (:func:`jax.make_array_from_callback`), so nothing crosses between hosts. This is what
    ``jax.device_put(host, sharding)`` also does for such data; the explicit form documents
    (and keeps, across JAX versions) the every-host-holds-everything contract. For data each
    host holds only a part of, use :func:`jax.make_array_from_process_local_data` instead.
    """
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def global_tree(host_tree, shardings):
    """:func:`global_array` over a pytree (e.g. a host :class:`~curriculax.data.bank.Bank`)."""
    if jax.process_count() == 1:
        return jax.device_put(host_tree, shardings)
    return jax.tree.map(global_array, host_tree, shardings)


def fingerprint(tree) -> np.ndarray:
    """A small uint32 digest of a pytree of host arrays (shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return np.frombuffer(h.digest(), np.uint32).copy()


def check_same_everywhere(tree, what: str) -> None:
    """Fails with a clear message unless every process holds the same host data ``tree``."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digests = np.asarray(multihost_utils.process_allgather(fingerprint(tree)))
    differ = [p for p in range(digests.shape[0]) if not np.array_equal(digests[p], digests[0])]
    if differ:
        raise ValueError(
            f"{what} differs between processes (processes {differ} disagree with process 0): "
            f"every host must build it from the same records and seed -- point data.path at "
            f"a file every host can read identically.")


def reached_preemption(step: int) -> bool:
    """True on every process at the same ``step`` once any of them got SIGTERM.

    Multi-process only (always False in a single process, whose loop has its own handler).
    JAX's preemption service catches the signal on the host that receives it and picks a step
    all processes reach, so they stop, checkpoint together and exit -- rather than one host
    leaving the collective step while the others wait for it. Call it with the same
    ``step`` on every process, counting up by one per call (the sync point is one past the
    largest value any process reported, so a counter that skips values may never meet it).
    """
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
        return False
