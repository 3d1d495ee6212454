"""The train step with the decoder's layers run one jitted program at a time, dispatched from Python.

Why (bench/NOTES.md, session 21): inside the decoder's lax.scan XLA:GPU copies each layer's weights out of the
stack in the forward and again in the backward (~20 ms of a 0.215 s LLaVA-7B LoRA step). Run as one forward and one
backward program per layer over per-layer weight arrays, no weight is sliced out of a stack. Measured on an H200
(bench/RESULTS.md, sessions 22-23): LLaVA-7B's GA / GD / NPO steps -10.8 / -8.3 / -6.9 %, Idefics2-8b's GA -7.7 %,
Llama-3.2-11B-Vision's GA -9.3 %; the first step 12-20 s against the scanned program's 10-13 s compile at 7B, 46 s
against 57 s at 11B (`lora_only`: where `auto` takes it).

The step is the trainer's own (same loss, same optimizer, same checkpoints): the loss is traced with the decoder
calls on a tape (models/decoder_tape.py). A *collect* program returns each decoder call's inputs; the layers run
one by one (the policy's with jax.vjp residuals, the reference's plain); a *replay* program takes the decoder
outputs as arguments and returns the loss, its aux, and the gradients of everything outside the layers and of the
decoder outputs; the layers' backward runs one by one; an *update* program adds the gradients of what runs before
the decoder (embeddings, projector, vision tower: the collect program's vjp, whose residuals it returned),
stacks the layers' gradients into the params' own [L, ...] layout and applies the optimizer. So params, optimizer
state and checkpoints keep the stacked layout of the scanned step, and a run may resume in either form.

Memory: the decoder's frozen weights are held per layer for the run (the stacked arrays in the model are replaced by
zero-size stand-ins and rebuilt bit for bit at the end), its trainable layer params once stacked and once per layer
(LoRA: small). Scope: decoders of stacked layers (`llama.DecoderLM`: LLaVA Llama / Phi-3, Idefics2, Qwen2-VL) and
Mllama's decoder (`mllama.MllamaTextModel`: several stacks, self- and cross-attention layers). Its cross layers'
K/V are projected from the vision states before the decoder call (MllamaTextModel.cross_kv), so they stay in the
collect trace: a cross layer's backward returns their cotangents too, and the collect program's vjp (applied by
the update program) then runs over the layer params as well (LoRA on the cross layers' k/v projections); those
projections' frozen weights stay stacked in the model beside their per-layer slices (the collect trace reads them).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlmu_jax.eval.layer_copies import decoder_of, restack, stand_in, unstack
from vlmu_jax.launches import one_at_a_time
from vlmu_jax.models.decoder_tape import POLICY, REFERENCE, DecoderCall, DecoderInputs, Tape, recording
from vlmu_jax.models.layers import GatedMLP, can_join, remat_policy
from vlmu_jax.models.llama import DecoderLM, LlamaAttention
from vlmu_jax.models.mllama import CrossAttention, CrossDecoderLayer, MllamaTextModel

Path = tuple


def module_path(root: nnx.Module, node: nnx.Module) -> Path:
    """`node`'s path inside `root`."""
    for path, found in nnx.iter_graph(root):
        if found is node:
            return tuple(path)
    raise ValueError("module is not part of the model")


def _under(prefix: Path) -> Callable[[Path, Any], bool]:
    """NNX filter: the variables below `prefix`."""
    return lambda path, _: tuple(path[: len(prefix)]) == prefix


@dataclass(frozen=True)
class Stack:
    """One stacked layer module of the decoder: its path in the model, the decoder layers it holds in stack order,
    and whether they are cross-attention layers (Mllama's, fed each its K/V of the vision states)."""

    prefix: Path
    ids: tuple[int, ...]
    cross: bool

    def read_outside(self, path: Path) -> bool:
        """Whether the model reads the param at `path` (full) outside the layer calls too: a cross layer's K/V
        projections, which MllamaTextModel.cross_kv runs before the decoder call."""
        rel = tuple(path[len(self.prefix):])
        return self.cross and len(rel) > 1 and rel[0] == "cross_attn" and rel[1] in CrossAttention.KV_MODULES


def _stack_modules(model: nnx.Module) -> list[tuple[Stack, nnx.Module]]:
    """The decoder's layer stacks with their modules: `llama.DecoderLM`'s one, `mllama.MllamaTextModel`'s several
    (its `layout`)."""
    lm = decoder_of(model)
    if isinstance(lm, MllamaTextModel):
        return [(Stack(module_path(model, lm.layers[name]), ids, isinstance(lm.layers[name], CrossDecoderLayer)),
                 lm.layers[name]) for name, ids in lm.layout]
    return [(Stack(module_path(model, lm.layers), tuple(range(lm.config.num_layers)), False), lm.layers)]


def decoder_stacks(model: nnx.Module) -> tuple[Stack, ...]:
    """The decoder's layer stacks (`_stack_modules`)."""
    return tuple(stack for stack, _ in _stack_modules(model))


