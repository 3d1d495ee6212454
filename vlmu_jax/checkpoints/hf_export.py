"""Flax model -> HF folder (config.json + safetensors, sharded with an index above a size threshold) that the
architecture's transformers class loads with ``from_pretrained``. LoRA adapters are merged on the way out; the
model itself is left untouched.
"""

from __future__ import annotations

import json
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmu_jax.checkpoints.hf_import import SAFETENSORS_DTYPES
from vlmu_jax.checkpoints.layout import to_stored
from vlmu_jax.models import sharding
from vlmu_jax.models.registry import abstract_model, hf_name_map

if TYPE_CHECKING:
    from vlmu_jax.checkpoints.in_memory import HostCopy

_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def _header(tensors: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    """A safetensors file's length-prefixed JSON header for tensors (name, shape, dtype) stored in this order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in tensors:
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _bytes(t: np.ndarray) -> memoryview:
    return np.ascontiguousarray(t).reshape(-1).view(np.uint8).data  # the bytes as they are, no copy


def merged_kernel(flat: dict[tuple, nnx.Variable], path: tuple[str, ...], scale: float) -> jax.Array:
    """kernel + scale * A @ B when the projection carries LoRA params, else the kernel."""
    kernel = flat[path].get_value()
    a, b = flat.get(path[:-1] + ("lora_a",)), flat.get(path[:-1] + ("lora_b",))
    if path[-1] != "kernel" or a is None:
        return kernel
    delta = jnp.einsum(
        "...ir,...ro->...io", a.get_value().astype(jnp.float32), b.get_value().astype(jnp.float32)
    )
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merged_params(model: nnx.Module) -> dict[tuple, jax.Array]:
    """Every exported param of the model (LoRA merged), on its devices in its Flax layout, by param path: what
    an HF folder holds before the host copy and the transposes."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    modules = {
        tuple(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)
    }
    return {path: merged_kernel(flat, path, getattr(modules.get(path[:-1]), "lora_scale", 1.0))
            for path in hf_name_map(model)}


def saved_config(model: nnx.Module, dtype) -> dict:
    """The config.json `export_hf` writes for `model` saved in `dtype`."""
    return {**model.config.hf_config, "dtype": str(np.dtype(dtype))}


class _Param(NamedTuple):
    """One exported param: its HF tensor names (one per layer of a stacked param), its merged value on its devices
    in the Flax layout, and whether HF stores it transposed."""

    names: list[str]
    value: jax.Array | HostCopy  # on its devices in the Flax layout, or (`export_held`) in host memory as stored
    stacked: bool
    transpose: bool  # the folder stores `value` with its last two axes swapped (never a held value)

    def tensor_shape(self) -> tuple[int, ...]:
        """Shape of each of its HF tensors."""
        shape = tuple(self.value.shape[1:] if self.stacked else self.value.shape)
        return shape[:-2] + shape[-2:][::-1] if self.transpose else shape

    def on_host(self, dtype) -> list[np.ndarray]:
        """Its HF tensors on this host, each contiguous (a row of a C-contiguous array): cast and transposed on
        its devices where the folder needs it, then copied over (a held value is copied out as it is)."""
        host = sharding.on_host(to_stored(self.value, self.transpose, dtype))
        return list(host) if self.stacked else [host]


def _hf_params(model: nnx.Module, stored: dict[tuple, HostCopy] | None = None) -> list[_Param]:
    """The model's exported params in export order: `stored` by param path, as the folder stores them (default:
    the model's own on its devices, LoRA merged, in the Flax layout)."""
    merged = merged_params(model) if stored is None else stored
    params = []
    for path, hp in hf_name_map(model).items():
        value = merged[path]
        names = hp.names(value.shape[0])
        params.append(_Param(names, value, hp.stacked, stored is None and hp.swaps(value.ndim)))
    return params


def hf_tensors(model: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
    """Every HF tensor of the model (LoRA merged), in HF layout, cast to dtype if given."""
    dtype = None if dtype is None else jnp.dtype(dtype)
    return {name: t for p in _hf_params(model) for name, t in zip(p.names, p.on_host(dtype), strict=True)}


def export_hf(model: nnx.Module, out_dir: str | Path, dtype=None, max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write config.json and model.safetensors (or model-0000k-of-0000n.safetensors + index) to out_dir."""
    dtype = None if dtype is None else jnp.dtype(dtype)
    params = _hf_params(model)
    config = saved_config(model, np.dtype(dtype or params[0].value.dtype))
    return _write_folder(Path(out_dir), config, params, dtype, max_shard_bytes)


def export_held(out_dir: str | Path, hf_config: dict, stored: dict[tuple, HostCopy],
                max_shard_bytes: int = 4 * 2**30) -> Path:
    """The folder `export_hf` writes, from a model held in host memory as the folder stores it
    (`in_memory.ModelCache`: its config.json, its params in HF layout and the folder's dtype): no device work and
    no host transposes, only bytes to the disk, so a thread can write it while the next stage trains."""
    params = _hf_params(abstract_model(hf_config, jnp.float32), stored)
    return _write_folder(Path(out_dir), hf_config, params, None, max_shard_bytes)


def _write_folder(out: Path, config: dict, params: list[_Param], dtype, max_shard_bytes: int) -> Path:
    """config.json and the safetensors of `params`, cast to `dtype` if given.

    Streamed one param at a time: the files' headers are written from the shapes first, then each param is
    copied to the host while a writer thread writes the one before it, so the host holds at most two params
    (not the whole model: 22 GB for an 11B model in bfloat16) and the device-to-host copies overlap the disk.
    """
    out.mkdir(parents=True, exist_ok=True)
    specs = [(name, p.tensor_shape(), np.dtype(dtype or p.value.dtype)) for p in params for name in p.names]
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _nbytes(spec[1], spec[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    file_of = {name: k for k, shard in enumerate(shards) for name, *_ in shard}
    main = jax.process_index() == 0
    if main:
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    with ExitStack() as stack, ThreadPoolExecutor(1, thread_name_prefix="export") as writer:
        handles = [stack.enter_context(open(out / name, "wb")) for name in files] if main else []
        for handle, shard in zip(handles, shards, strict=False):  # process 0 writes; the others only gather
            handle.write(_header(shard))
        writing: Future | None = None
        for p in params:
            parts = p.on_host(dtype)  # every process: a sharded param is gathered collectively
            if writing is not None:
                writing.result()
            if main:
                writing = writer.submit(_write, [(handles[file_of[n]], t) for n, t in zip(p.names, parts, strict=True)])
        if writing is not None:
            writing.result()
    if main and len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(shape, dt) for _, shape, dt in specs)},
            "weight_map": {name: files[k] for name, k in file_of.items()},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def _write(parts: list[tuple[BinaryIO, np.ndarray]]) -> None:
    for handle, t in parts:
        handle.write(_bytes(t))
