"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT over 14 px patches (2D rotary positions; Qwen2.5 adds window
attention in most blocks) -> a 2x2 patch merger MLP -> one token per merged patch spliced into a Qwen2 language
model whose rotary phases come from 3D (temporal, height, width) positions, M-RoPE.

The surface is llava.py's; ``images`` is the dict our Qwen2-VL processor makes: ``pixel_values`` [B, N, C*T*P*P]
(each row's flattened patches in transformers' 2x2-merge-block order, zero-padded to a fixed N) and
``image_grid_thw`` [B, 3] (the real patch grid; (0, 0, 0) for a text-only row). Row b's k-th image token takes the
k-th merged patch of its image, as transformers' masked scatter does for one image per row.

Static shapes: transformers packs every image's patches into one sequence and attends per image (and, in
Qwen2.5, per window after permuting patches into window order). Here each row's patches stay in their own padded
row and attention carries a mask: same image (full-attention blocks) or same window (window blocks), padded patches
never seen. Attention is permutation-equivariant and the merger groups the same 4 consecutive patches in both
orders, so skipping the window permutation (and its inverse after the merger) changes only summation order.

Module names follow this codebase's generic roles so LoRA targets and trainable filters work unchanged:
``vision_tower`` = HF ``model.visual`` without its merger, ``multi_modal_projector`` = HF ``model.visual.merger``
(FIUBench tunes the projector, not the tower), ``language_model`` = HF ``model.language_model``, ``lm_head``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmu_jax.models.architecture import Architecture, special_token_ids
from vlmu_jax.models.clip import ClipMLP
from vlmu_jax.models.hf_names import LEAVES, HFParam, rename, stacked_name_map
from vlmu_jax.models.layers import (
    Dense,
    GatedMLP,
    LayerNorm,
    RMSNorm,
    activation,
    attend,
    rotate,
    run_layers,
)
from vlmu_jax.models.llama import (
    DecoderLayer,
    DecoderLM,
    KVCache,
    LlamaAttention,
    SlicedCache,
    TextConfig,
    output_head,
)
from vlmu_jax.models.llava import LlavaForConditionalGeneration
from vlmu_jax.models.sharding import constrain


