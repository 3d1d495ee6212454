"""Mllama (Llama-3.2-Vision): tiled vision encoder (mllama_vision.py) -> linear projector -> K/V of gated
cross-attention layers inside a Llama decoder. The image never enters the token stream: the one
``<|image|>`` token stays one token (``num_image_tokens`` = 1) and only decides who sees the image.

Surface as in llava.py (``__call__``, ``head_weight``, ``prefill``, ``decode_step``); ``images`` is
``{"pixel_values": [B, T, 3, S, S], "aspect_ratio_ids": [B], "aspect_ratio_mask": [B, T]}`` (one image per
row, T = max tiles; a text-only row has aspect ratio id 0).

Cross-attention mask, as HF's processor + ``_prepare_cross_attention_mask`` build it: in a row with an image,
tokens from the first image token on attend to that image's valid tiles (every vision token of them, class
token included). A token before the image token (or a row whose image has no image token) has no allowed
key; HF then clears its mask row, so it attends to ALL vision tokens unmasked, and zeroes only the gated MLP
branch of the cross layer (``full_text_row_masked_out_mask``), not the attention branch; we keep that exactly.
A row without an image (id 0) skips every cross layer, which is what HF computes for that row on its own
(no pixel_values: cross layers are skipped); a batch with ``images=None`` skips them statically.

Layers are heterogeneous (self-attention and cross-attention decoder layers at ``cross_attention_layers``),
so the text decoder runs unrolled: ``scan_layers`` applies to the vision encoders only and is a no-op for the
decoder. ``remat`` wraps every decoder layer (and the vision layers through ``run_layers``).

Generation: ``prefill`` runs the vision model once, keeps every cross layer's projected (k-normed) K/V and
the per-row mask in the decode state next to the self-attention KV cache; ``decode_step`` reuses them (a new
token attends as the last prompt token does, as HF's generation repeats the last mask row).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlmu_jax.models.architecture import Architecture, special_token_ids
from vlmu_jax.models.hf_names import LEAVES, HFParam, base_params, rename
from vlmu_jax.models.layers import (
    Dense,
    GatedMLP,
    RMSNorm,
    attend,
    attention_mask,
    cache_written,
    fold,
    last_real,
    remat_call,
)
from vlmu_jax.models.llama import KVCache, TextConfig, layers_to_run, llama_layer
from vlmu_jax.models.mllama_vision import MllamaVisionConfig, MllamaVisionModel
from vlmu_jax.models.sharding import constrain


@dataclass(frozen=True)
class MllamaConfig:
    text: TextConfig
    vision: MllamaVisionConfig
    cross_attention_layers: tuple[int, ...]
    image_token_id: int
    vocab_size: int
    pad_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    num_image_tokens: int = 1
    remat: str = "none"
    scan_layers: bool = True  # vision encoders only; the decoder is always unrolled (heterogeneous layers)
    attention_impl: str = "auto"
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


def mllama_config(hf_config: dict[str, Any], **options: Any) -> MllamaConfig:
    """MllamaConfig from config.json; options: remat, scan_layers, attention_impl."""
    tc, vc = hf_config.get("text_config", {}), hf_config.get("vision_config", {})
    if tc.get("model_type", "mllama_text_model") != "mllama_text_model":
        raise ValueError(f"unknown architecture: mllama text_config.model_type={tc.get('model_type')!r}")
    if vc.get("model_type", "mllama_vision_model") != "mllama_vision_model":
        raise ValueError(f"unknown architecture: mllama vision_config.model_type={vc.get('model_type')!r}")
    if tc.get("tie_word_embeddings", False):
        raise ValueError("mllama with tie_word_embeddings=True is not supported (embed_tokens has 8 extra rows)")
    if tc.get("num_key_value_heads") and tc["num_attention_heads"] % tc["num_key_value_heads"]:
        raise ValueError("mllama: num_attention_heads must be a multiple of num_key_value_heads")
    text = TextConfig.from_hf({**tc, "head_dim": None}, arch="llama")
    layers = tuple(tc.get("cross_attention_layers") or (3, 8, 13, 18, 23, 28, 33, 38))
    if any(not 0 <= i < text.num_layers for i in layers):
        raise ValueError(f"cross_attention_layers {layers} outside 0..{text.num_layers - 1}")
    return MllamaConfig(
        text=text,
        vision=MllamaVisionConfig.from_hf(vc),
        cross_attention_layers=layers,
        image_token_id=hf_config.get("image_token_index", hf_config.get("image_token_id", 128256)),
        vocab_size=text.vocab_size,
        **special_token_ids(hf_config),
        hf_config=hf_config,
        **options,
    )


# ------------------------------------------------------------------------------------------- text model


class CrossAttention(nnx.Module):
    """q from text, k/v from vision states; RMSNorm over head_dim on q and k (no rotary)."""

    def __init__(self, c: TextConfig, *, dtype, rngs: nnx.Rngs):
        kw = dict(std=c.init_std, dtype=dtype, rngs=rngs)
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = Dense(d, c.num_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(c.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.q_norm = RMSNorm(hd, c.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(hd, c.rms_norm_eps, dtype=dtype)
        self.config = c

    def kv(self, states: jax.Array, rng: jax.Array | None) -> KVCache:
        c = self.config
        b, n, _ = states.shape
        k = self.k_norm(self.k_proj(states, fold(rng, 1)).reshape(b, n, c.num_kv_heads, c.head_dim))
        v = self.v_proj(states, fold(rng, 2)).reshape(b, n, c.num_kv_heads, c.head_dim)
        return k, v

    def __call__(self, x: jax.Array, kv: KVCache, mask: jax.Array, *, impl: str, rng: jax.Array | None):
        c = self.config
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x, fold(rng, 0)).reshape(b, t, c.num_heads, c.head_dim))
        out = attend(q, kv[0].astype(q.dtype), kv[1].astype(q.dtype), mask, impl=impl)
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim), fold(rng, 3))


class CrossDecoderLayer(nnx.Module):
    """h + tanh(attn_gate) * xattn(norm(h)); h + tanh(mlp_gate) * row_mask * mlp(norm(h))."""

    def __init__(self, c: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cross_attn = CrossAttention(c, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.cross_attn_attn_gate = nnx.Param(jnp.zeros((1,), dtype), axes=(None,))
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, stack=(), use_bias=c.mlp_bias,
                            std=c.init_std, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.cross_attn_mlp_gate = nnx.Param(jnp.zeros((1,), dtype), axes=(None,))

    def __call__(self, h: jax.Array, cross: CrossState, kv: KVCache, *, impl: str, rng: jax.Array | None):
        """cross.token_mask [B, T] (token sees its image), key_valid [B, N], has_image [B]."""
        tok = cross.token_mask.astype(bool)
        mask = tok[:, :, None] & cross.key_valid.astype(bool)[:, None, :]
        mask = jnp.where(tok[:, :, None], mask, True)[:, None]  # HF: rows with no allowed key are unmasked
        a = self.cross_attn(self.input_layernorm(h), kv, mask, impl=impl, rng=fold(rng, 0))
        out = h + jnp.tanh(self.cross_attn_attn_gate[...]).astype(h.dtype) * a
        m = self.mlp(self.post_attention_layernorm(out), fold(rng, 1)) * tok[..., None].astype(h.dtype)
        out = out + jnp.tanh(self.cross_attn_mlp_gate[...]).astype(h.dtype) * m
        out = jnp.where(cross.has_image.astype(bool)[:, None, None], out, h)
        return constrain(out, ("batch", "seq", None))


class CrossState(NamedTuple):
    token_mask: jax.Array  # [B, T] int: this token attends to its row's image
    key_valid: jax.Array  # [B, N] int: vision token belongs to a valid tile
    has_image: jax.Array  # [B] int: row has an image (else cross layers are the identity)


class DecodeState(NamedTuple):
    self_kv: tuple[KVCache, ...]  # one [B, S, K, H] pair per self-attention layer
    cross_kv: tuple[KVCache, ...] | None  # one [B, N, K, H] pair per cross layer (None: text-only batch)
    cross: CrossState | None  # token_mask [B, 1]: how generated tokens attend


class MllamaTextModel(nnx.Module):
    """embed_tokens (vocab + 8 rows), unrolled self/cross decoder layers, final norm (no head)."""

    def __init__(self, c: TextConfig, cross_layers: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
        self.config = c
        self.cross_layers = cross_layers
        self.embed_tokens = nnx.Param(
            (c.init_std * jax.random.normal(rngs.params(), (c.vocab_size + 8, c.hidden_size))).astype(dtype),
            axes=("vocab", "embed"),
        )
        # string keys: Flax paths stay ("layers", "3", ...), the HF layout, for the name map and LoRA regexes
        self.layers = nnx.Dict({
            str(i): CrossDecoderLayer(c, dtype=dtype, rngs=rngs)
            if i in cross_layers
            else llama_layer(c, stack=(), dtype=dtype, rngs=rngs)
            for i in range(c.num_layers)
        })
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        ids = jnp.clip(input_ids, 0, self.config.vocab_size + 7)
        return jnp.take(self.embed_tokens[...], ids, axis=0)

    def cross_kv(self, states: jax.Array, rng: jax.Array | None) -> tuple[KVCache, ...]:
        """Every cross layer's K/V of the projected vision states [B, N, D]."""
        return tuple(self.layers[str(i)].cross_attn.kv(states, fold(rng, 1000 + i)) for i in self.cross_layers)

    def __call__(
        self,
        h: jax.Array,
        positions: jax.Array,
        kv_valid: jax.Array,
        *,
        cross: CrossState | None,
        cross_kv: tuple[KVCache, ...] | None,
        impl: str,
        remat: str,
        self_kv: tuple[KVCache, ...] | None = None,
        index: jax.Array | int = 0,
        rng: jax.Array | None = None,
        output_layer: int | None = None,
    ) -> tuple[jax.Array, tuple[KVCache, ...] | None]:
        """As DecoderLM.__call__, plus the cross-attention inputs (None: no image in the batch); layer indices
        count the cross-attention layers, as HF's `model.language_model.layers` does."""
        b, t, _ = h.shape
        q_slots = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        k_slots = jnp.broadcast_to(jnp.arange(kv_valid.shape[1]), kv_valid.shape)
        mask = attention_mask(q_slots, k_slots, kv_valid)
        causal = self_kv is None
        h = constrain(h, ("batch", "seq", None))
        new_kv, n_self, n_cross = [], 0, 0

        def self_fn(layer, h, positions, mask, cache, index, rng):
            return layer(h, positions, mask, impl=impl, causal=causal, cache=cache, index=index, rng=rng)

        def cross_fn(layer, h, cross, kv, rng):
            return layer(h, cross, kv, impl=impl, rng=rng)

        self_call, cross_call = remat_call(self_fn, remat), remat_call(cross_fn, remat)
        n_run = self.config.num_layers if output_layer is None else layers_to_run(output_layer, self.config.num_layers)
        for i in range(n_run):
            layer, layer_rng = self.layers[str(i)], fold(rng, i)
            if i in self.cross_layers:
                if cross is not None:
                    h = cross_call(layer, h, cross, cross_kv[n_cross], layer_rng)
                n_cross += 1
            else:
                cache = None if self_kv is None else self_kv[n_self]
                h, cache = self_call(layer, h, positions, mask, cache, index, layer_rng)
                if cache is not None and t > 1:  # a prompt's pass writing the cache
                    h, cache = cache_written(h, cache)
                new_kv.append(cache)
                n_self += 1
        h = h if output_layer is not None else self.norm(h)
        return h, (None if self_kv is None else tuple(new_kv))


