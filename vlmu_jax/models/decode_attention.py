"""One decode step's attention over a KV cache as a single kernel (Pallas on Triton, GPU).

Why: XLA runs a decode step's attention (one query per row over a [B, S, K, H] cache with a boolean mask) as
seven kernels: the scores' reduction, the mask's select, max, exp, sum, a cast and the values' reduction. On an H200
at LLaVA-1.5-7B's shape (B=4, 736 cache slots) they took 30.6 us per layer against 11.2 us to read the layer's
keys and values once, ~0.6 ms of a 4.7 ms decode step (bench/RESULTS.md, session 20). Here each program reads one
(row, key head) pair's keys and values once, keeps an online softmax over them (FlashAttention's running max and
sum) and writes the normalised output: one kernel per layer and step and nothing else per layer (its query rows
are read and written in place; the rows' bounds come from the mask, shared by all layers, once per step; call
69's trace). Only where rows x key heads are too few to fill the GPU (grouped heads at small batch) are
the slots split over several programs, whose partial results a small XLA reduction merges.

The keys each query sees are given as the boolean mask the XLA path takes (causality and any sliding window
already folded in), read as one [block] vector per key block, so no assumption about where valid slots lie is
needed; each row's first and last valid slots only bound which blocks are read. The cache is read in its own
[B, S, K, H] layout (each key row is H contiguous elements), so nothing is transposed or copied first.
Numerics are jax.nn.dot_product_attention's XLA path's: float32 scores, softmax in float32, probabilities in the
values' dtype for the value product, float32 accumulation; the softmax is normalised once at the end instead of
before the cast, which moves results by bfloat16 rounding only (tests/test_decode_attention.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vlmu_jax.models.sharding import runs_on_one_gpu

BLOCK_K = 64  # key slots per loop step: 64 x 128 bf16 keys and values are 16 KB each
WARPS = 4  # Triton's warps per program
# Loads in flight per program (Triton's software pipelining): 3 where programs are fewer than FEW_PROGRAMS (two
# per SM of an H200), so that each keeps more bytes in flight, else 2. Measured on an H200 (bench/RESULTS.md,
# session 20, call 68): LLaVA-7B B=4 (128 programs) 26.6 -> 18.4 us per layer with 3; B=16 (512) 48.6 us with 2,
# 55.9 with 3; Mllama-11B B=16 (128) 33.5 -> 24.5 us with 3.
STAGES, STAGES_FEW, FEW_PROGRAMS = 2, 3, 264
WHOLE_ROWS = 96  # (row, key head) pairs from which one program per pair keeps an H200's 132 SMs busy
TARGET_PROGRAMS = 512  # below that, programs enough (pairs x slices of slots) for a few waves over the SMs
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # a masked score: finite, so a block of masked keys adds exp(0) * 0


def supported(q: jax.Array, k: jax.Array, mask: object) -> bool:
    """Whether a call of `layers.attend` can run here: one query per row, a boolean [B, 1, 1, S] mask, a head
    size Triton's tiles take (a power of two, >= 16), and one GPU to run on (`sharding.runs_on_one_gpu`)."""
    h = q.shape[-1]
    return (q.shape[1] == 1 and isinstance(mask, jax.Array) and mask.ndim == 4 and mask.shape[1:3] == (1, 1)
            and h >= 16 and h & (h - 1) == 0 and q.shape[2] % k.shape[2] == 0 and runs_on_one_gpu())


