"""Llama decoder (Vicuna / LLaVA-1.5 language model), also the shared decoder skeleton that phi3.py
specialises.

The decoder maps input embeddings to final-normed hidden states; it owns the token embedding but not the
output
head (llava.py does), so scoring can run a chunked head. An optional KV cache (stacked [L, B, S, K, H]) serves
generation: new keys/values are written at slot ``index`` and attention runs over all cache slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vlmu_jax.models import decoder_tape
from vlmu_jax.models.layers import (
    ATTENTION_INPUT,
    Dense,
    GatedMLP,
    Joining,
    RMSNorm,
    apply_rope,
    attend,
    attend_blocks,
    attention_mask,
    cache_written,
    fold,
    joined_matmul,
    remat_call,
    rope_inv_freq,
    rope_parameters,
    run_layers,
)
from vlmu_jax.models.sharding import constrain

KVCache = tuple[jax.Array, jax.Array]


class SlicedCache(NamedTuple):
    """Decode state holding each layer's weights and KV cache as separate arrays ([B, S, K, H] per layer).

    Why: inside a scan over the stacked [L, ...] params XLA:GPU copies every layer's weights out of the stack
    at every step (measured on an H200 at LLaVA-7B shape: 13.5 GB read and written per generated token, 8 of
    16 ms, bench/NOTES.md). Slicing them once per generate call and running the layers unrolled over these
    slices removes that, for one extra copy of the decoder weights in memory while generating."""

    layers: tuple[nnx.State, ...]
    kv: tuple[KVCache, ...]


def layer_weights(lm: DecoderLM) -> tuple[nnx.State, ...]:
    """Per-layer weights of the decoder: its attached per-layer copies, else slices of the stack made here."""
    if lm.layer_copies is not None:
        return tuple(nnx.state(layer) for layer in lm.layer_copies)
    state = nnx.state(lm.layers)
    return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(lm.config.num_layers))


def sliced_cache(lm: DecoderLM, batch: int, cache_len: int, dtype) -> SlicedCache:
    """The decoder's per-layer weights (`layer_weights`) and zero per-layer KV caches."""
    c = lm.config
    layers = layer_weights(lm)
    shape = (batch, cache_len, c.num_kv_heads, c.head_dim)
    return SlicedCache(layers, tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in layers))


