"""Models handed from one stage to the next in device memory instead of through their HF folders.

`stages` runs finetune -> unlearn -> eval in one process, and each stage used to load what the previous one had
just exported (about 20 s per save + reload at 7B). The folders are still written (they are the results users
take away); `ModelCache` also keeps the exported params on the accelerator and builds the next stage's model
from them exactly as `load_pretrained` builds it from the folder: the same config.json, the values cast to the
folder's dtype and then to the load dtype, the same sharding. Every model it hands out gets its own copy of the
arrays, since the trainer donates (and so invalidates) the arrays of the model it trains.

Held params live in pinned host memory, sharded like the model: a 7B model in bfloat16 is 13.5 GiB of host RAM
per model and nothing on the accelerator, whose memory the next stage's training needs (a full 7B finetune with
AdamW fills most of an 80 GB GPU), and copying it back takes about a second, not an export and a reload. At most
`capacity` models are held; the least recently saved or loaded goes first.

They are held as the folder stores them (HF layout, the folder's dtype), cast and transposed on the devices on
the way in and out, so that `hf_export.export_held` only streams bytes to the disk. Held in the Flax layout, the
background writer transposed every kernel with numpy on one host thread (~0.3 GB/s): at 7B a folder took 67-79 s
to write beside the next stage instead of ~20 s in the foreground (bench/NOTES.md).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.checkpoints.hf_export import merged_params, saved_config
from vlmu_jax.checkpoints.hf_import import runtime_summary
from vlmu_jax.checkpoints.layout import swapped, to_model, to_stored
from vlmu_jax.models.registry import abstract_model, hf_name_map
from vlmu_jax.models.sharding import placement


@dataclass(frozen=True)
class _Held:
    hf_config: dict  # config.json as the folder holds it
    params: dict[tuple, jax.Array]  # param path -> value as the folder stores it: HF layout, the folder's dtype


class ModelCache:
    """Folder -> the model exported there, for the stages of this process that load that folder next."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._held: OrderedDict[Path, _Held] = OrderedDict()

    def put(self, folder: Path, model: nnx.Module, dtype=None) -> None:
        """Holds `model` as `export_hf(model, folder, dtype)` wrote it (LoRA merged, cast to `dtype` if given)."""
        if self.capacity <= 0:
            return
        key = folder.resolve()
        self._held.pop(key, None)
        while len(self._held) >= self.capacity:
            self._held.popitem(last=False)
        names = hf_name_map(model)
        params = {}
        for path, value in merged_params(model).items():
            # One param at a time: its transposed device copy is gone before the next one is made (the copies to
            # the host are asynchronous, and a 7B model's worth of them would not fit beside a full finetune).
            params[path] = jax.block_until_ready(_to_host(to_stored(value, names[path].swaps(value.ndim), dtype)))
        # json round trip: tuples become lists, as in the folder's config.json
        config = json.loads(json.dumps(saved_config(model, next(iter(params.values())).dtype)))
        self._held[key] = _Held(config, params)

    def held(self, folder: Path) -> tuple[dict, dict[tuple, jax.Array]] | None:
        """(config.json as the folder holds it, the params as the folder stores them, in pinned host memory) of
        the model held for `folder`, or None: what `hf_export.export_held` writes the folder from."""
        held = self._held.get(folder.resolve())
        return None if held is None else (held.hf_config, held.params)

    def load(self, folder: Path, dtype, mesh: Mesh | None = None, **options) -> nnx.Module | None:
        """The model `load_pretrained(folder, dtype, mesh, **options)` would build, or None when not held."""
        key = folder.resolve()
        held = self._held.get(key)
        if held is None:
            return None
        self._held.move_to_end(key)
        abstract = abstract_model(held.hf_config, dtype, **options)
        paths = hf_name_map(abstract)
        graphdef, state = nnx.split(abstract)
        flat = dict(nnx.to_flat_state(state))
        for path, hp in paths.items():
            var, stored = flat[path], held.params[path]
            sharding, transpose = placement(var, mesh), hp.swaps(stored.ndim)
            on_device = _copy(stored, swapped(sharding, stored.ndim) if transpose else sharding)
            var.set_value(to_model(on_device, transpose, dtype, sharding))
        model = nnx.merge(graphdef, state)
        logging.info("%s, from memory", runtime_summary(model, folder, dtype))
        return model


def _to_host(x: jax.Array) -> jax.Array:
    """A copy of `x` in pinned host memory, sharded as `x` is."""
    return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"), may_alias=False)


def _copy(x: jax.Array, sharding) -> jax.Array:
    """A new buffer in `sharding`'s device memory (never an alias of `x`)."""
    return jax.device_put(x, sharding.with_memory_kind("device"), may_alias=False)
