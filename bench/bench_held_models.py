"""Host memory and time of models held between stages (`checkpoints.in_memory.ModelCache`).

Why: the pipeline at Llama-3.2-11B-Vision's shape (bench/RESULTS.md, session 17, call 56) peaked at 98.5 GB of
host memory with two 18 GB models held, when held params lived in the devices' `pinned_host` memory space (on a
GPU, XLA's pinned-host BFC pool, which grows by doubling regions up to XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, 64 GiB
by default, and never gives memory back). This times `put` (device -> host) of a random model at the released
shape three times (the third drops the first: capacity 2) and `load` (host -> device) of the two held, and reads
the process's resident set and the system's shared memory (where pinned pages show) after each.
`--kind pinned_host` holds the params in that memory space instead of pageable numpy blocks, as before.
`--copy` picks how a put copies pageable blocks out (session 18; pageable puts ran at ~1.9 GB/s in call 58):
`serial` (one param's copy waited for before the next), `threads` (`--threads` params' copies at once),
`staged` (each param through the devices' `pinned_host` space, then into its numpy block), `staged_threads`.

    PYTHONPATH=. python bench/bench_held_models.py [--kind pageable|pinned_host] [--family mllama|idefics2]
        [--copy serial|threads|staged|staged_threads] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp

from bench import family_shapes
from bench.bench_pipeline import host_peak_gb
from vlmu_jax.checkpoints import in_memory
from vlmu_jax.checkpoints.hf_export import merged_params, saved_config
from vlmu_jax.checkpoints.layout import to_stored
from vlmu_jax.models.registry import hf_name_map, init_model

SHAPES = {"mllama": family_shapes.MLLAMA, "idefics2": family_shapes.IDEFICS2}
_PAGEABLE_OF = in_memory.HostCopy.of  # the tree's copy, before --copy replaces it


def _gb(file: str, field: str) -> float:
    """A `field: N kB` line of a /proc file, in GB."""
    line = next(ln for ln in Path(file).read_text().splitlines() if ln.startswith(field + ":"))
    return round(int(line.split()[1]) / 2**20, 1)


def memory() -> dict[str, float]:
    return {"rss_gb": _gb("/proc/self/status", "VmRSS"), "rss_peak_gb": round(host_peak_gb(), 1),
            "shmem_gb": _gb("/proc/meminfo", "Shmem")}


def _staged_of(x: jax.Array) -> in_memory.HostCopy:
    """`HostCopy.of` through the devices' pinned_host space: a fast device -> pinned copy, then pinned -> numpy."""
    pinned = jax.device_put(x, x.sharding.with_memory_kind("pinned_host"), may_alias=False)
    held = _PAGEABLE_OF(pinned)
    return in_memory.HostCopy(held.shape, held.dtype, x.sharding, held.blocks)


def _threaded_put(threads: int):
    """`ModelCache.put` with `threads` params' copies under way at once."""
    def put(self, folder, model, dtype=None) -> None:
        key = folder.resolve()
        self._held.pop(key, None)
        while len(self._held) >= self.capacity:
            self._held.popitem(last=False)
        names = hf_name_map(model)
        with ThreadPoolExecutor(threads) as pool:
            futures = {path: pool.submit(lambda v=value, p=path: in_memory.HostCopy.of(
                to_stored(v, names[p].swaps(v.ndim), dtype))) for path, value in merged_params(model).items()}
            params = {path: f.result() for path, f in futures.items()}
        config = json.loads(json.dumps(saved_config(model, next(iter(params.values())).dtype)))
        self._held[key] = in_memory._Held(config, params)
    return put


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="pageable", choices=("pageable", "pinned_host"))
    parser.add_argument("--family", default="mllama", choices=sorted(SHAPES))
    parser.add_argument("--copy", default="serial", choices=("serial", "threads", "staged", "staged_threads"))
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(json.dumps({"memories": [m.kind for m in device.addressable_memories()], "kind": args.kind,
                      "copy": args.copy, "threads": args.threads}), flush=True)
    if args.copy.startswith("staged"):
        in_memory.HostCopy.of = staticmethod(_staged_of)
    if args.copy.endswith("threads"):
        in_memory.ModelCache.put = _threaded_put(args.threads)

    if args.kind == "pinned_host":  # held as before session 17: jax arrays in that memory space
        class Pinned:
            def __init__(self, x: jax.Array):
                self.x = jax.block_until_ready(
                    jax.device_put(x, x.sharding.with_memory_kind("pinned_host"), may_alias=False))
                self.dtype, self.ndim = self.x.dtype, self.x.ndim

            of = classmethod(lambda cls, x: cls(x))

            def on_devices(self, sharding) -> jax.Array:
                return jax.device_put(self.x, sharding, may_alias=False)

        in_memory.HostCopy = Pinned
    t0 = time.perf_counter()
    model = init_model(SHAPES[args.family], seed=0, dtype=jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(model))
    print(json.dumps({"init_s": round(time.perf_counter() - t0, 1), "model_gb": round(nbytes / 2**30, 1),
                      **memory()}), flush=True)
    cache = in_memory.ModelCache(2)
    folders = [Path(f"/tmp/held_{i}") for i in range(3)]
    for folder in folders:  # the third put drops the first model: does its memory come back?
        t0 = time.perf_counter()
        cache.put(folder, model)
        print(json.dumps({"put": folder.name, "s": round(time.perf_counter() - t0, 2), **memory()}), flush=True)
    del model
    for folder in folders[1:]:
        t0 = time.perf_counter()
        loaded = cache.load(folder, jnp.bfloat16)
        jax.block_until_ready(jax.tree.leaves(loaded))
        print(json.dumps({"load": folder.name, "s": round(time.perf_counter() - t0, 2), **memory()}), flush=True)
        del loaded


if __name__ == "__main__":
    main()
