"""LLaVA-1.5: CLIP tower -> feature layer select -> 2-layer MLP projector -> splice into the LM's embeddings.

The model returns final-normed hidden states [B, T, D]; the output head (``head_weight()``, [V, D]) is
applied by the chunked scorer or the generator, never here.

Every architecture exposes the same surface to scoring, training and generation:
``__call__(input_ids, attention_mask, images, dropout_rng, *, output_layer=None)`` -> hidden states (final-normed,
or the raw output of decoder layer ``output_layer``), ``head_weight()``,
``prefill(input_ids, attention_mask, images, cache_len)`` -> (hidden states, decode state) and
``decode_step(tokens, positions, kv_valid, state, index)`` -> (hidden states, decode state); ``images`` is
the dict the architecture's image processor makes (here ``{"pixel_values": [B, 3, H, W]}``) and the decode
state is whatever the architecture needs to carry between steps (here the KV cache). ``image_embeddings(images)``
gives what the images become inside the model before the decoder reads them, and ``images`` may carry those
instead (``{IMAGE_EMBEDDINGS: ..., **the inputs named in KEPT_WITH_EMBEDDINGS}``, vlmu_jax/image_embeddings.py).
``vision_states(images)`` is the vision tower's part of them, before ``project(states, images)``; ``images`` may
carry those instead (``{VISION_STATES: ..., **the inputs named in KEPT_WITH_STATES}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlmu_jax.models.architecture import IMAGE_EMBEDDINGS, Architecture, project_images, special_token_ids
from vlmu_jax.models.clip import ClipVisionTower, VisionConfig
from vlmu_jax.models.hf_names import HFParam, rename, stacked_name_map
from vlmu_jax.models.layers import Dense, activation, decode_step_impl, last_real
from vlmu_jax.models.llama import DecoderLM, KVCache, SlicedCache, TextConfig, output_head, sliced_cache
from vlmu_jax.models.phi3 import phi3_text_config


@dataclass(frozen=True)
class LlavaConfig:
    """Everything the modules need, derived once from config.json; hf_config is kept verbatim for export."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    num_image_tokens: int
    vocab_size: int
    pad_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    vision_feature_layer: int | tuple[int, ...]
    vision_feature_select_strategy: str
    projector_hidden_act: str
    projector_bias: bool
    remat: str = "none"
    scan_layers: bool = True
    attention_impl: str = "auto"
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def vision_layers_needed(self) -> int:
        """How many CLIP layers must run so every selected hidden state exists (HF hidden_states indexing)."""
        layers = (
            self.vision_feature_layer
            if isinstance(self.vision_feature_layer, tuple)
            else (self.vision_feature_layer,)
        )
        n = self.vision.num_layers
        return max(i if i >= 0 else n + 1 + i for i in layers)


