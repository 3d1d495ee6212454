"""The prompt pass of generation and of shared-prompt scoring, as a program of its own.

Why: the programs that decode over a prompt's KV cache (generation's loop, the scored continuations) and the
prompt's pass are compiled apart, so `batched.compile_ahead` compiles them side by side and a cold eval stage
waits for the longest of them, not for their sum: at LLaVA-1.5-7B shape the one shared-prompt program (prompt
pass + continuations, each over 32 unrolled layers) took ~29 s to compile against ~9 s for a prompt pass alone
(bench/RESULTS.md, session 9). Between the two programs the cache stays on the devices.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
from flax import nnx

from vlmu_jax.eval.frozen import CUBLAS_GEMMS, model_jit
from vlmu_jax.eval.layer_copies import decoder_of
from vlmu_jax.models.llama import SlicedCache, layer_weights

_ROOM = 64  # new-token slots after a prompt come in multiples of this


def cache_room(new: int) -> int:
    """Slots a prefill leaves after the prompt for `new` tokens: `new` rounded up to a multiple of 64. Why: the
    eval stage scores continuations of 16 or 32 tokens and generates 50; with one room for both, the scoring and
    the generation of a prompt shape share one prefill program (one compile fewer in a cold eval stage, where
    the 7B prefill is among the longest to compile), for a few unused slots the attention masks out."""
    return -(-new // _ROOM) * _ROOM


def _is_sliced(x: Any) -> bool:
    return isinstance(x, SlicedCache)


@partial(model_jit, static_argnames=("cache_len", "sliced"), compiler_options=CUBLAS_GEMMS)
def prefill(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array,
            images: dict[str, jax.Array] | None, *, cache_len: int, sliced: bool) -> tuple[jax.Array, Any, jax.Array]:
    """`model.prefill` of left-padded prompts [B, P] into a cache of `cache_len` slots: (the last real token's
    hidden state [B, 1, D], the cache, its valid slots [B, cache_len]). A SlicedCache (`sliced`) over the
    decoder's attached per-layer copies comes back without them (`with_layer_weights` puts them back): jit
    returns an output that is one of its inputs as a copy, 13 GB at 7B."""
    h, cache, kv_valid = model.prefill(input_ids, attention_mask, images, cache_len,
                                       **({"sliced": True} if sliced else {}))
    return h, without_layer_copies(cache, model), kv_valid


def without_layer_copies(cache: Any, model: nnx.Module) -> Any:
    """Traceable: the cache with the per-layer copies a SlicedCache holds left out (a program that returns the
    cache must not return them), when the model has copies attached (slices made in the program stay)."""
    lm = decoder_of(model)
    if lm is None or lm.layer_copies is None:
        return cache
    return jax.tree.map(lambda c: c._replace(layers=None) if _is_sliced(c) else c, cache, is_leaf=_is_sliced)


def with_layer_weights(cache: Any, model: nnx.Module) -> Any:
    """Traceable: a cache from `prefill` with the per-layer weights it left out attached again."""
    def attach(c: Any) -> Any:
        return c._replace(layers=layer_weights(decoder_of(model))) if _is_sliced(c) and c.layers is None else c

    return jax.tree.map(attach, cache, is_leaf=_is_sliced)
