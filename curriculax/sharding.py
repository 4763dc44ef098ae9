"""Logical-axis sharding: parameter axis names → mesh axes (``data``, ``fsdp``, ``tensor``).

Parameters carry logical names such as ``("embed", "mlp")``; a rules table (from config) maps
each name to zero, one or several mesh axes. A mesh axis that does not divide a dimension is
dropped for that array (the dimension is replicated) rather than failing, so one rules table
serves every model size and device count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("examples", ("data", "fsdp")),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one axis may be ``-1`` to absorb the remaining devices."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"Mesh axes {dict(zip(MESH_AXES, sizes))} do not divide {len(devices)} devices."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh axes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices but "
            f"{len(devices)} are available; set one axis to -1 to absorb the rest."
        )
    try:
        from jax.experimental import mesh_utils

        device_grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # noqa: BLE001 - e.g. CPU device sets mesh_utils cannot lay out
        device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, MESH_AXES)


def logical_to_mesh(axes: Sequence[str | None], rules) -> P:
    """Maps logical axis names to a mesh ``PartitionSpec`` (unknown names replicate)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)  # a mesh axis shards one dim only
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return P(*out)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes that do not evenly divide their dimension (that dim is replicated)."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        keep, size = [], 1
        for name in names:
            if dim % (size * mesh.shape[name]) == 0:
                keep.append(name)
                size *= mesh.shape[name]
            else:
                logging.debug("replicating dim of size %d over mesh axis %s", dim, name)
        fitted.append(keep[0] if len(keep) == 1 else (tuple(keep) or None))
    return P(*fitted)


def named_sharding(mesh: Mesh, shape, logical_axes, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, fit_spec(logical_to_mesh(logical_axes, rules), shape, mesh))


def logical_axes(state: nnx.State):
    """Pure-dict pytree of logical ``PartitionSpec``s, from each variable's metadata."""
    return nnx.to_pure_dict(nnx.get_partition_spec(state))


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) given its logical axes.

    ``axes_tree`` matches ``abstract_tree``'s structure with ``PartitionSpec`` leaves (logical
    names); ``None`` leaves replicate.
    """
    def one(x, axes):
        return named_sharding(mesh, x.shape, tuple(axes) if axes is not None else (), rules)

    return jax.tree.map(one, abstract_tree, axes_tree, is_leaf=lambda x: x is None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Places a model's variables on ``mesh`` according to their logical axes (in place)."""
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    shardings = tree_shardings(pure, logical_axes(state), mesh, rules)
    nnx.replace_by_pure_dict(state, jax.device_put(pure, shardings))
    nnx.update(model, state)
    return model
