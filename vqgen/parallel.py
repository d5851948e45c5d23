"""Device mesh, logical-axis rules and batch sharding.

The same code runs on 1 CPU device, 8 simulated CPU devices and a TPU pod; only the mesh shape
changes. The mesh always has the three axes ``('data', 'fsdp', 'tensor')``; a ``-1`` in the
shape is filled with whatever devices are left.

Typical use::

    mesh = parallel.create_mesh((-1, 1, 1))
    rules = parallel.DEFAULT_RULES
    with parallel.mesh_context(mesh, rules):
        shardings = parallel.logical_to_sharding(abstract_state_specs, mesh, rules)
        batch = parallel.shard_batch(batch, mesh)
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated). Configs may override.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", DATA_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("codebook", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("height", None),
    ("width", None),
    ("time", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills at most one ``-1`` in ``shape`` so that the product equals ``num_devices``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}; "
            "write e.g. (-1, 1, 1)."
        )
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape} has more than one -1; leave at most one axis to auto-fill.")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or num_devices % known:
        raise ValueError(
            f"mesh shape {shape} does not fit {num_devices} devices; choose axis sizes whose "
            f"product divides {num_devices}."
        )
    filled = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(filled) != num_devices:
        raise ValueError(
            f"mesh shape {shape} uses {math.prod(filled)} of {num_devices} devices; make the "
            "product equal the device count or put -1 on one axis."
        )
    return filled


def create_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Creates a ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types (needed by linen)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Any | None) -> tuple[tuple[str, Any], ...]:
    """Normalises rules given as a list/tuple of pairs (configs store lists) to tuples."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """Enters the mesh (``jax.set_mesh``) and the logical-axis rules together."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from ``spec`` where the array dimension is not divisible by them."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        axes_t = axes if isinstance(axes, tuple) else (axes,)
        kept, size = [], 1
        for a in axes_t:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*fitted)


def unbox(tree: Any) -> Any:
    """Removes ``nn.Partitioned`` boxes without adding sharding constraints (safe on abstract trees)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_to_sharding(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """Maps a tree of (possibly ``nn.Partitioned``-boxed) abstract arrays to ``NamedSharding``s.

    Leaves with logical names follow ``rules``; unnamed leaves are replicated. A mesh axis whose
    size does not divide the dimension is dropped for that dimension (the array is replicated
    along it), so tiny test models work on any mesh.
    """
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, tuple(rules))
    unboxed = unbox(abstract_tree)

    def to_sharding(x, spec):
        spec = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, _fit_spec(spec, np.shape(x), mesh))

    return jax.tree.map(to_sharding, unboxed, mesh_specs, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int, data_axes: Sequence[str] = DATA_AXES) -> NamedSharding:
    """Sharding that splits the leading (batch) dimension over the data axes."""
    return NamedSharding(mesh, P(tuple(data_axes), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, data_axes: Sequence[str] = DATA_AXES) -> int:
    return math.prod(mesh.shape[a] for a in data_axes)


def check_batch_size(batch_size: int, mesh: Mesh, data_axes: Sequence[str] = DATA_AXES) -> None:
    n = data_parallel_size(mesh, data_axes)
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {n} devices of the data axes "
            f"{tuple(data_axes)}; set the batch size to a multiple of {n} or change the mesh shape."
        )


def shard_batch(batch: Any, mesh: Mesh, data_axes: Sequence[str] = DATA_AXES) -> Any:
    """Puts a host batch (a pytree of arrays with a common leading dim) onto the mesh.

    Single-process: ``jax.device_put`` with a batch sharding. Multi-process: each host passes its
    own slice and the global array is assembled with ``make_array_from_process_local_data``.
    """
    leaves = jax.tree.leaves(batch)
    if leaves:
        check_batch_size(np.shape(leaves[0])[0] * jax.process_count(), mesh, data_axes)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        sharding = batch_sharding(mesh, np.ndim(x), data_axes)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, batch)


def maybe_initialize_distributed(enabled: bool | None = None) -> None:
    """Calls ``jax.distributed.initialize()`` when asked (flag or ``VQGEN_DISTRIBUTED=1``).

    On Cloud TPU VMs and SLURM the coordinator address and process ids are discovered
    automatically; elsewhere set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``.
    """
    if enabled is None:
        enabled = os.environ.get("VQGEN_DISTRIBUTED", "0").lower() in ("1", "true", "yes")
    if enabled:
        jax.distributed.initialize()


def is_main_process() -> bool:
    return jax.process_index() == 0
