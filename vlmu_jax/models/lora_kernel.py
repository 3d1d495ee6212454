"""LoRA's dropout and down-product in one kernel (Pallas on Triton, GPU): h = (x * keep / (1 - rate)) @ A with the
keep mask hashed where x is read, written once (one byte an element, 1 kept / 0 dropped) for the backward.

Why: XLA runs a LoRA input's dropout as three passes before the rank-r product: the mask kernel
(`dropout_kernel.keep_mask`) writes the mask, a select fusion reads x and the mask and writes the masked input,
and cuBLAS reads that again in a split-K gemm whose float32 partials a reduce fusion adds up. Per LLaVA-7B layer
at 4 x 704 tokens that is ~100 MB of traffic per 4096-wide input and ~270 MB for the 11008-wide one, where x
itself is 23 / 62 MB; together the masks and their selects cost 7.5 ms of a 0.174 s GA step (bench/RESULTS.md,
session 28, call 98: all-kept masks against the default). Here each program reads its rows of x once, hashes the
mask beside the loads, writes the mask (the backward's) and multiplies the kept, scaled tile by its rows of A.

Same mask as `layers.dropout_keep` (its quarter layout: lane l of Threefry block c is element l * q + c of a row
of q = d / 4 blocks, so one tile of hashes serves four tiles of contiguous columns), same masked input bit for
bit; the product sums in another order than cuBLAS's (float32 either way). The backward is XLA's: the
gradient of the unfused expression at the kept mask (`reference`), so both paths train alike
(tests/test_lora_kernel.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vlmu_jax.models.dropout_kernel import GROUPS, threefry2x32

BLOCK_ROWS = 64  # rows of x per program
# Threefry blocks per step of a program's loop: four [64, 32] tiles of x, one per lane. The fastest tiling of
# bench/bench_lora_kernel.py on an H100 (session 31, call 110): 20-24 % under XLA's path at LLaVA-7B's inputs.
BLOCK_COLS = 32
WARPS = 4
# Shared memory: each stage holds four lanes' [BLOCK_ROWS, BLOCK_COLS] tiles of x and [BLOCK_COLS, rank] tiles
# of A. Three stages of [64, 64] tiles at rank 128 asked for 278528 bytes, over Hopper's 232448 (session 31, call
# 109, H100); at [64, 32] tiles two stages ran faster than three (call 110).
STAGES = 2
PROGRAMS = 264  # about two per SM of an H100 / H200 (132): rows are cut into BLOCK_ROWS, then K into splits
# LoRA ranks the kernel takes: a Triton dot's dims are powers of two, >= 16. Rank 256 (A tiles of twice the shared
# memory) has not run on a GPU: it keeps XLA's path.
RANKS = (16, 32, 64, 128)


def _tiles(rows: int, d: int, block_rows: int, block_cols: int) -> bool:
    """Whether `rows` x `d` inputs tile into the kernel's chunks: whole blocks of `block_rows` rows (no masked loads
    or stores: a mask is a boolean, see `_kernel`), a last axis of four quarters, each a whole number of
    `block_cols` Threefry blocks, and fewer than 2**32 blocks (their counts are uint32)."""
    return rows % block_rows == 0 and d % (4 * block_cols) == 0 and rows * (d // 4) < 2**32


def fits(shape: tuple[int, ...], rank: int, dtype: jnp.dtype) -> bool:
    """Whether `dropout_hidden` takes an input of `shape` and a rank-`rank` A: it tiles at the default BLOCK_ROWS
    and BLOCK_COLS (`_tiles`), the rank is one the Triton dot takes, and the input is float16 or bfloat16."""
    *lead, d = shape
    return (_tiles(math.prod(lead), d, BLOCK_ROWS, BLOCK_COLS) and rank in RANKS
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


def reference(x: jax.Array, a: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """The unfused expression (`layers.Dense.with_lora`'s): the kept inputs scaled by 1 / (1 - rate), times A."""
    masked = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
    return jnp.einsum("...i,ir->...r", masked, a)


def _kernel(key_ref, x_ref, a_ref, h_ref, keep_ref, *, quarter: int, splits: int, block_rows: int,
            block_cols: int, threshold: int, divisor: float, groups: int) -> None:
    """Program (i, s): rows [i * block_rows, ...) of x; split s of the quarter's blocks, all four lanes. Writes the
    mask's tiles and split s's float32 partial product [block_rows, rank]. No boolean anywhere: Triton's compile
    on Hopper fails on one whose layout change goes through shared memory (no 1-bit elements there), as the dot
    operand's did (session 30, call 99); so whole row blocks only (no load or store masks), the keep mask as 1 / 0
    arithmetic, stored as uint8."""
    i, s = pl.program_id(0), pl.program_id(1)
    first = i * block_rows
    row = first + jax.lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 0)
    chunks = quarter // block_cols
    k0, k1 = key_ref[0], key_ref[1]

    def step(j: jax.Array, acc: jax.Array) -> jax.Array:
        c0 = j * block_cols
        col = c0 + jax.lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 1)
        # uint32 throughout, as dropout_kernel's: int32 counts would shift arithmetically (other bits)
        count = row.astype(jnp.uint32) * jnp.uint32(quarter) + col.astype(jnp.uint32)
        hi, lo = threefry2x32(k0, k1, jnp.zeros_like(count), count, groups)
        low16 = jnp.uint32(0xFFFF)
        for lane, bits in enumerate((hi & low16, hi >> jnp.uint32(16), lo & low16, lo >> jnp.uint32(16))):
            # bits >= threshold as 1 / 0 without a comparison: bits + 2**16 - threshold reaches 2**16 exactly then
            kept = (bits + jnp.uint32(65536 - threshold)) >> jnp.uint32(16)
            where = (pl.ds(first, block_rows), pl.ds(lane * quarter + c0, block_cols))
            x = x_ref[where]
            keep_ref[where] = kept.astype(jnp.uint8)
            # times 1 is exact: the kept inputs are those of jnp.where's form (dropped ones are +-0, not 0)
            masked = (x.astype(jnp.float32) * kept.astype(jnp.float32) / divisor).astype(x.dtype)
            a = a_ref[pl.ds(lane * quarter + c0, block_cols), :]
            acc = acc + jnp.dot(masked, a, preferred_element_type=jnp.float32)
        return acc

    rank = h_ref.shape[-1]
    acc = jax.lax.fori_loop(s * chunks // splits, (s + 1) * chunks // splits, step,
                            jnp.zeros((block_rows, rank), jnp.float32))
    h_ref[s, pl.ds(first, block_rows), :] = acc


