"""A LoRA gradient-ascent step over LLaVA-1.5-7B's decoder: one scanned program against one program per layer.

Question (bench/NOTES.md, session 21): inside the decoder's lax.scan XLA:GPU copies every layer's weights out of
the stack, in the forward and again in the backward (~20 ms of a 0.215 s GA step), and the step's one program
takes 20 s (LLaVA) to 70 s (Mllama) to compile. Run instead as one jitted forward and one jitted backward per layer,
dispatched from Python over per-layer weight arrays, no weight is sliced out of a stack and only one layer's body
compiles. This measures both forms of the same step on the decoder alone (the frozen vision prefix is the same in
both): the embeddings of B rows of T tokens -> 32 LoRA layers (r=128, dropout 0.05, the presets' dots remat) ->
norm -> head log-probs of the last 64 tokens -> -mean NLL -> AdamW. One JSON line per form (median seconds,
compile seconds, the largest gradient difference against the scanned form).
Run from the repo root: `PYTHONPATH=. python bench/bench_layerwise_step.py [--small]` (--small: CPU shape).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.bench_jax_llava import hf_config, peak_gb, timeit
from vlmu_jax.eval.layer_copies import swap_in_copies
from vlmu_jax.eval.scoring import head_logprobs
from vlmu_jax.models.layers import Dense, attention_mask, remat_policy, resolve_attention_impl
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.models.registry import init_model

REMAT = os.environ.get("REMAT", "dots_with_no_batch_dims_saveable")
LABELLED = 64  # labelled tokens per row (the anchor's second half of its text)


def ga_loss(h_normed: jax.Array, head: jax.Array, ids: jax.Array) -> jax.Array:
    """Gradient ascent's loss from final-normed hidden states: minus the mean NLL of the labelled (last LABELLED)
    tokens."""
    logp = head_logprobs(h_normed[:, -LABELLED - 1 : -1], head, ids[:, -LABELLED:])
    return jnp.mean(logp)


def scanned_step(lm: nnx.Module, head: jax.Array, tx: optax.GradientTransformation,
                 impl: str) -> tuple[Callable, nnx.State, nnx.State]:
    """The whole step as one program: the decoder's own scan over its stacked layers."""
    graphdef, lora, rest = nnx.split(lm, nnx.LoRAParam, ...)

    @jax.jit
    def step(lora, opt_state, rest, h0, positions, kv_valid, ids, rng):
        def loss(lora):
            model = nnx.merge(graphdef, lora, rest)
            h, _ = model(h0, positions, kv_valid, impl=impl, remat=REMAT, scan=True, rng=rng)
            return ga_loss(h, head, ids)  # the decoder's output is final-normed

        value, grads = jax.value_and_grad(loss)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value, grads

    return step, lora, rest


