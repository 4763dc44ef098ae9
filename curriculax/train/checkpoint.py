"""Orbax checkpoints of the whole ``TrainState`` plus a small JSON record of the run."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


def manager(workdir, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    path = pathlib.Path(workdir) / "checkpoints" if "://" not in str(workdir) else f"{workdir}/checkpoints"
    return ocp.CheckpointManager(path, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, info: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            info=ocp.args.JsonSave(info)), force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state, shardings, step: int | None = None):
    """Restores ``(state, info)`` at ``step`` (default: latest) into the given shardings,
    which may differ from the ones it was saved with (re-sharding on load)."""
    step = mngr.latest_step() if step is None else step
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state, shardings)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     info=ocp.args.JsonRestore()))
    return out.state, out.info
