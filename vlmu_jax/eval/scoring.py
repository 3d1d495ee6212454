"""Teacher-forced per-token log-probs through a chunked output head.

The head runs over sequence chunks inside a scan with remat, so neither the forward nor the backward pass
ever holds B x T x V float32 logits: only one [B, chunk, V] block at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from vlmu_jax.eval.frozen import CUBLAS_GEMMS, model_jit
from vlmu_jax.eval.prefill import cache_room, prefill, with_layer_weights


def _over_chunks(fn, inputs: tuple[jax.Array, ...], chunk_size: int) -> tuple[jax.Array, ...]:
    """Runs `fn` (rematerialised) over sequence chunks of [B, N, ...] inputs; returns [B, N] outputs.

    Only one chunk's [B, chunk, V] logits exist at a time, in the forward and the backward pass.
    """
    b, n = inputs[0].shape[:2]
    c = min(chunk_size, n)
    pad = (-n) % c

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, -1, c, *x.shape[2:]).swapaxes(0, 1)

    _, outs = jax.lax.scan(lambda carry, xs: (carry, jax.checkpoint(fn)(*xs)), None, tuple(map(split, inputs)))
    return tuple(o.swapaxes(0, 1).reshape(b, -1)[:, :n] for o in outs)


@jax.custom_vjp
def head_logits(h: jax.Array, head: jax.Array) -> jax.Array:
    """float32 logits [B, c, V] of hidden states [B, c, D] (the head [V, D] in their dtype), accumulated in float32.

    Why a custom backward: autodiff would run the backward gemms on the float32 cotangent, so XLA converts the
    whole head to float32 (0.5 GB at 7B shape) and runs a TF32 gemm, in every chunk of every step: 3.1 ms of a
    7B LoRA GA step on an H200 (bench/NOTES.md). Here the cotangent is rounded to the hidden states' dtype first
    and both gemms run in it, accumulating in float32: what PyTorch's backward through bf16 logits computes.
    A float32 model's gradients are exactly autodiff's."""
    return jnp.einsum("bcd,vd->bcv", h, head, preferred_element_type=jnp.float32)


def _head_logits_fwd(h: jax.Array, head: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return head_logits(h, head), (h, head)


def _head_logits_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    h, head = res
    g = g.astype(h.dtype)
    dh = jnp.einsum("bcv,vd->bcd", g, head, preferred_element_type=jnp.float32).astype(h.dtype)
    dhead = jnp.einsum("bcv,bcd->vd", g, h, preferred_element_type=jnp.float32).astype(head.dtype)
    return dh, dhead


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def _log_softmax_head(h: jax.Array, head: jax.Array) -> jax.Array:
    logits = head_logits(h, head.astype(h.dtype))
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def head_logprobs(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, *, with_stats: bool = False, chunk_size: int = 128
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """log p(targets) [B, N] from hidden [B, N, D] and head [V, D]; with_stats adds mu/var of log p under p."""

    def chunk(h_c: jax.Array, t_c: jax.Array) -> tuple[jax.Array, ...]:
        logp = _log_softmax_head(h_c, head)
        tgt = jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]
        if not with_stats:
            return (tgt,)
        p = jnp.exp(logp)
        mu = jnp.sum(p * logp, axis=-1)
        return tgt, mu, jnp.sum(p * logp * logp, axis=-1) - mu * mu

    outs = _over_chunks(chunk, (hidden, targets), chunk_size)
    return outs if with_stats else outs[0]


def head_token_stat(
    stat: Callable[[jax.Array, jax.Array | None, jax.Array], jax.Array],
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    ref_hidden: jax.Array | None = None,
    ref_head: jax.Array | None = None,
    chunk_size: int = 128,
) -> jax.Array:
    """`stat(logp, logq, targets)` [B, N] of the policy's (and the reference's) full next-token log-softmaxes.

    Objectives that need whole distributions (KL, UNDIAL's adjusted-logit target, CE-U) reduce them to one
    number per position inside the scan, so no B x T x V array exists, forward or backward; `logq` is None
    without a reference.
    """

    def chunk(h_c: jax.Array, t_c: jax.Array, *r_c: jax.Array) -> tuple[jax.Array]:
        logq = _log_softmax_head(r_c[0], ref_head) if r_c else None
        return (stat(_log_softmax_head(h_c, head), logq, t_c),)

    inputs = (hidden, targets) if ref_hidden is None else (hidden, targets, ref_hidden)
    return _over_chunks(chunk, inputs, chunk_size)[0]


def head_kl(hidden: jax.Array, ref_hidden: jax.Array, head: jax.Array, ref_head: jax.Array,
            chunk_size: int = 128) -> jax.Array:
    """Full-vocabulary KL(ref || policy) at each position [B, N] (FIUBench `kl`, MLLMU `kl_min`)."""

    def kl(logp: jax.Array, logq: jax.Array, _: jax.Array) -> jax.Array:
        return jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)

    targets = jnp.zeros(hidden.shape[:2], jnp.int32)
    return head_token_stat(kl, hidden, head, targets, ref_hidden, ref_head, chunk_size)


# The eval's whole-row scoring runs the output head over every position at once where the float32 logits take at
# most this much memory, else over chunks of 128: one chunk took the LLaVA-1.5-7B log-probs of 4 x 704 tokens from
# 0.0687 to 0.0661 s on an H200 (bench/RESULTS.md, session 30: the scan around the head and its slices gone).
# Training keeps 128-position chunks: its backward holds each chunk's logits' cotangent too.
WHOLE_HEAD_BYTES = 2**31


def eval_head_chunk(batch: int, positions: int, vocab: int) -> int:
    """Positions per output-head chunk in whole-row scoring: all of them where their float32 logits fit in
    WHOLE_HEAD_BYTES, else 128."""
    return positions if batch * positions * vocab * 4 <= WHOLE_HEAD_BYTES else 128


def compute_token_logprobs(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    images: dict[str, jax.Array] | None,
    with_stats: bool = False,
    chunk_size: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Traceable: logps [B, T-1] = log p(x_{t+1} | x_<=t); with_stats also (mu, var) of log p under p.
    `chunk_size` None: `eval_head_chunk`'s."""
    hidden = model(input_ids, attention_mask, images)
    head = model.head_weight()
    b, t = input_ids.shape
    chunk = eval_head_chunk(b, t - 1, head.shape[0]) if chunk_size is None else chunk_size
    return head_logprobs(hidden[:, :-1], head, input_ids[:, 1:], with_stats=with_stats, chunk_size=chunk)


def continuation_logprobs(
    model: nnx.Module,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    images: dict[str, jax.Array] | None,
    continuation_ids: jax.Array,
    continuation_mask: jax.Array,
    *,
    sliced: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log p, and mean / variance of log p under the model, of K right-padded continuations [B, K, C] of each
    left-padded prompt [B, P], every position j scored as log p(c_j | prompt, c_<j): [B, K, C] each.

    The prompt (its images included) runs once, into a KV cache (eval/prefill.py, a program of its own); each
    continuation then runs over that cache as a multi-token decode step. Causal attention makes the values those
    of the whole row run at once (prompt positions never see what follows them). `sliced`: decode over per-layer
    weights (generate.decode_over_slices)."""
    p = prompt_ids.shape[1]
    cache_len = p + cache_room(continuation_ids.shape[-1])
    h, cache, kv_valid = prefill(model, prompt_ids, prompt_mask, images, cache_len=cache_len, sliced=sliced)
    return _continuations_over_cache(model, h, cache, kv_valid, continuation_ids, continuation_mask, prompt_len=p)


@partial(model_jit, static_argnames=("prompt_len",), compiler_options=CUBLAS_GEMMS)
def _continuations_over_cache(model: nnx.Module, h: jax.Array, cache, kv_valid: jax.Array,
                              continuation_ids: jax.Array, continuation_mask: jax.Array, *, prompt_len: int
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`continuation_logprobs` after the prompt's pass: h [B, 1, D] its last real token's state, kv_valid [B, S]
    its valid cache slots (S >= prompt_len + C).

    A model whose decode_step extends a cache (`extends_cache`: LLaVA, Idefics2, Qwen2-VL) runs a prompt's K
    continuations as one pass of K x C tokens over the cache, each attending over the prompt and itself: the
    weights are read once, not once per answer, and the cache is not copied per answer (bench/NOTES.md). Mllama
    decodes each continuation in turn, writing it into a copy of the cache."""
    b, k, c = continuation_ids.shape
    p = prompt_len
    cache = with_layer_weights(cache, model)
    positions = jnp.sum(kv_valid, axis=1, dtype=jnp.int32)[:, None] + jnp.arange(c, dtype=jnp.int32)
    head = model.head_weight()
    if getattr(model, "extends_cache", False):
        ids = continuation_ids.reshape(b, k * c)
        hc, _ = model.decode_step(ids, jnp.tile(positions, (1, k)), kv_valid, cache, p, extend=k)
        # c_0 is predicted by the prompt's last position, c_j by the continuation's position j - 1.
        first = jnp.broadcast_to(h[:, None, -1:], (b, k, 1, h.shape[-1]))
        hidden = jnp.concatenate([first, hc.reshape(b, k, c, -1)[:, :, :-1]], axis=2).reshape(b, k * c, -1)
        return tuple(o.reshape(b, k, c) for o in head_logprobs(hidden, head, ids, with_stats=True))

    def one(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        ids, mask = xs
        hc, _ = model.decode_step(ids, positions, kv_valid.at[:, p:p + c].set(mask), cache, p)
        hidden = jnp.concatenate([h[:, -1:], hc[:, :-1]], axis=1)
        return head_logprobs(hidden, head, ids, with_stats=True)

    outs = jax.lax.map(one, (continuation_ids.swapaxes(0, 1), continuation_mask.swapaxes(0, 1)))
    return tuple(o.swapaxes(0, 1) for o in outs)


@partial(model_jit, static_argnames=("with_stats", "chunk_size"), compiler_options=CUBLAS_GEMMS)
def token_logprobs(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    images: dict[str, jax.Array] | None,
    with_stats: bool = False,
    chunk_size: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Jitted public wrapper of compute_token_logprobs."""
    return compute_token_logprobs(model, input_ids, attention_mask, images, with_stats, chunk_size)
