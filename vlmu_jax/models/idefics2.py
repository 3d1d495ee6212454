"""Idefics2 (HuggingFaceM4/idefics2-8b): SigLIP-style vision encoder over padded native-resolution images ->
perceiver resampler connector (modality projection MLP + latents cross-attending [context; latents]) ->
a fixed number of image tokens per image spliced into a Mistral language model.

The surface is llava.py's (hidden states, ``head_weight``, ``prefill``/``decode_step`` with the text KV
cache); ``images`` is the dict our Idefics2 processor makes: ``pixel_values`` [B, N, 3, P, P] and
``pixel_attention_mask`` [B, N, P, P] (N images per row: 1, or 5 with image splitting). Row b's k-th image
token takes the k-th of its N * n_latents image features.

Module names follow this codebase's generic roles so LoRA targets and trainable filters work unchanged:
``vision_tower`` = HF ``model.vision_model``, ``multi_modal_projector`` = HF ``model.connector``,
``language_model`` = HF ``model.text_model``, ``lm_head``.

Padded patches (a patch counts as real only if all its pixels are) are masked out as keys in the vision
encoder and the perceiver, and SigLIP position ids come from HF's fractional bucketing of the real patch
grid, so padding an image further (our fixed ``longest_edge`` square) changes nothing. transformers skips
all-zero (padding) images; here a text-only row's blank image is computed with a dummy all-real mask (kept
finite) and its features are never spliced since the row has no image tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmu_jax.models.architecture import Architecture, special_token_ids
from vlmu_jax.models.clip import ClipLayer, VisionConfig
from vlmu_jax.models.hf_names import LEAVES, HFParam, stacked_name_map
from vlmu_jax.models.layers import (
    Dense,
    LayerNorm,
    RMSNorm,
    SeqLengths,
    ValidFirst,
    activation,
    attend,
    fold,
    run_layers,
)
from vlmu_jax.models.llama import DecoderLM, TextConfig, output_head
from vlmu_jax.models.llava import LlavaForConditionalGeneration
from vlmu_jax.models.sharding import constrain


@dataclass(frozen=True)
class PerceiverConfig:
    hidden_size: int
    hidden_act: str
    rms_norm_eps: float
    n_latents: int
    depth: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    init_std: float


@dataclass(frozen=True)
class Idefics2Config:
    text: TextConfig
    vision: VisionConfig
    perceiver: PerceiverConfig
    image_token_id: int
    num_image_tokens: int  # per image (= perceiver latents); a row with N images carries N runs of them
    vocab_size: int
    pad_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    remat: str = "none"
    scan_layers: bool = True
    attention_impl: str = "auto"
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


# ------------------------------------------------------------------------------------------- vision


class PatchEmbedding(nnx.Module):
    """SigLIP's patch conv (kernel = stride = patch, with bias) as one matmul over non-overlapping patches."""

    def __init__(self, c: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, p = c.hidden_size, c.patch_size
        self.weight = nnx.Param(
            (c.init_std * jax.random.normal(rngs.params(), (d, c.num_channels, p, p))).astype(dtype),
            axes=("embed", None, None, None),
        )
        self.bias = nnx.Param(jnp.zeros((d,), dtype), axes=("embed",))
        self.patch_size = p

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B, C, H, W] -> [B, (H//p) * (W//p), D], row-major over the patch grid (remainders dropped)."""
        w, p = self.weight[...], self.patch_size
        b, ch, hh, ww = pixel_values.shape
        nh, nw = hh // p, ww // p
        x = pixel_values[:, :, : nh * p, : nw * p].astype(w.dtype).reshape(b, ch, nh, p, nw, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, nh * nw, ch * p * p)
        return x @ w.reshape(w.shape[0], -1).T + self.bias[...]


def _torch_arange_boundaries(n: int) -> np.ndarray:
    """torch.arange(1/n, 1.0, 1/n) in float32 (values start + i*step computed in double, as torch's CPU kernel)."""
    step = 1.0 / n
    count = math.ceil((1.0 - step) / step)
    return np.asarray([step + step * i for i in range(count)], np.float64).astype(np.float32)


def patch_position_ids(patch_mask: jax.Array, num_patches_per_side: int) -> jax.Array:
    """HF Idefics2VisionEmbeddings position ids: the real patch grid's fractional coordinates bucketed onto
    the learned num_patches_per_side^2 grid; 0 at padded patches. patch_mask [B, h, w] bool -> [B, h*w]."""
    b, mh, mw = patch_mask.shape
    boundaries = jnp.asarray(_torch_arange_boundaries(num_patches_per_side))

    def bucket(count: jax.Array, size: int) -> jax.Array:
        step = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
        frac = jnp.arange(size, dtype=jnp.float32)[None, :] * step[:, None]
        frac = jnp.minimum(frac, jnp.float32(1.0 - 1e-6))
        return jnp.searchsorted(boundaries, frac, side="right").astype(jnp.int32)  # torch.bucketize(right=True)

    rows = bucket(patch_mask[:, :, 0].sum(axis=1), mh)
    cols = bucket(patch_mask[:, 0, :].sum(axis=1), mw)
    pos = (rows[:, :, None] * num_patches_per_side + cols[:, None, :]).reshape(b, -1)
    return jnp.where(patch_mask.reshape(b, -1), pos, 0)


class Idefics2VisionEmbeddings(nnx.Module):
    def __init__(self, c: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.patch_embedding = PatchEmbedding(c, dtype=dtype, rngs=rngs)
        self.num_patches_per_side = c.image_size // c.patch_size
        self.position_embedding = nnx.Param(
            (c.init_std * jax.random.normal(rngs.params(), (self.num_patches_per_side**2, c.hidden_size))).astype(
                dtype
            ),
            axes=(None, "embed"),
        )

    def __call__(self, pixel_values: jax.Array, patch_mask: jax.Array) -> jax.Array:
        h = self.patch_embedding(pixel_values)
        pos = patch_position_ids(patch_mask, self.num_patches_per_side)
        return h + jnp.take(self.position_embedding[...], pos, axis=0).astype(h.dtype)


class Idefics2VisionTower(nnx.Module):
    """Embeddings -> pre-norm encoder layers (CLIP layer shape, patch key mask) -> post_layernorm."""

    def __init__(self, c: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.config = c
        self.embeddings = Idefics2VisionEmbeddings(c, dtype=dtype, rngs=rngs)
        self.layers = ClipLayer(c, stack=(c.num_layers,), dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(c.hidden_size, c.layer_norm_eps, dtype=dtype)

    def __call__(self, pixel_values: jax.Array, patch_mask: jax.Array, *, impl: str, remat: str, scan: bool):
        """pixel_values [B, 3, H, W], patch_mask [B, h, w] bool -> [B, h*w, D].

        Padded patches are masked as keys (HF: the patch mask), so the layers run on the patches reordered real
        ones first, with the mask as each image's count of real patches (layers.SeqLengths): on GPU cuDNN's fused
        kernel takes it as sequence lengths. Exact: nothing in a layer but attention mixes patches, and attention
        does not depend on key order (the positions were added by the embeddings). Why: a [B, 1, 1, S] mask kept
        jax on XLA's unfused attention, [heads, 4900, 4900] scores per image and layer at 980 px, which made
        Idefics2's log-probs 2.6x slower than HF's (bench/RESULTS.md, 2026-11-23), and real batches (non-square
        images, or images of several sizes) nearly always have padded patches."""
        h = self.embeddings(pixel_values, patch_mask)
        real = patch_mask.reshape(h.shape[0], -1)
        first = ValidFirst.of(real)
        h = constrain(first.to(h), ("batch", None, None))
        keys = SeqLengths(jnp.sum(real, axis=1, dtype=jnp.int32))  # >= 1: blank images get a full mask
        step = lambda layer, x, _: (layer(x, impl, keys), None)  # noqa: E731
        h = run_layers(self.layers, step, h, remat=remat, scan=scan)[0]
        h = first.back(h)
        return self.post_layernorm(h)


# ------------------------------------------------------------------------------------------- connector


class Idefics2MLP(nnx.Module):
    """down(act(gate(x)) * up(x)), no biases, input and output widths may differ."""

    def __init__(self, din: int, f: int, dout: int, act: str, *, stack=(), std: float, dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, std=std, dtype=dtype, rngs=rngs)
        self.gate_proj = Dense(din, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(din, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(f, dout, axes=("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        h = activation(self.act)(self.gate_proj(x, fold(rng, 0))) * self.up_proj(x, fold(rng, 1))
        return self.down_proj(h, fold(rng, 2))


class PerceiverAttention(nnx.Module):
    """Latents attend (GQA, no mask among latents) over [context; latents]."""

    def __init__(self, c: PerceiverConfig, *, stack, dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, std=c.init_std, dtype=dtype, rngs=rngs)
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = Dense(d, c.num_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(c.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.config = c

    def __call__(self, latents, context, mask, *, impl: str, rng=None):
        c = self.config
        b, n, _ = latents.shape
        kv_in = jnp.concatenate([context, latents], axis=1)
        s = kv_in.shape[1]
        q = self.q_proj(latents, fold(rng, 0)).reshape(b, n, c.num_heads, c.head_dim)
        k = self.k_proj(kv_in, fold(rng, 1)).reshape(b, s, c.num_kv_heads, c.head_dim)
        v = self.v_proj(kv_in, fold(rng, 2)).reshape(b, s, c.num_kv_heads, c.head_dim)
        out = attend(q, k, v, mask, impl=impl)
        return self.o_proj(out.reshape(b, n, c.num_heads * c.head_dim), fold(rng, 3))


class PerceiverLayer(nnx.Module):
    def __init__(self, c: PerceiverConfig, *, stack, dtype, rngs: nnx.Rngs):
        d, eps = c.hidden_size, c.rms_norm_eps
        self.input_latents_norm = RMSNorm(d, eps, stack=stack, dtype=dtype)
        self.input_context_norm = RMSNorm(d, eps, stack=stack, dtype=dtype)
        self.self_attn = PerceiverAttention(c, stack=stack, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps, stack=stack, dtype=dtype)
        self.mlp = Idefics2MLP(d, 4 * d, d, c.hidden_act, stack=stack, std=c.init_std, dtype=dtype, rngs=rngs)

    def __call__(self, latents, context, mask, *, impl: str, rng=None):
        lat = self.input_latents_norm(latents)
        ctx = self.input_context_norm(context)
        latents = latents + self.self_attn(lat, ctx, mask, impl=impl, rng=fold(rng, 0))
        return latents + self.mlp(self.post_attention_layernorm(latents), fold(rng, 1))


class PerceiverResampler(nnx.Module):
    def __init__(self, c: PerceiverConfig, *, dtype, rngs: nnx.Rngs):
        self.config = c
        self.latents = nnx.Param(jnp.ones((c.n_latents, c.hidden_size), dtype), axes=(None, "embed"))
        self.layers = PerceiverLayer(c, stack=(c.depth,), dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)

    def __call__(self, context, context_mask, *, impl: str, remat: str, scan: bool):
        """context [B, S, D], context_mask [B, S] bool -> [B, n_latents, D]."""
        b = context.shape[0]
        latents = jnp.broadcast_to(self.latents[...], (b, *self.latents.shape)).astype(context.dtype)
        keys = jnp.concatenate([context_mask, jnp.ones((b, self.config.n_latents), bool)], axis=1)
        mask = keys[:, None, None, :]
        latents, _ = run_layers(
            self.layers,
            lambda layer, x, _: (layer(x, context, mask, impl=impl), None),
            latents,
            remat=remat,
            scan=scan,
        )
        return self.norm(latents)


class Idefics2Connector(nnx.Module):
    def __init__(self, config: Idefics2Config, *, dtype, rngs: nnx.Rngs):
        t, v = config.text, config.vision
        self.modality_projection = Idefics2MLP(
            v.hidden_size, t.intermediate_size, t.hidden_size, t.hidden_act, std=t.init_std, dtype=dtype, rngs=rngs
        )
        self.perceiver_resampler = PerceiverResampler(config.perceiver, dtype=dtype, rngs=rngs)

    def __call__(self, image_hidden, patch_mask, *, impl: str, remat: str, scan: bool):
        return self.perceiver_resampler(
            self.modality_projection(image_hidden), patch_mask, impl=impl, remat=remat, scan=scan
        )


# ------------------------------------------------------------------------------------------- model


class Idefics2ForConditionalGeneration(LlavaForConditionalGeneration):
    """vision_tower (HF vision_model), multi_modal_projector (HF connector), language_model (HF text_model),
    lm_head. Decoding, prefill and decode_step are LLaVA's (same Llama-shaped decoder and KV cache)."""

    # transformers' Idefics2 keeps padding's embeddings and leaves position_ids to its text model (the index).
    ZERO_PAD_EMBEDDINGS = False

    def positions(
        self, input_ids: jax.Array, attention_mask: jax.Array, images: dict[str, jax.Array] | None
    ) -> jax.Array:
        """As LLaVA's, but padding slots keep their index (only their own outputs depend on it: MLLMU's KL_Min)."""
        index = jnp.broadcast_to(jnp.arange(attention_mask.shape[1]), attention_mask.shape)
        return jnp.where(attention_mask > 0, jnp.cumsum(attention_mask, axis=1) - 1, index)

    def __init__(self, config: Idefics2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.vision_tower = Idefics2VisionTower(config.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Idefics2Connector(config, dtype=dtype, rngs=rngs)
        self.language_model = DecoderLM(t, dtype=dtype, rngs=rngs)
        self.lm_head = output_head(t, dtype=dtype, rngs=rngs)
        self.lora_rngs: nnx.Rngs | None = nnx.data(None)

    KEPT_WITH_STATES = ("pixel_attention_mask",)  # the connector reads which patches are real

    def _patches(self, pixel_attention_mask: jax.Array) -> jax.Array:
        """[B * N, nh, nw]: which patches of each crop hold pixels, from pixel_attention_mask [B, N, H, W]."""
        p = self.config.vision.patch_size
        b, n, hh, ww = pixel_attention_mask.shape
        nh, nw = hh // p, ww // p
        pm = pixel_attention_mask.reshape(b * n, hh, ww)[:, : nh * p, : nw * p].astype(jnp.int32)
        patch_mask = pm.reshape(b * n, nh, p, nw, p).sum(axis=(2, 4)) == p * p
        # Blank (text-only) images have no real patch: give them a dummy full mask so nothing degenerates.
        return jnp.where(patch_mask.any(axis=(1, 2))[:, None, None], patch_mask, True)

    def vision_states(self, images: dict[str, jax.Array]) -> jax.Array:
        """[B, N * patches, D_vision]: the tower's states of each row's N crops (pixel_values [B, N, 3, H, W]),
        attending over their real patches (pixel_attention_mask [B, N, H, W])."""
        pixel_values = images["pixel_values"]
        b, n, ch, hh, ww = pixel_values.shape
        c = self.config
        h = self.vision_tower(pixel_values.reshape(b * n, ch, hh, ww), self._patches(images["pixel_attention_mask"]),
                              impl=c.attention_impl, remat=c.remat, scan=c.scan_layers)
        return h.reshape(b, n * h.shape[1], h.shape[2])

    def project(self, states: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        """[B, N * n_latents, D_text]: the connector on each crop's states and its real patches."""
        patch_mask = self._patches(images["pixel_attention_mask"])
        b = states.shape[0]
        crops = patch_mask.shape[0]
        # The perceiver's attention carries a key-padding mask: it runs on XLA's attention (exact with any mask)
        # whatever attention_impl says; the vision tower runs attention_impl on its real patches (see there).
        feats = self.multi_modal_projector(states.reshape(crops, -1, states.shape[-1]), patch_mask.reshape(crops, -1),
                                           impl="xla", remat=self.config.remat, scan=self.config.scan_layers)
        return feats.reshape(b, -1, feats.shape[2])


# ------------------------------------------------------------------------------------------- config.json


def mistral_text_config(c: dict[str, Any]) -> TextConfig:
    """Mistral = the Llama decoder with an optional sliding window (applied in the attention mask)."""
    return TextConfig.from_hf(c, arch="llama", sliding_window=c.get("sliding_window"))


TEXT_CONFIGS = {"mistral": mistral_text_config, "llama": TextConfig.from_hf}


def idefics2_config(hf_config: dict[str, Any], **options: Any) -> Idefics2Config:
    """Idefics2Config from config.json (clear errors on parts we do not build); options: remat, scan_layers,
    attention_impl."""
    tc = hf_config.get("text_config", {})
    vc = hf_config.get("vision_config", {})
    pc = dict(hf_config.get("perceiver_config", {}))
    text_type = tc.get("model_type", "mistral")
    if text_type not in TEXT_CONFIGS:
        raise ValueError(
            f"unknown architecture: idefics2 text_config.model_type={text_type!r}; supported {sorted(TEXT_CONFIGS)}"
        )
    vis_type = vc.get("model_type", "idefics2_vision")
    if vis_type != "idefics2_vision":
        raise ValueError(f"unknown architecture: idefics2 vision_config.model_type={vis_type!r}")
    if pc.get("qk_layer_norms_perceiver") or hf_config.get("qk_layer_norms_perceiver"):
        raise ValueError("idefics2: qk_layer_norms_perceiver=True is not supported")
    text = TEXT_CONFIGS[text_type](tc)
    tie = hf_config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
    if tie != text.tie_word_embeddings:
        text = TextConfig(**{**text.__dict__, "tie_word_embeddings": bool(tie)})
    image_size = vc.get("image_size", 224)
    patch_size = vc.get("patch_size", 32)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError("idefics2: non-square vision image_size/patch_size is not supported")
    vision = VisionConfig(
        hidden_size=vc.get("hidden_size", 768),
        intermediate_size=vc.get("intermediate_size", 3072),
        num_layers=vc.get("num_hidden_layers", 12),
        num_heads=vc.get("num_attention_heads", 12),
        image_size=image_size,
        patch_size=patch_size,
        num_channels=vc.get("num_channels", 3),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        hidden_act=vc.get("hidden_act", "gelu_pytorch_tanh"),
        init_std=vc.get("initializer_range", 0.02),
    )
    p_hidden, p_eps = pc.get("hidden_size", 4096), pc.get("rms_norm_eps", 1e-6)
    if p_hidden != text.hidden_size:  # transformers' Idefics2Config.__post_init__ does the same
        p_hidden, p_eps = text.hidden_size, text.rms_norm_eps
    heads, kv_heads = pc.get("resampler_n_heads", 16), pc.get("num_key_value_heads", 4)
    if heads % kv_heads:
        raise ValueError(f"idefics2: resampler_n_heads={heads} not a multiple of num_key_value_heads={kv_heads}")
    perceiver = PerceiverConfig(
        hidden_size=p_hidden,
        hidden_act=pc.get("hidden_act", "silu"),
        rms_norm_eps=p_eps,
        n_latents=pc.get("resampler_n_latents", 64),
        depth=pc.get("resampler_depth", 3),
        num_heads=heads,
        head_dim=pc.get("resampler_head_dim", 96),
        num_kv_heads=kv_heads,
        init_std=pc.get("initializer_range", 0.02),
    )
    return Idefics2Config(
        text=text,
        vision=vision,
        perceiver=perceiver,
        image_token_id=hf_config.get("image_token_id", 32001),
        num_image_tokens=perceiver.n_latents,
        vocab_size=text.vocab_size,
        **special_token_ids(hf_config),
        hf_config=hf_config,
        **options,
    )


# ----------------------------------------------------------------------------------------------- HF names
_PREFIXES = {
    "vision_tower": "model.vision_model",
    "multi_modal_projector": "model.connector",
    "language_model": "model.text_model",
}
_STACKS = {"vision_tower": "encoder.layers.{i}", "multi_modal_projector": "layers.{i}", "language_model": "layers.{i}"}
_LEAVES = {**LEAVES, "latents": ("latents", False), "position_embedding": ("position_embedding.weight", False)}


def idefics2_name_map(model: nnx.Module) -> dict[tuple[str, ...], HFParam]:
    """Flax path -> transformers-5 tensor name."""
    return stacked_name_map(
        model, _PREFIXES, _STACKS, _LEAVES, special={("lm_head",): HFParam("lm_head.weight", False, False)}
    )


ARCHITECTURE = Architecture(
    model_type="idefics2",
    config=idefics2_config,
    model=Idefics2ForConditionalGeneration,
    name_map=idefics2_name_map,
    canonical_name=lambda name: name,  # Idefics2 checkpoints on the Hub already use these names
)
