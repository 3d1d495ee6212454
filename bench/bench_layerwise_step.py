"""A LoRA gradient-ascent step over a decoder (LLaVA-1.5-7B's, or Llama-3.2-11B-Vision's self and cross layers):
one scanned program against one program per layer.

Question (bench/NOTES.md, session 21): inside the decoder's lax.scan XLA:GPU copies every layer's weights out of
the stack, in the forward and again in the backward (~20 ms of a 0.215 s LLaVA GA step), and the step's one
program takes 20 s (LLaVA) to 70-90 s (Mllama) to compile. Run instead as one jitted forward and one jitted
backward per layer, dispatched from Python over per-layer weight arrays, no weight is sliced out of a stack and
only one body per kind of layer compiles. This measures both forms of the same step on the decoder alone (the
frozen vision prefix is the same in both; Mllama's vision states are random): embeddings of B rows -> the LoRA
layers (r=128, dropout 0.05, the presets' dots remat) -> norm -> head log-probs of the last 64 tokens -> -mean
NLL -> AdamW. One JSON line per form (median seconds, compile seconds, the largest gradient difference against
the scanned form, the per-layer form's program count).
Run from the repo root: `PYTHONPATH=. python bench/bench_layerwise_step.py [--small] [--family llava|mllama]`
(--small: a CPU shape; B= sets the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.bench_jax_llava import hf_config, peak_gb, timeit
from bench.family_shapes import MLLAMA
from vlmu_jax.eval.layer_copies import swap_in_copies
from vlmu_jax.eval.scoring import head_logprobs
from vlmu_jax.models.layers import Dense, attention_mask, fold, remat_policy, resolve_attention_impl
from vlmu_jax.models.llama import TextConfig
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.models.mllama import CrossState, MllamaTextModel
from vlmu_jax.models.registry import init_model

REMAT = os.environ.get("REMAT", "dots_with_no_batch_dims_saveable")
LABELLED = 64  # labelled tokens per row (the anchor's second half of its text)


def ga_loss(h_normed: jax.Array, head: jax.Array, ids: jax.Array) -> jax.Array:
    """Gradient ascent's loss from final-normed hidden states: minus the mean NLL of the labelled (last LABELLED)
    tokens."""
    logp = head_logprobs(h_normed[:, -LABELLED - 1 : -1], head, ids[:, -LABELLED:])
    return jnp.mean(logp)


def scanned_step(lm: nnx.Module, forward: Callable, head: jax.Array,
                 tx: optax.GradientTransformation) -> tuple[Callable, nnx.State, nnx.State]:
    """The whole step as one program: `forward(decoder, h0, extra, rng)`, the decoder's own scans over its
    stacked layers, to final-normed hidden states."""
    graphdef, lora, rest = nnx.split(lm, nnx.LoRAParam, ...)

    @jax.jit
    def step(lora, opt_state, rest, h0, extra, ids, rng):
        def loss(lora):
            return ga_loss(forward(nnx.merge(graphdef, lora, rest), h0, extra, rng), head, ids)

        value, grads = jax.value_and_grad(loss)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value, grads

    return step, lora, rest


class LayerwiseStep:
    """The same step as one jitted forward and one jitted backward per layer, dispatched from Python.

    `layers`: (call, module) per layer in order, `call(layer, h, extra, rng) -> h` a module-level function (a
    static argument: one program per call and layer structure). Each layer's forward returns its output and the
    backward's residuals (what the remat policy saves) but not the arrays it was given (its weights, its input,
    its extra inputs): jit would copy them into outputs, so the backward takes them again as arguments and they are
    put back where jax.vjp's residuals held them."""

    def __init__(self, layers: list[tuple[Callable, nnx.Module]], head_loss: Callable,
                 tx: optax.GradientTransformation):
        self.calls = [call for call, _ in layers]
        self.graphdefs = [nnx.graphdef(module) for _, module in layers]
        split = [nnx.split(module, nnx.LoRAParam, ...)[1:] for _, module in layers]
        self.lora = [s[0] for s in split]
        self.rest = [s[1] for s in split]
        self.tx = tx
        self.meta: dict[tuple, tuple] = {}
        self.residual_bytes = 0  # one layer's residuals, as the last call kept them
        self._fwd = jax.jit(self._forward, static_argnums=(0, 1))
        self._bwd = jax.jit(self._backward, static_argnums=(0, 1))
        self._head = jax.jit(jax.value_and_grad(head_loss, argnums=0))
        self._update = jax.jit(self._apply, donate_argnums=(0, 1))

    def _forward(self, call, graphdef, lora, rest, h, extra, rng):
        f = jax.checkpoint(lambda lora, h: call(nnx.merge(graphdef, lora, rest), h, extra, rng),
                           policy=remat_policy(REMAT))
        y, vjp = jax.vjp(f, lora, h)
        leaves, treedef = jax.tree.flatten(vjp)
        given = jax.tree.leaves((lora, rest, h, extra, rng))
        where = [next((j for j, a in enumerate(given) if a is leaf), -1) for leaf in leaves]
        self.meta[call, graphdef] = treedef, where
        return y, [leaf for leaf, j in zip(leaves, where, strict=True) if j < 0]

    def _backward(self, call, graphdef, lora, rest, h, extra, rng, residuals, dy):
        treedef, where = self.meta[call, graphdef]
        given = jax.tree.leaves((lora, rest, h, extra, rng))
        it = iter(residuals)
        return jax.tree.unflatten(treedef, [next(it) if j < 0 else given[j] for j in where])(dy)

    def _apply(self, lora, opt_state, grads):
        updates, opt_state = self.tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    def grads(self, h0, extras, rngs, head_args):
        """The loss and each layer's LoRA gradients; extras / rngs: each layer's extra inputs and key."""
        inputs, saved, h = [], [], h0
        for i, (lora, rest) in enumerate(zip(self.lora, self.rest, strict=True)):
            inputs.append(h)
            h, res = self._fwd(self.calls[i], self.graphdefs[i], lora, rest, h, extras[i], rngs[i])
            saved.append(res)
        self.residual_bytes = sum(x.nbytes for x in jax.tree.leaves(saved[0]))
        value, dh = self._head(h, *head_args)
        grads = [None] * len(self.lora)
        for i in reversed(range(len(self.lora))):
            grads[i], dh = self._bwd(self.calls[i], self.graphdefs[i], self.lora[i], self.rest[i], inputs[i],
                                     extras[i], rngs[i], saved[i], dh)
            saved[i] = inputs[i] = None
        return value, grads

    def step(self, opt_state, h0, extras, rngs, head_args):
        value, grads = self.grads(h0, extras, rngs, head_args)
        self.lora, opt_state = self._update(self.lora, opt_state, grads)
        return value, opt_state


