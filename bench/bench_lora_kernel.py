"""LoRA's dropout and down-product on the device: one kernel (models/lora_kernel.py) against XLA's path (the mask
kernel, a select writing the masked input, cuBLAS's gemm), at LLaVA-7B's LoRA inputs (4 x 704 tokens, 4096 and
11008 wide, rank 128), 20 inputs with different keys in one program (a timed loop of separate calls would measure
their dispatch: bench/NOTES.md session 7), each giving (h, keep) as the step's forward keeps them.

Also the kernel at each of LORA_TILINGS (`rows,blocks,warps,stages,programs;...`: the same mask, the product
summed in another order), with 12 of Threefry's 20 rounds (other bits), and the bytes floor (x read, the mask
written, at 4.3 TB/s): whether the kernel waits on its memory or on its Threefry hashing (the mask kernel alone
did not, session 27's call 95; this one also multiplies).
Run from the repo root: `PYTHONPATH=. python bench/bench_lora_kernel.py`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vlmu_jax.models import lora_kernel
from vlmu_jax.models.dropout_kernel import keep_mask

RATE, RANK, COPIES = 0.05, 128, 20
_TILINGS = os.environ.get("LORA_TILINGS", "64,32,4,3,264;64,32,4,2,264;64,64,8,2,528;32,64,4,2,528;64,64,4,2,132")
LORA_TILINGS = tuple(tuple(int(v) for v in t.split(",")) for t in _TILINGS.split(";") if t)


def unfused(x: jax.Array, a: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    keep = keep_mask(rng, x.shape, RATE)
    return lora_kernel.reference(x, a, keep, RATE), keep


def fused(**tiling: int) -> Callable:
    def call(x: jax.Array, a: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        return lora_kernel.fused_call(x, a, jax.random.key_data(rng).astype(jnp.uint32), rate=RATE, **tiling)
    return call


def per_input_ms(fn: Callable, x: jax.Array, a: jax.Array) -> float:
    """Milliseconds per input: COPIES inputs' (h, keep) in one program (different keys), median of 5 calls."""
    @jax.jit
    def program(x, a):
        hs, keeps = zip(*(fn(x, a, jax.random.key(i)) for i in range(COPIES)), strict=True)
        return jnp.stack(hs), keeps
    jax.block_until_ready(program(x, a))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(program(x, a))
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[2] / COPIES


def main() -> None:
    print(json.dumps({"what": "device", "device": str(jax.devices()[0])}), flush=True)
    for d in (4096, 11008):
        x = jax.random.normal(jax.random.key(1), (2816, d)).astype(jnp.bfloat16)
        a = (0.05 * jax.random.normal(jax.random.key(2), (d, RANK))).astype(jnp.bfloat16)
        floor_ms = 1e3 * (2816 * d * 3) / 4.3e12
        rows = [("unfused", unfused), ("fused", fused()), ("fused, 12 rounds", fused(groups=3))]
        rows += [("fused " + ",".join(map(str, t)), fused(**dict(zip(
            ("block_rows", "block_cols", "warps", "stages", "programs"), t, strict=True)))) for t in LORA_TILINGS]
        for name, fn in rows:
            try:
                ms = per_input_ms(fn, x, a)
            except Exception as e:  # noqa: BLE001 -- a tiling Triton cannot compile is reported, not fatal
                print(json.dumps({"what": name, "d": d, "error": str(e)[:300]}), flush=True)
                continue
            print(json.dumps({"what": name, "d": d, "ms_per_input": ms, "bytes_floor_ms": floor_ms}), flush=True)


if __name__ == "__main__":
    main()
