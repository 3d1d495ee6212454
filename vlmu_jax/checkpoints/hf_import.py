"""Local HF checkpoint (config.json + safetensors) -> Flax model, each tensor streamed into its sharding.

safetensors files are memory-mapped and parsed from their JSON header (no pickle, no torch); every Flax
param is built with ``jax.make_array_from_callback`` so a device only ever receives its own shard. Tensor
names go through the architecture's ``canonical_name``, so older layouts (llava-hf's
``language_model.model.*``, ``vision_tower.vision_model.*``) and the transformers-5 layout both load.

Checkpoints come from other tools and get copied around, so every header is checked against its file before a
byte is read: a truncated copy, a missing shard, an unknown dtype or a tensor whose shape disagrees with
config.json is an `InputError` naming the file, the tensor and the field, not a numpy reshape error later.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.checkpoints.layout import ToModel, block_key, compile_to_model, to_model
from vlmu_jax.errors import InputError
from vlmu_jax.launches import launching
from vlmu_jax.models.layers import resolve_attention_impl
from vlmu_jax.models.registry import abstract_model, architecture, hf_name_map
from vlmu_jax.models.sharding import placement

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

# Params read and placed at once. Why: a load's host copies (memory map -> numpy, numpy -> device) ran one param at
# a time on one thread: a 7B folder took 7.6 s (1.8 GB/s) on an H200 host with 16 cores, 3 s from 8 threads.
_LOAD_THREADS = min(8, os.cpu_count() or 1)
# Host bytes a load's threads hold at once. Why: each thread reads a whole param to the host before placing it, and
# a stacked param is every layer's tensor at once (3.3 GB for Llama-3.2-11B-Vision's [28, 14336, 4096] MLP kernels),
# so 8 threads could hold ~26 GB of host memory beside whatever else the run holds (bench/NOTES.md item 5). 8 GiB
# still lets two of a 7B model's largest stacked params (2.9 GB each) load side by side.
_LOAD_HOST_BYTES = 8 << 30


class _ByteBudget:
    """Lets a reader start once its bytes fit under the bytes in flight; a param over the whole budget waits
    until nothing else is held, then reads alone."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        n = min(nbytes, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.held + n <= self.limit)
            self.held += n
        try:
            yield
        finally:
            with self._cond:
                self.held -= n
                self._cond.notify_all()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError("missing", file=path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", file=path) from err


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json, checked to be an object of a supported architecture."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise InputError("not a folder (a Hugging Face checkpoint folder with config.json and safetensors)",
                         file=folder)
    if not path.is_file() and (Path(folder) / "adapter_config.json").is_file():
        raise InputError("a PEFT adapter folder, not a model: merge it first (PeftModel.merge_and_unload() then "
                         "save_pretrained)", file=folder)
    config = _read_json(path)
    if not isinstance(config, dict):
        raise InputError("must be a JSON object", file=path)
    try:
        architecture(config)
    except ValueError as err:
        raise InputError(str(err), file=path, field="model_type") from err
    return config


def _shard_files(folder: Path) -> list[str]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise InputError("has no weight_map object", file=index)
        return sorted(set(weight_map.values()))
    if single.exists():
        return [single.name]
    hint = ""
    if list(folder.glob("pytorch_model*.bin")):
        hint = " (it has pytorch_model*.bin: re-save it with save_pretrained(..., safe_serialization=True))"
    raise InputError(f"no model.safetensors or model.safetensors.index.json{hint}", file=folder)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header of `path`, every entry checked against the file's size; and the data offset."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"truncated: {size} bytes, not even a header length", file=path)
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise InputError(f"truncated: the header alone needs {8 + n} bytes, the file has {size}", file=path)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"not a safetensors file: its header is not JSON ({err})", file=path) from err
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise InputError("header entry lacks dtype / shape / data_offsets", file=path, record=f"tensor {name}")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise InputError(f"unsupported dtype {info['dtype']!r}; supported: {sorted(SAFETENSORS_DTYPES)}",
                             file=path, record=f"tensor {name}", field="dtype")
        start, end = info["data_offsets"]
        need = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        if end - start != need:
            raise InputError(f"{end - start} bytes, but shape {info['shape']} of {info['dtype']} needs {need}",
                             file=path, record=f"tensor {name}", field="data_offsets")
        if 8 + n + end > size:
            raise InputError(f"truncated: the tensor ends at byte {8 + n + end}, the file has {size} bytes (an "
                             "interrupted copy or download?)", file=path, record=f"tensor {name}", field="data_offsets")
    return header, 8 + n


