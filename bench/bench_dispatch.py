"""What a jitted call costs per argument array on this host and device (bench/NOTES.md, session 7).

The 7B log-prob call over eval's per-layer weight copies (327 arrays) left the device idle ~13 ms between two
calls, against 2.4 ms over the stacked scan (39 arrays); generation over per-call slices, also unrolled but
taking the 39 stacked arrays, idled 2 ms. So the idle follows the number of argument arrays, not the unrolled
program. On this project's CPU, jax.jit's dispatch of 327 used arguments costs 0.16 ms, far below that. This
times a program that reads one element of each of N arrays (no real device work), synchronised each call and
dispatched back to back, for N = 39, 327 and 1000, each array a 16 MiB bf16 [4096, 2048] matrix.
Run from the repo root: `PYTHONPATH=. python bench/bench_dispatch.py` (XLA_FLAGS as the bench under test).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp


def per_call_us(fn, args: tuple, n: int, sync: bool) -> float:
    """Mean microseconds per call over `n` calls, each waited for (`sync`) or all dispatched before one wait."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn(*args)
        if sync:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    arrays = [jnp.full((4096, 2048), i, jnp.bfloat16) for i in range(1000)]
    jax.block_until_ready(arrays)
    touch = jax.jit(lambda xs, y: y + sum(x[0, 0].astype(jnp.float32) for x in xs))
    y = jnp.zeros((4,), jnp.float32)
    for n_args in (39, 327, 1000):
        args = (arrays[:n_args], y)
        print(json.dumps({"what": "dispatch", "n_args": n_args, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                          "sync_us": round(per_call_us(touch, args, 200, True), 1),
                          "async_us": round(per_call_us(touch, args, 200, False), 1)}), flush=True)


if __name__ == "__main__":
    main()