@dataclass(frozen=True)
class TextConfig:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    inv_freq: tuple[float, ...]
    rope_scaling: float
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    tie_word_embeddings: bool
    init_std: float

    @classmethod
    def from_hf(cls, c: dict[str, Any], arch: str = "llama", **overrides: Any) -> TextConfig:
        heads = c.get("num_attention_heads", 32)
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        inv_freq, scaling = rope_inv_freq(
            rope_parameters(c), head_dim, c.get("max_position_embeddings", 4096)
        )
        fields = dict(
            arch=arch,
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=c["vocab_size"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            hidden_act=c.get("hidden_act", "silu"),
            inv_freq=tuple(float(f) for f in inv_freq),
            rope_scaling=scaling,
            attention_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            sliding_window=None,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            init_std=c.get("initializer_range", 0.02),
        )
        fields.update(overrides)
        return cls(**fields)


def split_qkv(x: jax.Array, c: TextConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A joined [q | k | v] along the last axis (a fused projection's output, or its kernel) as its three parts."""
    nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return x[..., :nq], x[..., nq : nq + nk], x[..., nq + nk :]


class LlamaAttention(nnx.Module):
    """Separate q/k/v/o projections, rotary on q and k, grouped-query attention."""

    def __init__(self, c: TextConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, use_bias=c.attention_bias, std=c.init_std, dtype=dtype, rngs=rngs)
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = Dense(d, c.num_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, c.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(c.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.qkv_kernel: nnx.Param | None = nnx.data(None)  # [q | k | v] while joined (`joining`)
        self.config = c

    def qkv(self, x: jax.Array, rng: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.qkv_kernel is not None:
            parts = split_qkv(joined_matmul(x, self.qkv_kernel), self.config)
            q, k, v = (p.with_lora(y, x, fold(rng, j))
                       for j, (p, y) in enumerate(zip((self.q_proj, self.k_proj, self.v_proj), parts, strict=True)))
            return q, k, v
        return self.q_proj(x, fold(rng, 0)), self.k_proj(x, fold(rng, 1)), self.v_proj(x, fold(rng, 2))

    def joining(self) -> Joining | None:
        """q, k and v share their input: held as one [q | k | v] kernel while joined (`layers.fuse_projections`)."""
        return Joining("qkv_kernel", ("q_proj", "k_proj", "v_proj"), lambda k: split_qkv(k, self.config))

    def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Rotary embedding of q or k [B,T,N,H] at positions [B,T] (M-RoPE overrides it with 3D positions)."""
        return apply_rope(x, positions, self.config.inv_freq, self.config.rope_scaling)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        impl: str,
        causal: bool,
        cache: KVCache | None,
        index: jax.Array | None,
        rng: jax.Array | None,
        prefill: bool = False,
        extend: int = 0,
        write_order: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """`extend` (with a cache; `mask` then is (over the cache, over the tokens' own keys), see
        DecoderLM.__call__): the tokens attend over the cache and over their own keys, and the cache is left as it
        is (None comes back): scored continuations, whose keys no later token reads. `write_order` [B, T]: cache
        slot index + j gets the keys of token write_order[:, j]."""
        c = self.config
        b, t, _ = x.shape
        q, k, v = self.qkv(x, rng)
        q = checkpoint_name(self.rope(q.reshape(b, t, c.num_heads, c.head_dim), positions), ATTENTION_INPUT)
        k = checkpoint_name(self.rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), positions), ATTENTION_INPUT)
        v = checkpoint_name(v.reshape(b, t, c.num_kv_heads, c.head_dim), ATTENTION_INPUT)
        if cache is not None and extend:
            before, own = mask
            out = attend_blocks(q, ((cache[0].astype(q.dtype), cache[1].astype(q.dtype), before), (k, v, own)))
            return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim), fold(rng, 3)), None
        if cache is not None:
            kw, vw = (k, v) if write_order is None else (
                jnp.take_along_axis(x, write_order[:, :, None, None], axis=1) for x in (k, v))
            cache = (jax.lax.dynamic_update_slice(cache[0], kw.astype(cache[0].dtype), (0, index, 0, 0)),
                     jax.lax.dynamic_update_slice(cache[1], vw.astype(cache[1].dtype), (0, index, 0, 0)))
            if not prefill:  # a decode step sees every cached slot, a prefill its own keys
                k, v = cache
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=impl, causal=causal)
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim), fold(rng, 3)), cache


class DecoderLayer(nnx.Module):
    """Pre-norm block: h + attn(norm(h)); h + mlp(norm(h)). The attention and MLP classes set the
    architecture."""

    def __init__(self, c: TextConfig, attn: nnx.Module, mlp: nnx.Module, *, stack: tuple[int, ...], dtype):
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, stack=stack, dtype=dtype)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, stack=stack, dtype=dtype)
        self.mlp = mlp

    def __call__(
        self,
        h: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        impl: str,
        causal: bool,
        cache: KVCache | None,
        index: jax.Array | None,
        rng: jax.Array | None,
        prefill: bool = False,
        extend: int = 0,
        write_order: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        a, cache = self.self_attn(
            self.input_layernorm(h),
            positions,
            mask,
            impl=impl,
            causal=causal,
            cache=cache,
            index=index,
            rng=fold(rng, 0),
            prefill=prefill,
            extend=extend,
            write_order=write_order,
        )
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h), fold(rng, 1))
        return constrain(h, ("batch", "seq", None)), cache


def llama_layer(c: TextConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs) -> DecoderLayer:
    attn = LlamaAttention(c, stack=stack, dtype=dtype, rngs=rngs)
    mlp = GatedMLP(
        c.hidden_size,
        c.intermediate_size,
        c.hidden_act,
        stack=stack,
        use_bias=c.mlp_bias,
        std=c.init_std,
        dtype=dtype,
        rngs=rngs,
    )
    return DecoderLayer(c, attn, mlp, stack=stack, dtype=dtype)


class DecoderLM(nnx.Module):
    """Token embedding + stacked decoder layers + final norm (no head)."""

    def __init__(self, c: TextConfig, *, dtype, rngs: nnx.Rngs, make_layer: Callable[..., nnx.Module] | None = None):
        """make_layer builds the stacked layer (default: by ``c.arch``); a family with its own layer passes it."""
        from vlmu_jax.models.phi3 import phi3_layer

        make_layer = make_layer or {"llama": llama_layer, "phi3": phi3_layer}[c.arch]
        self.config = c
        self.embed_tokens = nnx.Param(
            (c.init_std * jax.random.normal(rngs.params(), (c.vocab_size, c.hidden_size))).astype(dtype),
            axes=("vocab", "embed"),
        )
        self.layers = make_layer(c, stack=(c.num_layers,), dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        # Per-layer copies of `layers`' weights, attached only while a model is evaluated (eval/layer_copies.py).
        self.layer_copies: nnx.List | None = nnx.data(None)

    def layer_stacks(self) -> tuple[tuple[nnx.Module, int], ...]:
        """The stacked layer module and its depth (eval/layer_copies.py copies it per layer)."""
        return ((self.layers, self.config.num_layers),)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        ids = jnp.clip(input_ids, 0, self.config.vocab_size - 1)
        return jnp.take(self.embed_tokens[...], ids, axis=0)

    def __call__(
        self,
        h: jax.Array,
        positions: jax.Array,
        kv_valid: jax.Array,
        *,
        impl: str,
        remat: str,
        scan: bool,
        cache: KVCache | SlicedCache | None = None,
        index: jax.Array | int = 0,
        rng: jax.Array | None = None,
        output_layer: int | None = None,
        prefill: bool = False,
        extend: int = 0,
        write_order: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | SlicedCache | None]:
        """h [B,T,D] embeddings at cache slots index..index+T; kv_valid [B,S] marks real (non-pad) key slots.

        Without a cache S == T and attention is causal within h; with a cache S is the cache length. `prefill`
        (a cache, index 0, kv_valid [B, T] of h's own tokens): h is written into the cache and attends causally
        over itself only, as a cache-less call does, so it runs the model's fused causal kernel; that kernel drops
        the padding mask, so every row's real tokens must come first (right padding); `write_order` [B, T] then
        puts them back in their own order in the cache (slot j gets token write_order[:, j]), layer by layer. A
        SlicedCache runs the layers unrolled over its weight slices (not differentiated: no remat), and so does a
        cache-less call while per-layer weight copies are attached (with `remat`, as a step over them). `extend` = K > 0
        (with a cache): h holds K continuations of T / K tokens, each at slots index.., each attending over the
        cache's valid slots before `index` and causally over its own tokens; the cache comes back as it was, the
        continuations' keys not written (LlamaAttention). Why: a prompt's scored answers run as one pass over the
        weights, with no copy of the cache per answer (eval/scoring.py).
        Returns final-normed hidden states and the updated cache; with `output_layer` L, the raw output of
        layer L (0-based, HF `hidden_states[L + 1]`) and only layers 0..L run.
        """
        b, t, _ = h.shape
        if prefill and (cache is None or not isinstance(index, int) or index != 0 or kv_valid.shape[1] != t):
            raise ValueError("prefill writes a cache from slot 0 and its keys are its own tokens: pass cache=, "
                             "index=0 and kv_valid of h's length")
        window = self.config.sliding_window
        k_slots = jnp.broadcast_to(jnp.arange(kv_valid.shape[1]), kv_valid.shape)
        if extend:
            mask = _extend_masks(t, extend, index, k_slots, kv_valid, window)
        else:
            q_slots = jnp.broadcast_to(index + jnp.arange(t), (b, t))
            mask = attention_mask(q_slots, k_slots, kv_valid, window)
        # Causality alone (cuDNN's fused causal kernel, no mask) is exact only while the sliding window, if
        # any, covers the whole sequence.
        causal = (cache is None or prefill) and (window is None or t <= window)
        layer_rngs = None if rng is None else jax.random.split(rng, self.config.num_layers)

        def step(layer, carry, xs):
            layer_cache, layer_rng = xs
            return layer(
                carry,
                positions,
                mask,
                impl=impl,
                causal=causal,
                cache=layer_cache,
                index=index,
                rng=layer_rng,
                prefill=prefill,
                extend=extend,
                write_order=write_order,
            )

        h = constrain(h, ("batch", "seq", None))
        limit = None if output_layer is None else layers_to_run(output_layer, self.config.num_layers)
        tape = decoder_tape.active()
        if tape is not None and cache is None and not extend:  # the trainer's per-layer step runs the layers
            return tape.record(self, h, positions, mask, layer_rngs, impl=impl, causal=causal, remat=remat,
                               limit=limit), None
        if isinstance(cache, SlicedCache):
            # the layers' states are the copies' where copies are attached (their projections held joined),
            # and slices of the stack otherwise (layer_weights)
            graphdef = nnx.graphdef(self.layers if self.layer_copies is None else self.layer_copies[0])
            layers, kvs = [nnx.merge(graphdef, state) for state in cache.layers], cache.kv
        elif cache is None and self.layer_copies is not None:
            layers = list(self.layer_copies)[:limit]
            kvs = (None,) * len(layers)
            step = remat_call(step, remat)  # a LoRA step over the copies (bench/NOTES.md, session 12)
        else:
            h, out = run_layers(self.layers, step, h, (cache, layer_rngs), remat=remat, scan=scan, limit=limit)
            return (self.norm(h) if limit is None else h), (cache if extend else out)
        kv_out = []
        for i, (layer, layer_kv) in enumerate(zip(layers, kvs, strict=True)):
            h, layer_kv = step(layer, h, (layer_kv, None if layer_rngs is None else layer_rngs[i]))
            if prefill:
                h, layer_kv = cache_written(h, layer_kv)
            kv_out.append(layer_kv)
        if not isinstance(cache, SlicedCache):
            cache = None
        elif not extend:  # an extension leaves the cache as it was
            cache = cache._replace(kv=tuple(kv_out))
        return (self.norm(h) if limit is None else h), cache


def _extend_masks(t: int, segments: int, index: jax.Array | int, k_slots: jax.Array, kv_valid: jax.Array,
                  window: int | None) -> tuple[jax.Array, jax.Array]:
    """DecoderLM's `extend` masks for `segments` continuations of t / segments tokens each at slots index..: over
    the cache [B,1,T,S] (valid slots before index, within the window) and over the tokens' own keys [1,1,T,T]
    (the same continuation, causal, within the window)."""
    length = t // segments
    pos = jnp.tile(jnp.arange(length), segments)  # each token's place in its continuation
    seg = jnp.repeat(jnp.arange(segments), length)
    q_slots = jnp.broadcast_to(index + pos, (kv_valid.shape[0], t))
    before = attention_mask(q_slots, k_slots, kv_valid, window) & (k_slots < index)[:, None, None, :]
    own = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        own &= (pos[:, None] - pos[None, :]) < window
    return before, own[None, None]


def layers_to_run(output_layer: int, num_layers: int) -> int:
    """Layers to run for the output of layer `output_layer` (an out-of-range index is an error, not a clip)."""
    if not 0 <= output_layer < num_layers:
        raise ValueError(f"hidden layer {output_layer} is outside the model's {num_layers} decoder layers")
    return output_layer + 1


def output_head(t: TextConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Param | None:
    """The untied output projection [V, D] (None when the head is the tied embedding)."""
    if t.tie_word_embeddings:
        return None
    return nnx.Param((t.init_std * jax.random.normal(rngs.params(), (t.vocab_size, t.hidden_size))).astype(dtype),
                     axes=("vocab", "embed"))