# ------------------------------------------------------------------------------------------ full model


class MllamaForConditionalGeneration(nnx.Module):
    """Parameter tree: vision_tower (HF model.vision_model), multi_modal_projector, language_model, lm_head."""

    def __init__(self, config: MllamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        t, v = config.text, config.vision
        self.config = config
        self.vision_tower = MllamaVisionModel(v, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Dense(v.output_dim, t.hidden_size, axes=("mlp", "embed"), use_bias=True,
                                           std=t.init_std, dtype=dtype, rngs=rngs)
        self.language_model = MllamaTextModel(t, config.cross_attention_layers, dtype=dtype, rngs=rngs)
        self.lm_head = nnx.Param(
            (t.init_std * jax.random.normal(rngs.params(), (t.vocab_size, t.hidden_size))).astype(dtype),
            axes=("vocab", "embed"),
        )
        self.lora_rngs: nnx.Rngs | None = nnx.data(None)

    def head_weight(self) -> jax.Array:
        return self.lm_head[...]

    def vision_states(self, images: dict[str, jax.Array]) -> jax.Array:
        """Projected vision tokens [B, T * P, D_text] (tile-major)."""
        c = self.config
        feats = self.vision_tower(
            images["pixel_values"],
            images["aspect_ratio_ids"].reshape(-1),
            images["aspect_ratio_mask"],
            impl=c.attention_impl,
            remat=c.remat,
            scan=c.scan_layers,
        )
        b = feats.shape[0]
        return self.multi_modal_projector(feats.astype(self.lm_head[...].dtype)).reshape(b, -1, c.text.hidden_size)

    def cross_state(self, input_ids: jax.Array, images: dict[str, jax.Array]) -> CrossState:
        p = self.config.vision.num_patches
        token_mask = jnp.cumsum(input_ids == self.config.image_token_id, axis=1) > 0
        key_valid = jnp.repeat(images["aspect_ratio_mask"] > 0, p, axis=1)
        has_image = images["aspect_ratio_ids"].reshape(-1) > 0
        return CrossState(token_mask.astype(jnp.int32), key_valid.astype(jnp.int32), has_image.astype(jnp.int32))

    def _run(self, input_ids, attention_mask, images, *, kv_valid, self_kv, index, rng, impl, output_layer=None):
        c = self.config
        h = self.language_model.embed(input_ids)
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        cross = cross_kv = None
        if images is not None:
            cross = self.cross_state(input_ids, images)
            cross_kv = self.language_model.cross_kv(self.vision_states(images).astype(h.dtype), rng)
        h, self_kv = self.language_model(h, positions, kv_valid, cross=cross, cross_kv=cross_kv, impl=impl,
                                         remat=c.remat, self_kv=self_kv, index=index, rng=rng,
                                         output_layer=output_layer)
        return h, self_kv, cross, cross_kv

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        images: dict[str, jax.Array] | None = None,
        dropout_rng: jax.Array | None = None,
        *,
        output_layer: int | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] (or decoder layer `output_layer`'s raw output); positions follow
        the attention mask (HF: cumsum - 1)."""
        if dropout_rng is None and self.lora_rngs is not None:
            dropout_rng = self.lora_rngs.dropout()
        h, *_ = self._run(input_ids, attention_mask, images, kv_valid=attention_mask, self_kv=None, index=0,
                          rng=dropout_rng, impl=self.config.attention_impl, output_layer=output_layer)
        return h

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, images: dict[str, jax.Array] | None, cache_len: int
    ) -> tuple[jax.Array, DecodeState, jax.Array]:
        """As LlavaForConditionalGeneration.prefill (last real token's hidden state, decode state, valid cache
        slots), the prompt kept in its padding: its self-attention runs XLA's with the explicit mask."""
        t, b = self.config.text, input_ids.shape[0]
        dtype = self.head_weight().dtype
        n_self = t.num_layers - len(self.config.cross_attention_layers)
        self_kv = tuple(
            tuple(jnp.zeros((b, cache_len, t.num_kv_heads, t.head_dim), dtype) for _ in range(2))
            for _ in range(n_self)
        )
        kv_valid = jnp.zeros((b, cache_len), jnp.int32).at[:, : input_ids.shape[1]].set(attention_mask)
        h, self_kv, cross, cross_kv = self._run(input_ids, attention_mask, images, kv_valid=kv_valid,
                                                self_kv=self_kv, index=0, rng=None, impl="xla")
        if cross is not None:  # new tokens see the images the last prompt token sees
            cross = cross._replace(token_mask=last_real(cross.token_mask, attention_mask))
        return last_real(h, attention_mask), DecodeState(self_kv, cross_kv, cross), kv_valid

    def decode_step(
        self, tokens: jax.Array, positions: jax.Array, kv_valid: jax.Array, state: DecodeState, index: jax.Array
    ) -> tuple[jax.Array, DecodeState]:
        """Hidden states [B, T, D] of new tokens per row written at cache slots ``index``.."""
        c = self.config
        h, self_kv = self.language_model(
            self.language_model.embed(tokens), positions, kv_valid, cross=state.cross, cross_kv=state.cross_kv,
            impl="xla", remat=c.remat, self_kv=state.self_kv, index=index,
        )
        return h, state._replace(self_kv=self_kv)


# ----------------------------------------------------------------------------------------------- HF names
_PREFIXES = {
    "vision_tower": "model.vision_model",
    "multi_modal_projector": "model.multi_modal_projector",
    "language_model": "model.language_model",
}
_LEAVES = {
    **LEAVES,
    "embedding": ("embedding", False),  # gated_positional_embedding.embedding: a bare nn.Parameter
    "gate": ("gate", False),
    "gate_attn": ("gate_attn", False),
    "gate_ffn": ("gate_ffn", False),
    "cross_attn_attn_gate": ("cross_attn_attn_gate", False),
    "cross_attn_mlp_gate": ("cross_attn_mlp_gate", False),
}


def mllama_name_map(model: nnx.Module) -> dict[tuple[str, ...], HFParam]:
    """Flax path -> transformers-5 tensor name. Vision encoder layers are stacked ([L, ...] -> ``layers.{i}``);
    decoder layers are separate modules (``layers.<n>`` in the path already)."""
    out = {}
    for path, _ in base_params(model):
        if path == ("lm_head",):
            out[path] = HFParam("lm_head.weight", False, False)
            continue
        top, *mid, leaf = path
        stacked = top == "vision_tower" and "layers" in mid
        if stacked:
            mid = ["layers.{i}" if p == "layers" else p for p in mid]
        name, transpose = _LEAVES[leaf]
        out[path] = HFParam(".".join([_PREFIXES[top], *mid, name]), transpose, stacked)
    return out


# transformers-4 / hub layout (meta-llama/Llama-3.2-11B-Vision) -> transformers-5 names.
_ALIASES = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_model\."), "model.vision_model."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]

ARCHITECTURE = Architecture(
    model_type="mllama",
    config=mllama_config,
    model=MllamaForConditionalGeneration,
    name_map=mllama_name_map,
    canonical_name=lambda name: rename(name, _ALIASES),
)
