"""Per-layer copies of a decoder's stacked weights, in place of the stack while a model is evaluated.

Why: the decoders keep their layers stacked ([L, ...] params run by one lax.scan), which training wants. But
inside that scan XLA:GPU copies each layer's weights out of the stack before every use: at LLaVA-1.5-7B shape
19 of the 87 ms of a teacher-forced forward and, while generating, 13.5 GB per token (bench/NOTES.md).
Evaluation runs many forwards of one fixed model, so it pays that copy once: the layers are copied out once per
model and every forward (scores, MIA, generation) runs unrolled over the copies.

The copies replace the stacked weights rather than sit beside them: each stacked param is copied out and then
dropped from the model (a zero-size stand-in keeps the model's structure), and on exit the stack is rebuilt from
the copies the same way, one param at a time. In the copies each attention's q/k/v kernels and each gated MLP's
gate and up kernels are held joined (`layers.fuse_projections`: else XLA concatenates them on every call), and split
again on exit. So evaluating costs the device no more memory than the stacked model does, plus one param in
flight: held beside the stack, the copies took 30.3 GB for an 8B Idefics2 whose PyTorch twin evaluates in 17.4 GB
(bench/RESULTS.md, session 4). Taken on GPU only: CPU and TPU scans do not copy the weights the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from vlmu_jax.launches import launching
from vlmu_jax.models.layers import GatedMLP, fuse_projections, split_projections
from vlmu_jax.models.llama import DecoderLM, LlamaAttention
from vlmu_jax.models.mllama import MllamaTextModel


def decoder_of(model: nnx.Module) -> DecoderLM | MllamaTextModel | None:
    """The model's decoder of stacked layers (None for a model without one)."""
    get = getattr(model, "decoder_lm", None)
    return None if get is None else get()


def room_for(module: nnx.Module, copies: float) -> bool:
    """Whether the first local device's free memory holds `copies` times its share of the module's arrays (no
    on a device that reports no memory statistics, e.g. the CPU)."""
    need = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(nnx.state(module)))
    stats = jax.local_devices()[0].memory_stats() or {}
    return need * copies < stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)


def room_for_copy(lm: DecoderLM) -> bool:
    """On GPU, whether the first local device's free memory holds its share of one more copy of the stacked
    decoder weights with a tenth to spare (CPU and TPU: no, their scans do not copy the same way). For
    generation's per-call slices (eval/generate.py), which do sit beside the stack."""
    return jax.default_backend() == "gpu" and room_for(lm.layers, 1.1)


@partial(jax.jit, static_argnums=1)
def unstack(x: jax.Array, n: int) -> list[jax.Array]:
    """Slices 0..n-1 of a stacked param. One program per param shape, reused by every model the eval stage
    evaluates; each slice keeps the stack's placement of its remaining axes (the layer axis is never sharded)."""
    return [x[i] for i in range(n)]


@partial(jax.jit, static_argnames="sharding")
def restack(xs: list[jax.Array], sharding: Sharding) -> jax.Array:
    """The stacked param rebuilt from its per-layer copies, placed as it was."""
    return jax.lax.with_sharding_constraint(jnp.stack(xs), sharding)


@jax.jit
def join(kernels: list[jax.Array]) -> jax.Array:
    """Kernels side by side along the output axis: a joined kernel of `layers.fuse_projections`."""
    return jnp.concatenate(kernels, axis=-1)


def _placed(fn, *args):
    """`fn(*args)` for a jitted `fn`; where the args are shapes (a stand-in model's, `stages._compile_on_stand_in`),
    the shapes and placements its program gives its outputs, compiling that program for the call on real arrays
    to find later."""
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(args)):
        return fn(*args)
    out = fn.lower(*args).compile().out_info
    return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), out)


def stand_in(x: jax.Array) -> jax.Array:
    """A zero-size array of `x`'s dtype on `x`'s devices: what a stacked param holds while its copies replace it.
    Copied under the launch lock: a stand-in model's copies are made beside the first model's load and passes."""
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec())
    with launching():
        return jax.device_put(np.zeros((0,), x.dtype), sharding)


