"""Batched decoding of left-padded prompts with a KV cache: the prompt's pass (eval/prefill.py), then one compiled
loop (lax.while_loop) over the cache.

Positions follow the attention mask as HF does (cumsum - 1), so left padding does not shift the rotary phases;
pad slots are masked out of every attention. The prefill runs each prompt with its real tokens moved to the front
(the model's fused causal kernel, no mask) and hands its cache back in the prompt's own slot order (`prefill`).
Greedy when temperature == 0, else temperature + top-p sampling.
On GPU, when the device has room for it, decoding runs over per-layer slices of the decoder's stacked weights
(llama.SlicedCache, `decode_over_slices`), or over the per-layer copies evaluation attaches (eval/layer_copies.py).
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlmu_jax.eval.frozen import model_jit
from vlmu_jax.eval.layer_copies import decoder_of, room_for_copy
from vlmu_jax.eval.prefill import cache_room, prefill, with_layer_weights, without_layer_copies
from vlmu_jax.models.llama import DecoderLM


def _sample(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


_SLICED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its decision, made once


def decode_over_slices(model: nnx.Module) -> bool:
    """Whether to decode over per-layer weights (llama.SlicedCache; a DecoderLM's only, Mllama's decoder runs layer
    by layer over its copies or stack slices anyway): always while per-layer copies are attached
    (eval/layer_copies.py); else on GPU (where a scan over the stacked weights copies each layer's weights at
    every token) when the device has room to slice them per call (`room_for_copy`); else the stacked scan,
    which needs no second copy of the weights (a 7B model in bfloat16 still fits a 24 GB card). Decided once per
    model: a decision that flipped with the allocator's state between batches would recompile the loop."""
    lm = decoder_of(model)
    if not isinstance(lm, DecoderLM):  # a decoder that decodes layer by layer anyway (Mllama) or none
        return False
    if lm.layer_copies is not None:
        return True
    if model not in _SLICED:
        _SLICED[model] = room_for_copy(lm)
    return _SLICED[model]


@partial(model_jit, static_argnames=("prompt_len", "max_new_tokens", "eos", "pad", "temperature", "top_p"),
         donate_argnames=("cache",))
def _decode(
    model: nnx.Module,
    h: jax.Array,
    kv_valid: jax.Array,
    rng: jax.Array,
    *,
    cache,
    prompt_len: int,
    max_new_tokens: int,
    eos: tuple[int, ...],
    pad: int,
    temperature: float,
    top_p: float,
) -> tuple[jax.Array, Any]:
    """The new tokens [B, max_new_tokens] after a `prefill` of prompts of `prompt_len` tokens (into a cache with
    room for them), and the cache.
    The cache is donated and returned, so the loop writes into its buffers (a cache the program only read would be
    copied into the loop first)."""
    cache = with_layer_weights(cache, model)
    b = h.shape[0]
    p = prompt_len
    head = model.head_weight()
    eos_ids = jnp.asarray(eos, jnp.int32)
    next_pos = jnp.sum(kv_valid, axis=1, dtype=jnp.int32)  # the prompt's slots only, so far

    def pick(h, rng, done):
        """The next token of each row from the last hidden state (pad once a row is done)."""
        logits = jnp.einsum("bd,vd->bv", h[:, -1], head, preferred_element_type=jnp.float32)
        tok = jnp.where(done, pad, _sample(logits, rng, temperature, top_p))
        return tok, (done | jnp.isin(tok, eos_ids)) if eos else done

    rng, key = jax.random.split(rng)
    tok, done = pick(h, key, jnp.zeros((b,), bool))
    out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)

    # Token i is decoded from token i - 1: max_new_tokens - 1 decode steps (none is spent on a token no one reads).
    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, kv_valid, tok, done, out, rng = carry
        kv_valid = kv_valid.at[:, p + i - 1].set(1)
        h, cache = model.decode_step(tok[:, None], (next_pos + i - 1)[:, None], kv_valid, cache, p + i - 1)
        rng, key = jax.random.split(rng)
        tok, done = pick(h, key, done)
        return i + 1, cache, kv_valid, tok, done, out.at[:, i].set(tok), rng

    carry = (jnp.int32(1), cache, kv_valid, tok, done, out, rng)
    _, cache, _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
    return out, without_layer_copies(cache, model)


def _as_array(x: Any, dtype: Any = None) -> jax.Array | jax.ShapeDtypeStruct:
    """x as a jax array; an abstract value as it is (a compile-only call's inputs: eval/batched.compile_ahead)."""
    return x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x, dtype)


def generate(
    model: nnx.Module,
    input_ids,
    attention_mask,
    images,
    *,
    max_new_tokens: int,
    eos_token_id: int | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """New tokens int32 [B, max_new_tokens] for left-padded prompts; after EOS a row holds pad_token_id.

    `images` is the model's image-input dict for the batch (None: text only).

    eos/pad default to the model config's; the loop stops early once every row has finished.
    """
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    )
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    rng = jax.random.key(0) if rng is None else rng
    ids = _as_array(input_ids, jnp.int32)
    h, cache, kv_valid = prefill(model, ids, _as_array(attention_mask, jnp.int32),
                                 None if images is None else jax.tree.map(_as_array, images),
                                 cache_len=ids.shape[1] + cache_room(max_new_tokens), sliced=decode_over_slices(model))
    tokens, _ = _decode(model, h, kv_valid, rng, cache=cache, prompt_len=ids.shape[1], max_new_tokens=max_new_tokens,
                        eos=eos, pad=int(pad), temperature=float(temperature), top_p=float(top_p))
    return tokens