class TensorIndex:
    """Name -> lazily read numpy tensor over one checkpoint's safetensors files (memory-mapped)."""

    def __init__(self, folder: Path, canonical_name: Callable[[str], str] = lambda name: name):
        self.entries: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for name in _shard_files(folder):
            path = folder / name
            if not path.is_file():
                raise InputError("missing (listed in model.safetensors.index.json)", file=path)
            header, base = _read_header(path)
            for key, info in header.items():
                if key != "__metadata__":
                    self.entries[canonical_name(key)] = (path, info, base)
        # Every file mapped up front: `load_pretrained` reads tensors from several threads.
        self._maps = {path: np.memmap(path, dtype=np.uint8, mode="r")
                      for path in {path for path, _, _ in self.entries.values()}}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name][1]["data_offsets"]
        return end - start

    def get(self, name: str) -> np.ndarray:
        path, info, base = self.entries[name]
        start, end = info["data_offsets"]
        raw = self._maps[path][base + start : base + end]
        return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _check(index: TensorIndex, name: str, want: tuple[int, ...], folder: Path) -> None:
    if name not in index.entries:
        raise InputError("missing from the checkpoint (config.json's architecture needs it)", file=folder,
                         record=f"tensor {name}")
    if index.shape(name) != want:
        raise InputError(f"{index.shape(name)}, but config.json implies {want}", file=index.entries[name][0],
                         record=f"tensor {name}", field="shape")


def _checked_plan(folder: Path, dtype, options: dict[str, Any]):
    """The abstract model of `folder` and, per param, its HF tensor names, each checked present with its shape."""
    hf_config = read_hf_config(folder)
    index = TensorIndex(folder, architecture(hf_config).canonical_name)
    model = abstract_model(hf_config, dtype, **options)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    plan = []
    for path_, hp in hf_name_map(model).items():
        var = flat[path_]
        shape = tuple(var.get_value().shape)
        names = hp.names(shape[0])
        per = shape[1:] if hp.stacked else shape
        want = per[::-1] if hp.transpose else per
        for name in names:
            _check(index, name, tuple(want), folder)
        plan.append((var, hp, names, shape))
    return graphdef, state, index, plan


def check_checkpoint(path: str | Path) -> None:
    """Everything `load_pretrained` checks (config.json, safetensors headers against their files, every tensor's
    presence and shape) without reading a tensor, so a bad folder fails before work starts on good ones."""
    _checked_plan(Path(path), jnp.float32, {})


def load_pretrained(
    path: str | Path, dtype=jnp.float32, mesh: Mesh | None = None, **options: Any
) -> nnx.Module:
    """Build the model of a local HF folder and fill it from its safetensors, sharded over ``mesh`` if given.

    options (remat, scan_layers, attention_impl) are forwarded to the model config.
    """
    folder = Path(path)
    graphdef, state, index, plan = _checked_plan(folder, dtype, options)
    budget = _ByteBudget(_LOAD_HOST_BYTES)

    programs = [_to_model_program(index, entry, dtype, mesh) for entry in plan]

    def make(entry, program: ToModel) -> jax.Array:
        _, hp, names, _ = entry
        with budget.hold(sum(index.nbytes(name) for name in names)):
            return _make_array(index, names, hp, program, compiled.get(program))

    with ThreadPoolExecutor(_LOAD_THREADS, thread_name_prefix="load-compile") as compiling, \
            ThreadPoolExecutor(_LOAD_THREADS, thread_name_prefix="load") as pool:
        compiled = compile_to_model(programs, compiling)
        for (var, *_), value in zip(plan, pool.map(make, plan, programs), strict=True):
            var.set_value(value)
    model = nnx.merge(graphdef, state)
    logging.info("%s", runtime_summary(model, folder, dtype))
    return model


