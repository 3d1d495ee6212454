"""Blocks shared by every architecture: projections, norms, rotary embedding, attention, MLPs, and the
stacked-layer runner (scan with a named remat policy, or an unrolled loop for debugging).

Parameters of stacked layers carry a leading ``layers`` axis; a layer module is written for one layer and is
handed its slice inside the scan, so the same code serves scanned and unrolled execution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.extend.random import threefry2x32_p

from vlmu_jax.models import decode_attention, dropout_kernel, lora_kernel
from vlmu_jax.models.sharding import runs_on_one_gpu

Axes = tuple[str | None, ...]
DROPOUT_MASK = "lora_dropout_keep"  # the checkpoint name of LoRA dropout masks (REMAT_POLICIES)
PROJECTION_OUTPUT = "projection_output"  # a Dense's output, bias and LoRA included (REMAT_POLICIES)
LORA_HIDDEN = "lora_hidden"  # LoRA's rank-r x @ A (REMAT_POLICIES)
ATTENTION_INPUT = "attention_input"  # a self-attention's q and k after the rotary, and its v (REMAT_POLICIES)
# True: on one GPU, a LoRA input's dropout and its product with A run as one kernel where it fits (`lora_kernel`);
# False: as the mask kernel, XLA's select and a gemm (bench/bench_jax_llava.py times both: `unfused` steps). Off:
# on an H100 (session 32, calls 112-113, each order once) LLaVA-7B's GA, GD and NPO steps moved under 2 % either way
# fused, for 1.2-1.5 GB more.
FUSED_LORA_DROPOUT = False


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias), kernel [*stack, in, out] with logical axes; optional LoRA adapter (see
    lora.py)."""

    def __init__(
        self,
        din: int,
        dout: int,
        *,
        axes: Axes,
        stack: tuple[int, ...] = (),
        use_bias: bool = False,
        std: float = 0.02,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        lead = ("layers",) * len(stack)
        self.kernel = nnx.Param(_normal(rngs, (*stack, din, dout), std, dtype), axes=lead + tuple(axes))
        self.bias = nnx.Param(jnp.zeros((*stack, dout), dtype), axes=lead + (axes[-1],)) if use_bias else None
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale = 1.0
        self.lora_dropout = 0.0
        self.deterministic = True

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return self.with_lora(y, x, rng)

    def with_lora(self, y: jax.Array, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        """`y` (x @ kernel + bias, computed here or as this projection's slice of a joined gemm: `fuse_projections`)
        plus the LoRA term of `x`, named as the projection's output for the remat policies."""
        if self.lora_a is not None:
            a = self.lora_a[...].astype(x.dtype)
            if self.lora_dropout > 0.0 and not self.deterministic and rng is not None:
                if (FUSED_LORA_DROPOUT and _threefry(rng) and runs_on_one_gpu()
                        and lora_kernel.fits(x.shape, a.shape[1], x.dtype)):
                    h = lora_kernel.dropout_hidden(x, a, rng, self.lora_dropout, DROPOUT_MASK)
                else:
                    keep = checkpoint_name(dropout_keep(rng, x.shape, self.lora_dropout), DROPOUT_MASK)
                    h = lora_kernel.reference(x, a, keep, self.lora_dropout)
            else:
                h = jnp.einsum("...i,ir->...r", x, a)
            h = checkpoint_name(h, LORA_HIDDEN)
            y = y + self.lora_scale * jnp.einsum("...r,ro->...o", h, self.lora_b[...].astype(x.dtype))
        return checkpoint_name(y, PROJECTION_OUTPUT)


class Joining(NamedTuple):
    """Projections of one module that share their input and may be held as one kernel (`fuse_projections`): the
    module attribute that holds the joined kernel, the projections' attribute names in joined order, and how a
    joined kernel (or its output) splits into theirs along the last axis."""

    attr: str
    names: tuple[str, ...]
    split: Callable[[jax.Array], Sequence[jax.Array]]

    def projections(self, module: nnx.Module) -> list[Dense]:
        """The joining projections of `module`, in joined order."""
        return [getattr(module, name) for name in self.names]


def can_join(projections: Sequence[Dense]) -> bool:
    """Whether `projections`' kernels can be held joined: none has a bias or is spread over several devices (a kernel
    sharded along its output axis would be resharded by the split)."""
    return not any(p.bias is not None or len(p.kernel.get_value().sharding.device_set) > 1 for p in projections)


def fuse_projections(module: nnx.Module, stand_in: Callable[[jax.Array], jax.Array],
                     join: Callable[[list[jax.Array]], jax.Array]) -> None:
    """`module.joining()`'s projections (if any, and where they `can_join`) held as one kernel side by side along the
    output axis (`join` of their kernels), theirs replaced by `stand_in`s; on fresh layer copies
    (eval/layer_copies.py). Each projection's LoRA (if any) stays its own: it adds its term to its slice of the
    joined gemm (`Dense.with_lora`). Undone by `split_projections`.

    Why: XLA's dot merger joins projections that share their input, and with the weights passed as arguments it
    concatenates them on every call (64 MiB per layer at 7B, 1.1 ms of a 69 ms log-prob call, bench/RESULTS.md
    session 12); a kernel held joined is read in place, and one gemm (one weight read while decoding) does the
    work of several.
    """
    joining = module.joining()
    if joining is None or not can_join(projections := joining.projections(module)):
        return
    kernels = [p.kernel.get_value() for p in projections]
    for p, kernel in zip(projections, kernels, strict=True):
        p.kernel.set_value(stand_in(kernel))
    setattr(module, joining.attr, nnx.Param(join(kernels)))


def split_projections(module: nnx.Module) -> None:
    """Undo `fuse_projections`: each projection gets its kernel back from the joined one (nothing to do where none
    is held)."""
    joining = module.joining()
    joined = None if joining is None else getattr(module, joining.attr)
    if joined is None:
        return
    for p, part in zip(joining.projections(module), joining.split(joined.get_value()), strict=True):
        p.kernel.set_value(part)
    setattr(module, joining.attr, nnx.data(None))


def joined_matmul(x: jax.Array, joined: nnx.Param) -> jax.Array:
    """x @ a joined kernel, as each projection (`Dense`) computes its own part."""
    return jnp.einsum("...i,io->...o", x, joined[...].astype(x.dtype))


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 row-major index of every element of `shape` (fewer than 2**32 elements)."""
    if math.prod(shape) >= 2**32:
        raise ValueError(f"dropout mask of shape {shape} has 2**32 elements or more")
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in range(len(shape) - 1, -1, -1):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


def dropout_keep(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep mask, each element kept with probability 1 - rate, independently.

    Why not `jax.random.bernoulli`: it draws 32 bits per element, and under jax's default partitionable Threefry
    each element costs a whole Threefry-2x32 block (64 bits hashed, 32 kept). LoRA draws one mask per adapted
    projection and layer, again in the backward when remat recomputes it: most of the ~30 ms of mask fusions in a
    7B LoRA GA step (bench/NOTES.md). Here one block gives four 16-bit lanes, a quarter of the hashing, so the rate
    is realised to 1/65536 (0.05 -> 0.0500031). Lanes are counted by their flat index, like jax's own
    partitionable bits, so the mask does not depend on how the array is sharded. A key of another PRNG
    implementation (or a raw uint32 key) falls back to `jax.random.bernoulli`. On one GPU the same bits come from
    one kernel per mask (`dropout_kernel.keep_mask`: XLA writes the blocks' words out and reads them back; -5.4 ms
    per LLaVA-7B GA step, bench/RESULTS.md session 25).
    """
    if not _threefry(rng):
        return jax.random.bernoulli(rng, 1.0 - rate, shape)
    if runs_on_one_gpu():
        return dropout_kernel.keep_mask(rng, shape, rate)
    return keep_from_blocks(threefry_blocks(rng, shape), shape, rate)


def _threefry(rng: jax.Array) -> bool:
    """Whether `rng` is a typed Threefry-2x32 key (what `dropout_keep`'s lanes are hashed with)."""
    return jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and str(jax.random.key_impl(rng)) == "threefry2x32"


def threefry_blocks(rng: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 blocks (hi, lo) of `dropout_keep`'s mask: one per four elements along the last axis, block
    c of a row at flat count row * ceil(d / 4) + c."""
    *lead, d = shape
    count = flat_index((*lead, -(-d // 4)))
    k = jax.random.key_data(rng)
    return threefry2x32_p.bind(k[0], k[1], jnp.zeros_like(count), count)


def keep_from_blocks(blocks: tuple[jax.Array, jax.Array], shape: tuple[int, ...], rate: float) -> jax.Array:
    """`dropout_keep`'s mask from its blocks: four 16-bit lanes each, kept where a lane is >= rate * 65536.

    Lane l of block c goes to element l * q + c of its row (q = ceil(d / 4) blocks a row): a row is four quarters,
    the lanes' (hi & 0xFFFF, hi >> 16, lo & 0xFFFF, lo >> 16). Why quarters and not four neighbours: a kernel that
    hashes a tile of blocks gets four tiles of contiguous columns, one per lane, where neighbours would need its
    tiles interleaved; LoRA's fused down-product (`lora_kernel.dropout_hidden`) multiplies each by its rows of A."""
    hi, lo = blocks
    *lead, d = shape
    low16 = jnp.uint32(0xFFFF)
    lanes = jnp.stack([hi & low16, hi >> 16, lo & low16, lo >> 16], axis=-2).reshape(*lead, -1)[..., :d]
    return lanes >= jnp.uint32(round(rate * 65536))


class RMSNorm(nnx.Module):
    """Llama/Phi-3 RMSNorm: normalise in float32, cast back, then scale (HF order of operations)."""

    def __init__(self, dim: int, eps: float, *, stack: tuple[int, ...] = (), dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((*stack, dim), dtype), axes=("layers",) * len(stack) + ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (CLIP), computed in float32."""

    def __init__(self, dim: int, eps: float, *, stack: tuple[int, ...] = (), dtype=jnp.float32):
        lead = ("layers",) * len(stack)
        self.weight = nnx.Param(jnp.ones((*stack, dim), dtype), axes=lead + ("norm",))
        self.bias = nnx.Param(jnp.zeros((*stack, dim), dtype), axes=lead + ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


# ------------------------------------------------------------------------------------ rotary embedding


def rope_parameters(text_config: dict[str, Any]) -> dict[str, Any]:
    """HF rope settings from either the transformers-5 ``rope_parameters`` or the older
    ``rope_scaling``/``rope_theta``."""
    params = dict(text_config.get("rope_parameters") or text_config.get("rope_scaling") or {})
    params.setdefault("rope_theta", text_config.get("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", text_config.get("partial_rotary_factor", 1.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(
    params: dict[str, Any], head_dim: int, max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention scaling for the rope types we support: default, linear, llama3."""
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    kind = params["rope_type"]
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / params["factor"]
    elif kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params.get("original_max_position_embeddings", max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv_freq = np.where(medium, smoothed, scaled)
    else:
        raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")
    return inv_freq.astype(np.float32), 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scaling: float = 1.0) -> jax.Array:
    """Rotate the first 2*len(inv_freq) channels of x [B,T,N,H] (HF rotate_half layout) at integer
    positions [B,T]."""
    return rotate(x, positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq), scaling)


def rotate(x: jax.Array, freqs: jax.Array, scaling: float = 1.0) -> jax.Array:
    """Rotate the first 2*F channels of x [B,T,N,H] by the angles freqs [B,T,F] (HF rotate_half layout).

    Split from ``apply_rope`` because multimodal RoPEs (Qwen2-VL's M-RoPE, its vision tower's 2D rope) take
    each frequency's position from a different axis; only how the angles are formed differs."""
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = (jnp.cos(emb) * scaling).astype(x.dtype)[:, :, None, :]
    sin = (jnp.sin(emb) * scaling).astype(x.dtype)[:, :, None, :]
    rot, rest = x[..., : emb.shape[-1]], x[..., emb.shape[-1] :]
    half = rot.shape[-1] // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


# ------------------------------------------------------------------------------------------- attention


def attention_mask(
    q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """Boolean [B,1,T,S]: causal by position, keys restricted to valid (non-pad) slots and the sliding
    window."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :].astype(bool)
    if sliding_window is not None:
        mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    return mask[:, None]


def last_real(h: jax.Array, mask: jax.Array) -> jax.Array:
    """h [B, T, ...] at each row's last real (mask > 0) position, [B, 1, ...]: T - 1 for a left-padded row, its
    length - 1 for a right-padded one."""
    last = jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[1]), 0), axis=1)
    return jnp.take_along_axis(h, last.reshape((-1, 1) + (1,) * (h.ndim - 2)), axis=1)


def decode_step_impl(impl: str, new_tokens: int) -> str:
    """The attention a decode step over a KV cache runs: the model's own `impl` for one new token per row (on GPU
    `attend` sends it to the decode kernel, models/decode_attention.py), XLA's for several (their explicit
    non-causal mask stays off cuDNN's bias path)."""
    return impl if new_tokens == 1 else "xla"


def resolve_attention_impl(impl: str, dtype=None) -> str:
    """The kernel a model's attention runs: "auto" -> cudnn on GPU, XLA elsewhere (on TPU XLA fuses attention
    itself); cuDNN's flash attention needs half precision, so a float32 ``dtype`` runs XLA's."""
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if impl == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "xla"
    return impl


class SeqLengths(NamedTuple):
    """A mask given as sequence lengths: each row's first `keys[b]` keys are valid, and with `queries`, only
    its first `queries[b]` query rows are computed (the others are undefined: select them away, never use them).

    Why: fused kernels take such a mask as lengths (cuDNN's padding mask) and skip what it excludes, instead of
    reading a [T, S] mask for every head (as a bias, on cuDNN) or applying it to materialised scores (XLA). A
    model whose attention ignores token order (no rotary phases) can move its valid tokens to the front to
    use it (the Idefics2 and Mllama vision towers).
    """

    keys: jax.Array
    queries: jax.Array | None = None


class ValidFirst(NamedTuple):
    """A token order that puts each row's valid tokens first (stable), and its inverse, both [B, N]."""

    order: jax.Array
    inverse: jax.Array

    @classmethod
    def of(cls, valid: jax.Array) -> ValidFirst:
        order = jnp.argsort(~valid, axis=1, stable=True)
        return cls(order, jnp.argsort(order, axis=1))

    def to(self, x: jax.Array) -> jax.Array:
        """x [B, N, ...] in valid-first order."""
        return take_tokens(x, self.order)

    def back(self, x: jax.Array) -> jax.Array:
        """x [B, N, ...] from valid-first back to the original order."""
        return take_tokens(x, self.inverse)


def cache_written(h: jax.Array, layer_kv: Any) -> tuple[jax.Array, Any]:
    """Hidden state and this layer's freshly written cache, fenced so the next layer starts after the write.

    Why: in an unrolled prefill each layer's cache is an output read by nothing else in the program, so XLA sinks
    every layer's cache write to the program's end and holds each layer's keys and values until then (4.5 GiB
    of temporaries for LLaVA-7B with 16 prompts of 640 tokens, bench/RESULTS.md session 11).
    """
    return jax.lax.optimization_barrier((h, layer_kv))


def take_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, N, ...] with each row's tokens taken in `index` [B, N] order."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | SeqLengths | None, *, impl: str, causal: bool = False
) -> jax.Array:
    """Scaled dot-product attention, GQA when k/v have fewer heads. q [B,T,N,H], k/v [B,S,K,H]. `mask` is a
    boolean [B, 1|N, T, S] mask, SeqLengths, or None.

    With impl="cudnn" and causal=True the explicit mask is dropped: for right-padded batches causality
    alone is exact on every real position (pad positions only produce ignored outputs), and it keeps the fused
    kernel.
    """
    impl = resolve_attention_impl(impl, q.dtype)
    t, s = q.shape[1], k.shape[1]
    if impl == "cudnn" and decode_attention.supported(q, k, mask):
        # a decode step (one query per row over a masked cache): one kernel instead of XLA's seven
        return decode_attention.decode_attention(q, k, v, mask)
    if impl == "cudnn" and (t % 2 or s % 2):
        # jax's cuDNN backward rejects odd sequence lengths (seen on H100, jax 0.11.2). Padded by one token, with
        # the real keys given as lengths (causality alone hides a key appended after the last query), they keep
        # the fused kernel; the padded query's row is dropped. CLIP's 577 tokens on XLA's attention cost ~3 ms
        # of a 7B LLaVA log-prob call (bench/RESULTS.md session 12). A boolean mask without causality stays on XLA.
        if causal and not isinstance(mask, SeqLengths):
            padded, mask = t % 2 == s % 2, None  # the fused causal kernel drops an explicit mask (below)
        else:
            padded = not isinstance(mask, jax.Array)
            mask = SeqLengths(keys=jnp.full((q.shape[0],), s, jnp.int32)) if mask is None else mask
        if not padded:
            impl = "xla"
        else:
            def even(x: jax.Array) -> jax.Array:
                return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))

            return attend(even(q), even(k), even(v), mask, impl=impl, causal=causal)[:, :t]
    implementation = None if impl == "xla" else impl
    if isinstance(mask, SeqLengths):
        return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=mask.queries, key_value_seq_lengths=mask.keys,
                                            implementation=implementation)
    if impl == "cudnn" and causal:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def attend_blocks(q: jax.Array, blocks: Sequence[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """XLA's attention of q [B,T,N,H] over several blocks of keys, each (k, v [B,S_i,K,H], boolean mask
    [B,1,T,S_i]), as one softmax over all of them (every query needs a valid key in some block); GQA when k/v
    have fewer heads. The numerics are jax.nn.dot_product_attention's (float32 scores and softmax, probabilities
    in the values' dtype).

    Why: a scored continuation attends over its prompt's KV cache and over its own new keys. Writing the new keys
    into the cache first, as a decode step does, copies the whole cache for every continuation (2.7 ms and 5 GB
    per answer at 7B with 16 prompts of 640 tokens, bench/RESULTS.md session 9); here the blocks are only read,
    and only the [T, S] scores (T = a continuation's length) are put side by side."""
    b, t, n, hd = q.shape
    kh = blocks[0][0].shape[2]
    qg = q.reshape(b, t, kh, n // kh, hd)
    scale = jnp.float32(1.0 / math.sqrt(hd))
    logits = []
    for k, _, mask in blocks:
        x = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        logits.append(jnp.where(mask[:, :, None], x, jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    out, start = None, 0
    for k, v, _ in blocks:
        part = probs[..., start:start + k.shape[1]].astype(v.dtype)
        y = jnp.einsum("bkgts,bskh->btkgh", part, v, preferred_element_type=jnp.float32)
        out, start = (y if out is None else out + y), start + k.shape[1]
    return out.astype(q.dtype).reshape(b, t, n, hd)


def attend_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, key_lengths: jax.Array, *,
                    impl: str) -> tuple[jax.Array, jax.Array]:
    """Attention of every query over each row's first `key_lengths[b]` keys (at least 1; q, k, v [B, T|S, N, H], as
    many key heads as query heads), and the log-sum-exp of each query's scaled scores over them, [B, T, N] float32.

    Why: two attentions over disjoint key sets combine exactly through their log-sum-exps (the FlashAttention
    merge), which lets a mask that is not a length mask be split into length-masked calls that together cost
    one full attention (Mllama's vision towers, `mllama_vision.vision_attention`). On cuDNN the kernel returns
    the log-sum-exp it computes anyway (its softmax statistics, through jax's cuDNN module: jax.nn's attention
    does not return them); no gradient flows through it there, so differentiate only through a custom VJP that
    does not need it.
    """
    impl = resolve_attention_impl(impl, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "cudnn" and not (q.shape[1] % 2 or k.shape[1] % 2):
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

        queries = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
        out, lse = dot_product_attention(q, k, v, None, None, queries, key_lengths.astype(jnp.int32), scale=scale,
                                         mask_type=MaskType.PADDING, return_residual=True)
        return out, jnp.swapaxes(lse, 1, 2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(k.shape[1])[None, :] < key_lengths[:, None]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None]).astype(v.dtype)
    out = jnp.einsum("bnts,bsnh->btnh", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return out, jnp.swapaxes(lse, 1, 2)


# ------------------------------------------------------------------------------------------------ MLPs


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """HF ACT2FN names used by our architectures."""
    table = {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}")
    return table[name]


def fold(rng: jax.Array | None, i: int) -> jax.Array | None:
    """Independent dropout key per projection (None passes through)."""
    return None if rng is None else jax.random.fold_in(rng, i)


class GatedMLP(nnx.Module):
    """Llama MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int, act: str, *, stack, use_bias: bool, std: float, dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, use_bias=use_bias, std=std, dtype=dtype, rngs=rngs)
        self.gate_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), **kw)
        self.gate_up_kernel: nnx.Param | None = nnx.data(None)  # [gate | up] while joined (`joining`)
        self.act = act

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        if self.gate_up_kernel is None:
            gate, up = self.gate_proj(x, fold(rng, 0)), self.up_proj(x, fold(rng, 1))
        else:
            gate, up = self.joining().split(joined_matmul(x, self.gate_up_kernel))
            gate, up = self.gate_proj.with_lora(gate, x, fold(rng, 0)), self.up_proj.with_lora(up, x, fold(rng, 1))
        return self.down_proj(activation(self.act)(gate) * up, fold(rng, 2))

    def joining(self) -> Joining:
        """gate and up share their input: held as one [gate | up] kernel while joined (`fuse_projections`)."""
        return Joining("gate_up_kernel", ("gate_proj", "up_proj"), lambda k: jnp.split(k, 2, axis=-1))


class FusedGatedMLP(nnx.Module):
    """Phi-3 MLP: gate_up_proj holds [gate | up]; down(up * act(gate))."""

    def __init__(self, d: int, f: int, act: str, *, stack, std: float, dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, std=std, dtype=dtype, rngs=rngs)
        self.gate_up_proj = Dense(d, 2 * f, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        gate, up = jnp.split(self.gate_up_proj(x, fold(rng, 0)), 2, axis=-1)
        return self.down_proj(up * activation(self.act)(gate), fold(rng, 1))


# -------------------------------------------------------------------------------------- stacked layers

def fused_attention_saveable(prim: Any, *_: Any, **__: Any) -> bool:
    """Checkpoint policy: the outputs of cuDNN's fused attention forward (its output and softmax statistics), which
    its backward reads. Why: under the dots policy the backward ran the whole attention forward again (60 us per
    7B layer and step on an H200, bench/NOTES.md session 23); kept, they cost [B, T, heads, head_dim] per layer."""
    return prim.name.startswith("dot_product_attention_fwd")


def _dots_attention_and(*names: str) -> Any:
    """Keeps the matmul outputs (no batch dims), cuDNN attention's outputs and the values named `names`."""
    both = jax.checkpoint_policies.save_from_both_policies
    return both(both(jax.checkpoint_policies.dots_with_no_batch_dims_saveable, fused_attention_saveable),
                jax.checkpoint_policies.save_only_these_names(*names))


# "dots_and_dropout_saveable" also keeps the LoRA dropout masks (one byte per element of each adapted projection's
# input, ~3.2 GB for a 7B LoRA step at 4 x 704 tokens). Why: a Threefry mask costs ~0.1 ms of integer hashing per
# [2816, 11008] input on an H200, and under the dots policy each is drawn again in the backward (bench/NOTES.md).
# The policies that keep the masks keep LoRA's rank-r hidden by name too: on one GPU it is the output of
# `lora_kernel`'s fused product rather than a dot, and the backward would otherwise run that kernel again.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_and_dropout_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(DROPOUT_MASK, LORA_HIDDEN),
    ),
    # Llama-3.2-Vision's and Qwen2-VL's LoRA stages in the presets (presets.lora_remat): LLaVA-1.5's 7B step 1-3 %
    # faster than the dots alone, for ~3.6 GiB of masks and attention outputs at B=4 (bench/RESULTS.md, session
    # 23); 5.4 % per 11B step, 1.9 % per Qwen2.5-VL-7B step (session 24)
    "dots_attention_dropout_saveable": _dots_attention_and(DROPOUT_MASK, LORA_HIDDEN),
    # The presets' policy plus the attention's inputs (q and k after the rotary, v), which the forward writes anyway
    # for the fused kernel: the backward then reads them instead of adding q's, k's and v's base and LoRA dot
    # outputs again and redoing the rotary, and those six dot outputs are no longer kept (three [B, T, 4096] per 7B
    # layer less). LLaVA-1.5's LoRA stages in the presets: its per-layer 7B GA step 0.1798 -> 0.1753 s (session 27).
    "dots_attention_inputs_dropout_saveable": _dots_attention_and(DROPOUT_MASK, LORA_HIDDEN, ATTENTION_INPUT),
    # Each projection's output once (base + LoRA summed), LoRA's rank-r hidden, the masks and cuDNN attention's
    # outputs, where the dots policies keep a LoRA projection's base and LoRA outputs apart (the backward of what
    # follows it adds them again). For less memory: LLaVA-1.5-7B's GA step peaked 29.4 instead of 37.2 GiB, GD 42.3
    # instead of 55.1, Qwen2.5-VL-7B's GA 27.0 instead of 32.3, at 1-2 % more time per step (bench/RESULTS.md,
    # session 24: the sum is one more write in the forward, and the re-add it saves was fused into its consumers).
    "projections_attention_dropout_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(PROJECTION_OUTPUT, LORA_HIDDEN, DROPOUT_MASK),
        fused_attention_saveable),
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(remat: str) -> Any:
    """The checkpoint policy a remat name stands for (None for "none"); a clear error for an unknown name."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[remat]


def remat_call(fn: Callable[..., Any], remat: str) -> Callable[..., Any]:
    """``fn(module, *arrays)`` wrapped in jax.checkpoint with a named policy (REMAT_POLICIES), for layers run
    one by one rather than by run_layers' scan (Mllama's decoder, a decoder over per-layer weight copies)."""
    policy = remat_policy(remat)
    if remat == "none":
        return fn

    def call(module: nnx.Module, *args: Any) -> Any:
        graphdef, state = nnx.split(module)
        return jax.checkpoint(lambda s, *a: fn(nnx.merge(graphdef, s), *a), policy=policy)(state, *args)

    return call


def run_layers(
    stack: nnx.Module,
    fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat: str = "none",
    scan: bool = True,
    limit: int | None = None,
) -> tuple[Any, Any]:
    """Run ``fn(layer, carry, x) -> (carry, y)`` over the layers of ``stack`` (a layer module holding [L,
    ...] params).

    scan=True compiles one layer body (lax.scan); scan=False unrolls a Python loop, for debugging. xs is a
    pytree
    with a leading L axis (or None); ys come back stacked. limit runs only the first ``limit`` layers.
    """
    policy = remat_policy(remat)
    graphdef, state = nnx.split(stack)
    full = jax.tree.leaves(state)[0].shape[0]
    n = full if limit is None else limit
    xs = jax.tree.map(lambda a: a[:n], xs)

    def body(c, inp):
        layer_state, x = inp
        return fn(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
    if scan and n < full:
        # Each step takes its layer out of the whole stack: a stack cut to its first `limit` layers would be a
        # copy of them on every call (LLaVA's CLIP tower runs 23 of its 24 layers: 0.85 ms and 0.4 GiB per call
        # at 7B, bench/RESULTS.md session 11).
        def indexed(c, inp):
            i, x = inp
            return body(c, (jax.tree.map(lambda a: a[i], state), x))

        return jax.lax.scan(indexed, carry, (jnp.arange(n), xs))
    if scan:
        return jax.lax.scan(body, carry, (state, xs))
    ys = []
    for i in range(n):
        carry, y = body(carry, jax.tree.map(lambda a, i=i: a[i], (state, xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
