"""LoRA dropout's keep mask as one kernel (Pallas on Triton, GPU): the bits of `layers.dropout_keep`, hashed and
compared where they are written.

Why: XLA builds `dropout_keep`'s mask in two passes. One fusion hashes the Threefry-2x32 blocks of every mask a
layer draws and writes both words of each block as uint32 arrays (138 MB per LLaVA-7B layer for its six 4096-wide
masks at 4 x 704 tokens); concatenate fusions read them back, split the 16-bit lanes, compare them and write the
boolean masks, since the four lanes of a block land on four neighbouring elements (bench/NOTES.md, session 24:
call 92's HLO of call 87's trace, ~6.8 ms of a 0.18 s GA step). Here each program hashes a tile of blocks and
stores the four lanes' comparisons straight into the mask: the mask's bytes are written once and nothing is
read. Measured on an H200 (bench/RESULTS.md, session 25, call 93): the same bits as XLA's path, compiled; per
LLaVA-7B step GA 0.1822 -> 0.1768 s, NPO 0.4243 -> 0.4198 s, for 1.3-1.4 GB more peak memory.

Same bits as `layers.dropout_keep` for a Threefry key: block c of row r (the flat count r * q + c, q = ceil(d / 4)
blocks over the mask's last axis d) gives lanes (hi & 0xFFFF, hi >> 16, lo & 0xFFFF, lo >> 16) to elements c,
q + c, 2q + c and 3q + c, each kept where its lane is >= round(rate * 65536) (tests/test_dropout.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_ROWS = 64  # mask rows (tokens) per program
BLOCK_COLS = 64  # Threefry blocks (four mask elements each) per row and program: 64 x 64 x 4 = 16 KB of mask
WARPS = 4
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's 20 rounds in five groups of four
GROUPS = 5  # jax's Threefry-2x32: fewer give other bits (the benches' is-it-hash-bound variants)


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array,
                 groups: int = GROUPS) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds) of the counts (x0, x1) under the key (k0, k1), as jax's `threefry2x32_p`
    computes it; uint32 throughout, so it runs inside a kernel as well as outside. `groups` of four rounds other
    than GROUPS give other bits: for `bench/bench_dropout.py` to time whether the kernel waits on its hashing."""
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for group in range(groups):
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0, x1 = x0 + ks[(group + 1) % 3], x1 + ks[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def _kernel(key_ref, out_ref, *, blocks: int, threshold: int, block_rows: int, block_cols: int,
            groups: int) -> None:
    """Program (i, j): rows [i * block_rows, ...) and Threefry blocks [j * block_cols, ...) of the mask, stored
    as [rows, 4, blocks] (the row's four quarters: the mask's own element order)."""
    # uint32 throughout (an int32 program id would promote the counts to int32: arithmetic shifts, other bits)
    first_row = pl.program_id(0).astype(jnp.uint32) * jnp.uint32(block_rows)
    first_col = pl.program_id(1).astype(jnp.uint32) * jnp.uint32(block_cols)
    rows = first_row + jax.lax.broadcasted_iota(jnp.uint32, (block_rows, block_cols), 0)
    cols = first_col + jax.lax.broadcasted_iota(jnp.uint32, (block_rows, block_cols), 1)
    hi, lo = threefry2x32(key_ref[0], key_ref[1], jnp.zeros_like(rows), rows * jnp.uint32(blocks) + cols, groups)
    lane = jax.lax.broadcasted_iota(jnp.int32, (block_rows, 4, block_cols), 1)
    word = jnp.where(lane < 2, hi[:, None, :], lo[:, None, :])
    bits = jnp.where(lane % 2 == 0, word & jnp.uint32(0xFFFF), word >> jnp.uint32(16))
    out_ref[...] = bits >= jnp.uint32(threshold)


@functools.partial(jax.jit, static_argnames=("shape", "rate", "interpret", "block_rows", "block_cols", "warps",
                                             "groups"))
def keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float, *, interpret: bool = False,
              block_rows: int = BLOCK_ROWS, block_cols: int = BLOCK_COLS, warps: int = WARPS,
              groups: int = GROUPS) -> jax.Array:
    """`layers.dropout_keep(rng, shape, rate)` for a Threefry key, as one kernel; `interpret` runs it through
    Pallas's interpreter (CPU tests). The tiling (rows and Threefry blocks per program, warps) gives the same bits
    whatever it is: `bench/bench_dropout.py` times others (MASK_TILINGS), and fewer rounds (`groups`, other bits)."""
    *lead, d = shape
    rows, blocks = math.prod(lead), -(-d // 4)
    if rows * blocks >= 2**32:
        raise ValueError(f"dropout mask of shape {shape} has 2**32 Threefry blocks or more")
    out = pl.pallas_call(
        functools.partial(_kernel, blocks=blocks, threshold=round(rate * 65536), block_rows=block_rows,
                          block_cols=block_cols, groups=groups),
        grid=(pl.cdiv(rows, block_rows), pl.cdiv(blocks, block_cols)),
        in_specs=[pl.BlockSpec((2,), lambda i, j: (0,))],
        out_specs=pl.BlockSpec((block_rows, 4, block_cols), lambda i, j: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((rows, 4, blocks), jnp.bool_),
        compiler_params=plgpu.CompilerParams(num_warps=warps),
        interpret=interpret,
        name="dropout_keep_mask",
    )(jax.random.key_data(rng).astype(jnp.uint32))
    return out.reshape(rows, 4 * blocks)[:, :d].reshape(shape)
