"""The train step with the decoder's layers run one jitted program at a time, dispatched from Python.

Why (bench/NOTES.md, session 21): inside the decoder's lax.scan XLA:GPU copies each layer's weights out of the
stack in the forward and again in the backward (~20 ms of a 0.215 s LLaVA-7B LoRA step), and the step's one
program compiles for 20-30 s. Run as one forward and one backward program per layer over per-layer weight arrays,
no weight is sliced out of a stack and only one layer body compiles (LLaVA-7B's decoder: -6 to -12 % per step,
compile 22-32 s -> 10-13 s, measured on an H200).

The step is the trainer's own (same loss, same optimizer, same checkpoints): the loss is traced with the decoder
calls on a tape (models/decoder_tape.py). A *collect* program returns each decoder call's inputs; the layers run
one by one (the policy's with jax.vjp residuals, the reference's plain); a *replay* program takes the decoder
outputs as arguments and returns the loss, its aux, and the gradients of everything outside the layers and of the
decoder outputs; the layers' backward runs one by one; an *update* program adds the gradients of what runs before
the decoder (embeddings, projector, vision tower: a vjp of the collect trace, cut by XLA when nothing there trains),
stacks the layers' gradients into the params' own [L, ...] layout and applies the optimizer. So params, optimizer
state and checkpoints keep the stacked layout of the scanned step, and a run may resume in either form.

Memory: the decoder's frozen weights are held per layer for the run (the stacked arrays in the model are replaced by
zero-size stand-ins and rebuilt bit for bit at the end), its trainable layer params once stacked and once per layer
(LoRA: small). Scope: decoders of stacked layers (`llama.DecoderLM`: LLaVA Llama / Phi-3, Idefics2, Qwen2-VL).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlmu_jax.eval.layer_copies import decoder_of, restack, stand_in, unstack
from vlmu_jax.models.decoder_tape import POLICY, REFERENCE, Tape, recording
from vlmu_jax.models.layers import remat_policy
from vlmu_jax.models.llama import DecoderLM

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


def _at(state: nnx.State, prefix: Path) -> nnx.State:
    """The sub-state at `prefix` (paths relative to it)."""
    for key in prefix:
        state = state[key]
    return state


def stack_graphdefs(model: nnx.Module) -> tuple[Any, Any]:
    """The decoder's stacked layer module's graphdef in train and in eval mode (the model is left in train mode)."""
    layers = decoder_of(model).layers
    model.eval()
    graphdef_eval = nnx.graphdef(layers)
    model.train()
    return nnx.graphdef(layers), graphdef_eval


def applicable(model: nnx.Module, params: nnx.State) -> str | None:
    """Why the per-layer step cannot run on `model` training `params` (None: it can)."""
    lm = decoder_of(model)
    if not isinstance(lm, DecoderLM):
        return "its decoder is not a stack of identical layers (llama.DecoderLM)"
    prefix = module_path(model, lm.layers)
    if any(_under(prefix)(p, None) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.RngState))):
        return "its decoder layers hold RNG state"
    if not any(_under(prefix)(p, None) for p, _ in nnx.to_flat_state(params)):
        return "nothing in its decoder layers trains"
    return None


def lora_only(model: nnx.Module, params: nnx.State) -> bool:
    """Whether every trainable param in the decoder's layers is a LoRA adapter (what `auto` takes the per-layer
    step for: the trainable layer params are then held twice, stacked and per layer, at a small cost)."""
    prefix = module_path(model, decoder_of(model).layers)
    flat = [(p, v) for p, v in nnx.to_flat_state(params) if _under(prefix)(p, None)]
    return all(isinstance(v, nnx.LoRAParam) or getattr(v, "type", None) is nnx.LoRAParam for _, v in flat)


class FrozenLayers:
    """A model's frozen decoder-layer weights as per-layer states (full paths, for `nnx.merge` beside the trainable
    slices), the stacked arrays in the model replaced by zero-size stand-ins until `restore`.

    Why here and not eval/layer_copies.swap_in_copies: training keeps the trainable layer params stacked (the
    optimizer and the checkpoints see the scanned step's layout), so only what the trainer leaves frozen moves."""

    def __init__(self, model: nnx.Module, trainable: Any):
        lm = decoder_of(model)
        self.n = lm.config.num_layers
        self.prefix = module_path(model, lm.layers)
        frozen = nnx.split_state(nnx.split(model, trainable, nnx.RngState, ...)[3], _under(self.prefix), ...)[0]
        variables = {tuple(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
        flat = list(nnx.to_flat_state(frozen))
        self._slices: dict[Path, list[jax.Array]] = {}  # path -> its per-layer arrays, for `restore`
        self._dropped = {}
        for path, _ in flat:  # one param at a time: its stacked value is freed once sliced
            value = variables[tuple(path)].get_value()
            self._slices[tuple(path)] = unstack(value, self.n)
            self._dropped[tuple(path)] = (variables[tuple(path)], value.sharding)
            variables[tuple(path)].set_value(stand_in(value))
            del value
        self.layers = [nnx.from_flat_state([(p, jax.tree.map(lambda _, p=p, i=i: self._slices[tuple(p)][i], v))
                                            for p, v in flat]) for i in range(self.n)]

    def restore(self) -> None:
        """The stacked arrays rebuilt in the model from the per-layer states (bit for bit), one param at a time,
        each param's slices freed once it is rebuilt: `layers` is emptied in place, so a step that shares the list
        holds none of them afterwards (else a 7B decoder's slices outlive the run beside the rebuilt stack)."""
        self.layers.clear()
        # flax's state flattening leaves reference cycles (a recursive closure holding its result) that keep the
        # per-layer Variables, so their arrays, alive until the collector runs: measured on this CPU, a decoder's
        # slices outlived restore(); on an H200 the pipeline's training stages peaked 12.3 / 24.5 GiB higher
        gc.collect()
        for path, (var, sharding) in self._dropped.items():
            var.set_value(restack(self._slices.pop(path), sharding))


@dataclass(frozen=True)
class LayerCall:
    """One cache-less decoder layer call (a static argument of the layer programs: hashed by value)."""

    impl: str
    causal: bool

    def __call__(self, layer: nnx.Module, h: jax.Array, positions: jax.Array, mask: Any,
                 rng: jax.Array | None) -> jax.Array:
        return layer(h, positions, mask, impl=self.impl, causal=self.causal, cache=None, index=0, rng=rng)[0]


def _avals(tree: Any) -> tuple:
    return tuple((x.shape, x.dtype) for x in jax.tree.leaves(tree))


class LayerPrograms:
    """A layer's forward with the backward's residuals, its backward, and a plain forward, each one jitted program
    per (call, layer structure, remat, shapes).

    The forward returns jax.vjp's residuals but not the arrays it was given (its weights, input, mask, key): jit
    would copy a returned argument into a new buffer, so the backward takes them again and puts them back where the
    residuals held them (which residual is which argument is found at trace time by identity)."""

    def __init__(self) -> None:
        self._meta: dict[tuple, tuple] = {}
        self.forward = jax.jit(self._forward, static_argnums=(0, 1, 2, 3))
        self.backward = jax.jit(self._backward, static_argnums=(0, 1, 2, 3))
        self.plain = jax.jit(self._plain, static_argnums=(0, 1, 2))

    @staticmethod
    def _fn(call: LayerCall, graphdef, remat: str, prefix: Path, rest, positions, mask, rng) -> Callable:
        def f(params, h):
            layer = nnx.merge(graphdef, _at(params, prefix), _at(rest, prefix))
            return call(layer, h, positions, mask, rng)

        return f if remat == "none" else jax.checkpoint(f, policy=remat_policy(remat))

    def _forward(self, call, graphdef, remat, prefix, params, rest, h, positions, mask, rng):
        y, vjp = jax.vjp(self._fn(call, graphdef, remat, prefix, rest, positions, mask, rng), params, h)
        leaves, treedef = jax.tree.flatten(vjp)
        given = jax.tree.leaves((params, rest, h, positions, mask, rng))
        where = [next((j for j, a in enumerate(given) if a is leaf), -1) for leaf in leaves]
        self._meta[call, graphdef, remat, prefix, _avals((params, rest, h, positions, mask, rng))] = treedef, where
        return y, [leaf for leaf, j in zip(leaves, where, strict=True) if j < 0]

    def _backward(self, call, graphdef, remat, prefix, params, rest, h, positions, mask, rng, residuals, dy):
        treedef, where = self._meta[call, graphdef, remat, prefix, _avals((params, rest, h, positions, mask, rng))]
        given = jax.tree.leaves((params, rest, h, positions, mask, rng))
        it = iter(residuals)
        return jax.tree.unflatten(treedef, [next(it) if j < 0 else given[j] for j in where])(dy)

    @staticmethod
    def _plain(call, graphdef, prefix, params, rest, h, positions, mask, rng):
        return call(nnx.merge(graphdef, _at(params, prefix), _at(rest, prefix)), h, positions, mask, rng)


class LayerwiseStep:
    """The trainer's step `(params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches) -> (params,
    opt_state, rng, loss, aux)` with the decoder's layers run per layer (module docstring).

    merge / loss / apply: the trainer's `make_merge`, `make_loss` and `apply_gradients` (with its tx bound).
    `frozen` / `ref_frozen`: the policy's and the reference's frozen layer weights (FrozenLayers.layers); the
    stacked `rest` / `ref_rest` given to the step hold stand-ins there. `stack_graphdef(s)`: the stacked layer
    module's graphdef in train and eval mode (the reference runs in eval mode: no dropout)."""

    def __init__(self, *, merge: Callable, loss: Callable, apply: Callable, masked_streams: Sequence[str],
                 prefix: Path, n_layers: int, stack_graphdefs: tuple[Any, Any], frozen: list[nnx.State],
                 ref_frozen: list[nnx.State]):
        self.merge, self.loss, self.apply = merge, loss, apply
        self.masked_streams = set(masked_streams)
        self.prefix, self.n = prefix, n_layers
        self.graphdef_train, self.graphdef_eval = stack_graphdefs
        self.frozen, self.ref_frozen = frozen, ref_frozen
        self.programs = LayerPrograms()
        self.policy: list[nnx.State] | None = None  # this step's trainable layer params, per layer
        self.reference: list[nnx.State] | None = None  # the reference's (zero LoRA), per layer; fixed
        self._calls: dict[tuple, tuple] = {}  # batches' shapes -> the decoder calls of the loss
        self._sig: tuple = ()
        self._collect = jax.jit(self._collect_fn)
        self._replay = jax.jit(self._replay_fn)
        self._update = jax.jit(self._update_fn, donate_argnums=(0, 1))
        self._slices = jax.jit(self._slices_fn)
        self._reference_slices = jax.jit(self._reference_fn)

    # -- the programs around the layers ------------------------------------------------------------------------
    def _split(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(the decoder layers' trainable params, everything else that trains)."""
        return nnx.split_state(params, _under(self.prefix), ...)

    def _slices_fn(self, layer_params: nnx.State) -> list[nnx.State]:
        return [jax.tree.map(lambda a, i=i: a[i], layer_params) for i in range(self.n)]

    def _reference_fn(self, params, ref_other):
        lora, _ = nnx.split_state(params, nnx.LoRAParam, ...)
        ref_params = nnx.merge_state(jax.tree.map(jnp.zeros_like, lora), ref_other)
        return self._slices_fn(self._split(ref_params)[0])

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

    def _collect_fn(self, params, rng, rest, ref_other, ref_rest, batches):
        return self._traced(params, rng, rest, ref_other, ref_rest, batches)[3].inputs

    def _replay_fn(self, outer, layer_params, rng, rest, ref_other, ref_rest, batches, outputs):
        def f(outer, outputs):
            value, aux, new_rng, _ = self._traced(nnx.merge_state(layer_params, outer), rng, rest, ref_other,
                                                  ref_rest, batches, outputs)
            return value, (aux, new_rng)

        (value, (aux, new_rng)), (g_outer, d_out) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            outer, outputs)
        policy = [k for k, c in enumerate(self._calls[self._sig]) if c.role == POLICY]
        return value, aux, new_rng, g_outer, [d_out[k] for k in policy]

    def _update_fn(self, params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches, g_outer,
                   layer_grads, dh0s):
        layer_params, outer = self._split(params)
        if jax.tree.leaves(outer) and dh0s:  # what runs before the decoder: the vjp of the collect trace

            def h0s(outer):
                tape = self._traced(nnx.merge_state(layer_params, outer), rng, rest, ref_other, ref_rest, batches)[3]
                return [inp[0] for c, inp in zip(tape.calls, tape.inputs, strict=True) if c.role == POLICY]

            _, vjp = jax.vjp(h0s, outer)
            g_outer = jax.tree.map(jnp.add, g_outer, vjp(dh0s)[0])
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), layer_params)
        per_layer = []
        for i in range(self.n):
            got = [g[i] for g in layer_grads if g[i] is not None]
            per_layer.append(jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *got) if got else zeros)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
        grads = nnx.merge_state(stacked, g_outer)
        masked = any(n in self.masked_streams for n in batches)
        params, opt_state, norm = self.apply(params, opt_state, grads, grad_mask, masked)
        return params, opt_state, norm, self._slices_fn(self._split(params)[0])

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
        p = self.programs
        outputs, layer_grads, dh0s = [], [], []
        for call, (h, positions, mask, keys) in zip(calls, collect.out_info, strict=True):
            layer_call, key = LayerCall(call.impl, call.causal), None if keys is None else keys[0]
            n = self.n if call.limit is None else call.limit
            program = (call.role, layer_call, call.remat, _avals((h, positions, mask, key)))
            if call.role == POLICY:
                args = (layer_call, self.graphdef_train, call.remat, self.prefix, self.policy[0], self.frozen[0], h,
                        positions, mask, key)
                if program not in seen:
                    forward = p.forward.lower(*args)  # traced before the backward: it records where residuals go
                    lowered += [forward, p.backward.lower(*args, forward.out_info[1], h)]
                layer_grads.append([self.policy[0]] * n + [None] * (self.n - n))
                dh0s.append(h)
            elif program not in seen:
                lowered.append(p.plain.lower(layer_call, self.graphdef_eval, self.prefix, self.reference[0],
                                             self.ref_frozen[0], h, positions, mask, key))
            seen.add(program)
            outputs.append(h)
        lowered.append(self._replay.lower(outer, layer_params, rng, rest, ref_other, ref_rest, batches, outputs))
        lowered.append(self._update.lower(params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches,
                                          outer, layer_grads, dh0s))
        with ThreadPoolExecutor(len(lowered), thread_name_prefix="compile") as pool:
            list(pool.map(lambda program: program.compile(), lowered))

    # -- the step ------------------------------------------------------------------------------------------------
    def __call__(self, params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches):
        self._sig = jax.tree.structure(batches), _avals(batches)
        layer_params, outer = self._split(params)
        if self.policy is None:
            self.policy = self._slices(layer_params)
        if self._sig not in self._calls:
            self._compile_ahead(params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches)
        inputs = self._collect(params, rng, rest, ref_other, ref_rest, batches)
        calls = self._calls[self._sig]
        if self.reference is None and any(c.role == REFERENCE for c in calls):
            self.reference = self._reference_slices(params, ref_other)
        p = self.programs
        outputs, saved = [], []
        for call, (h, positions, mask, keys) in zip(calls, inputs, strict=True):
            layer_call = LayerCall(call.impl, call.causal)
            n = self.n if call.limit is None else call.limit
            residuals = []
            for i in range(n):
                key = None if keys is None else keys[i]
                if call.role == POLICY:
                    given = h
                    h, res = p.forward(layer_call, self.graphdef_train, call.remat, self.prefix, self.policy[i],
                                       self.frozen[i], h, positions, mask, key)
                    residuals.append((given, key, res))
                else:
                    h = p.plain(layer_call, self.graphdef_eval, self.prefix, self.reference[i], self.ref_frozen[i],
                                h, positions, mask, key)
            outputs.append(h)
            saved.append(residuals)
        value, aux, new_rng, g_outer, d_out = self._replay(outer, layer_params, rng, rest, ref_other, ref_rest,
                                                            batches, outputs)
        del outputs
        layer_grads, dh0s = [], []
        policy_calls = [(c, inp, res) for c, inp, res in zip(calls, inputs, saved, strict=True) if c.role == POLICY]
        for (call, (_, positions, mask, _), residuals), dh in zip(policy_calls, d_out, strict=True):
            layer_call = LayerCall(call.impl, call.causal)
            grads: list = [None] * self.n
            for i in reversed(range(len(residuals))):
                h, key, res = residuals[i]
                grads[i], dh = p.backward(layer_call, self.graphdef_train, call.remat, self.prefix, self.policy[i],
                                          self.frozen[i], h, positions, mask, key, res, dh)
                residuals[i] = None
            layer_grads.append(grads)
            dh0s.append(dh)
        params, opt_state, norm, self.policy = self._update(params, opt_state, rng, rest, ref_other, ref_rest,
                                                            grad_mask, batches, g_outer, layer_grads, dh0s)
        return params, opt_state, new_rng, value, {**aux, "grad_norm": norm}