def stack_graphdefs(model: nnx.Module) -> tuple[tuple[tuple[Stack, Any], ...], tuple[tuple[Stack, Any], ...]]:
    """Each of the decoder's layer stacks with its module's graphdef, in train and in eval mode (the model is left in
    train mode)."""
    stacks = _stack_modules(model)
    model.eval()
    graphdefs_eval = tuple((stack, nnx.graphdef(m)) for stack, m in stacks)
    model.train()
    return tuple((stack, nnx.graphdef(m)) for stack, m in stacks), graphdefs_eval


def _within(state: nnx.State, prefix: Path) -> nnx.State:
    """The variables of `state` below `prefix`, their paths relative to it (empty where there are none)."""
    n = len(prefix)
    return nnx.from_flat_state([(tuple(p)[n:], v) for p, v in nnx.to_flat_state(state) if tuple(p[:n]) == prefix])


def _prefixed(state: nnx.State, prefix: Path) -> nnx.State:
    """`state` with `prefix` put before every path (`_within`'s inverse)."""
    return nnx.from_flat_state([(tuple(prefix) + tuple(p), v) for p, v in nnx.to_flat_state(state)])


def applicable(model: nnx.Module, params: nnx.State) -> str | None:
    """Why the per-layer step cannot run on `model` training `params` (None: it can)."""
    lm = decoder_of(model)
    if not isinstance(lm, DecoderLM | MllamaTextModel):
        return "its decoder is not made of stacked layers (llama.DecoderLM, mllama.MllamaTextModel)"
    prefix = module_path(model, lm.layers)
    if any(_under(prefix)(p, None) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.RngState))):
        return "its decoder layers hold RNG state"
    if not any(_under(prefix)(p, None) for p, _ in nnx.to_flat_state(params)):
        return "nothing in its decoder layers trains"
    return None


def lora_only(model: nnx.Module, params: nnx.State) -> bool:
    """Whether every trainable param in `model`'s decoder layers (a decoder `applicable` accepts) is LoRA: where
    `auto` takes the per-layer step on GPU. Why LoRA only: the trainable layer params are held twice, stacked and
    per layer (small for LoRA). Measured faster than the scan on an H200 there (bench/RESULTS.md, sessions 22-23):
    LLaVA-7B, Idefics2-8b and Llama-3.2-11B-Vision, 7-13 % less per step (Mllama's since its collect program hands
    the vision tower's vjp residuals to the update program: before, 0.499 against the scan's 0.349 s)."""
    prefix = module_path(model, decoder_of(model).layers)
    flat = [(p, v) for p, v in nnx.to_flat_state(params) if _under(prefix)(p, None)]
    return all(isinstance(v, nnx.LoRAParam) or getattr(v, "type", None) is nnx.LoRAParam for _, v in flat)


# Whether FrozenLayers holds the frozen q/k/v and gate/up kernels joined (`frozen_joinings`): one gemm over
# one normed input for q/k/v and one for gate/up, where XLA's dot merger concatenated the kernels and sliced the
# outputs in every step. Measured on an H200 (bench/RESULTS.md, session 27, call 94), LLaVA-7B's per-layer LoRA
# steps: GA 0.1798 -> 0.1747 s (with the attention-inputs policy 0.1753 -> 0.1725 s), NPO and GD ~0.8 % faster.
# Not measured on a GPU for the other families (the same layers: tests/test_layerwise_mllama.py).
JOIN_FROZEN_KERNELS = True


def frozen_joinings(model: nnx.Module, trainable: Any) -> list[tuple[Path, LlamaAttention | GatedMLP]]:
    """The decoder layers' attentions and gated MLPs (with their paths) whose q/k/v (gate/up) kernels are all frozen
    and can be held joined (`layers.Joining`, `layers.can_join`).

    Why joined (bench/NOTES.md, session 25): with the kernels passed apart, XLA's dot merger concatenates q and k's
    kernels in every layer call (34 us per 7B layer), slices their outputs apart again, and multiplies the norm's
    output by its weight once per consumer gemm; a kernel held joined is one gemm over one normed input, each
    projection's LoRA term added to its slice."""
    trained = {tuple(p) for p, _ in nnx.to_flat_state(nnx.split(model, trainable, ...)[1])}
    inside = _under(module_path(model, decoder_of(model).layers))
    found = []
    for path, node in nnx.iter_graph(model):
        if not (isinstance(node, LlamaAttention | GatedMLP) and inside(tuple(path), None)):
            continue
        joining = node.joining()
        if (joining is None or any((*path, name, "kernel") in trained for name in joining.names)
                or not can_join(joining.projections(node))):
            continue
        found.append((tuple(path), node))
    return found