class LlavaMultiModalProjector(nnx.Module):
    def __init__(self, din: int, d: int, act: str, use_bias: bool, *, std: float, dtype, rngs: nnx.Rngs):
        self.linear_1 = Dense(
            din, d, axes=("embed", "mlp"), use_bias=use_bias, std=std, dtype=dtype, rngs=rngs
        )
        self.linear_2 = Dense(d, d, axes=("mlp", "embed"), use_bias=use_bias, std=std, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(activation(self.act)(self.linear_1(x)))


class LlavaForConditionalGeneration(nnx.Module):
    """Parameter tree mirrors HF names: vision_tower, multi_modal_projector, language_model, lm_head."""

    def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        t, v = config.text, config.vision
        self.config = config
        self.vision_tower = ClipVisionTower(v, dtype=dtype, rngs=rngs)
        n_feat = len(config.vision_feature_layer) if isinstance(config.vision_feature_layer, tuple) else 1
        self.multi_modal_projector = LlavaMultiModalProjector(
            v.hidden_size * n_feat,
            t.hidden_size,
            config.projector_hidden_act,
            config.projector_bias,
            std=t.init_std,
            dtype=dtype,
            rngs=rngs,
        )
        self.language_model = DecoderLM(t, dtype=dtype, rngs=rngs)
        self.lm_head = output_head(t, dtype=dtype, rngs=rngs)
        self.lora_rngs: nnx.Rngs | None = nnx.data(None)

    # Padding's embedding as transformers feeds it (see ``__call__``): LLaVA's merge zeroes it.
    ZERO_PAD_EMBEDDINGS: bool = True

    def head_weight(self) -> jax.Array:
        """Output projection [V, D] (logits = hidden @ W.T); the embedding when tied."""
        return (self.language_model.embed_tokens if self.lm_head is None else self.lm_head)[...]

    def tower_states(self, pixel_values: jax.Array) -> jax.Array:
        """[B, num_image_tokens, D_vision * layers]: the selected CLIP hidden states (CLS dropped for "default")."""
        c = self.config
        layers = (
            c.vision_feature_layer if isinstance(c.vision_feature_layer, tuple) else (c.vision_feature_layer,)
        )
        n = c.vision.num_layers
        if len(layers) == 1:
            hs = [
                self.vision_tower(
                    pixel_values,
                    c.vision_layers_needed,
                    impl=c.attention_impl,
                    remat=c.remat,
                    scan=c.scan_layers,
                )
            ]
        else:
            hs = [
                self.vision_tower(
                    pixel_values,
                    i if i >= 0 else n + 1 + i,
                    impl=c.attention_impl,
                    remat=c.remat,
                    scan=c.scan_layers,
                )
                for i in layers
            ]
        if c.vision_feature_select_strategy == "default":
            hs = [h[:, 1:] for h in hs]
        return jnp.concatenate(hs, axis=-1)

    # Image inputs the model reads besides IMAGE_EMBEDDINGS (VISION_STATES) when a batch carries those (Qwen2-VL's
    # positions, Idefics2's patch masks).
    KEPT_WITH_EMBEDDINGS: tuple[str, ...] = ()
    KEPT_WITH_STATES: tuple[str, ...] = ()

    def vision_states(self, images: dict[str, jax.Array]) -> jax.Array:
        """[B, N * num_image_tokens, D_vision * layers]: row b's images' tower states in prompt order; pixel_values
        [B, 3, H, W] (one image per row) or [B, N, 3, H, W] (N images per row)."""
        pixels = images["pixel_values"]
        states = self.tower_states(pixels.reshape(-1, *pixels.shape[-3:]))
        return states.reshape(pixels.shape[0], -1, states.shape[-1])

    def project(self, states: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        """[B, N, D_text]: the projector on each tower state (it reads nothing else of the images)."""
        return self.multi_modal_projector(states)

    def image_embeddings(self, images: dict[str, jax.Array]) -> jax.Array:
        """[B, N, D_text]: row b's image features in the order its image tokens take them."""
        return project_images(self, images)

    def embed(self, input_ids: jax.Array, images: dict[str, jax.Array] | None) -> jax.Array:
        """Token embeddings with row b's k-th image token replaced by row b's k-th image feature: the batch's
        IMAGE_EMBEDDINGS [B, ..., D_text] where it carries them (made once per image: vlmu_jax/image_embeddings.py),
        else `image_embeddings` of its image inputs."""
        h = self.language_model.embed(input_ids)
        if images is None:
            return h
        feats = images[IMAGE_EMBEDDINGS] if IMAGE_EMBEDDINGS in images else self.image_embeddings(images)
        feats = feats.reshape(feats.shape[0], -1, feats.shape[-1]).astype(h.dtype)
        is_img = input_ids == self.config.image_token_id
        idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, feats.shape[1] - 1)
        spliced = jnp.take_along_axis(feats, idx[..., None], axis=1)
        return jnp.where(is_img[..., None], spliced, h)

    def decode(
        self,
        h: jax.Array,
        positions: jax.Array,
        kv_valid: jax.Array,
        *,
        cache: KVCache | None = None,
        index: jax.Array | int = 0,
        rng: jax.Array | None = None,
        impl: str | None = None,
        output_layer: int | None = None,
        prefill: bool = False,
        extend: int = 0,
        write_order: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Run the language model on embeddings (see DecoderLM.__call__)."""
        c = self.config
        return self.language_model(
            h,
            positions,
            kv_valid,
            impl=impl or c.attention_impl,
            remat=c.remat,
            scan=c.scan_layers,
            cache=cache,
            index=index,
            rng=rng,
            output_layer=output_layer,
            prefill=prefill,
            extend=extend,
            write_order=write_order,
        )

    def positions(
        self, input_ids: jax.Array, attention_mask: jax.Array, images: dict[str, jax.Array] | None
    ) -> jax.Array:
        """Rotary positions [B, T] of a prompt: they follow the attention mask (HF: cumsum - 1), so left padding
        does not shift them; padding slots get position 1, as HF LLaVA's image merge gives them (only their own
        outputs depend on it). Qwen2-VL overrides this with its 3D M-RoPE positions."""
        return jnp.where(attention_mask > 0, jnp.cumsum(attention_mask, axis=1) - 1, 1)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        images: dict[str, jax.Array] | None = None,
        dropout_rng: jax.Array | None = None,
        *,
        output_layer: int | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] (positions: see ``positions``). Padding slots get a zero embedding
        (``ZERO_PAD_EMBEDDINGS``), as HF LLaVA's image merge gives them (transformers 4.45, the seeds' path): only
        their own outputs depend on it, and the KL terms over every position (FIUBench's KL, MLLMU's KL_Min) sum
        those in.

        output_layer=L: the raw output of decoder layer L instead, running only layers 0..L (RMU)."""
        if dropout_rng is None and self.lora_rngs is not None:
            dropout_rng = self.lora_rngs.dropout()
        positions = self.positions(input_ids, attention_mask, images)
        embeds = self.embed(input_ids, images)
        if self.ZERO_PAD_EMBEDDINGS:
            embeds = jnp.where(attention_mask[..., None] > 0, embeds, 0)
        h, _ = self.decode(embeds, positions, attention_mask, rng=dropout_rng, output_layer=output_layer)
        return h

    # decode_step(extend=K) runs a prompt's K scored continuations at once over its cache (eval/scoring.py)
    extends_cache = True

    def decoder_lm(self) -> DecoderLM:
        """The decoder whose stacked layers generation may slice (llama.SlicedCache) and evaluation may copy per
        layer (eval/layer_copies.py)."""
        return self.language_model

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, images: dict[str, jax.Array] | None, cache_len: int,
        *, sliced: bool = False,
    ) -> tuple[jax.Array, KVCache | SlicedCache, jax.Array]:
        """A padded prompt [B, P] (either side) run into a KV cache of `cache_len` slots: the hidden state of each
        row's last real token [B, 1, D], the cache, and which of its slots hold real tokens [B, cache_len] (what
        follows is decoded from slot P on). `sliced`: a SlicedCache, the decoder's weights sliced per layer (see
        llama.SlicedCache).

        The prompt runs with each row's real tokens moved to its front (a stable reorder, so images and positions
        keep their order), which makes its attention plain causal attention: the model's fused kernel (cuDNN's
        flash attention on GPU) runs it, where a left-padded prompt needs an explicit mask and XLA's attention (~45
        ms more per 7B prefill of 16 x 640 tokens on an H200, bench/NOTES.md). Each layer writes its keys and
        values into the cache in the prompt's own slot order (`write_order`), so decoding sees the layout it was
        given (a sliding window counts slots: a gap between a short row's prompt and its new tokens would widen
        it), and the cache is never reordered whole (a second copy of it, 5 GB at 7B with 16 prompts of 640)."""
        t, b, p = self.config.text, input_ids.shape[0], input_ids.shape[1]
        dtype = self.head_weight().dtype
        if sliced:
            cache = sliced_cache(self.language_model, b, cache_len, dtype)
        else:
            shape = (t.num_layers, b, cache_len, t.num_kv_heads, t.head_dim)
            cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        order = jnp.argsort(attention_mask == 0, axis=1, stable=True)  # real tokens first, in their order
        ids = jnp.take_along_axis(input_ids, order, axis=1)
        packed = jnp.take_along_axis(attention_mask, order, axis=1)
        back = jnp.argsort(order, axis=1)  # slot j of the prompt holds packed token back[:, j]
        h, cache = self.decode(self.embed(ids, images), self.positions(ids, packed, images), packed, cache=cache,
                               index=0, prefill=True, write_order=back)
        kv_valid = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(attention_mask)
        return last_real(h, packed), cache, kv_valid

    def decode_step(
        self, tokens: jax.Array, positions: jax.Array, kv_valid: jax.Array, state: KVCache | SlicedCache,
        index: jax.Array, *, extend: int = 0,
    ) -> tuple[jax.Array, KVCache | SlicedCache]:
        """Hidden states [B, T, D] of new tokens per row written at cache slots `index`.. (`extend` = K: K
        continuations over the cache, not written; see DecoderLM.__call__). Attention: `layers.decode_step_impl`."""
        impl = decode_step_impl(self.config.attention_impl, tokens.shape[1])  # extend: attend_blocks, no impl
        return self.decode(self.language_model.embed(tokens), positions, kv_valid, cache=state, index=index,
                           impl=impl, extend=extend)


