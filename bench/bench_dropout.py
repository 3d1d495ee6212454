"""LoRA dropout masks on the device: what one costs (bench/NOTES.md, sessions 6-7 and 24-25).

A 7B LoRA GA step spent ~30 ms in the masks' fusions, and drawing four 16-bit lanes per Threefry block
(`layers.dropout_keep`) took only 4 ms off. This times `x * keep / (1 - rate)` at the 7B step's shapes, 20 masks
with different keys inside one program (a timed loop of separate calls measures their dispatch: session 7): as
XLA builds `dropout_keep`'s bits (`xla`, its path off a single GPU); with the blocks materialised first (an
optimization barrier between `threefry_blocks` and `keep_from_blocks`); with `jax.random.bernoulli`; with 16-bit
draws of XLA's own bit generator (`philox`: an `unsafe_rbg` key seeded from one Threefry draw, so
`lax.rng_bit_generator`, Philox on GPU, as PyTorch's dropout uses; its bits depend on the sharding); with
`hashed`: two rounds of a 32-bit integer mixer keyed by the Threefry key's words, two 16-bit lanes per element
pair (about a sixth of Threefry's integer work per element); and with `kernel`: the same bits as `xla` from one
Pallas kernel per mask (models/dropout_kernel.py; what `dropout_keep` runs on one GPU).
Then the kernel alone (`what: mask_kernel`: 20 masks written, one element of each read, so nothing fuses into it),
at its default tiling and at each of MASK_TILINGS (`rows,blocks,warps;...`, the same bits whatever the tiling), beside
the time to write its bytes at the device's copy bandwidth: whether the kernel waits on its Threefry hashing or on
its writes (call 93: 0.043 ms per [4, 704, 4096] mask with the masked sum, ~4x its bytes' floor); and with 16
and 12 of Threefry's 20 rounds (other bits: how much of its time is hashing).
Run from the repo root: `PYTHONPATH=. python bench/bench_dropout.py`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vlmu_jax.models.dropout_kernel import keep_mask
from vlmu_jax.models.layers import flat_index, keep_from_blocks, threefry_blocks

RATE = 0.05
_TILINGS = os.environ.get("MASK_TILINGS", "32,64,4;64,32,4;64,128,8;128,64,8;64,64,8;16,256,4")
MASK_TILINGS = tuple(tuple(int(v) for v in t.split(",")) for t in _TILINGS.split(";") if t)


def xla_keep(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """`dropout_keep`'s bits through XLA's fusions (what it runs off a single GPU)."""
    return keep_from_blocks(threefry_blocks(rng, shape), shape, rate)


def materialised(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    return keep_from_blocks(jax.lax.optimization_barrier(threefry_blocks(rng, shape)), shape, rate)


def philox(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    seed = jax.random.bits(rng, (), jnp.uint32)
    return jax.random.bits(jax.random.key(seed, impl="unsafe_rbg"), shape, jnp.uint16) >= round(rate * 65536)


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash (Wellons' lowbias32): xor-shifts and two odd multiplies."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hashed(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    k = jax.random.key_data(rng)
    *lead, d = shape
    count = flat_index((*lead, -(-d // 2)))
    bits = _mix32(_mix32(count ^ k[0]) + k[1])
    lanes = jnp.stack([bits & jnp.uint32(0xFFFF), bits >> 16], axis=-1).reshape(*lead, -1)[..., :d]
    return lanes >= jnp.uint32(round(rate * 65536))


def bernoulli(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    return jax.random.bernoulli(rng, 1.0 - rate, shape)


def main() -> None:
    key = jax.random.key(0)
    for shape in ((4, 704, 4096), (4, 704, 11008)):
        x = jnp.ones(shape, jnp.bfloat16)
        # the kernel as the GPU compiles it must give XLA's bits (its tests run it interpreted on a CPU)
        same = bool(jnp.array_equal(keep_mask(key, shape, RATE), xla_keep(key, shape, RATE)))
        print(json.dumps({"what": "dropout_kernel_bits", "shape": shape, "same_as_xla": same}), flush=True)
        for name, keep in (("xla", xla_keep), ("blocks_materialised", materialised),
                           ("bernoulli", bernoulli), ("philox", philox), ("hashed", hashed), ("kernel", keep_mask)):
            def masks(x: jax.Array, k: jax.Array, keep=keep) -> jax.Array:
                def one(i: int, total: jax.Array) -> jax.Array:
                    kept = jnp.where(keep(jax.random.fold_in(k, i), x.shape, RATE), x / (1 - RATE), 0)
                    return total + kept.astype(jnp.float32).sum()

                return jax.lax.fori_loop(0, 20, one, jnp.float32(0))

            print(json.dumps({"what": "dropout", "how": name, "shape": shape,
                              "ms": round(per_mask_ms(jax.jit(masks), x, key), 3)}), flush=True)
        floor_ms = x.size / 4.3e12 * 1e3  # one byte per element at ~4.3 TB/s (KINDS.md)
        # fewer Threefry rounds (other bits: their time only says how much of the kernel's is hashing)
        for how in ({}, *({"block_rows": r, "block_cols": c, "warps": w} for r, c, w in MASK_TILINGS),
                    {"groups": 4}, {"groups": 3}):

            def written(x: jax.Array, k: jax.Array, how=how) -> jax.Array:
                def one(i: int, total: jax.Array) -> jax.Array:
                    mask = keep_mask(jax.random.fold_in(k, i), x.shape, RATE, **how)
                    return total + mask[0, 0, 0].astype(jnp.float32)

                return jax.lax.fori_loop(0, 20, one, jnp.float32(0))

            same = bool(jnp.array_equal(keep_mask(key, shape, RATE, **how), xla_keep(key, shape, RATE)))
            print(json.dumps({"what": "mask_kernel", "how": how or "default", "shape": shape, "same_bits": same,
                              "ms": round(per_mask_ms(jax.jit(written), x, key), 4),
                              "bytes_floor_ms": round(floor_ms, 4)}), flush=True)


def per_mask_ms(f: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, key: jax.Array) -> float:
    """Milliseconds per mask of `f` (20 masks per call), over five calls after one to compile."""
    jax.block_until_ready(f(x, key))
    t0 = time.perf_counter()
    for n in range(5):
        out = f(x, jax.random.fold_in(key, n))
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / 100 * 1e3


if __name__ == "__main__":
    main()
