"""Teacher-forced per-token log-probs through a chunked output head.

The head runs over sequence chunks inside a scan with remat, so neither the forward nor the backward pass
ever holds
B x T x V float32 logits: only one [B, chunk, V] block at a time.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


def head_logprobs(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, *, with_stats: bool = False, chunk_size: int = 128
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """log p(targets) [B, N] from hidden [B, N, D] and head [V, D]; with_stats adds mu/var of log p under
    p."""
    b, n, d = hidden.shape
    c = min(chunk_size, n)
    pad = (-n) % c
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, d).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(h_c: jax.Array, t_c: jax.Array) -> tuple[jax.Array, ...]:
        logits = jnp.einsum("bcd,vd->bcv", h_c, head.astype(h_c.dtype), preferred_element_type=jnp.float32)
        logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        tgt = jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]
        if not with_stats:
            return (tgt,)
        p = jnp.exp(logp)
        mu = jnp.sum(p * logp, axis=-1)
        return tgt, mu, jnp.sum(p * logp * logp, axis=-1) - mu * mu

    _, outs = jax.lax.scan(lambda carry, x: (carry, chunk(*x)), None, (h, t))
    outs = tuple(o.swapaxes(0, 1).reshape(b, -1)[:, :n] for o in outs)
    return outs if with_stats else outs[0]


def head_kl(hidden: jax.Array, ref_hidden: jax.Array, head: jax.Array, ref_head: jax.Array,
            chunk_size: int = 128) -> jax.Array:
    """Full-vocabulary KL(ref || policy) at each position [B, N], chunked like `head_logprobs`.

    KL-regularised unlearning (FIUBench `kl`, MLLMU `kl_min`) needs whole next-token distributions,
    which never exist as B x T x V arrays here: each chunk's two softmaxes live only inside the scan.
    """
    b, n, d = hidden.shape
    c = min(chunk_size, n)
    pad = (-n) % c

    def chunks(x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, c, d).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(h_c: jax.Array, r_c: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(jnp.einsum("bcd,vd->bcv", h_c, head.astype(h_c.dtype),
                                             preferred_element_type=jnp.float32), axis=-1)
        logq = jax.nn.log_softmax(jnp.einsum("bcd,vd->bcv", r_c, ref_head.astype(r_c.dtype),
                                             preferred_element_type=jnp.float32), axis=-1)
        return jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)

    _, kl = jax.lax.scan(lambda carry, x: (carry, chunk(*x)), None, (chunks(hidden), chunks(ref_hidden)))
    return kl.swapaxes(0, 1).reshape(b, -1)[:, :n]


def compute_token_logprobs(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None,
    with_stats: bool = False,
    chunk_size: int = 128,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Traceable: logps [B, T-1] = log p(x_{t+1} | x_<=t); with_stats also (mu, var) of log p under p."""
    hidden = model(input_ids, attention_mask, pixel_values)
    return head_logprobs(
        hidden[:, :-1], model.head_weight(), input_ids[:, 1:], with_stats=with_stats, chunk_size=chunk_size
    )


@partial(nnx.jit, static_argnames=("with_stats", "chunk_size"))
def token_logprobs(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None,
    with_stats: bool = False,
    chunk_size: int = 128,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Jitted public wrapper of compute_token_logprobs."""
    return compute_token_logprobs(model, input_ids, attention_mask, pixel_values, with_stats, chunk_size)