class FrozenLayers:
    """A model's frozen decoder-layer weights per layer (layer i's: its stack's params sliced at i, paths relative to
    the stack module, for `nnx.merge` beside the trainable slices; held as the leaves of `treedefs[i]`, which
    `LayerProgram` passes to jit), the stacked arrays in the model replaced by zero-size stand-ins until `restore`;
    but for what the model reads outside the layer calls (`Stack.read_outside`), which stays stacked as well. With
    `JOIN_FROZEN_KERNELS` each layer's frozen q/k/v and gate/up kernels are held joined (`frozen_joinings`) until
    `restore`, and the model's graph changes with them (the joined kernels' attributes hold stand-ins): take its
    graphdefs after this.

    Memory: one stacked param at a time is sliced and then freed, so the most this adds is the largest of them; the
    kernels are joined layer by layer after slicing. Joined as stacks first (sessions 27-32), gate and up were
    concatenated whole beside themselves: idefics2-8b's LoRA GA step peaked 3.3 GiB higher than with the kernels
    apart, above HF + PEFT's (bench/RESULTS.md session 33).

    Why here and not eval/layer_copies.swap_in_copies: training keeps the trainable layer params stacked (the
    optimizer and the checkpoints see the scanned step's layout), so only what the trainer leaves frozen moves."""

    def __init__(self, model: nnx.Module, trainable: Any):
        lm = decoder_of(model)
        self.n = lm.config.num_layers
        self.prefix = module_path(model, lm.layers)
        joinings = frozen_joinings(model, trainable) if JOIN_FROZEN_KERNELS else []
        variables = {tuple(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
        stacks = decoder_stacks(model)

        def frozen_flat() -> tuple[list, dict[Path, Stack]]:
            frozen = nnx.split_state(nnx.split(model, trainable, nnx.RngState, ...)[3], _under(self.prefix), ...)[0]
            flat = [(tuple(p), v) for p, v in nnx.to_flat_state(frozen)]
            return flat, {p: next(s for s in stacks if p[: len(s.prefix)] == s.prefix) for p, _ in flat}

        flat, stack_of = frozen_flat()
        self._slices: dict[Path, list[jax.Array]] = {}  # path -> its per-layer arrays, for `restore`
        self._dropped = {}
        for path, _ in flat:  # one param at a time: its stacked value is freed once sliced
            value = variables[path].get_value()
            self._slices[path] = unstack(value, len(stack_of[path].ids))
            if stack_of[path].read_outside(path):  # stays stacked too (small: Mllama's K/V projections)
                continue
            self._dropped[path] = (variables[path], value.sharding)
            variables[path].set_value(stand_in(value))
            del value
        for path, module in joinings:
            self._join(path, module)
        self._joined = joinings
        flat, stack_of = frozen_flat()  # with the joined kernels' paths
        self.layers: list[list[jax.Array]] = [[] for _ in range(self.n)]
        self.treedefs: list[Any] = [None] * self.n
        for stack in stacks:
            own = [(p, v) for p, v in flat if stack_of[p] is stack]
            for j, i in enumerate(stack.ids):
                self.layers[i], self.treedefs[i] = jax.tree.flatten(nnx.from_flat_state([
                    (p[len(stack.prefix):], jax.tree.map(lambda _, p=p, j=j: self._slices[p][j], v)) for p, v in own]))

    def _join(self, path: Path, module: LlamaAttention | GatedMLP) -> None:
        """Each layer's slices of `module`'s joining projections' kernels as one joined kernel, under the joined
        attribute's path, the projections' own slices then zero-size stand-ins; the stacked module's joined
        attribute a stand-in."""
        joining = module.joining()
        parts = [(*path, name, "kernel") for name in joining.names]
        joined = []
        for j in range(len(self._slices[parts[0]])):
            joined.append(jnp.concatenate([self._slices[p][j] for p in parts], axis=-1))
            for p in parts:
                self._slices[p][j] = stand_in(self._slices[p][j])
        setattr(module, joining.attr, nnx.Param(stand_in(joined[0])))
        self._slices[(*path, joining.attr)] = joined

    def restore(self) -> None:
        """The stacked arrays rebuilt in the model from the per-layer states (bit for bit), one param at a time,
        each param's slices freed once it is rebuilt: `layers` is emptied in place, so a step that shares the list
        holds none of them afterwards (else a 7B decoder's slices outlive the run beside the rebuilt stack)."""
        self.layers.clear()
        # flax's state flattening leaves reference cycles (a recursive closure holding its result) that keep the
        # per-layer Variables, so their arrays, alive until the collector runs: measured on this CPU, a decoder's
        # slices outlived restore(); on an H200 the pipeline's training stages peaked 12.3 / 24.5 GiB higher
        gc.collect()
        for path, module in self._joined:  # each layer's joined kernel back into its projections' slices
            joining = module.joining()
            joined = self._slices.pop((*path, joining.attr))
            for j in range(len(joined)):
                for name, part in zip(joining.names, joining.split(joined[j]), strict=True):
                    self._slices[(*path, name, "kernel")][j] = part
                joined[j] = None
            setattr(module, joining.attr, nnx.data(None))
        self._joined = []
        for path, (var, sharding) in self._dropped.items():
            var.set_value(restack(self._slices.pop(path), sharding))
        self._slices.clear()


@dataclass(frozen=True)
class LayerCall:
    """One cache-less self-attention decoder layer call (bound in its LayerProgram, which it keys by value).
    `diff` (what the backward differentiates besides the weights and h) is empty, `fixed` = (positions, mask)."""

    impl: str
    causal: bool

    def __call__(self, layer: nnx.Module, h: jax.Array, diff: tuple, fixed: tuple, rng: jax.Array | None) -> jax.Array:
        positions, mask = fixed
        return layer(h, positions, mask, impl=self.impl, causal=self.causal, cache=None, index=0, rng=rng)[0]


@dataclass(frozen=True)
class CrossLayerCall:
    """One Mllama cross-attention layer call: `diff` = its K/V (computed before the decoder, so their gradient
    flows back to the vision side and to the layer's own k/v projections through the update program), `fixed` =
    the CrossState."""

    impl: str

    def __call__(self, layer: nnx.Module, h: jax.Array, diff: tuple, fixed: Any, rng: jax.Array | None) -> jax.Array:
        return layer(h, fixed, diff, impl=self.impl, rng=rng)


def _avals(tree: Any) -> tuple:
    return tuple((x.shape, x.dtype) for x in jax.tree.leaves(tree))


def split_residuals(vjp: Callable, given: list) -> tuple[list, tuple]:
    """jax.vjp's function as (its residuals that are not among `given`, how to put it back together). Why: a jitted
    program that returned the arrays it was given would copy them into new buffers; its caller passes them again
    to the program that applies the vjp (`join_residuals`). Which residual is which argument is found at trace time
    by identity."""
    leaves, treedef = jax.tree.flatten(vjp)
    where = [next((j for j, a in enumerate(given) if a is leaf), -1) for leaf in leaves]
    return [leaf for leaf, j in zip(leaves, where, strict=True) if j < 0], (treedef, where)


def join_residuals(meta: tuple, kept: list, given: list) -> Callable:
    """The vjp function `split_residuals` took apart, from its kept residuals and the same `given` arrays."""
    treedef, where = meta
    it = iter(kept)
    return jax.tree.unflatten(treedef, [next(it) if j < 0 else given[j] for j in where])


class LayerProgram:
    """A layer structure's programs: its forward with the backward's residuals, its backward, and a plain forward,
    each jitted once per shape. The layer's call, graph, remat policy and its weights' tree structures are bound
    here, and the weights pass as flat lists of arrays. Why (bench/NOTES.md, session 23): with the graph as a static
    argument, jit hashed nnx's GraphDef and flattened nnx States in Python on each of a 7B step's 64 layer calls,
    which took most of the host's ~1.5 ms per layer forward on an H200 host; bound here, 0.5 ms. A 7B step is
    device-bound either way (the host waits on the device), but a layer must not cost the host more than the device
    where layers are cheap.

    The forward returns jax.vjp's residuals but not the arrays it was given (`split_residuals`); the backward takes
    those again and returns the gradients of the layer's trainable params (leaves), of h and of `diff`."""

    def __init__(self, call: LayerCall | CrossLayerCall, graphdef: Any, remat: str, param_def: Any, rest_def: Any):
        self.call, self.graphdef, self.remat = call, graphdef, remat
        self.param_def, self.rest_def = param_def, rest_def
        self._meta: dict[tuple, tuple] = {}
        # the model's programs: each may warm up a cuDNN graph the first time it runs (vlmu_jax/launches.py)
        self.forward = one_at_a_time(jax.jit(self._forward))
        self.backward = one_at_a_time(jax.jit(self._backward))
        self.weights_backward = one_at_a_time(jax.jit(self._weights_backward))
        self.plain = one_at_a_time(jax.jit(self._run))

    def _run(self, params: list, rest: list, h, diff, fixed, rng):
        layer = nnx.merge(self.graphdef, jax.tree.unflatten(self.param_def, params),
                          jax.tree.unflatten(self.rest_def, rest))
        return self.call(layer, h, diff, fixed, rng)

    def _fn(self, rest: list, fixed, rng) -> Callable:
        def f(params, h, diff):
            return self._run(params, rest, h, diff, fixed, rng)

        return f if self.remat == "none" else jax.checkpoint(f, policy=remat_policy(self.remat))

    def _forward(self, params, rest, h, diff, fixed, rng):
        y, vjp = jax.vjp(self._fn(rest, fixed, rng), params, h, diff)
        args = (params, rest, h, diff, fixed, rng)
        kept, self._meta[_avals(args)] = split_residuals(vjp, jax.tree.leaves(args))
        return y, kept

    def _backward(self, params, rest, h, diff, fixed, rng, residuals, dy):
        args = (params, rest, h, diff, fixed, rng)
        return join_residuals(self._meta[_avals(args)], residuals, jax.tree.leaves(args))(dy)

    def _weights_backward(self, params, rest, h, diff, fixed, rng, residuals, dy):
        """The backward's trainable-param gradients alone, for a decoder's first layer where nothing before the
        decoder trains: XLA then leaves out the input's cotangent (the dx gemms of the layer's q/k/v and gate/up
        projections and the norms' backward: ~1.2 ms of a LLaVA-7B step per policy call by call 128's trace, not
        timed apart, bench/NOTES.md session 35). PyTorch skips it the same way: nothing before the first layer
        requires a gradient."""
        return self._backward(params, rest, h, diff, fixed, rng, residuals, dy)[0]


class LayerRun(NamedTuple):
    """One layer of a decoder call: its index, its stack's index, its programs, and what they take besides the
    layer's input h (its trainable and frozen weights, the call's diff and fixed inputs, its dropout key)."""

    index: int
    stack: int
    program: LayerProgram
    weights: list
    frozen: list
    diff: Any
    fixed: Any
    key: Any

    def args(self, h: jax.Array) -> tuple:
        """The layer programs' arguments with input `h`."""
        return self.weights, self.frozen, h, self.diff, self.fixed, self.key


class LayerwiseStep:
    """The trainer's step `(params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches) -> (params,
    opt_state, rng, loss, aux)` with the decoder's layers run per layer (module docstring).

    merge / loss / apply / reference_params: the trainer's `make_merge`, `make_loss`, `apply_gradients` (with its tx
    bound) and `reference_params`.
    `prefix`: the path of the decoder's layers (every stack below it). `frozen` / `ref_frozen`: the policy's and the
    reference's frozen layer weights (FrozenLayers.layers); the stacked `rest` / `ref_rest` given to the step hold
    stand-ins there; `frozen_defs`: their tree structures (FrozenLayers.treedefs; the reference has the policy's
    graph). `stack_graphdefs`: each layer stack with its module's graphdef, in train and in eval mode
    (`stack_graphdefs`; the reference runs in eval mode: no dropout). Per-layer params pass between the programs
    as flat lists of arrays (`LayerProgram`)."""

    def __init__(self, *, merge: Callable, loss: Callable, apply: Callable, reference_params: Callable,
                 masked_streams: Sequence[str],
                 prefix: Path, n_layers: int, stack_graphdefs: tuple[tuple, tuple], frozen: list[list],
                 ref_frozen: list[list], frozen_defs: list):
        self.merge, self.loss, self.apply, self.reference_params = merge, loss, apply, reference_params
        self.masked_streams = set(masked_streams)
        self.prefix, self.n = prefix, n_layers
        train, evaluated = stack_graphdefs
        self.stacks = tuple(stack for stack, _ in train)
        self.graphdefs_train = tuple(graphdef for _, graphdef in train)
        self.graphdefs_eval = tuple(graphdef for _, graphdef in evaluated)
        self.stack_of = {i: s for s, stack in enumerate(self.stacks) for i in stack.ids}  # layer -> its stack
        # a cross layer -> the index of its K/V among the decoder's (MllamaTextModel.cross_kv: in layer order)
        self.cross_index = {i: k for k, i in enumerate(sorted(i for st in self.stacks if st.cross for i in st.ids))}
        self.frozen, self.ref_frozen, self.frozen_defs = frozen, ref_frozen, frozen_defs
        self.programs: dict[tuple, LayerProgram] = {}  # (role, stack, layer call, remat) -> its programs
        # stack -> the first stack of the same layer structure, whose programs it shares (Mllama's three stacks of
        # self-attention layers, its two of cross layers): compared once here, not hashed per call
        self.shares = [next(t for t in range(s + 1) if self._same_structure(t, s)) for s in range(len(self.stacks))]
        self.param_defs: dict[int, Any] = {}  # stack -> the tree structure of a layer's trainable params
        self.policy: list[list] | None = None  # this step's trainable layer params, per layer (leaves)
        self.reference: list[list] | None = None  # the reference's (zero LoRA), per layer (leaves); fixed
        self._calls: dict[tuple, tuple] = {}  # batches' shapes -> the decoder calls of the loss
        self._prefix_meta: dict[tuple, tuple] = {}  # batches' shapes -> how the collect program's vjp comes apart
        self._sig: tuple = ()
        self._collect = one_at_a_time(jax.jit(self._collect_fn))
        self._replay = one_at_a_time(jax.jit(self._replay_fn))
        self._update = one_at_a_time(jax.jit(self._update_fn, donate_argnums=(0, 1)))
        self._slices = jax.jit(self._slices_fn)
        self._reference_slices = jax.jit(self._reference_fn)

    # -- the programs around the layers ------------------------------------------------------------------------
    def _split(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(the decoder layers' trainable params, everything else that trains)."""
        return nnx.split_state(params, _under(self.prefix), ...)

    def _slices_fn(self, layer_params: nnx.State) -> list[list]:
        """Each layer's slice of its stack's params (paths relative to the stack) as the leaves of its stack's
        `param_defs` (a slice has its stack's tree structure)."""
        slices: list[list] = [[] for _ in range(self.n)]
        for stack in self.stacks:
            state = _within(layer_params, stack.prefix)
            for j, i in enumerate(stack.ids):
                slices[i] = jax.tree.leaves(jax.tree.map(lambda a, j=j: a[j], state))
        return slices

    def _reference_fn(self, params, ref_other):
        return self._slices_fn(self._split(self.reference_params(params, ref_other))[0])

    def _stacked(self, layer_params: nnx.State, layer_grads: list[list]) -> nnx.State:
        """The layers' gradients (per decoder call, per layer; None where a call did not run the layer) summed and
        stacked into the params' layout, stack by stack (full paths)."""
        stacked = []
        for s, stack in enumerate(self.stacks):
            own = _within(layer_params, stack.prefix)
            if not jax.tree.leaves(own):
                continue
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), own)
            per_layer = []
            for i in stack.ids:
                got = [jax.tree.unflatten(self.param_defs[s], g[i]) for g in layer_grads if g[i] is not None]
                per_layer.append(jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *got) if got else zeros)
            stacked.append(_prefixed(jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer), stack.prefix))
        return nnx.merge_state(*stacked) if stacked else nnx.State({})

    def _traced(self, params, rng, rest, ref_other, ref_rest, batches, outputs=None):
        """The loss traced with its decoder calls on a tape: (loss, aux, the model's RNG state, the tape)."""
        model, ref_model = self.merge(params, rng, rest, ref_other, ref_rest)
        roles = {id(model.decoder_lm()): POLICY}
        if ref_model is not None:
            roles[id(ref_model.decoder_lm())] = REFERENCE
        with recording(Tape(roles, outputs)) as tape:
            value, aux = self.loss(model, ref_model, batches)
        self._calls[self._sig] = tuple(tape.calls)
        return value, aux, nnx.state(model, nnx.RngState), tape

    def _prefix(self, params, rng, rest, ref_other, ref_rest, batches) -> tuple[nnx.State, Callable] | None:
        """What runs before the decoder as a function for jax.vjp: (the params it differentiates, a function of them
        giving the policy's decoder inputs (h, cross-attention K/V) with every call's inputs as aux); None where
        nothing there trains. Over the params outside the layers, or over all of them for a decoder with cross
        layers (their K/V are projected there, by params inside the layer stacks)."""
        layer_params, outer = self._split(params)
        cross = any(stack.cross for stack in self.stacks)
        if not (jax.tree.leaves(outer) or cross):
            return None

        def inputs(p):
            p = p if cross else nnx.merge_state(layer_params, p)
            tape = self._traced(p, rng, rest, ref_other, ref_rest, batches)[3]
            own = [inp for c, inp in zip(tape.calls, tape.inputs, strict=True) if c.role == POLICY]
            return ([inp.h for inp in own], [inp.cross_kv for inp in own]), tape.inputs

        return (params if cross else outer), inputs

    def _collect_fn(self, params, rng, rest, ref_other, ref_rest, batches):
        """Each decoder call's inputs, and the residuals of their vjp over what trains before the decoder (none
        where nothing does): the update program applies it without running the vision tower again."""
        prefix = self._prefix(params, rng, rest, ref_other, ref_rest, batches)
        if prefix is None:
            return self._traced(params, rng, rest, ref_other, ref_rest, batches)[3].inputs, []
        _, vjp, inputs = jax.vjp(prefix[1], prefix[0], has_aux=True)
        kept, self._prefix_meta[self._sig] = split_residuals(
            vjp, jax.tree.leaves((params, rng, rest, ref_other, ref_rest, batches)))
        return inputs, kept

    def _replay_fn(self, outer, layer_params, rng, rest, ref_other, ref_rest, batches, outputs):
        def f(outer, outputs):
            value, aux, new_rng, _ = self._traced(nnx.merge_state(layer_params, outer), rng, rest, ref_other,
                                                  ref_rest, batches, outputs)
            return value, (aux, new_rng)

        (value, (aux, new_rng)), (g_outer, d_out) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            outer, outputs)
        policy = [k for k, c in enumerate(self._calls[self._sig]) if c.role == POLICY]
        return value, aux, new_rng, g_outer, [d_out[k] for k in policy]

    def _before_trains(self) -> bool:
        """Whether something before the decoder trains for this step's batch shapes: the collect program (traced
        first) then recorded its vjp. Else nothing needs the first layer's input gradient (`_weights_backward`)."""
        return self._sig in self._prefix_meta

    def _prefix_grads(self, params, rng, rest, ref_other, ref_rest, batches, residuals, kvs, dh0s,
                      dkvs) -> nnx.State | None:
        """The gradients of what runs before the decoder (embeddings, projector, vision tower; and a cross layer's
        k/v projections, which make its K/V there): the collect program's vjp applied to the cotangents of the
        policy's decoder inputs (`kvs`: their K/V, for the zeros of a cross layer a call did not run). None where
        nothing before the decoder trains."""
        if not (self._before_trains() and dh0s):
            return None
        vjp = join_residuals(self._prefix_meta[self._sig], residuals,
                             jax.tree.leaves((params, rng, rest, ref_other, ref_rest, batches)))
        dkvs = [None if kv is None else tuple(jax.tree.map(jnp.zeros_like, x) if d is None else d
                                              for x, d in zip(kv, dkv, strict=True))
                for kv, dkv in zip(kvs, dkvs, strict=True)]
        return vjp((list(dh0s), dkvs))[0]

    def _update_fn(self, params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches, g_outer,
                   layer_grads, residuals, kvs, dh0s, dkvs):
        layer_params, _ = self._split(params)
        grads = nnx.merge_state(self._stacked(layer_params, layer_grads), g_outer)
        before = self._prefix_grads(params, rng, rest, ref_other, ref_rest, batches, residuals, kvs, dh0s, dkvs)
        if before is not None:
            grads = _add_into(grads, before)
        masked = any(n in self.masked_streams for n in batches)
        params, opt_state, norm = self.apply(params, opt_state, grads, grad_mask, masked)
        return params, opt_state, norm, self._slices_fn(self._split(params)[0])

    # -- the layers ----------------------------------------------------------------------------------------------
    def _same_structure(self, t: int, s: int) -> bool:
        """Whether stacks t and s hold layers of one structure (graphs in both modes, frozen weights' tree)."""
        return (self.graphdefs_train[t] == self.graphdefs_train[s] and self.graphdefs_eval[t] == self.graphdefs_eval[s]
                and self.frozen_defs[self.stacks[t].ids[0]] == self.frozen_defs[self.stacks[s].ids[0]])

    def _program(self, role: str, s: int, layer_call: LayerCall | CrossLayerCall, remat: str) -> LayerProgram:
        """The programs of stack `s`'s layers for this role and call (made once per layer structure)."""
        s = self.shares[s]
        key = (role, s, layer_call, remat)
        if key not in self.programs:
            graphdef = (self.graphdefs_train if role == POLICY else self.graphdefs_eval)[s]
            self.programs[key] = LayerProgram(layer_call, graphdef, remat, self.param_defs[s],
                                              self.frozen_defs[self.stacks[s].ids[0]])
        return self.programs[key]

    def _runs(self, call: DecoderCall, inp: DecoderInputs) -> list[LayerRun]:
        """The decoder layers `call` runs, in order: the first `limit` layers, but for a cross layer in a pass
        without images."""
        params, frozen = (self.policy, self.frozen) if call.role == POLICY else (self.reference, self.ref_frozen)
        runs = []
        for i in range(self.n if call.limit is None else call.limit):
            s, key = self.stack_of[i], None if inp.keys is None else inp.keys[i]
            if not self.stacks[s].cross:
                layer_call, diff, fixed = LayerCall(call.impl, call.causal), (), (inp.positions, inp.mask)
            elif inp.cross is not None:
                layer_call, diff, fixed = CrossLayerCall(call.impl), inp.cross_kv[self.cross_index[i]], inp.cross
            else:
                continue
            runs.append(LayerRun(i, s, self._program(call.role, s, layer_call, call.remat), params[i], frozen[i],
                                 diff, fixed, key))
        return runs

    def _compile_ahead(self, params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches) -> None:
        """Every program of a step over `batches`' shapes lowered from the shapes alone (the collect program's
        outputs give the layers' inputs) and compiled at once, each in its own thread (XLA's compile runs outside
        the GIL); the step's calls then find them in jit's caches. Why: compiled one after another as the first
        step reaches them, LLaVA-7B's collect, layer, replay and update programs took 17-24 s against the scanned
        step's 11-13 s (bench/RESULTS.md, session 22)."""
        layer_params, outer = self._split(params)
        collect = self._collect.lower(params, rng, rest, ref_other, ref_rest, batches)
        lowered, seen = [collect], set()
        calls = self._calls[self._sig]
        if self.reference is None and any(c.role == REFERENCE for c in calls):
            self.reference = self._reference_slices(params, ref_other)
        outputs, layer_grads, dh0s, dkvs = [], [], [], []
        inputs, prefix_residuals = collect.out_info
        need_dh0 = self._before_trains()
        residuals: dict[tuple, Any] = {}  # a layer program's signature -> its forward's residuals (shapes)
        for call, inp in zip(calls, inputs, strict=True):
            grads, dkv = [None] * self.n, self._no_dkv(inp)
            for j, run in enumerate(self._runs(call, inp)):
                args = run.args(inp.h)
                sig = (run.program, _avals(args))
                if call.role == POLICY:
                    if sig not in seen:
                        forward = run.program.forward.lower(*args)  # traced before the backward: records residuals
                        residuals[sig] = forward.out_info[1]
                        lowered += [forward, run.program.backward.lower(*args, residuals[sig], inp.h)]
                    if j == 0 and not need_dh0 and (sig, "first") not in seen:
                        lowered.append(run.program.weights_backward.lower(*args, residuals[sig], inp.h))
                        seen.add((sig, "first"))
                    grads[run.index] = run.weights
                    if dkv is not None and run.index in self.cross_index:
                        dkv[self.cross_index[run.index]] = run.diff
                elif sig not in seen:
                    lowered.append(run.program.plain.lower(*args))
                seen.add(sig)
            if call.role == POLICY:
                layer_grads.append(grads)
                dh0s.append(inp.h if need_dh0 else None)
                dkvs.append(None if dkv is None else tuple(dkv))
            outputs.append(inp.h)
        lowered.append(self._replay.lower(outer, layer_params, rng, rest, ref_other, ref_rest, batches, outputs))
        kvs = [inp.cross_kv for c, inp in zip(calls, inputs, strict=True) if c.role == POLICY]
        lowered.append(self._update.lower(params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches,
                                          outer, layer_grads, prefix_residuals, kvs, dh0s, dkvs))
        with ThreadPoolExecutor(len(lowered), thread_name_prefix="compile") as pool:
            list(pool.map(lambda program: program.compile(), lowered))

    @staticmethod
    def _no_dkv(inp: DecoderInputs) -> list | None:
        """A call's cross-attention K/V cotangents before its backward (None: the call has none)."""
        return None if inp.cross is None or inp.cross_kv is None else [None] * len(inp.cross_kv)

    # -- the step ------------------------------------------------------------------------------------------------
    def __call__(self, params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches):
        self._sig = jax.tree.structure(batches), _avals(batches)
        layer_params, outer = self._split(params)
        if self.policy is None:
            self.param_defs = {s: jax.tree.structure(_within(layer_params, stack.prefix))
                               for s, stack in enumerate(self.stacks)}
            self.policy = self._slices(layer_params)
        if self._sig not in self._calls:
            self._compile_ahead(params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches)
        inputs, prefix_residuals = self._collect(params, rng, rest, ref_other, ref_rest, batches)
        calls = self._calls[self._sig]
        if self.reference is None and any(c.role == REFERENCE for c in calls):
            self.reference = self._reference_slices(params, ref_other)
        outputs, saved = [], []  # saved: per policy call, its layer runs and each one's (input, residuals)
        for call, inp in zip(calls, inputs, strict=True):
            h, runs, residuals = inp.h, self._runs(call, inp), []
            for run in runs:
                if call.role == POLICY:
                    given = h
                    h, res = run.program.forward(*run.args(h))
                    residuals.append((given, res))
                else:
                    h = run.program.plain(*run.args(h))
            outputs.append(h)
            if call.role == POLICY:
                saved.append((inp, runs, residuals))
        value, aux, new_rng, g_outer, d_out = self._replay(outer, layer_params, rng, rest, ref_other, ref_rest,
                                                            batches, outputs)
        del outputs
        layer_grads, dh0s, dkvs = [], [], []
        need_dh0 = self._before_trains()
        for (inp, runs, residuals), dh in zip(saved, d_out, strict=True):
            grads: list = [None] * self.n
            dkv = self._no_dkv(inp)
            while runs:
                run, (h, res) = runs.pop(), residuals.pop()  # each layer's residuals freed once it is through
                if not (runs or need_dh0):
                    grads[run.index], dh = run.program.weights_backward(*run.args(h), res, dh), None
                    continue
                grads[run.index], dh, d_diff = run.program.backward(*run.args(h), res, dh)
                if self.stacks[run.stack].cross:
                    dkv[self.cross_index[run.index]] = d_diff
            layer_grads.append(grads)
            dh0s.append(dh)
            dkvs.append(None if dkv is None else tuple(dkv))
        kvs = [inp.cross_kv for c, inp in zip(calls, inputs, strict=True) if c.role == POLICY]
        params, opt_state, norm, self.policy = self._update(params, opt_state, rng, rest, ref_other, ref_rest,
                                                            grad_mask, batches, g_outer, layer_grads,
                                                            prefix_residuals, kvs, dh0s, dkvs)
        return params, opt_state, new_rng, value, {**aux, "grad_norm": norm}


def _add_into(grads: nnx.State, more: nnx.State) -> nnx.State:
    """`grads` with `more` (gradients of a subset of its params, same paths) added where `more` has them."""
    added = {tuple(p): v for p, v in nnx.to_flat_state(more)}
    return nnx.from_flat_state([(tuple(p), jax.tree.map(jnp.add, v, added[tuple(p)]) if tuple(p) in added else v)
                                for p, v in nnx.to_flat_state(grads)])
