"""Logical-axis sharding: parameter axis names → mesh axes (``data``, ``fsdp``, ``tensor``).

Parameters carry logical names such as ``("embed", "mlp")``; a rules table (from config) maps
each name to zero, one or several mesh axes. A mesh axis that does not divide a dimension is
dropped for that array (the dimension is replicated) rather than failing, so one rules table
serves every model size and device count.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import warnings
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


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *,
              dcn_data: int = 1, dcn_fsdp: int = 1) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one axis may be ``-1`` to absorb the remaining devices.

    Sizes are global (over every process's devices). The device order comes from
    ``jax.experimental.mesh_utils``: within a slice (ICI) ``create_device_mesh`` lays the axes
    on the physical torus; with ``dcn_data``/``dcn_fsdp`` > 1 those axes additionally span
    that many slices (TPU multi-slice) or hosts (GPU nodes) over the slower data-center
    network (DCN), via ``create_hybrid_device_mesh``: ``data`` is then ``dcn_data`` slices
    times ``data // dcn_data`` devices per slice. Keep ``tensor`` inside a slice.
    """
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
    dcn = [dcn_data, dcn_fsdp, 1]
    if dcn != [1, 1, 1]:
        return Mesh(hybrid_device_grid(sizes, dcn, devices), MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        device_grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # noqa: BLE001 - e.g. CPU device sets mesh_utils cannot lay out
        device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, MESH_AXES)


def _granule_key(devices, count: int):
    """How devices group into ``count`` DCN granules: TPU slices, processes, or hosts.

    Returns ``(key, process_is_granule)`` where ``key`` is None when
    ``mesh_utils.create_hybrid_device_mesh`` can group by itself (``slice_index`` or
    ``process_index``), else a function of a device (several processes per host, e.g. one
    process per GPU under SLURM: consecutive ranks share a host).
    """
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) == count:
        return None, False
    procs = sorted({d.process_index for d in devices})
    if len(procs) == count:
        return None, True
    if len(procs) % count == 0:
        per = len(procs) // count
        rank = {p: i for i, p in enumerate(procs)}
        return (lambda d: rank[d.process_index] // per), True
    raise ValueError(
        f"mesh.dcn_* asks for {count} DCN granules (slices or hosts) but the devices come from "
        f"{len(slices)} slice(s) and {len(procs)} process(es); the DCN sizes' product must equal "
        f"the number of slices or hosts.")


def hybrid_device_grid(sizes, dcn, devices) -> np.ndarray:
    """Device array for global axis ``sizes`` split into per-slice (ICI) x DCN parts."""
    for name, size, d in zip(MESH_AXES, sizes, dcn):
        if d < 1 or size % d:
            raise ValueError(f"mesh.dcn_{name}={d} must divide mesh.{name}={size}.")
    ici = [s // d for s, d in zip(sizes, dcn)]
    key, by_process = _granule_key(devices, math.prod(dcn))
    from jax.experimental import mesh_utils

    if key is None:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                    process_is_granule=by_process)
    groups: dict[int, list] = {}
    for dev in devices:
        groups.setdefault(key(dev), []).append(dev)
    per_granule = [mesh_utils.create_device_mesh(ici, groups[k]) for k in sorted(groups)]
    blocks = np.empty(dcn, dtype=object)
    for i, idx in enumerate(np.ndindex(*dcn)):
        blocks[idx] = per_granule[i]
    return np.block(blocks.tolist())


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


_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=DEFAULT_RULES):
    """While tracing inside it, :func:`constrain` lays activations out on ``mesh`` by ``rules``."""
    token = _ACTIVATIONS.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def with_activation_sharding(fn, mesh: Mesh | None, rules=DEFAULT_RULES):
    """``fn`` traced under :func:`activation_sharding` (a train step, before ``jax.jit``)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def constrain(x, logical_axes):
    """``x`` constrained to ``logical_axes`` under :func:`activation_sharding`, else unchanged.

    The model's residual stream is ``("batch", None, None)``: without it the partitioner lays
    the hidden states out like the FSDP-sharded embedding table (``embed`` over ``fsdp``), so
    every device holds the whole global batch and all-reduces activations instead of
    all-gathering weights. A shape the mesh axes do not divide (a micro-batch smaller than the
    batch shards) is left to the partitioner, with a warning.
    """
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_mesh(logical_axes, rules)
    fitted = fit_spec(spec, x.shape, mesh)
    if fitted != spec:
        # warnings dedupe by message: once per unsplittable size, not per layer or sequence length
        bad = [(name, size) for name, size, want, got in zip(logical_axes, x.shape, spec, fitted)
               if want != got]
        warnings.warn(f"Activation dimension(s) {bad} do not split over the mesh axes "
                      f"{dict(mesh.shape)}: the partitioner lays them out instead, often "
                      f"replicated. Make the (micro-)batch a multiple of the batch shards.")
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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