@dataclass(frozen=True)
class QwenVisionConfig:
    """Both towers: Qwen2-VL (LayerNorm, fc1/fc2 MLP, no windows) and Qwen2.5-VL (RMSNorm, gated MLP, windows)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    out_hidden_size: int
    hidden_act: str
    norm: str  # "layer" (Qwen2-VL) | "rms" (Qwen2.5-VL)
    gated_mlp: bool
    window_size: int | None  # pixels; None = every block attends over the whole image (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...]
    rope_theta: float
    init_std: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class QwenVLConfig:
    text: TextConfig
    vision: QwenVisionConfig
    mrope_section: tuple[int, ...]
    image_token_id: int
    num_image_tokens: int  # 0: the count depends on each image's size (the processor says it per image)
    vocab_size: int
    pad_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    remat: str = "none"
    scan_layers: bool = True
    attention_impl: str = "auto"
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


def _norm(c: QwenVisionConfig, dim: int, *, stack: tuple[int, ...] = (), dtype) -> nnx.Module:
    norm = RMSNorm if c.norm == "rms" else LayerNorm
    return norm(dim, 1e-6, stack=stack, dtype=dtype)


# ------------------------------------------------------------------------------------------- vision


def patch_layout(grid_thw: jax.Array, n: int, merge: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(valid [B, N], row [B, N], col [B, N]) of each padded patch slot: the processor writes patches in 2x2
    merge-block order (block-major over the merged grid, then row-major inside a block)."""
    slot = jnp.arange(n)[None, :]
    t, h, w = grid_thw[:, 0:1], grid_thw[:, 1:2], grid_thw[:, 2:3]
    valid = slot < t * h * w
    per_frame = slot % jnp.maximum(h * w, 1)
    block, inner = per_frame // (merge * merge), per_frame % (merge * merge)
    blocks_w = jnp.maximum(w // merge, 1)
    row = (block // blocks_w) * merge + inner // merge
    col = (block % blocks_w) * merge + inner % merge
    return valid, row, col


class PatchEmbed(nnx.Module):
    """The Conv3d (kernel = stride = [T, P, P], no bias) as one matmul over the processor's flattened patches."""

    def __init__(self, c: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        shape = (c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nnx.Param((c.init_std * jax.random.normal(rngs.params(), shape)).astype(dtype),
                              axes=("embed", None, None, None, None))

    def __call__(self, patches: jax.Array) -> jax.Array:
        w = self.proj[...]
        return patches.astype(w.dtype) @ w.reshape(w.shape[0], -1).T


class VisionAttention(nnx.Module):
    """Fused qkv ([q | k | v] along features) with biases, 2D rotary on q and k in float32, masked attention."""

    def __init__(self, c: QwenVisionConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, use_bias=True, std=c.init_std, dtype=dtype, rngs=rngs)
        d = c.hidden_size
        self.qkv = Dense(d, 3 * d, axes=("embed", "qkv"), **kw)
        self.proj = Dense(d, d, axes=("heads", "embed"), **kw)
        self.num_heads = c.num_heads

    def __call__(self, x: jax.Array, freqs: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
        q = rotate(q.astype(jnp.float32), freqs).astype(x.dtype)
        k = rotate(k.astype(jnp.float32), freqs).astype(x.dtype)
        return self.proj(attend(q, k, v, mask, impl="xla").reshape(b, n, d))


class VisionBlock(nnx.Module):
    def __init__(self, c: QwenVisionConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        self.norm1 = _norm(c, c.hidden_size, stack=stack, dtype=dtype)
        self.norm2 = _norm(c, c.hidden_size, stack=stack, dtype=dtype)
        self.attn = VisionAttention(c, stack=stack, dtype=dtype, rngs=rngs)
        if c.gated_mlp:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, stack=stack, use_bias=True,
                                std=c.init_std, dtype=dtype, rngs=rngs)
        else:  # Qwen2-VL's fc1 -> act -> fc2 is CLIP's MLP
            self.mlp = ClipMLP(c, stack=stack, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array, freqs: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attn(self.norm1(h), freqs, mask)
        return h + self.mlp(self.norm2(h))


class QwenVisionTower(nnx.Module):
    """Patch embedding -> blocks (window or full attention per block) -> last hidden states [B, N, D]."""

    def __init__(self, c: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.config = c
        self.patch_embed = PatchEmbed(c, dtype=dtype, rngs=rngs)
        self.layers = VisionBlock(c, stack=(c.num_layers,), dtype=dtype, rngs=rngs)  # HF blocks.{i}

    def masks(self, grid_thw: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(2D rotary angles [B, N, head_dim/2], full-image mask, window mask), masks [B, 1, N, N].

        Each padded slot also sees itself, so its (never used) output stays finite."""
        c = self.config
        valid, row, col = patch_layout(grid_thw, n, c.merge_size)
        dim = c.head_dim // 2
        inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        freqs = jnp.concatenate([row[..., None] * inv_freq, col[..., None] * inv_freq], axis=-1)
        eye = jnp.eye(n, dtype=bool)[None]
        full = (valid[:, :, None] & valid[:, None, :]) | eye
        if c.window_size is None:
            return freqs, full[:, None], full[:, None]
        # Windows tile the merged-patch grid in squares of window_size // merge // patch merged patches.
        side = c.window_size // c.merge_size // c.patch_size
        window = (row // c.merge_size // side) * (n + 1) + (col // c.merge_size // side)
        same = (window[:, :, None] == window[:, None, :]) & full
        return freqs, full[:, None], (same | eye)[:, None]

    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array, *, remat: str, scan: bool) -> jax.Array:
        c = self.config
        h = constrain(self.patch_embed(pixel_values), ("batch", None, None))
        freqs, full, window = self.masks(grid_thw, h.shape[1])
        is_full = jnp.asarray([c.window_size is None or i in c.fullatt_block_indexes for i in range(c.num_layers)])

        def step(block, x, full_attention):
            return block(x, freqs, jnp.where(full_attention, full, window)), None

        h, _ = run_layers(self.layers, step, h, is_full, remat=remat, scan=scan)
        return h


class PatchMerger(nnx.Module):
    """ln_q, then each 2x2 block of patches concatenated -> linear_1 -> GELU -> linear_2 (HF merger.mlp.0/.2)."""

    def __init__(self, c: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = c.hidden_size * c.merge_size**2
        kw = dict(use_bias=True, std=c.init_std, dtype=dtype, rngs=rngs)
        self.ln_q = _norm(c, c.hidden_size, dtype=dtype)
        self.linear_1 = Dense(d, d, axes=("embed", "mlp"), **kw)
        self.linear_2 = Dense(d, c.out_hidden_size, axes=("mlp", "embed"), **kw)
        self.group = c.merge_size**2

    def __call__(self, h: jax.Array) -> jax.Array:
        b, n, d = h.shape
        x = self.ln_q(h).reshape(b, n // self.group, self.group * d)
        return self.linear_2(activation("gelu")(self.linear_1(x)))


# ------------------------------------------------------------------------------------------- language model


class Qwen2Attention(LlamaAttention):
    """Llama attention with biased q/k/v (o_proj has none) and M-RoPE: rotary frequency f takes its position from
    axis sections[f] (temporal, height, width) of the 3D positions [B, T, 3]; [B, T] positions (decoding, where
    the three axes coincide) rotate as plain RoPE."""

    def __init__(self, c: TextConfig, sections: tuple[int, ...], *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, std=c.init_std, dtype=dtype, rngs=rngs)
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = Dense(d, c.num_heads * hd, axes=("embed", "heads"), use_bias=True, **kw)
        self.k_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = Dense(c.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.qkv_kernel = nnx.data(None)  # never joined: the projections have biases (`layers.can_join`)
        self.config = c
        self.axis_of_freq = tuple(int(a) for a in np.repeat(np.arange(len(sections)), sections))

    def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        pos = positions[..., None] if positions.ndim == 2 else jnp.take(positions, jnp.asarray(self.axis_of_freq), -1)
        freqs = pos.astype(jnp.float32) * jnp.asarray(self.config.inv_freq)
        return rotate(x, freqs, self.config.rope_scaling)


def qwen2_layer(sections: tuple[int, ...]):
    """The stacked-layer builder DecoderLM takes: Qwen2 attention with these M-RoPE sections, Llama's MLP."""

    def make(c: TextConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs) -> DecoderLayer:
        attn = Qwen2Attention(c, sections, stack=stack, dtype=dtype, rngs=rngs)
        mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, stack=stack, use_bias=False,
                       std=c.init_std, dtype=dtype, rngs=rngs)
        return DecoderLayer(c, attn, mlp, stack=stack, dtype=dtype)

    return make


def mrope_positions(input_ids: jax.Array, attention_mask: jax.Array, grid_thw: jax.Array, image_token_id: int,
                    merge: int) -> jax.Array:
    """transformers' get_rope_index for rows with at most one image: [B, T, 3] positions.

    Text tokens count on over real tokens; the image's merged patches sit at (s, s + i, s + j) for grid cell (i, j),
    s = the image's first position; text after the image restarts at s + max(grid_h, grid_w) / merge. Pads get 0.
    """
    real = attention_mask.astype(bool)
    is_img = (input_ids == image_token_id) & real
    index = jnp.cumsum(real, axis=1) - 1  # position among real tokens
    seen = jnp.cumsum(is_img, axis=1)
    before = seen - is_img  # image tokens strictly before
    blocks_w = jnp.maximum(grid_thw[:, 2:3] // merge, 1)
    span = jnp.maximum(grid_thw[:, 1:2], grid_thw[:, 2:3]) // merge
    start = jnp.sum(real & (seen == 0), axis=1, keepdims=True)  # real tokens before the image
    text = index - before + jnp.where(before > 0, span, 0)
    k = seen - 1
    image = jnp.stack([jnp.broadcast_to(start, k.shape), start + k // blocks_w, start + k % blocks_w], axis=-1)
    pos = jnp.where(is_img[..., None], image, text[..., None])
    return jnp.where(real[..., None], pos, 0).astype(jnp.int32)


class QwenVLForConditionalGeneration(LlavaForConditionalGeneration):
    """vision_tower (HF visual), multi_modal_projector (HF visual.merger), language_model, lm_head.

    The decode state is (KV cache, rope delta [B]): after the prompt, token i sits at rotary position
    ``n_real + i + delta`` (delta = last M-RoPE position + 1 - real prompt length), as transformers' rope_deltas."""

    def __init__(self, config: QwenVLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.vision_tower = QwenVisionTower(config.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = PatchMerger(config.vision, dtype=dtype, rngs=rngs)
        self.language_model = DecoderLM(t, dtype=dtype, rngs=rngs, make_layer=qwen2_layer(config.mrope_section))
        self.lm_head = output_head(t, dtype=dtype, rngs=rngs)
        self.lora_rngs: nnx.Rngs | None = nnx.data(None)

    # the M-RoPE positions read the image grids
    KEPT_WITH_EMBEDDINGS = ("image_grid_thw",)
    KEPT_WITH_STATES = KEPT_WITH_EMBEDDINGS

    def vision_states(self, images: dict[str, jax.Array]) -> jax.Array:
        """[B, N, D_vision]: the tower's states of each row's patches (pixel_values) on their grids."""
        c = self.config
        return self.vision_tower(images["pixel_values"], images["image_grid_thw"], remat=c.remat, scan=c.scan_layers)

    def project(self, states: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        """[B, N / merge^2, D_text]: each row's merged patches, in the order its image tokens take them."""
        return self.multi_modal_projector(states)

    def positions(
        self, input_ids: jax.Array, attention_mask: jax.Array, images: dict[str, jax.Array] | None
    ) -> jax.Array:
        """M-RoPE positions [B, T, 3] (text-only batches: the mask-following positions on all three axes)."""
        if images is None:
            return jnp.repeat(super().positions(input_ids, attention_mask, None)[..., None], 3, axis=-1)
        return mrope_positions(input_ids, attention_mask, images["image_grid_thw"], self.config.image_token_id,
                               self.config.vision.merge_size)

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, images: dict[str, jax.Array] | None, cache_len: int,
        *, sliced: bool = False,
    ) -> tuple[jax.Array, tuple[KVCache | SlicedCache, jax.Array], jax.Array]:
        h, cache, kv_valid = super().prefill(input_ids, attention_mask, images, cache_len, sliced=sliced)
        pos = self.positions(input_ids, attention_mask, images)
        last = jnp.max(jnp.where(attention_mask[..., None] > 0, pos, 0), axis=(1, 2))
        return h, (cache, last + 1 - jnp.sum(attention_mask, axis=1).astype(jnp.int32)), kv_valid

    def decode_step(
        self, tokens: jax.Array, positions: jax.Array, kv_valid: jax.Array, state: tuple[KVCache, jax.Array],
        index: jax.Array, *, extend: int = 0,
    ) -> tuple[jax.Array, tuple[KVCache, jax.Array]]:
        cache, delta = state
        h, cache = super().decode_step(tokens, positions + delta[:, None], kv_valid, cache, index, extend=extend)
        return h, (cache, delta)


# ------------------------------------------------------------------------------------------- config.json


def _text_config(hf_config: dict[str, Any]) -> tuple[TextConfig, tuple[int, ...]]:
    """The Qwen2 LM and its M-RoPE sections, from transformers-5's text_config or the Hub's flat layout."""
    tc = dict(hf_config.get("text_config") or hf_config)
    rope = dict(tc.get("rope_parameters") or tc.get("rope_scaling") or {})
    sections = tuple(rope.pop("mrope_section", (16, 24, 24)))
    if rope.get("rope_type", rope.get("type", "default")) in ("mrope", "default"):
        rope.pop("type", None)
        rope["rope_type"] = "default"
    rope.setdefault("rope_theta", tc.get("rope_theta", 1000000.0))  # transformers' Qwen2-VL default theta
    if tc.get("use_sliding_window"):
        raise ValueError("qwen2_vl: use_sliding_window=True is not supported")
    tc["rope_parameters"] = rope
    tie = hf_config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
    text = TextConfig.from_hf(tc, arch="qwen2", attention_bias=True, tie_word_embeddings=bool(tie))
    if sum(sections) != text.head_dim // 2:
        raise ValueError(f"qwen2_vl: mrope_section {sections} must sum to head_dim / 2 = {text.head_dim // 2}")
    return text, sections


def _vision_config(vc: dict[str, Any], qwen2_5: bool) -> QwenVisionConfig:
    rope = vc.get("rope_parameters") or {}
    common = dict(
        num_layers=vc.get("depth", 32),
        num_heads=vc.get("num_heads", 16),
        patch_size=vc.get("patch_size", vc.get("spatial_patch_size", 14)),
        temporal_patch_size=vc.get("temporal_patch_size", 2),
        merge_size=vc.get("spatial_merge_size", 2),
        in_channels=vc.get("in_channels", vc.get("in_chans", 3)),
        rope_theta=rope.get("rope_theta", 10000.0),
        init_std=vc.get("initializer_range", 0.02),
    )
    if qwen2_5:
        return QwenVisionConfig(
            hidden_size=vc.get("hidden_size", 1280), intermediate_size=vc.get("intermediate_size", 3420),
            out_hidden_size=vc.get("out_hidden_size", 3584), hidden_act=vc.get("hidden_act", "silu"), norm="rms",
            gated_mlp=True, window_size=vc.get("window_size", 112),
            fullatt_block_indexes=tuple(vc.get("fullatt_block_indexes", (7, 15, 23, 31))), **common)
    # Qwen2-VL names the tower width embed_dim and the merger's output width hidden_size.
    embed = vc.get("embed_dim", 1280)
    return QwenVisionConfig(
        hidden_size=embed, intermediate_size=int(embed * vc.get("mlp_ratio", 4)),
        out_hidden_size=vc.get("hidden_size", 3584), hidden_act=vc.get("hidden_act", "quick_gelu"), norm="layer",
        gated_mlp=False, window_size=None, fullatt_block_indexes=(), **common)


def qwen_vl_config(hf_config: dict[str, Any], **options: Any) -> QwenVLConfig:
    """QwenVLConfig from a qwen2_vl or qwen2_5_vl config.json; options: remat, scan_layers, attention_impl."""
    text, sections = _text_config(hf_config)
    vision = _vision_config(hf_config.get("vision_config", {}), hf_config.get("model_type") == "qwen2_5_vl")
    if vision.out_hidden_size != text.hidden_size:
        raise ValueError(f"qwen2_vl: merger width {vision.out_hidden_size} != text hidden_size {text.hidden_size}")
    return QwenVLConfig(
        text=text,
        vision=vision,
        mrope_section=sections,
        image_token_id=hf_config.get("image_token_id", 151655),
        num_image_tokens=0,
        vocab_size=text.vocab_size,
        **special_token_ids(hf_config),
        hf_config=hf_config,
        **options,
    )


# ----------------------------------------------------------------------------------------------- HF names
_PREFIXES = {
    "vision_tower": "model.visual",
    "multi_modal_projector": "model.visual.merger",
    "language_model": "model.language_model",
}
_STACKS = {"vision_tower": "blocks.{i}", "language_model": "layers.{i}"}
_LEAVES = {**LEAVES, "proj": ("proj.weight", False)}
_SPECIAL = {
    ("lm_head",): HFParam("lm_head.weight", False, False),
    **{("multi_modal_projector", f"linear_{i}", leaf): HFParam(f"model.visual.merger.mlp.{j}.{name}", t, False)
       for i, j in ((1, 0), (2, 2)) for leaf, name, t in (("kernel", "weight", True), ("bias", "bias", False))},
}


def qwen_vl_name_map(model: nnx.Module) -> dict[tuple[str, ...], HFParam]:
    """Flax path -> transformers-5 tensor name."""
    return stacked_name_map(model, _PREFIXES, _STACKS, _LEAVES, special=_SPECIAL)


# The Hub's checkpoints (Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*) predate transformers 5's names.
_ALIASES = [
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!visual\.|language_model\.)"), "model.language_model."),
]

ARCHITECTURES = tuple(
    Architecture(
        model_type=model_type,
        config=qwen_vl_config,
        model=QwenVLForConditionalGeneration,
        name_map=qwen_vl_name_map,
        canonical_name=lambda name: rename(name, _ALIASES),
    )
    for model_type in ("qwen2_vl", "qwen2_5_vl")
)