def self_layer(layer: nnx.Module, h: jax.Array, extra: tuple, rng: jax.Array, *, impl: str) -> jax.Array:
    """A self-attention decoder layer (LLaVA's, Mllama's) without a cache; extra = (positions, mask)."""
    positions, mask = extra
    return layer(h, positions, mask, impl=impl, causal=True, cache=None, index=0, rng=rng)[0]


def cross_layer(layer: nnx.Module, h: jax.Array, extra: tuple, rng: tuple, *, impl: str) -> jax.Array:
    """Mllama's cross-attention layer, its K/V projected from the vision states inside (LoRA on k/v trains);
    rng = (the layer's key, its K/V's key) as MllamaTextModel draws them."""
    states, cross = extra
    return layer(h, cross, layer.cross_attn.kv(states, rng[1]), impl=impl, rng=rng[0])


class Setup(NamedTuple):
    """One family's decoder-only step: the decoder, its scanned forward, the per-layer form's layers and
    inputs, and the batch."""

    lm: nnx.Module
    forward: Callable
    head: jax.Array
    ids: jax.Array
    extra: Any  # the scanned forward's extra inputs
    layer_extras: list  # each layer's extra inputs in the per-layer form
    layer_rngs: Callable  # key -> each layer's key(s), as the decoder draws them
    calls: list  # each layer's call (self_layer / cross_layer with the impl bound)