def placed_shapes(hf_config: dict[str, Any], dtype, mesh: Mesh | None = None, **options: Any) -> nnx.Module:
    """The model `load_pretrained` (or `in_memory.ModelCache.load`) builds from a folder of `hf_config`, with shapes
    in their placements (jax.ShapeDtypeStruct) for its params: what its programs compile for while its weights are
    read (stages._compile_on_stand_in). Each loaded param is cast to `dtype` and placed by `placement`."""
    graphdef, state = nnx.split(abstract_model(hf_config, dtype, **options))
    for _, var in nnx.to_flat_state(state):
        var.set_value(jax.ShapeDtypeStruct(var.get_value().shape, jnp.dtype(dtype), sharding=placement(var, mesh)))
    return nnx.merge(graphdef, state)


def runtime_summary(model: nnx.Module, source: str | Path, dtype) -> str:
    """One line naming the attention kernel and remat policy a loaded model runs with: the fast path is
    the default, and a run that silently fell back to XLA's attention or to no remat should say so."""
    c = model.config
    return (f"model {source}: {c.hf_config.get('model_type', '?')} in {jnp.dtype(dtype).name}, attention "
            f"{resolve_attention_impl(c.attention_impl, dtype)} (asked {c.attention_impl!r}), remat {c.remat!r}, "
            f"scan_layers {c.scan_layers}")


def _to_model_program(index: TensorIndex, entry, dtype, mesh: Mesh | None) -> ToModel:
    """The `to_model` program of one entry of `_checked_plan`'s plan."""
    var, hp, names, shape = entry
    transpose = hp.swaps(len(shape))
    stored = shape[:-2] + shape[-2:][::-1] if transpose else shape
    stored_dtype = np.result_type(*(SAFETENSORS_DTYPES[index.entries[name][1]["dtype"]] for name in names))
    return ToModel(stored, jnp.dtype(stored_dtype), transpose, jnp.dtype(dtype), placement(var, mesh))


def _make_array(index: TensorIndex, names: list[str], hp, program: ToModel, compiled: Future | None = None
                ) -> jax.Array:
    """Assemble only the requested shard of a (possibly layer-stacked) param from its HF tensors: read as stored
    (HF layout and dtype, contiguous slices of the memory map), then cast and transposed on the devices by
    `program` (checkpoints/layout.py: numpy would do both on one host thread over strided memory)."""
    stored, target = program.shape, program.stored_sharding

    def one(name: str, idx: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(index.get(name)[idx])

    def callback(idx: tuple[slice, ...]) -> np.ndarray:
        if not hp.stacked:
            return one(names[0], idx)
        return np.stack([one(names[i], idx[1:]) for i in range(len(names))[idx[0]]])

    # Each distinct block read from the file first, then copied while no other thread launches or copies
    # (vlmu_jax/launches.py): the eval loads its next model beside the one it evaluates.
    blocks = {block_key(idx, stored): callback(idx) for idx in target.addressable_devices_indices_map(stored).values()}
    with launching():
        raw = jax.make_array_from_callback(stored, target, lambda idx: blocks[block_key(idx, stored)])
    raw.block_until_ready()  # on the devices: the host copies it was made from can go (load_pretrained's budget)
    if compiled is not None:  # its program, compiled outside the launch lock (layout.compile_to_model)
        compiled.result()
    return to_model(raw, program.transpose, program.dtype, program.sharding)