def variables_of(module: nnx.Module) -> dict[tuple, nnx.Variable]:
    """The module's own variables by path (setting their values changes the module)."""
    return {path: node for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Variable)}


def _joinable(copies: Iterable[nnx.Module]) -> Iterator[LlamaAttention | GatedMLP]:
    """The modules of the layer copies whose projections are joined while the copies are held."""
    for copy in copies:
        yield from (node for _, node in nnx.iter_graph(copy) if isinstance(node, LlamaAttention | GatedMLP))


def swap_in_copies(stack: nnx.Module, n: int) -> tuple[list[nnx.Module], dict[tuple, Sharding]]:
    """The `n` layers of a stacked layer module as separate modules over per-layer copies of its weights, each
    stacked param dropped from the model once copied; and the placement of every param dropped (for
    `swap_back`). On a model of shapes (jax.ShapeDtypeStruct params) the copies are shapes too, placed as the
    copies of real params would be."""
    slices, dropped = {}, {}
    shapes = {(x.shape, x.dtype, x.sharding): x for x in (v.get_value() for v in variables_of(stack).values())
              if isinstance(x, jax.ShapeDtypeStruct)}
    if shapes:  # a stand-in's slicing programs, compiled side by side for `_placed` below to find
        with ThreadPoolExecutor(8, thread_name_prefix="copies-compile") as pool:
            list(pool.map(lambda x: unstack.lower(x, n).compile(), shapes.values()))
    for path, var in variables_of(stack).items():
        value = var.get_value()
        slices[path] = _placed(unstack, value, n)
        if isinstance(var, nnx.Param):
            dropped[path] = value.sharding
            var.set_value(stand_in(value))  # the stacked value is freed once its slices are made
        del value
    graphdef, state = nnx.split(stack)
    flat = nnx.to_flat_state(state)
    copies = [nnx.merge(graphdef, nnx.from_flat_state([(p, jax.tree.map(lambda _, p=p, i=i: slices[p][i], v))
                                                       for p, v in flat]))
              for i in range(n)]
    for module in _joinable(copies):
        fuse_projections(module, stand_in, partial(_placed, join))
    return copies, dropped


def swap_back(stack: nnx.Module, copies: list[nnx.Module], dropped: dict[tuple, Sharding]) -> None:
    """Rebuilds each dropped stacked param from the copies, freeing that param's copies before the next one."""
    for module in _joinable(copies):
        split_projections(module)
    stacked = variables_of(stack)
    per_layer = [variables_of(copy) for copy in copies]
    for path, sharding in dropped.items():
        stacked[path].set_value(restack([layer[path].get_value() for layer in per_layer], sharding))
        blank = stand_in(per_layer[0][path].get_value())
        for layer in per_layer:
            layer[path].set_value(blank)


@contextmanager
def layer_copies(model: nnx.Module, mode: str = "auto", *, restore: bool = True) -> Iterator[bool]:
    """Per-layer weight copies in place of the model's stacked decoder weights for the body of the block (yields
    whether they are attached). mode: auto (on GPU), always, never (config.eval.layer_copies). On exit the stack
    is rebuilt (bit for bit) and the copies detached, so nothing after evaluation (training, export) sees them.
    The model's weights must not change inside the block, and nothing may read the stacked params there: they
    hold zero-size stand-ins.

    restore=False, for a caller that drops the model after the block (the eval stage: each model it evaluates is
    its own, loaded or built from held params): the copies stay attached and the stack is not rebuilt, which
    would cost a copy of every decoder weight for nothing (1.0-2.8 s per eval stage at 7B-11B, bench/RESULTS.md).
    """
    lm = decoder_of(model)
    if lm is None or lm.layer_copies is not None or mode == "never" or (
            mode == "auto" and jax.default_backend() != "gpu"):
        yield False
        return
    swapped = [(stack, *swap_in_copies(stack, n)) for stack, n in lm.layer_stacks()]
    lm.layer_copies = nnx.List([copy for _, copies, _ in swapped for copy in copies])
    try:
        yield True
    finally:
        if restore:
            lm.layer_copies = None
            for stack, copies, dropped in swapped:
                swap_back(stack, copies, dropped)
