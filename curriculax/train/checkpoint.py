"""Orbax checkpoints of the whole ``TrainState`` plus a small JSON record of the run.

``workdir`` may be local or remote (``gs://bucket/run``): paths go through ``etils.epath``
(never ``pathlib``, which turns ``gs://b`` into ``gs:/b``). In a multi-process run every
process calls :func:`save` and :func:`restore` (each writes/reads its own shards; Orbax
coordinates), so the workdir must be one location all hosts see (GCS, NFS, Lustre).
"""

from __future__ import annotations

import os
import pathlib

import jax
import orbax.checkpoint as ocp
from etils import epath


def is_remote(workdir) -> bool:
    return "://" in str(workdir)


def local_dir(workdir) -> pathlib.Path:
    """Where host-local outputs (metrics.jsonl, TensorBoard, plots) of a run go.

    ``workdir`` itself when it is local; for a remote ``scheme://bucket/path`` a local mirror
    ``$CURRICULAX_LOCAL_DIR/scheme/bucket/path`` (default ``runs/``), since appending to a
    JSONL file or redrawing PNGs in place is a local-filesystem operation.
    """
    if not is_remote(workdir):
        return pathlib.Path(workdir)
    scheme, rest = str(workdir).split("://", 1)
    return pathlib.Path(os.environ.get("CURRICULAX_LOCAL_DIR") or "runs") / scheme / rest.strip("/")


def manager(workdir, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(_root(workdir) / "checkpoints", options=options)


def _root(workdir) -> epath.Path:
    # Orbax needs absolute paths; a relative local --workdir (runs/quickstart) is resolved here.
    return epath.Path(str(workdir)) if is_remote(workdir) else epath.Path(pathlib.Path(workdir).resolve())


def save(mngr: ocp.CheckpointManager, step: int, state, info: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            info=ocp.args.JsonSave(info)), force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state, shardings, step: int | None = None):
    """Restores ``(state, info)`` at ``step`` (default: latest) into the given shardings,
    which may differ from the ones it was saved with (re-sharding on load)."""
    step = mngr.latest_step() if step is None else step
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state, shardings)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                         info=ocp.args.JsonRestore()))
    except ValueError as e:  # Orbax names neither the leaf nor the cause (and suggests padding)
        problems = _mismatches(mngr, step, target)
        if not problems:
            raise
        raise ValueError(
            f"The checkpoint at step {step} in {mngr.directory} does not fit the state this config "
            f"builds: {_listing(problems)}. The run that "
            f"saved it used another config (e.g. data.num_train, the curriculum or its settings, "
            f"the model): resume with that config or start in a fresh workdir.") from e
    return out.state, out.info


def _listing(problems: list[str], most: int = 8) -> str:
    more = f" (and {len(problems) - most} more)" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _mismatches(mngr, step: int, target) -> list[str]:
    """Leaves of ``target`` missing from, extra to or shaped unlike the saved ``state``."""
    try:
        saved = ocp.StandardCheckpointHandler().metadata(
            epath.Path(str(mngr.directory)) / str(step) / "state")
    except Exception:  # noqa: BLE001 - no readable metadata: keep Orbax's own error
        return []
    saved = {_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(
        getattr(saved, "tree", saved))}
    wanted = {_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    out = [f"{k} is not in the checkpoint" for k in wanted if k not in saved]
    out += [f"{k} is in the checkpoint but not in this state" for k in saved if k not in wanted]
    for k in wanted.keys() & saved.keys():
        a, b = saved[k], wanted[k]
        if tuple(a.shape) != tuple(b.shape):
            out.append(f"{k} saved with shape {tuple(a.shape)}, now {tuple(b.shape)}")
    return sorted(out)


def saved(workdir, field: str = "--workdir") -> ocp.CheckpointManager:
    """A manager over the checkpoints a run already saved in ``workdir``, for reading (eval,
    soups, ``init_from``). One clear ``FileNotFoundError`` naming ``field`` when there are none,
    and a mistyped path stays uncreated (``manager`` creates the folder)."""
    root = _root(workdir)
    mngr = ocp.CheckpointManager(root / "checkpoints") if (root / "checkpoints").exists() else None
    if mngr is None or mngr.latest_step() is None:
        raise FileNotFoundError(f"No checkpoint in {str(workdir).rstrip('/')}/checkpoints: train "
                                f"first (or check {field}).")
    return mngr


def latest_step(workdir) -> int:
    """The newest checkpoint step of another run (``config.model.init_from``)."""
    mngr = saved(workdir, "config.model.init_from")
    step = mngr.latest_step()
    mngr.close()
    return step


def load_params(workdir, abstract_params, shardings, step: int | None = None):
    """Only the ``params`` of another run's checkpoint (``config.model.init_from``), e.g. an SFT
    warm-up that an RL run continues from; its optimizer and curriculum state are not read."""
    mngr = saved(workdir, "config.model.init_from")
    step = mngr.latest_step() if step is None else step
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_params, shardings)
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)))
    except ValueError as e:  # Orbax names neither the leaf nor the field (and suggests padding)
        problems = [p for p in _mismatches(mngr, step, {"params": target}) if "saved with shape" in p]
        if not problems:
            raise
        raise ValueError(
            f"config.model.init_from={str(workdir)!r}: its params do not fit the model this config "
            f"builds: {_listing(problems)}. Use the model "
            f"settings (model.*) of the run that saved it (its config.json).") from e
    finally:
        mngr.close()
    # Leaves the checkpoint lacks come back as their ShapeDtypeStruct: left out (None), for the
    # sparsity method's init_params to create (LoRAMoE experts, prefixes on a plain run).
    return jax.tree.map(lambda x: None if isinstance(x, jax.ShapeDtypeStruct) else x,
                        out.state["params"])
