"""Flax LLaVA -> HF folder (config.json + safetensors, sharded with an index above a size threshold) that
``transformers.LlavaForConditionalGeneration.from_pretrained`` loads. LoRA adapters are merged on the way
out; the
model itself is left untouched.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vlmu_jax.checkpoints.hf_import import SAFETENSORS_DTYPES
from vlmu_jax.checkpoints.layout import relayout
from vlmu_jax.models.registry import hf_name_map

_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Plain safetensors writer (handles bfloat16, which safetensors.numpy does not)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).reshape(-1).view(np.uint8).data)  # the bytes as they are, no copy


def _host(x: jax.Array) -> np.ndarray:
    """Full value on this host (gathered across processes when sharded over several)."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


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


def hf_tensors(model: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
    """Every HF tensor of the model (LoRA merged), in HF layout, cast to dtype if given."""
    merged = merged_params(model)
    dtype = None if dtype is None else jnp.dtype(dtype)
    out: dict[str, np.ndarray] = {}
    for path, hp in hf_name_map(model).items():
        # .T of one (per-layer) tensor: a no-op below two axes
        transpose = hp.transpose and merged[path].ndim - hp.stacked >= 2
        value = _host(relayout(merged[path], transpose=transpose, dtype=dtype, sharding=None))
        parts = list(value) if hp.stacked else [value]  # rows of a C-contiguous array: contiguous views
        for i, part in enumerate(parts):
            out[hp.name.format(i=i)] = part
    return out


def export_hf(model: nnx.Module, out_dir: str | Path, dtype=None, max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write config.json and model.safetensors (or model-0000k-of-0000n.safetensors + index) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model, dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if jax.process_index() == 0:
        config = saved_config(model, next(iter(tensors.values())).dtype)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if len(shards) == 1:
            write_safetensors(out / "model.safetensors", shards[0])
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            for name, shard in zip(names, shards, strict=True):
                write_safetensors(out / name, shard)
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s},
            }
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
