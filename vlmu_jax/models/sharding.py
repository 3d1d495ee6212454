"""Logical axis names -> mesh axes: the one table of sharding rules, plus mesh and placement helpers.

Every parameter declares logical axes next to its shape (Variable metadata ``axes``); the mesh layout is
decided here only, so the same model code runs on 1 CPU, 8 fake CPU devices, a GPU host or a TPU pod.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from vlmu_jax.launches import one_at_a_time

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of axes, or None = replicated). First match wins.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("lora_rank", None),
    ("layers", None),
    ("seq", None),
    ("head_dim", None),
    ("norm", None),
    ("patch", None),
)


def logical_to_spec(axes: Sequence[str | None], rules=RULES) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec, never using a mesh axis twice (later uses replicate)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        if any(n in used for n in names):
            names = ()
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); data=-1 takes the devices left over."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh {data}x{fsdp}x{tensor} does not match {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def _fits(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (tiny test shapes), so placement never fails."""
    out = []
    for dim, names in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        group = (names,) if isinstance(names, str) else tuple(names or ())
        size = int(np.prod([mesh.shape[n] for n in group])) if group else 1
        out.append(names if dim % size == 0 else None)
    return PartitionSpec(*out)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """NamedSharding of one (possibly abstract) variable from its ``axes`` metadata."""
    value = var.get_value() if hasattr(var, "get_value") else var.value
    axes = var.get_metadata().get("axes") or (None,) * len(value.shape)
    return NamedSharding(mesh, _fits(value.shape, logical_to_spec(axes), mesh))


def placement(var: nnx.Variable, mesh: Mesh | None) -> NamedSharding | SingleDeviceSharding:
    """Where a loaded param goes: its mesh sharding, or the first device without a mesh."""
    return variable_sharding(var, mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])


def state_shardings(state: nnx.State, mesh: Mesh | None) -> nnx.State | None:
    """Per-variable NamedShardings for a state (abstract or concrete); None without a mesh."""
    if mesh is None:
        return None
    return jax.tree.map(
        lambda v: variable_sharding(v, mesh), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move an existing model's variables onto the mesh according to the rules (in place)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh))
    nnx.update(model, state)
    return model


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding when a mesh is active (jax.set_mesh); a no-op otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = _fits(x.shape, logical_to_spec(axes), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch's rows are split over (the rules' 'batch')."""
    axes = logical_to_spec(("batch",))[0]
    return tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.axis_names)


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways `global_batch` splits a batch's rows over `mesh` (1 without a mesh): a global batch size must
    be a multiple of it."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in _batch_axes(mesh))


def _batch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch's placement: its rows split over the rules' 'batch' axes, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh)))


def _placed(batch: dict[str, Any], mesh: Mesh | None) -> dict[str, Any]:
    if mesh is None:  # device_put, not jnp.asarray: that compiles a copy program per shape (jax 0.10)
        return jax.tree.map(jax.device_put, batch)
    sharding = _batch_sharding(mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), batch)


# This host's rows of a batch (a pytree of arrays) -> global arrays split along 'batch' over the mesh. Copied from
# the batch threads beside the main thread's programs: one at a time (vlmu_jax/launches.py).
global_batch = one_at_a_time(_placed)


def on_host(x: jax.Array) -> np.ndarray:
    """`x`'s full value as a numpy array on this host (gathered from the other processes where it is sharded over
    them): a pass's outputs, indexed by its batches' global row indices."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def abstract_batch(batch: dict[str, Any], mesh: Mesh | None) -> dict[str, Any]:
    """The shapes, dtypes and placement `global_batch(batch, mesh)` would give, without copying anything to the
    devices: what compiling a batch's programs ahead needs (eval/batched.compile_ahead). Why: there a sample batch
    per program was copied in eight threads at once, device memory held for nothing (an idefics2 batch with image
    splitting is up to `eval.max_batch_image_mb`). `batch` holds numpy arrays, as the batch sources give them."""
    if mesh is None:
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jax.dtypes.canonicalize_dtype(v.dtype)), batch)
    sharding = _batch_sharding(mesh)
    # global rows: this host's rows times the batch shards over the ones its devices hold, as
    # make_array_from_process_local_data reads them
    shards = batch_shards(mesh)
    placed = sharding.devices_indices_map((shards,))
    here = len({placed[d][0].start for d in sharding.addressable_devices})

    def spec(v: np.ndarray) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((v.shape[0] * shards // here, *v.shape[1:]), jax.dtypes.canonicalize_dtype(v.dtype),
                                    sharding=sharding)

    return jax.tree.map(spec, batch)


def runs_on_one_gpu() -> bool:
    """Whether what is traced now runs on one GPU: the active mesh's only device (`jax.set_mesh`, `constrain`'s),
    else the process's only device. Where our Pallas kernels run (models/decode_attention.py,
    models/dropout_kernel.py). Why one: arrays sharded over several devices would be gathered to each of them in
    front of a custom kernel by XLA's partitioner, and the pipeline places its arrays on its mesh without making it
    the active one."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() == "gpu" and (jax.device_count() if mesh.empty else mesh.size) == 1
