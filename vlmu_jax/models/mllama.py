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

Layers are heterogeneous, so the decoder keeps its layers in several stacks, one per part of the pass that runs
as a scan (`stack_layout`). A pass without a cache runs the self layers before the first cross layer as one scan and
the blocks between evenly spaced cross layers [self layers + cross layer] as another (`schedule`; ``scan_layers``,
which also scans the vision encoders); a pass with a cache, or over the eval's per-layer copies, runs layer by
layer. ``remat`` wraps every decoder layer (and the vision layers through ``run_layers``). While the trainer's
per-layer step traces the loss, a pass without a cache goes on its tape instead (models/decoder_tape.py).

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

from vlmu_jax.models import decoder_tape
from vlmu_jax.models.architecture import IMAGE_EMBEDDINGS, Architecture, project_images, special_token_ids
from vlmu_jax.models.hf_names import LEAVES, HFParam, base_params, rename
from vlmu_jax.models.layers import (
    Dense,
    GatedMLP,
    RMSNorm,
    attend,
    attention_mask,
    cache_written,
    decode_step_impl,
    fold,
    last_real,
    remat_call,
    run_layers,
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
    scan_layers: bool = True  # vision encoders, and the decoder's blocks of [self layers + cross layer]
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

    # what `kv` reads: MllamaTextModel.cross_kv runs it before the decoder call, not inside the layer's own call
    # (the trainer's per-layer step leaves these frozen weights stacked in the model: unlearn/layerwise.py)
    KV_MODULES = ("k_proj", "v_proj", "k_norm")

    def __init__(self, c: TextConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, std=c.init_std, dtype=dtype, rngs=rngs)
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = Dense(d, c.num_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(c.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.q_norm = RMSNorm(hd, c.rms_norm_eps, stack=stack, dtype=dtype)
        self.k_norm = RMSNorm(hd, c.rms_norm_eps, stack=stack, dtype=dtype)
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

    def __init__(self, c: TextConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        lead = ("layers",) * len(stack)
        self.cross_attn = CrossAttention(c, stack=stack, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, stack=stack, dtype=dtype)
        self.cross_attn_attn_gate = nnx.Param(jnp.zeros((*stack, 1), dtype), axes=(*lead, None))
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, stack=stack, use_bias=c.mlp_bias,
                            std=c.init_std, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, stack=stack, dtype=dtype)
        self.cross_attn_mlp_gate = nnx.Param(jnp.zeros((*stack, 1), dtype), axes=(*lead, None))

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


class Schedule(NamedTuple):
    """How the decoder runs its first `len(kinds)` layers: `kinds[i]` is (is a cross layer, its index among the
    layers of its kind, which is its KV's index in a DecodeState). Layers 0 .. head - 1 (self-attention layers
    before the first cross layer) run as one scan, layers first .. first + count * period - 1 as `count` scanned
    blocks of `period` layers (a scan over the block's period - 1 self-attention layers, then its cross layer), the
    others one by one (head 0, count 0: every layer)."""

    kinds: tuple[tuple[bool, int], ...]
    head: int
    first: int
    period: int
    count: int


def schedule(num_layers: int, cross_layers: tuple[int, ...], n_run: int, scan: bool) -> Schedule:
    """The decoder's Schedule. Llama-3.2-Vision's cross layers come every fifth layer (3, 8, .., 38): its 40
    layers run as a scan over layers 0-2, layer 3, a scan over seven blocks [a scan over 4 self layers + 1 cross]
    and layer 39, so a step compiles four layer bodies. Why: unrolled, the LoRA step's compile grew superlinearly
    with depth (25.7 / 63.0 / 210.8 s at 10 / 20 / 40 layers on a CPU, bench/NOTES.md session 14) and LLaVA's
    unrolled step did not compile within 150 s on an H200 (session 3). Blocks need evenly spaced cross layers;
    anything else runs one by one. A scan over fewer than two layers or blocks is not worth its own body."""
    cross, kinds, n_self = sorted(cross_layers), [], 0
    for i in range(n_run):
        kinds.append((True, cross.index(i)) if i in cross else (False, n_self))
        n_self += i not in cross
    head = min(cross[0], n_run) if scan else 0
    gaps = {b - a for a, b in zip(cross, cross[1:], strict=False)}
    if not scan or len(gaps) != 1:
        return Schedule(tuple(kinds), head if head >= 2 else 0, 0, 1, 0)
    period = gaps.pop()
    first = cross[0] + 1
    count = min(len(cross) - 1, max(0, (n_run - first) // period))
    return Schedule(tuple(kinds), head if head >= 2 else 0, first, period, count if count >= 2 else 0)


def stack_layout(num_layers: int, cross_layers: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Which HF layers each of the decoder's stacks holds, in stack order (the full-depth Schedule's parts):
    ``head_self`` the self layers before the first cross layer, ``block_self`` the blocks' self layers block by
    block (read as [count, period - 1, ...] by the scan, a free reshape), ``block_cross`` the blocks' cross layers,
    ``self`` and ``cross`` the layers run one by one. Why a stack per scanned part: a scan over a stack that holds
    exactly its steps' layers takes each step's weights as its input, which the backward reuses; a layer sliced out
    of a larger stack inside the step is saved for the backward, stacked into a second copy of the weights
    (Mllama's 11B LoRA step: 52.7 against 37.1 GiB, bench/RESULTS.md session 15)."""
    plan = schedule(num_layers, cross_layers, num_layers, scan=True)
    block = range(plan.first, plan.first + plan.count * plan.period)
    layout = {
        "head_self": tuple(range(plan.head)),
        "block_self": tuple(i for i in block if i not in cross_layers),
        "block_cross": tuple(i for i in block if i in cross_layers),
    }
    placed = {i for ids in layout.values() for i in ids}
    layout["self"] = tuple(i for i in range(num_layers) if i not in placed and i not in cross_layers)
    layout["cross"] = tuple(i for i in sorted(cross_layers) if i not in placed)
    return {name: ids for name, ids in layout.items() if ids}


class MllamaTextModel(nnx.Module):
    """embed_tokens (vocab + 8 rows), the decoder layers in stacks (`stack_layout`), final norm (no head)."""

    def __init__(self, c: TextConfig, cross_layers: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
        self.config = c
        self.cross_layers = tuple(sorted(cross_layers))
        self.embed_tokens = nnx.Param(
            (c.init_std * jax.random.normal(rngs.params(), (c.vocab_size + 8, c.hidden_size))).astype(dtype),
            axes=("vocab", "embed"),
        )
        self.layout = tuple(stack_layout(c.num_layers, self.cross_layers).items())  # hashable: a static field
        # string keys: Flax paths are ("layers", <stack>, ...), mapped to HF's layers.{i} by the name map
        self.layers = nnx.Dict({
            name: CrossDecoderLayer(c, stack=(len(ids),), dtype=dtype, rngs=rngs) if "cross" in name
            else llama_layer(c, stack=(len(ids),), dtype=dtype, rngs=rngs)
            for name, ids in self.layout
        })
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        # Per-layer copies of every stack's weights (in `layout` order), attached only while a model is evaluated
        # (eval/layer_copies.py).
        self.layer_copies: nnx.List | None = nnx.data(None)

    def layer_stacks(self) -> tuple[tuple[nnx.Module, int], ...]:
        """The stacked layer modules and their depths, in the order `layer_copies` holds their copies."""
        return tuple((self.layers[name], len(ids)) for name, ids in self.layout)

    def layer(self, i: int) -> nnx.Module:
        """HF layer i as a module: its attached copy, else a slice of its stack (a copy of its weights in the
        program: decoding and scoring over the stacks are right but slower; evaluation attaches copies)."""
        offset = 0
        for name, ids in self.layout:
            if i in ids:
                j = ids.index(i)
                if self.layer_copies is not None:
                    return self.layer_copies[offset + j]
                graphdef, state = nnx.split(self.layers[name])
                return nnx.merge(graphdef, jax.tree.map(lambda a, j=j: a[j], state))
            offset += len(ids)
        raise ValueError(f"no decoder layer {i}")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        ids = jnp.clip(input_ids, 0, self.config.vocab_size + 7)
        return jnp.take(self.embed_tokens[...], ids, axis=0)

    def cross_kv(self, states: jax.Array, rng: jax.Array | None) -> tuple[KVCache, ...]:
        """Every cross layer's K/V of the projected vision states [B, N, D]."""
        return tuple(self._kv_projection(i).kv(states, fold(rng, 1000 + i)) for i in self.cross_layers)

    def _kv_projection(self, i: int) -> CrossAttention:
        """Cross layer i's attention with only what `kv` reads sliced out of its stack (its attached copy's where
        copies are attached). Why not `layer(i)`: while the trainer's per-layer step runs, the stacks hold zero-size
        stand-ins for every other frozen weight (unlearn/layerwise.py)."""
        if self.layer_copies is not None:
            return self.layer(i).cross_attn
        name, j = next((name, ids.index(i)) for name, ids in self.layout if i in ids)
        graphdef, state = nnx.split(self.layers[name].cross_attn)
        return nnx.merge(graphdef, nnx.State({k: jax.tree.map(lambda a, j=j: a[j], v) if k in CrossAttention.KV_MODULES
                                              else v for k, v in state.items()}))

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
        scan: bool = True,
        self_kv: tuple[KVCache, ...] | None = None,
        index: jax.Array | int = 0,
        rng: jax.Array | None = None,
        output_layer: int | None = None,
    ) -> tuple[jax.Array, tuple[KVCache, ...] | None]:
        """As DecoderLM.__call__, plus the cross-attention inputs (None: no image in the batch); layer indices
        count the cross-attention layers, as HF's `model.language_model.layers` does. A pass without a cache
        over the stacks (training, scoring) runs the Schedule's scanned blocks (`scan`); with a cache or over
        attached copies every layer runs one by one."""
        b, t, _ = h.shape
        q_slots = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        k_slots = jnp.broadcast_to(jnp.arange(kv_valid.shape[1]), kv_valid.shape)
        mask = attention_mask(q_slots, k_slots, kv_valid)
        causal = self_kv is None
        h = constrain(h, ("batch", "seq", None))
        n_run = self.config.num_layers if output_layer is None else layers_to_run(output_layer, self.config.num_layers)
        tape = decoder_tape.active()
        if tape is not None and self_kv is None and self.layer_copies is None:  # the trainer's per-layer step
            keys = None if rng is None else tuple(fold(rng, i) for i in range(n_run))
            return tape.record(self, h, positions, mask, keys, impl=impl, causal=causal, remat=remat,
                               limit=None if output_layer is None else n_run, cross=cross, cross_kv=cross_kv), None

        def self_fn(layer, h, positions, mask, cache, index, rng):
            return layer(h, positions, mask, impl=impl, causal=causal, cache=cache, index=index, rng=rng)

        def cross_fn(layer, h, cross, kv, rng):
            return layer(h, cross, kv, impl=impl, rng=rng)

        self_call, cross_call = remat_call(self_fn, remat), remat_call(cross_fn, remat)

        def run(i, kind, layer, h, kv=None):
            """Layer i (`kind` as in Schedule.kinds; a cross layer's K/V `kv` unless its index is given) on h, and
            its updated cache (None for a cross layer)."""
            is_cross, j = kind
            if is_cross:
                if cross is None:
                    return h, None
                return cross_call(layer, h, cross, cross_kv[j] if kv is None else kv, fold(rng, i)), None
            cache = None if self_kv is None else self_kv[j]
            h, cache = self_call(layer, h, positions, mask, cache, index, fold(rng, i))
            if cache is not None and t > 1:  # a prompt's pass writing the cache
                h, cache = cache_written(h, cache)
            return h, cache

        plan = schedule(self.config.num_layers, self.cross_layers, n_run,
                        scan and self_kv is None and self.layer_copies is None)
        blocks = range(plan.first, plan.first + plan.count * plan.period)
        new_kv = []
        for i, kind in enumerate(plan.kinds):
            if i < plan.head or i in blocks:
                if i == 0:
                    h = self._scan_self(self._stack("head_self", plan.head), h, 0, run)
                elif i == blocks.start:
                    h = self._run_blocks(plan, h, run, cross_kv)
                continue
            h, cache = run(i, kind, self.layer(i), h)
            if not kind[0]:
                new_kv.append(cache)
        h = h if output_layer is not None else self.norm(h)
        return h, (None if self_kv is None else tuple(new_kv))

    def _stack(self, name: str, n: int) -> nnx.Module:
        """A stack as a module of its first n layers (itself unless a pass stops inside it)."""
        stack = self.layers[name]
        if n == len(dict(self.layout)[name]):
            return stack
        graphdef, state = nnx.split(stack)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[:n], state))

    @staticmethod
    def _scan_self(stack: nnx.Module, h: jax.Array, first: jax.Array | int, run) -> jax.Array:
        """The self-attention layers first, first + 1, .. of a stack as one scan (`run` applies each layer's
        remat)."""
        n = jax.tree.leaves(nnx.state(stack))[0].shape[0]
        return run_layers(stack, lambda layer, h, j: run(first + j, (False, None), layer, h), h, jnp.arange(n))[0]

    def _run_blocks(self, plan: Schedule, h: jax.Array, run, cross_kv: tuple[KVCache, ...] | None) -> jax.Array:
        """The Schedule's blocks as one lax.scan whose steps take their layers' weights from the block stacks
        (`stack_layout`): a scan over the block's self layers, then its cross layer."""
        inner = plan.period - 1
        self_graph, self_state = nnx.split(self._stack("block_self", plan.count * inner))
        self_state = jax.tree.map(lambda a: a.reshape(plan.count, inner, *a.shape[1:]), self_state)
        cross_graph, cross_state = nnx.split(self._stack("block_cross", plan.count))
        first_cross = plan.kinds[plan.first + inner][1]
        kvs = None if cross_kv is None else jax.tree.map(
            lambda *a: jnp.stack(a), *cross_kv[first_cross : first_cross + plan.count])

        def block(h, xs):
            n, layer_states, cross_layer, kv = xs
            start = plan.first + n * plan.period
            h = self._scan_self(nnx.merge(self_graph, layer_states), h, start, run)
            h, _ = run(start + inner, (True, None), nnx.merge(cross_graph, cross_layer), h, kv)
            return h, None

        return jax.lax.scan(block, h, (jnp.arange(plan.count), self_state, cross_state, kvs))[0]


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

    KEPT_WITH_EMBEDDINGS = ("aspect_ratio_ids", "aspect_ratio_mask")  # the cross-attention masks read them
    KEPT_WITH_STATES = KEPT_WITH_EMBEDDINGS

    def vision_states(self, images: dict[str, jax.Array]) -> jax.Array:
        """The vision encoder's output [B, T * P, D_vision] (tile-major; final and intermediate layers' states)."""
        c = self.config
        states = self.vision_tower(
            images["pixel_values"],
            images["aspect_ratio_ids"].reshape(-1),
            images["aspect_ratio_mask"],
            impl=c.attention_impl,
            remat=c.remat,
            scan=c.scan_layers,
        )
        return states.reshape(states.shape[0], -1, states.shape[-1])

    def project(self, states: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        """Projected vision tokens [B, T * P, D_text]: what every cross layer's K/V are made from."""
        return self.multi_modal_projector(states.astype(self.lm_head[...].dtype))

    def image_embeddings(self, images: dict[str, jax.Array]) -> jax.Array:
        """`project` of the batch's vision states (carried, or made from its pixels)."""
        return project_images(self, images)

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
            states = images[IMAGE_EMBEDDINGS] if IMAGE_EMBEDDINGS in images else self.image_embeddings(images)
            cross_kv = self.language_model.cross_kv(states.astype(h.dtype), rng)
        h, self_kv = self.language_model(h, positions, kv_valid, cross=cross, cross_kv=cross_kv, impl=impl,
                                         remat=c.remat, scan=c.scan_layers, self_kv=self_kv, index=index, rng=rng,
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

    def decoder_lm(self) -> MllamaTextModel:
        """The decoder whose stacked layers evaluation may copy per layer (eval/layer_copies.py)."""
        return self.language_model

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, images: dict[str, jax.Array] | None, cache_len: int
    ) -> tuple[jax.Array, DecodeState, jax.Array]:
        """As LlavaForConditionalGeneration.prefill (last real token's hidden state, decode state, valid cache
        slots), the prompt kept in its padding: its self-attention runs XLA's with the explicit mask. Decoding
        runs one layer after another, over the attached per-layer copies or else over slices of the stacks."""
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
        """Hidden states [B, T, D] of new tokens per row written at cache slots ``index``.. Attention, over the cache
        and over the images: `layers.decode_step_impl`."""
        c = self.config
        h, self_kv = self.language_model(
            self.language_model.embed(tokens), positions, kv_valid, cross=state.cross, cross_kv=state.cross_kv,
            impl=decode_step_impl(c.attention_impl, tokens.shape[1]), remat=c.remat, self_kv=state.self_kv,
            index=index,
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
    """Flax path -> transformers-5 tensor name. Every layer stack is stacked ([L, ...] -> ``layers.{i}``): the
    vision encoders' in order, each of the decoder's stacks at the HF layer indices its `layout` gives."""
    layout = dict(model.language_model.layout)
    out = {}
    for path, _ in base_params(model):
        if path == ("lm_head",):
            out[path] = HFParam("lm_head.weight", False, False)
            continue
        top, *mid, leaf = path
        ids = layout[mid[1]] if top == "language_model" and mid[:1] == ["layers"] else None
        stacked = ids is not None or (top == "vision_tower" and "layers" in mid)
        if ids is not None:
            mid = ["layers.{i}", *mid[2:]]
        elif stacked:
            mid = ["layers.{i}" if p == "layers" else p for p in mid]
        name, transpose = _LEAVES[leaf]
        out[path] = HFParam(".".join([_PREFIXES[top], *mid, name]), transpose, stacked, ids)
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