class LayerwiseStep:
    """The same step as one jitted forward and one jitted backward per layer, dispatched from Python.

    Each layer's forward returns its output and the backward's residuals (what the remat policy saves) but not
    the arrays it was given (its weights, its input): jit would copy them into outputs, so the backward takes
    them again as arguments and they are put back where jax.vjp's residuals held them."""

    def __init__(self, copies: list[nnx.Module], norm: nnx.Module, head: jax.Array,
                 tx: optax.GradientTransformation, impl: str):
        self.graphdef = nnx.graphdef(copies[0])
        split = [nnx.split(c, nnx.LoRAParam, ...)[1:] for c in copies]
        self.lora = [s[0] for s in split]
        self.rest = [s[1] for s in split]
        self.norm, self.head, self.tx, self.impl = norm, head, tx, impl
        self.meta: dict[str, Any] = {}
        self.residual_bytes = 0  # one layer's residuals, as the last call kept them
        self._fwd = jax.jit(self._forward)
        self._bwd = jax.jit(self._backward)
        self._head = jax.jit(jax.value_and_grad(self._head_loss, argnums=0))
        self._update = jax.jit(self._apply, donate_argnums=(0, 1))

    def _layer(self, lora, rest, h, positions, mask, rng):
        layer = nnx.merge(self.graphdef, lora, rest)
        return layer(h, positions, mask, impl=self.impl, causal=True, cache=None, index=0, rng=rng)[0]

    def _forward(self, lora, rest, h, positions, mask, rng):
        f = jax.checkpoint(lambda lora, h: self._layer(lora, rest, h, positions, mask, rng),
                           policy=remat_policy(REMAT))
        y, vjp = jax.vjp(f, lora, h)
        leaves, treedef = jax.tree.flatten(vjp)
        given = jax.tree.leaves((lora, rest, h, positions, mask, rng))
        where = [next((j for j, a in enumerate(given) if a is leaf), -1) for leaf in leaves]
        self.meta.update(treedef=treedef, where=where)
        return y, [leaf for leaf, j in zip(leaves, where, strict=True) if j < 0]

    def _backward(self, lora, rest, h, positions, mask, rng, residuals, dy):
        given = jax.tree.leaves((lora, rest, h, positions, mask, rng))
        it = iter(residuals)
        leaves = [next(it) if j < 0 else given[j] for j in self.meta["where"]]
        return jax.tree.unflatten(self.meta["treedef"], leaves)(dy)

    def _head_loss(self, h, head, ids):
        return ga_loss(self.norm(h), head, ids)

    def _apply(self, lora, opt_state, grads):
        updates, opt_state = self.tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    def grads(self, h0, positions, mask, ids, rng):
        rngs = jax.random.split(rng, len(self.lora))
        inputs, saved, h = [], [], h0
        for i, (lora, rest) in enumerate(zip(self.lora, self.rest, strict=True)):
            inputs.append(h)
            h, res = self._fwd(lora, rest, h, positions, mask, rngs[i])
            saved.append(res)
        self.residual_bytes = sum(x.nbytes for x in jax.tree.leaves(saved[0]))
        value, dh = self._head(h, self.head, ids)
        grads = [None] * len(self.lora)
        for i in reversed(range(len(self.lora))):
            grads[i], dh = self._bwd(self.lora[i], self.rest[i], inputs[i], positions, mask, rngs[i], saved[i], dh)
            saved[i] = inputs[i] = None
        return value, grads

    def step(self, opt_state, h0, positions, mask, ids, rng):
        value, grads = self.grads(h0, positions, mask, ids, rng)
        self.lora, opt_state = self._update(self.lora, opt_state, grads)
        return value, opt_state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    b, t = int(os.environ.get("B", 4)), 704
    model = init_model(hf_config(args.small), seed=0, dtype=jnp.bfloat16)
    apply_lora(model, rank=128, alpha=256.0, dropout=0.05, seed=0)
    # LoRA's B is zero-initialised, which zeroes every A gradient: a nonzero B exercises them all
    for i, (_, node) in enumerate(nnx.iter_graph(model)):
        if isinstance(node, Dense) and node.lora_b is not None:
            b_value = node.lora_b.get_value()
            node.lora_b.set_value(0.01 * jax.random.normal(jax.random.key(i), b_value.shape, b_value.dtype))
    model.train()
    lm, head = model.decoder_lm(), model.head_weight()
    impl = resolve_attention_impl(model.config.attention_impl)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(100, 32000, (b, t)), jnp.int32)
    h0 = lm.embed(ids)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    kv_valid = jnp.ones((b, t), bool)
    mask = attention_mask(positions, positions, kv_valid)
    key = jax.random.key(1)
    tx = optax.adamw(1e-5, weight_decay=0.01)

    step, lora, rest = scanned_step(lm, head, tx, impl)
    opt_state = jax.jit(tx.init)(lora)
    t0 = time.perf_counter()
    step.lower(lora, opt_state, rest, h0, positions, kv_valid, ids, key).compile()
    compile_s = time.perf_counter() - t0
    ref_loss, ref_grads = None, None

    def run_scanned() -> jax.Array:
        nonlocal ref_loss, ref_grads
        _, _, value, grads = step(lora, opt_state, rest, h0, positions, kv_valid, ids, key)
        ref_loss, ref_grads = value, grads
        return value

    s = timeit(run_scanned)
    print(json.dumps({"what": "lora_ga_decoder_step", "form": "scanned", "B": b, "T": t, "remat": REMAT, "s": s,
                      "compile_s": compile_s, "loss": float(ref_loss), "device": str(jax.devices()[0]),
                      "peak_gb": peak_gb()}), flush=True)

    copies, _ = swap_in_copies(lm.layers, lm.config.num_layers)
    lw = LayerwiseStep(copies, lm.norm, head, tx, impl)
    lw_opt = jax.jit(tx.init)(lw.lora)
    t0 = time.perf_counter()
    value, grads = lw.grads(h0, positions, mask, ids, key)
    jax.block_until_ready(grads)
    first_s = time.perf_counter() - t0
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b_.astype(jnp.float32))))
               for a, b_ in zip(jax.tree.leaves(stacked), jax.tree.leaves(ref_grads), strict=True))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref_grads))

    def run_layerwise() -> jax.Array:
        nonlocal lw_opt
        value, lw_opt = lw.step(lw_opt, h0, positions, mask, ids, key)
        return value

    s = timeit(run_layerwise)
    print(json.dumps({"what": "lora_ga_decoder_step", "form": "layerwise", "B": b, "T": t, "remat": REMAT, "s": s,
                      "first_call_s": first_s, "loss": float(value), "max_grad_diff": diff,
                      "max_grad": scale, "residual_mb_per_layer": lw.residual_bytes / 2**20,
                      "peak_gb": peak_gb()}), flush=True)


if __name__ == "__main__":
    main()
