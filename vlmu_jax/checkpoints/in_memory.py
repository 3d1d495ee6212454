"""Models handed from one stage to the next in memory instead of through their HF folders.

`stages` runs finetune -> unlearn -> eval in one process, and each stage used to load what the previous one had
just exported (about 20 s per save + reload at 7B). The folders are still written (they are the results users
take away); `ModelCache` also keeps the exported params in host memory and builds the next stage's model
from them exactly as `load_pretrained` builds it from the folder: the same config.json, the values cast to the
folder's dtype and then to the load dtype, the same sharding. Every model it hands out gets its own copy of the
arrays, since the trainer donates (and so invalidates) the arrays of the model it trains.

Held params live in the host's ordinary (pageable) memory, one numpy block per distinct shard this process
holds (`HostCopy`): a 7B model in bfloat16 is 13.5 GiB of host RAM per model and nothing on the accelerator,
whose memory the next stage's training needs (a full 7B finetune with AdamW fills most of an 80 GB GPU), and
copying it back takes seconds, not an export and a reload. At most `capacity` models are held; the least recently
saved or loaded goes first. Not the devices' `pinned_host` memory space: on a GPU that is XLA's pinned-host pool,
which grows by doubling regions up to a 64 GiB cap (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB) and never gives memory
back; at Llama-3.2-11B-Vision's shape two held 19.9 GB models took the whole 64 GiB, their first copies out took
26.4 s and 18.4 s while the pool grew, and the pipeline's host peak reached 98.5 GB (bench/RESULTS.md, session 17).
That space still serves as a staging area (`_HostCopier`): a copy from the devices into pageable memory ran at
~1.7 GB/s on an H200 (11.6-13.5 s per 11B model, with or without several copies at once), one into pinned memory
at ~40 GB/s, and host threads then copy each staged param into its numpy block, so that a put after the first took
1.8-2.4 s; only the params in flight (two at a time) are pinned, a pool of 10 GB at 11B (bench/RESULTS.md,
session 18). Loads build each param there before copying it to the devices.

They are held as the folder stores them (HF layout, the folder's dtype), cast and transposed on the devices on
the way in and out, so that `hf_export.export_held` only streams bytes to the disk. Held in the Flax layout, the
background writer transposed every kernel with numpy on one host thread (~0.3 GB/s): at 7B a folder took 67-79 s
to write beside the next stage instead of ~20 s in the foreground (bench/NOTES.md).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, Sharding

from vlmu_jax.checkpoints.hf_export import merged_params, saved_config
from vlmu_jax.checkpoints.hf_import import runtime_summary
from vlmu_jax.checkpoints.layout import ToModel, block_key, compile_to_model, to_model, to_stored
from vlmu_jax.launches import launching
from vlmu_jax.models.registry import abstract_model, hf_name_map
from vlmu_jax.models.sharding import placement


def _distinct_shards(x: jax.Array) -> dict[tuple[tuple[int, int], ...], jax.Array]:
    """The data of each distinct block of `x` this process holds (a block replicated over devices once)."""
    distinct = {}
    for shard in x.addressable_shards:
        distinct.setdefault(block_key(shard.index, x.shape), shard.data)
    return distinct


# The largest param (this process's blocks of it) copied through pinned_host: XLA's pinned pool keeps what it grew
# to, up to a 64 GiB cap, and two params are staged at a time. Llama-3.2-11B-Vision's largest is 3.3 GB; a 90B
# model's stacked MLP kernels (~38 GB each) go the slow way rather than fill the pool.
STAGE_MAX_BYTES = 8 << 30


def _staged(sharding: Sharding, nbytes: int) -> bool:
    """Whether a param of `nbytes` on this process goes through pinned_host: where the devices of `sharding` have
    that memory space (GPUs, TPUs and the CPU backend do) and it is at most STAGE_MAX_BYTES."""
    kinds = {m.kind for m in next(iter(sharding.device_set)).addressable_memories()}
    return "pinned_host" in kinds and nbytes <= STAGE_MAX_BYTES


def _own(x: jax.Array) -> np.ndarray:
    """`x`'s value in host memory of its own (on the CPU backend `np.asarray` is a view of the device buffer)."""
    host = np.asarray(x)
    return host.copy() if x.platform() == "cpu" else host


