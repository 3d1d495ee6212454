"""MMUnlearner's weight saliency map (Huo et al., ACL Findings 2025, "MMUnlearner: Reformulating Multimodal
Machine Unlearning in the Era of Multimodal Large Language Models", arXiv:2502.11051).

A VLM stores an identity's visual pattern and its textual facts in shared weights; plain gradient ascent on
image questions erases both. MMUnlearner scores every parameter entry by its diagonal empirical Fisher
importance, I_D(theta) = mean over the batches of D of (d NLL_batch / d theta)^2, and lets the ascent move an
entry only where I_forget / I_preserve >= gamma: the forget images' questions need it more than the retained
identities' image questions and the forget identities' text-only questions do (the paper's mask is built from
exactly these three sets; gamma = 1, and 1e-15 guards 0/0 as in the authors' code).

Differences from the authors' code, which builds separate masks for the language model and the vision side:
one preserve set (retain image QA + forget text QA) serves every trainable array, so for arrays that text-only
rows do not reach (projector, vision tower) the preserve importance is the retain one scaled by
n_retain / (n_retain + n_text) batches; and the mask multiplies the gradient before the optimizer's clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from vlmu_jax.launches import one_at_a_time

EPS = 1e-15


def saliency_mask(forget_fisher: Any, preserve_fisher: Any, threshold: float) -> Any:
    """Boolean pytree: entries whose forget importance is at least `threshold` times their preserve importance."""
    return jax.tree.map(lambda f, p: (f + EPS) / (p + EPS) >= threshold, forget_fisher, preserve_fisher)


def _squared_grad_added(loss_fn: Callable[[Any, Any, Any], jax.Array], acc: Any, p: Any, ctx: Any, batch: Any) -> Any:
    """acc + (d loss_fn / d p)^2 in float32. One jit keyed by `loss_fn`: the forget and preserve passes of one map
    share their compiled programs (a full forward and backward at full weights compiles for seconds)."""
    grads = jax.grad(loss_fn)(p, ctx, batch)
    return jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), acc, grads)


# the model's forward and backward: may warm up a cuDNN graph the first time it runs (vlmu_jax/launches.py)
_add_squared_grad = one_at_a_time(jax.jit(_squared_grad_added, static_argnums=0, donate_argnums=1))


def fisher_diagonal(loss_fn: Callable[[Any, Any, Any], jax.Array], params: Any, batches: Iterable[Any],
                    context: Any = None) -> Any:
    """Mean over `batches` of the squared gradient in `params` of `loss_fn(params, context, batch)`, in float32.

    `context` (e.g. the frozen weights) is an argument of the jitted step, never a constant baked into it."""

    acc, n = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), params), 0
    for batch in batches:
        acc, n = _add_squared_grad(loss_fn, acc, params, context, batch), n + 1
    if not n:
        raise ValueError("the saliency map needs at least one batch")
    return jax.tree.map(lambda a: a / n, acc)