def _kernel(q_ref, k_ref, v_ref, valid_ref, lo_ref, hi_ref, *out_refs, split: int, scale: float, groups: int,
            rows: int, block_k: int) -> None:
    """Program (b, h, j): the `groups` queries of key head h in row b (read as `rows` >= 16 rows, the rest masked)
    over slots [j * split, (j + 1) * split) of the cache, intersected with the row's [lo, hi) bounds and its mask
    (lo < 0: every slot, with equal scores).
    One slice (one out_ref): writes the normalised output into the queries' own rows. Several: the unnormalised
    output [rows, H], the running max [rows] and the sum of exponentials [rows], for `decode_attention`'s merge."""
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    real = jnp.arange(rows) < groups
    q = plgpu.load(q_ref.at[b, pl.ds(h * groups, rows), :], mask=real[:, None], other=0.0)  # [rows, H]
    lo = lo_ref[b]
    even = lo < 0  # no valid key in this row: equal scores over all of them
    begin = jnp.maximum(j * split, jnp.maximum(lo, 0))
    end = jnp.minimum((j + 1) * split, hi_ref[b])  # hi <= the slots
    offsets = jnp.arange(block_k)

    def body(i, carry):
        o, m, total = carry
        start = begin + i * block_k
        inside = start + offsets < end
        k = plgpu.load(k_ref.at[b, pl.ds(start, block_k), h, :], mask=inside[:, None], other=0.0)
        v = plgpu.load(v_ref.at[b, pl.ds(start, block_k), h, :], mask=inside[:, None], other=0.0)
        use = inside & (plgpu.load(valid_ref.at[b, pl.ds(start, block_k)], mask=inside, other=0) != 0)
        s = jnp.where(even, 0.0, plgpu.dot(q, k, trans_b=True) * scale)  # [rows, block_k] float32
        s = jnp.where(use[None, :], s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(use[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        o = o * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return o, m_new, total * correction + jnp.sum(p, axis=1)

    hd = q.shape[1]
    steps = jnp.maximum(end - begin + block_k - 1, 0) // block_k
    init = (jnp.zeros((rows, hd), jnp.float32), jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o, m, total = jax.lax.fori_loop(0, steps, body, init)
    if len(out_refs) == 1:
        out = o / jnp.where(total > 0, total, 1.0)[:, None]
        plgpu.store(out_refs[0].at[b, pl.ds(h * groups, rows), :], out.astype(out_refs[0].dtype),
                    mask=real[:, None])
        return
    o_ref, m_ref, sum_ref = out_refs
    o_ref[...] = o
    m_ref[...] = m
    sum_ref[...] = total


@functools.partial(jax.jit, static_argnames=("interpret", "splits", "block_k", "warps", "stages"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, interpret: bool = False,
                     splits: int | None = None, block_k: int = BLOCK_K, warps: int = WARPS,
                     stages: int | None = None) -> jax.Array:
    """Attention of q [B, 1, N, H] over k, v [B, S, K, H] (N a multiple of K: grouped heads) where mask
    [B, 1, 1, S] is True, as `jax.nn.dot_product_attention(q, k, v, mask=mask)` computes it; [B, 1, N, H] in q's
    dtype. `splits`: slices of the slots per (row, key head) (default: one where there are `WHOLE_ROWS` pairs or
    more, else enough for `TARGET_PROGRAMS` programs); `block_k`, `warps`, `stages`: the kernel's tiling (for
    benchmarks; `stages` by default from the program count, see STAGES). `interpret` runs the kernel through
    Pallas's interpreter (CPU tests)."""
    b, _, n, hd = q.shape
    slots, kh = k.shape[1], k.shape[2]
    groups = n // kh
    rows = max(16, 1 << (groups - 1).bit_length())  # Triton's dot takes tiles of >= 16 rows
    valid = mask.reshape(b, slots)
    # A row with no valid key spreads its attention evenly over all of them, as XLA's masked softmax does (every
    # score equally low): all of its keys count, with equal scores, flagged by a negative `lo`.
    none = ~jnp.any(valid, axis=1)
    valid = valid | none[:, None]
    lo = jnp.where(none, -1, jnp.argmax(valid, axis=1)).astype(jnp.int32)
    hi = (slots - jnp.argmax(valid[:, ::-1], axis=1)).astype(jnp.int32)
    if splits is None:
        splits = 1 if b * kh >= WHOLE_ROWS else min(pl.cdiv(slots, block_k), pl.cdiv(TARGET_PROGRAMS, b * kh))
    split = pl.cdiv(pl.cdiv(slots, splits), block_k) * block_k
    splits = pl.cdiv(slots, split)
    if stages is None:
        stages = STAGES_FEW if b * kh * splits < FEW_PROGRAMS else STAGES
    kernel = functools.partial(_kernel, split=split, scale=1.0 / math.sqrt(hd), groups=groups, rows=rows,
                               block_k=block_k)
    if splits == 1:
        out_specs, out_shape = pl.no_block_spec, jax.ShapeDtypeStruct((b, n, hd), q.dtype)
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, rows, hd), lambda i, h, j: (i, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
        ]
        out_shape = [jax.ShapeDtypeStruct((b, kh, splits, rows, hd), jnp.float32),
                     jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32),
                     jax.ShapeDtypeStruct((b, kh, splits, rows), jnp.float32)]
    result = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=pl.no_block_spec,  # whole arrays, indexed in the kernel
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="decode_attention",
    )(q.reshape(b, n, hd), k, v, valid.astype(jnp.int32), lo, hi)
    if splits == 1:
        return result.reshape(q.shape)
    o, m, sums = result
    # FlashAttention's merge of the slices: each slice's sums rescaled to the overall max
    weight = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # [B, K, splits, rows]
    total = jnp.sum(sums * weight, axis=2)
    out = jnp.sum(o * weight[..., None], axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    return out[:, :, :groups].reshape(b, 1, n, hd).astype(q.dtype)