# ------------------------------------------------------------------------------------------- config.json
TEXT_CONFIGS = {"llama": TextConfig.from_hf, "phi3": phi3_text_config}


def llava_config(hf_config: dict[str, Any], **options: Any) -> LlavaConfig:
    """LlavaConfig from config.json (clear errors for towers we do not build); options: remat, scan_layers,
    attention_impl."""
    tc, vc = hf_config.get("text_config", {}), hf_config.get("vision_config", {})
    text_type = tc.get("model_type", "llama")
    if text_type not in TEXT_CONFIGS:
        raise ValueError(
            f"unknown architecture: text_config.model_type={text_type!r}; supported {sorted(TEXT_CONFIGS)}"
        )
    vis_type = vc.get("model_type", "clip_vision_model")
    if vis_type != "clip_vision_model":
        raise ValueError(
            f"unknown architecture: vision_config.model_type={vis_type!r}; supported 'clip_vision_model'"
        )
    text = TEXT_CONFIGS[text_type](tc)
    vision = VisionConfig.from_hf(vc)
    layer = hf_config.get("vision_feature_layer", -2)
    strategy = hf_config.get("vision_feature_select_strategy", "default")
    return LlavaConfig(
        text=text,
        vision=vision,
        image_token_id=hf_config.get("image_token_id", hf_config.get("image_token_index", 32000)),
        num_image_tokens=vision.num_patches + (strategy == "full"),
        vocab_size=text.vocab_size,
        **special_token_ids(hf_config),
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=hf_config.get("projector_hidden_act", "gelu"),
        projector_bias=hf_config.get("multimodal_projector_bias", True),
        hf_config=hf_config,
        **options,
    )


# ----------------------------------------------------------------------------------------------- HF names
_PREFIXES = {
    "vision_tower": "model.vision_tower",
    "multi_modal_projector": "model.multi_modal_projector",
    "language_model": "model.language_model",
}
_STACKS = {"vision_tower": "encoder.layers.{i}", "language_model": "layers.{i}"}


def llava_name_map(model: nnx.Module) -> dict[tuple[str, ...], HFParam]:
    """Flax path -> transformers-5 tensor name."""
    return stacked_name_map(model, _PREFIXES, _STACKS, special={("lm_head",): HFParam("lm_head.weight", False, False)})


# Other on-disk layouts -> the transformers-5 names (llava-hf checkpoints and transformers' own save use these).
_ALIASES = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^(model\.)?vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]

ARCHITECTURE = Architecture(
    model_type="llava",
    config=llava_config,
    model=LlavaForConditionalGeneration,
    name_map=llava_name_map,
    canonical_name=lambda name: rename(name, _ALIASES),
)
