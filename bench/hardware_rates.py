"""The device's own ceilings, measured in the same call as the benchmarks they are the floor of: the bf16 matmul
rate (an 8192^3 product on random data, as KINDS.md's figures are) and the device-to-device copy bandwidth (bytes
read plus written), through JAX.

Why: every "share of the matmul rate" in bench/RESULTS.md divides by one of these, and a share against another
card's, or another stack's, figure is not a share. KINDS.md gives ~790 TFLOP/s through PyTorch for both an H100 and
an H200 of this workplace, and 3.0 against 4.3 TB/s; through JAX an H100 gave 728 TFLOP/s and 2.91 TB/s (session
32). Run from the repo root: `PYTHONPATH=. python bench/hardware_rates.py`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from bench.bench_jax_llava import timeit

N = 8192  # the matmul's side
COPY_BYTES = 2**32  # 4 GiB copied per call
REPEATS = 10  # products (copies) per timed program: one call's dispatch is then noise


def matmul_tflops() -> float:
    """bf16 [N, N] @ [N, N] products, float32 accumulation, REPEATS per program (each on its own left operand, so
    XLA cannot share them)."""
    a = jax.random.normal(jax.random.key(0), (REPEATS, N, N), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (N, N), jnp.bfloat16)
    program = jax.jit(lambda a, b: jnp.einsum("rij,jk->rik", a, b))
    return REPEATS * 2 * N**3 / timeit(lambda: program(a, b)) / 1e12


def copy_tbps() -> float:
    """A 4 GiB array added to a scalar REPEATS times in one program (a memory-bound elementwise pass reads and
    writes each byte once: what a fusion of the step pays)."""
    x = jnp.zeros((COPY_BYTES // 2,), jnp.bfloat16)

    def program(x):
        for _ in range(REPEATS):
            x = x + jnp.bfloat16(1)
            x = jax.lax.optimization_barrier(x)  # one pass each, not one fused pass
        return x

    program = jax.jit(program)
    return REPEATS * 2 * COPY_BYTES / timeit(lambda: program(x)) / 1e12


def main() -> None:
    print(json.dumps({"what": "hardware", "device": jax.devices()[0].device_kind,
                      "bf16_matmul_tflops": round(matmul_tflops(), 1), "copy_tbps": round(copy_tbps(), 2)}),
          flush=True)


if __name__ == "__main__":
    main()
