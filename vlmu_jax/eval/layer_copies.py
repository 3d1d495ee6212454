"""Per-layer copies of a decoder's stacked weights, held while a model is evaluated.

Why: the decoders keep their layers stacked ([L, ...] params run by one lax.scan), which training wants. But
inside that scan XLA:GPU copies each layer's weights out of the stack before every use: at LLaVA-1.5-7B shape
19 of the 87 ms of a teacher-forced forward and, while generating, 13.5 GB per token (bench/NOTES.md).
Evaluation runs many forwards of one fixed model, so it pays that copy once: the layers are copied out once per
model, held next to the stack, and every forward (scores, MIA, generation) runs unrolled over the copies.
It costs one more copy of the decoder's weights on the device, so it is taken only on GPU and only when the
device's free memory holds it with a tenth to spare; otherwise nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import jax
from flax import nnx

from vlmu_jax.models.llama import DecoderLM


def decoder_of(model: nnx.Module) -> DecoderLM | None:
    """The model's stacked decoder (None for a model without one, e.g. Mllama's unscanned decoder)."""
    get = getattr(model, "decoder_lm", None)
    return None if get is None else get()


def room_for_copy(lm: DecoderLM) -> bool:
    """On GPU, whether the first local device's free memory holds its share of one more copy of the stacked
    decoder weights with a tenth to spare (CPU and TPU: no, their scans do not copy the same way)."""
    if jax.default_backend() != "gpu":
        return False
    need = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(nnx.state(lm.layers)))
    stats = jax.local_devices()[0].memory_stats() or {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    return need * 1.1 < free


@partial(jax.jit, static_argnums=1)
def _unstack(state: nnx.State, n: int) -> list[nnx.State]:
    """Layer i's weights of a stacked state, for i < n. One program per decoder shape, reused by every model the
    eval stage evaluates; each copy keeps the stack's placement of its remaining axes (sharding propagation:
    the layer axis is never sharded)."""
    return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(n)]


def copy_layers(lm: DecoderLM) -> nnx.List:
    """The decoder's layers as separate modules over per-layer copies of the stacked weights."""
    graphdef, state = nnx.split(lm.layers)
    return nnx.List([nnx.merge(graphdef, c) for c in _unstack(state, lm.config.num_layers)])


@contextmanager
def layer_copies(model: nnx.Module, mode: str = "auto") -> Iterator[bool]:
    """Attach per-layer weight copies to the model's decoder for the body of the block (yields whether they are
    attached). mode: auto (when `room_for_copy`), always, never (config.eval.layer_copies). The copies are
    detached on exit, so nothing after evaluation (training, export) sees them. The model's weights must not
    change inside the block: the copies would go stale, and gradients would reach the copies, not the stack."""
    lm = decoder_of(model)
    if lm is None or lm.layer_copies is not None or mode == "never" or (mode == "auto" and not room_for_copy(lm)):
        yield False
        return
    lm.layer_copies = copy_layers(lm)
    try:
        yield True
    finally:
        lm.layer_copies = None
