"""Host memory and time of models held between stages (`checkpoints.in_memory.ModelCache`).

Why: the pipeline at Llama-3.2-11B-Vision's shape (bench/RESULTS.md, session 17, call 56) peaked at 98.5 GB of
host memory with two 18 GB models held, when held params lived in the devices' `pinned_host` memory space (on a
GPU, XLA's pinned-host BFC pool, which grows by doubling regions up to XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, 64 GiB
by default, and never gives memory back). This times `put` (device -> host) of a random model at the released
shape three times (the third drops the first: capacity 2) and `load` (host -> device) of the two held, and reads
the process's resident set and the system's shared memory (where pinned pages show) after each.
`--kind pinned_host` holds the params in that memory space instead of pageable numpy blocks, as before.
`--copy direct` copies each param straight into pageable memory (session 17's way; ~1.9 GB/s on an H200, no
faster with 8 params' copies at once, call 59) instead of through a pinned staging buffer (`_HostCopier`).
`--load direct` copies each loaded param straight from its numpy blocks to the devices instead of building it in
pinned_host first (`HostCopy.on_devices`; call 61 compared the two).

    PYTHONPATH=. python bench/bench_held_models.py [--kind pageable|pinned_host] [--family mllama|idefics2]
        [--copy staged|direct] [--load staged|direct]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bench import family_shapes
from bench.bench_pipeline import host_peak_gb
from vlmu_jax.checkpoints import in_memory
from vlmu_jax.models.registry import init_model

SHAPES = {"mllama": family_shapes.MLLAMA, "idefics2": family_shapes.IDEFICS2}


def _gb(file: str, field: str) -> float:
    """A `field: N kB` line of a /proc file, in GB."""
    line = next(ln for ln in Path(file).read_text().splitlines() if ln.startswith(field + ":"))
    return round(int(line.split()[1]) / 2**20, 1)


def memory() -> dict[str, float]:
    return {"rss_gb": _gb("/proc/self/status", "VmRSS"), "rss_peak_gb": round(host_peak_gb(), 1),
            "shmem_gb": _gb("/proc/meminfo", "Shmem")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="pageable", choices=("pageable", "pinned_host"))
    parser.add_argument("--family", default="mllama", choices=sorted(SHAPES))
    parser.add_argument("--copy", default="staged", choices=("staged", "direct"))
    parser.add_argument("--load", default="staged", choices=("staged", "direct"))
    args = parser.parse_args()
    device = jax.devices()[0]
    print(json.dumps({"memories": [m.kind for m in device.addressable_memories()], "kind": args.kind,
                      "copy": args.copy, "load": args.load}), flush=True)
    if args.load == "direct":  # loads as before a7fbc90: built where the blocks were held, then moved
        def on_devices(self, sharding):
            x = jax.make_array_from_callback(self.shape, self.sharding,
                                             lambda index: self.blocks[in_memory._block_key(index, self.shape)])
            return jax.device_put(x, sharding.with_memory_kind("device"), may_alias=False)

        in_memory.HostCopy.on_devices = on_devices
    if args.copy == "direct":
        in_memory._HostCopier.copies = lambda self, arrays: map(in_memory.HostCopy.of, arrays)

    if args.kind == "pinned_host":  # held as before session 17: jax arrays in that memory space
        class Pinned:
            def __init__(self, x: jax.Array):
                self.x = jax.block_until_ready(
                    jax.device_put(x, x.sharding.with_memory_kind("pinned_host"), may_alias=False))
                self.dtype, self.ndim = self.x.dtype, self.x.ndim

            def on_devices(self, sharding) -> jax.Array:
                return jax.device_put(self.x, sharding, may_alias=False)

        in_memory._HostCopier.copies = lambda self, arrays: map(Pinned, arrays)
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