def with_nonzero_lora_b(model: nnx.Module) -> None:
    """LoRA's B is zero-initialised, which zeroes every A gradient: a nonzero B exercises them all."""
    for i, (_, node) in enumerate(nnx.iter_graph(model)):
        if isinstance(node, Dense) and node.lora_b is not None:
            b_value = node.lora_b.get_value()
            node.lora_b.set_value(0.01 * jax.random.normal(jax.random.key(i), b_value.shape, b_value.dtype))


def llava(small: bool, b: int) -> Setup:
    """LLaVA-1.5-7B's decoder (bench_jax_llava's shape), B rows of 704 tokens."""
    model = init_model(hf_config(small), seed=0, dtype=jnp.bfloat16)
    apply_lora(model, rank=128, alpha=256.0, dropout=0.05, seed=0)
    with_nonzero_lora_b(model)
    model.train()
    lm, t = model.decoder_lm(), 704
    impl = resolve_attention_impl(model.config.attention_impl)
    ids = jnp.asarray(np.random.RandomState(0).randint(100, 32000, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    kv_valid = jnp.ones((b, t), bool)

    def forward(decoder, h0, extra, rng):
        return decoder(h0, *extra, impl=impl, remat=REMAT, scan=True, rng=rng)[0]

    n = lm.config.num_layers
    mask = attention_mask(positions, positions, kv_valid)
    return Setup(lm, forward, model.head_weight(), ids, (positions, kv_valid), [(positions, mask)] * n,
                 lambda key: list(jax.random.split(key, n)), [partial(self_layer, impl=impl)] * n)


def mllama(small: bool, b: int) -> Setup:
    """Llama-3.2-11B-Vision's decoder (bench_jax_families' shape: BOS, the image token, 128 text tokens; 2 x 2
    tiles of 1601 vision states per row), its head random."""
    tc = dict(MLLAMA["text_config"])
    if small:
        tc.update(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, cross_attention_layers=[3, 8])
    text = TextConfig.from_hf({**tc, "head_dim": None}, arch="llama")
    lm = MllamaTextModel(text, tuple(tc["cross_attention_layers"]), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    apply_lora(lm, rank=128, alpha=256.0, dropout=0.05, seed=0, targets=r"(q|k|v|o|gate|up|down)_proj$")
    with_nonzero_lora_b(lm)
    lm.train()
    impl = resolve_attention_impl("auto")
    t, n_states = 130, 4 * 1601
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(100, text.vocab_size, (b, t)), jnp.int32)
    head = (0.02 * jax.random.normal(jax.random.key(2), (text.vocab_size, text.hidden_size))).astype(jnp.bfloat16)
    states = (0.02 * jax.random.normal(jax.random.key(3), (b, n_states, text.hidden_size))).astype(jnp.bfloat16)
    cross = CrossState(jnp.ones((b, t), jnp.int32).at[:, 0].set(0), jnp.ones((b, n_states), jnp.int32),
                       jnp.ones((b,), jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    kv_valid = jnp.ones((b, t), bool)

    def forward(decoder, h0, extra, rng):
        positions, kv_valid, states, cross = extra
        return decoder(h0, positions, kv_valid, cross=cross, cross_kv=decoder.cross_kv(states, rng), impl=impl,
                       remat=REMAT, scan=True, rng=rng)[0]

    mask = attention_mask(positions, positions, kv_valid)
    is_cross = [i in lm.cross_layers for i in range(text.num_layers)]
    calls = {False: partial(self_layer, impl=impl), True: partial(cross_layer, impl=impl)}  # one program each
    return Setup(lm, forward, head, ids, (positions, kv_valid, states, cross),
                 [(states, cross) if c else (positions, mask) for c in is_cross],
                 lambda key: [(fold(key, i), fold(key, 1000 + i)) if c else fold(key, i)
                              for i, c in enumerate(is_cross)],
                 [calls[c] for c in is_cross])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--family", choices=("llava", "mllama"), default="llava")
    args = parser.parse_args()
    b = int(os.environ.get("B", 4))
    t0 = time.perf_counter()
    setup = {"llava": llava, "mllama": mllama}[args.family](args.small, b)
    init_s = time.perf_counter() - t0
    lm, ids, key = setup.lm, setup.ids, jax.random.key(1)
    h0 = lm.embed(ids)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    info = {"what": "lora_ga_decoder_step", "family": args.family, "B": b, "T": ids.shape[1], "remat": REMAT}

    step, lora, rest = scanned_step(lm, setup.forward, setup.head, tx)
    opt_state = jax.jit(tx.init)(lora)
    t0 = time.perf_counter()
    step.lower(lora, opt_state, rest, h0, setup.extra, ids, key).compile()
    compile_s = time.perf_counter() - t0
    ref_loss, ref_grads = None, None

    def run_scanned() -> jax.Array:
        nonlocal ref_loss, ref_grads
        _, _, value, grads = step(lora, opt_state, rest, h0, setup.extra, ids, key)
        ref_loss, ref_grads = value, grads
        return value

    s = timeit(run_scanned)
    print(json.dumps({**info, "form": "scanned", "s": s, "compile_s": compile_s, "init_s": init_s,
                      "loss": float(ref_loss), "device": str(jax.devices()[0]), "peak_gb": peak_gb()}), flush=True)

    copies = [copy for stack, n in lm.layer_stacks() for copy in swap_in_copies(stack, n)[0]]
    # (stack name, its layers' indices) in the copies' order; LLaVA's one stack holds every layer in order
    layout = getattr(lm, "layout", None) or ((None, range(len(copies))),)
    order = [i for _, ids_ in layout for i in ids_]  # copy j is layer order[j]
    by_layer = [copies[j] for j in sorted(range(len(copies)), key=order.__getitem__)]
    lw = LayerwiseStep(list(zip(setup.calls, by_layer, strict=True)), lambda h, head, ids: ga_loss(
        lm.norm(h), head, ids), tx)
    lw_opt = jax.jit(tx.init)(lw.lora)
    rngs = setup.layer_rngs(key)
    t0 = time.perf_counter()
    value, grads = lw.grads(h0, setup.layer_extras, rngs, (setup.head, ids))
    jax.block_until_ready(grads)
    first_s = time.perf_counter() - t0
    # each stack's gradients from its layers' (the copies' order), set beside the scanned step's for that stack
    diff, k = 0.0, 0
    for name, ids_ in layout:
        ours = jax.tree.map(lambda *xs: jnp.stack(xs), *(grads[order[j]] for j in range(k, k + len(ids_))))
        theirs = ref_grads["layers"] if name is None else ref_grads["layers"][name]
        diff = max([diff, *(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b_.astype(jnp.float32))))
                            for a, b_ in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True))])
        k += len(ids_)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref_grads))

    def run_layerwise() -> jax.Array:
        nonlocal lw_opt
        value, lw_opt = lw.step(lw_opt, h0, setup.layer_extras, rngs, (setup.head, ids))
        return value

    s = timeit(run_layerwise)
    print(json.dumps({**info, "form": "layerwise", "s": s, "first_call_s": first_s, "loss": float(value),
                      "max_grad_diff": diff, "max_grad": scale, "residual_mb_per_layer": lw.residual_bytes / 2**20,
                      "layer_programs": lw._fwd._cache_size() + lw._bwd._cache_size(),
                      "peak_gb": peak_gb()}), flush=True)


if __name__ == "__main__":
    main()