@functools.partial(jax.jit, static_argnames=("rate", "interpret", "block_rows", "block_cols", "warps", "stages",
                                             "programs", "groups"))
def fused_call(x: jax.Array, a: jax.Array, key: jax.Array, *, rate: float, interpret: bool = False,
               block_rows: int = BLOCK_ROWS, block_cols: int = BLOCK_COLS, warps: int = WARPS, stages: int = STAGES,
               programs: int = PROGRAMS, groups: int = GROUPS) -> tuple[jax.Array, jax.Array]:
    """(h, keep) for x [rows, d] and A [d, rank] of x's dtype under a raw Threefry key (uint32[2]): h in x's dtype,
    keep the mask as uint8 (1 kept; its consumer's select takes the conversion to boolean in). `interpret` runs it
    through Pallas's interpreter (CPU tests); the tiling and the number of programs aimed at do not change the mask,
    only the order the product sums in. `groups` of Threefry's four rounds other than GROUPS give other bits: for
    `bench/bench_lora_kernel.py` to time whether the kernel waits on its hashing."""
    rows, d = x.shape
    quarter, rank = d // 4, a.shape[1]
    if not _tiles(rows, d, block_rows, block_cols):
        raise ValueError(f"LoRA input [{rows}, {d}]: the kernel needs whole {block_rows}-row blocks, a width of four "
                         f"quarters of whole {block_cols}-block chunks and fewer than 2**32 Threefry blocks")
    chunks, row_blocks = quarter // block_cols, rows // block_rows
    splits = max(1, min(chunks, programs // row_blocks))  # split K too where rows alone give too few programs
    partial, keep = pl.pallas_call(
        functools.partial(_kernel, quarter=quarter, splits=splits, block_rows=block_rows,
                          block_cols=block_cols, threshold=round(rate * 65536),
                          divisor=float(np.asarray(1.0 - rate, x.dtype)), groups=groups),
        grid=(row_blocks, splits),
        out_shape=(jax.ShapeDtypeStruct((splits, rows, rank), jnp.float32),
                   jax.ShapeDtypeStruct((rows, d), jnp.uint8)),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="lora_dropout_hidden",
    )(key, x, a)
    return partial.sum(0).astype(x.dtype), keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _hidden(x: jax.Array, a: jax.Array, key: jax.Array, rate: float, mask_name: str, interpret: bool) -> jax.Array:
    return fused_call(x, a, key, rate=rate, interpret=interpret)[0]


def _hidden_fwd(x, a, key, rate, mask_name, interpret):
    h, keep = fused_call(x, a, key, rate=rate, interpret=interpret)
    # Named inside the forward rule: a remat policy that saves the name keeps the mask for the backward, where
    # otherwise jax.checkpoint would run this forward (the kernel) again to rebuild it.
    return h, (x, a, checkpoint_name(keep, mask_name))


def _hidden_bwd(rate, mask_name, interpret, residuals, dh):
    x, a, keep = residuals
    _, vjp = jax.vjp(lambda x, a: reference(x, a, keep.astype(jnp.bool_), rate), x, a)
    return (*vjp(dh), None)


_hidden.defvjp(_hidden_fwd, _hidden_bwd)


def dropout_hidden(x: jax.Array, a: jax.Array, rng: jax.Array, rate: float, mask_name: str, *,
                   interpret: bool = False) -> jax.Array:
    """`reference(x, a, layers.dropout_keep(rng, x.shape, rate), rate)` for x [..., d] (`fits`) and A [d, rank] of
    x's dtype under a Threefry key, the mask named `mask_name` for the remat policies."""
    *lead, d = x.shape
    key = jax.random.key_data(rng).astype(jnp.uint32)
    h = _hidden(x.reshape(-1, d), a, key, rate, mask_name, interpret)
    return h.reshape(*lead, a.shape[1])