@dataclass(frozen=True)
class HostCopy:
    """A device array's value in the host's pageable memory: one numpy block per distinct shard this process holds
    (a block replicated over several devices is held once), and the placement it had on the devices."""

    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: Sharding
    blocks: dict[tuple[tuple[int, int], ...], np.ndarray]

    @classmethod
    def of(cls, x: jax.Array) -> HostCopy:
        """`x`'s value copied straight into pageable memory (see `_HostCopier` for the faster way out)."""
        distinct = _distinct_shards(x)
        for data in distinct.values():  # every block's transfer under way before the first is waited for
            data.copy_to_host_async()
        return cls(tuple(x.shape), np.dtype(x.dtype), x.sharding, {k: _own(d) for k, d in distinct.items()})

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_fully_addressable(self) -> bool:
        return self.sharding.is_fully_addressable

    def on_devices(self, sharding: Sharding) -> jax.Array:
        """A new array of this value, placed by `sharding` (built where it was, then moved if that differs).

        Built in the devices' pinned_host space first where they have one: at 11B a load took 3.9 / 1.9 s so,
        5.9 / 2.5 s straight from pageable memory, and the pinned pool did not grow (bench/RESULTS.md, call 61).
        Copied while no other thread launches or copies (vlmu_jax/launches.py): the eval loads its next model
        beside the one it evaluates."""
        staged = _staged(self.sharding, sum(b.nbytes for b in self.blocks.values()))
        source = self.sharding.with_memory_kind("pinned_host") if staged else self.sharding
        with launching():
            x = jax.make_array_from_callback(self.shape, source,
                                             lambda index: self.blocks[block_key(index, self.shape)])
            # may_alias=False: on the CPU backend `x` may share the held blocks' memory, and the trainer donates
            # the arrays of the model it trains
            return jax.device_put(x, sharding.with_memory_kind("device"), may_alias=False)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole value, from a process that holds every block of it (the background writer's case)."""
        whole = self.blocks.get(tuple((0, n) for n in self.shape))
        if whole is None:
            whole = np.empty(self.shape, self.dtype)
            for key, block in self.blocks.items():
                whole[tuple(slice(*k) for k in key)] = block
        elif copy:  # the held block itself otherwise
            whole = whole.copy()
        return whole if dtype is None else whole.astype(dtype)


class _HostCopier:
    """Device arrays -> `HostCopy`s through the devices' `pinned_host` memory space, two arrays in flight.

    Why staged: a device -> pageable copy ran at ~1.7 GB/s on an H200, a device -> pinned one at ~40 GB/s, and a
    pinned -> pageable copy runs on the host's cores in parallel. The staged array is dropped once its blocks are
    copied out, so XLA's pinned pool only grows to the params in flight. Where the devices have no pinned_host
    space, or a param is larger than STAGE_MAX_BYTES, it is copied straight into pageable memory (`HostCopy.of`).
    """

    _THREADS = min(8, os.cpu_count() or 1)
    _CHUNK = 64 << 20  # bytes per host thread's share of a block's copy, at least

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool

    def copies(self, arrays: Iterable[jax.Array]) -> Iterator[HostCopy]:
        """A `HostCopy` of each array, in order; an array's transfer starts before the previous one is copied out
        (the iterable is read one ahead, so make each array as it is read to bound the device memory)."""
        staged = None
        for x in arrays:
            if _staged(x.sharding, sum(d.nbytes for d in _distinct_shards(x).values())):
                # may_alias=False: on the CPU backend the staged array could otherwise be `x` itself
                upcoming = (x.sharding, jax.device_put(x, x.sharding.with_memory_kind("pinned_host"),
                                                       may_alias=False))
            else:
                upcoming = None
            if staged is not None:
                yield self._copy_out(*staged)
            if upcoming is None:
                yield HostCopy.of(x)
            staged = upcoming
        if staged is not None:
            yield self._copy_out(*staged)

    def _copy_out(self, sharding: Sharding, staged: jax.Array) -> HostCopy:
        blocks = {key: self._block(np.asarray(data)) for key, data in _distinct_shards(staged).items()}
        return HostCopy(tuple(staged.shape), np.dtype(staged.dtype), sharding, blocks)

    def _block(self, src: np.ndarray) -> np.ndarray:
        """A pageable copy of `src` (a view of pinned memory on a GPU), its bytes split over the host threads."""
        dst = np.empty_like(src)
        src_bytes, dst_bytes = src.reshape(-1).view(np.uint8), dst.reshape(-1).view(np.uint8)
        parts = max(1, min(self._THREADS, src_bytes.size // self._CHUNK))
        bounds = np.linspace(0, src_bytes.size, parts + 1).astype(int)
        list(self.pool.map(lambda i: np.copyto(dst_bytes[bounds[i]:bounds[i + 1]], src_bytes[bounds[i]:bounds[i + 1]]),
                           range(parts)))
        return dst


@dataclass(frozen=True)
class _Held:
    hf_config: dict  # config.json as the folder holds it
    params: dict[tuple, HostCopy]  # param path -> value as the folder stores it: HF layout, the folder's dtype


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
        merged = merged_params(model)
        # Each param's transposed device copy is made as the copier reads it, so two are on the devices at a time
        # (a 7B model's worth of them would not fit beside a full finetune).
        stored = (to_stored(value, names[path].swaps(value.ndim), dtype) for path, value in merged.items())
        with ThreadPoolExecutor(_HostCopier._THREADS) as pool:
            params = dict(zip(merged, _HostCopier(pool).copies(stored), strict=True))
        # json round trip: tuples become lists, as in the folder's config.json
        config = json.loads(json.dumps(saved_config(model, next(iter(params.values())).dtype)))
        self._held[key] = _Held(config, params)

    def held(self, folder: Path) -> tuple[dict, dict[tuple, HostCopy]] | None:
        """(config.json as the folder holds it, the params as the folder stores them, in host memory) of
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
        programs = {path: ToModel(tuple(held.params[path].shape), jnp.dtype(held.params[path].dtype),
                                  hp.swaps(held.params[path].ndim), jnp.dtype(dtype), placement(flat[path], mesh))
                    for path, hp in paths.items()}
        with ThreadPoolExecutor(_HostCopier._THREADS, thread_name_prefix="load-compile") as pool:
            compiled = compile_to_model(programs.values(), pool)
            for path, p in programs.items():
                on_device = held.params[path].on_devices(p.stored_sharding)
                if p in compiled:
                    compiled[p].result()
                flat[path].set_value(to_model(on_device, p.transpose, dtype, p.sharding))
        model = nnx.merge(graphdef, state)
        logging.info("%s, from memory", runtime_summary(model, folder, dtype))
        return model
