"""Local HF checkpoint (config.json + safetensors) -> Flax model, each tensor streamed into its sharding.

safetensors files are memory-mapped and parsed from their JSON header (no pickle, no torch); every Flax
param is built with ``jax.make_array_from_callback`` so a device only ever receives its own shard. Tensor
names go through the architecture's ``canonical_name``, so older layouts (llava-hf's
``language_model.model.*``, ``vision_tower.vision_model.*``) and the transformers-5 layout both load.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from vlmu_jax.models.layers import resolve_attention_impl
from vlmu_jax.models.registry import abstract_model, architecture, hf_name_map
from vlmu_jax.models.sharding import variable_sharding

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class TensorIndex:
    """Name -> lazily read numpy tensor over one checkpoint's safetensors files (memory-mapped)."""

    def __init__(self, folder: Path, canonical_name: Callable[[str], str] = lambda name: name):
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif single.exists():
            files = [single.name]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
        self.entries: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise FileNotFoundError(f"safetensors shard {path} listed in the index is missing")
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for key, info in header.items():
                if key != "__metadata__":
                    self.entries[canonical_name(key)] = (path, info, 8 + n)
        self._maps: dict[Path, np.memmap] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def get(self, name: str) -> np.ndarray:
        path, info, base = self.entries[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._maps[path][base + start : base + end]
        return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _check(index: TensorIndex, name: str, want: tuple[int, ...], folder: Path) -> None:
    if name not in index.entries:
        raise KeyError(f"tensor {name!r} missing from the checkpoint in {folder}")
    if index.shape(name) != want:
        raise ValueError(
            f"tensor {name!r} in {index.entries[name][0]} has shape {index.shape(name)}, "
            f"expected {want} from config.json"
        )


def load_pretrained(
    path: str | Path, dtype=jnp.float32, mesh: Mesh | None = None, **options: Any
) -> nnx.Module:
    """Build the model of a local HF folder and fill it from its safetensors, sharded over ``mesh`` if given.

    options (remat, scan_layers, attention_impl) are forwarded to the model config.
    """
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    hf_config = json.loads((folder / "config.json").read_text())
    index = TensorIndex(folder, architecture(hf_config).canonical_name)
    model = abstract_model(hf_config, dtype, **options)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path_, hp in hf_name_map(model).items():
        var = flat[path_]
        shape = tuple(var.get_value().shape)
        names = [hp.name.format(i=i) for i in range(shape[0])] if hp.stacked else [hp.name]
        per = shape[1:] if hp.stacked else shape
        want = per[::-1] if hp.transpose else per
        for name in names:
            _check(index, name, tuple(want), folder)
        sharding = (
            variable_sharding(var, mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        )
        var.set_value(_make_array(index, names, hp, shape, dtype, sharding))
    model = nnx.merge(graphdef, state)
    logging.info("%s", runtime_summary(model, folder, dtype))
    return model


def runtime_summary(model: nnx.Module, source: str | Path, dtype) -> str:
    """One line naming the attention kernel and remat policy a loaded model runs with: the fast path is
    the default, and a run that silently fell back to XLA's attention or to no remat should say so."""
    c = model.config
    return (f"model {source}: {c.hf_config.get('model_type', '?')} in {jnp.dtype(dtype).name}, attention "
            f"{resolve_attention_impl(c.attention_impl, dtype)} (asked {c.attention_impl!r}), remat {c.remat!r}, "
            f"scan_layers {c.scan_layers}")


def _make_array(
    index: TensorIndex,
    names: list[str],
    hp,
    shape: tuple[int, ...],
    dtype,
    sharding: NamedSharding | SingleDeviceSharding,
) -> jax.Array:
    """Assemble only the requested shard of a (possibly layer-stacked) param from its HF tensors."""
    np_dtype = np.dtype(jnp.dtype(dtype))

    def one(name: str, idx: tuple[slice, ...]) -> np.ndarray:
        t = index.get(name)
        t = t.T if hp.transpose else t
        return np.asarray(t[idx]).astype(np_dtype)

    def callback(idx: tuple[slice, ...]) -> np.ndarray:
        if not hp.stacked:
            return one(names[0], idx)
        return np.stack([one(names[i], idx[1:]) for i in range(len(names))[idx[0]]])

    return jax.make_array_from_callback(shape, sharding, callback)
