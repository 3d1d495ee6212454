"""Jitted evaluation calls on a model that does not change while it is evaluated.

Why: `nnx.jit` walks the model's object graph in Python on every call to split it into arrays and back. On this
project's 2-core CPU that cost 7.5 ms per call for a 39-array LLaVA and 37 ms once per-layer weight copies were
attached (327 arrays), against 0.45 ms for `jax.jit` on the same arrays; on an H200 host the copies made a
7B log-prob call 19 ms slower although they remove device work. While a model is `frozen`, the functions
built with `model_jit` take its graph as split once on entry and call `jax.jit` on the arrays; elsewhere
(a model being trained) they are plain `nnx.jit`.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from vlmu_jax.launches import one_at_a_time

_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its graph split on entry
_AHEAD: weakref.WeakSet = weakref.WeakSet()  # frozen models whose programs `batched.compile_ahead` compiles
_MODE = threading.local()  # .compiled: a _CompileOnly while this thread's model_jit calls compile, not run


class _Structure:
    """A frozen model's graph and tree structure, passed to jax.jit as one static argument that hashes and
    compares by identity. Why: nnx's GraphDef hashes and compares by walking every node, on every call of a jitted
    function that takes it as a static argument: 2.2 ms per call on this project's CPU for a LLaVA of 7B's 32
    layers with per-layer copies attached; on an H200 the device sat idle 17 ms between two 7B log-prob calls,
    and with the structure interned each call ran 4.4 ms faster (bench/NOTES.md). Equal structures share one
    object (`_structure`), so the models an eval stage evaluates one after another still share their compiled
    programs."""

    __slots__ = ("graphdef", "treedef")

    def __init__(self, graphdef: nnx.GraphDef, treedef: Any):
        self.graphdef, self.treedef = graphdef, treedef


_STRUCTURES: dict[tuple[nnx.GraphDef, Any], _Structure] = {}


def _structure(graphdef: nnx.GraphDef, treedef: Any) -> _Structure:
    """The one `_Structure` of every frozen model with this graph and tree (hashed once, on entry)."""
    return _STRUCTURES.setdefault((graphdef, treedef), _Structure(graphdef, treedef))


@contextmanager
def frozen(model: nnx.Module, *, compile_ahead: bool = True) -> Iterator[None]:
    """Within the block, `model_jit` functions use the model's graph as it is on entry. The model must not
    change inside (no training, LoRA merge, `set_options` or layer copies attached): calls would not see it.
    compile_ahead: whether `eval/batched.compile_ahead` compiles this model's programs ahead (config
    eval.compile_ahead)."""
    if model in _FROZEN:
        yield
        return
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    _FROZEN[model] = (_structure(graphdef, treedef), leaves)  # a flat list: jax.jit flattens it in C++
    if compile_ahead:
        _AHEAD.add(model)
    try:
        yield
    finally:
        del _FROZEN[model]
        _AHEAD.discard(model)


def is_frozen(model: nnx.Module) -> bool:
    """Whether the model is inside a `frozen` block: then `model_jit` calls on it may run from several threads at
    once (`nnx.jit`'s graph walk on the live model is not safe to run concurrently)."""
    return model in _FROZEN


def stands_in(model: nnx.Module) -> bool:
    """Whether the model is frozen with shapes (jax.ShapeDtypeStruct) for params: a stand-in whose programs compile
    before its weights exist (`stages._compile_on_stand_in`); nothing can run on it."""
    split = _FROZEN.get(model)
    return split is not None and any(isinstance(x, jax.ShapeDtypeStruct) for x in split[1])


def compiles_ahead(model: nnx.Module) -> bool:
    """Whether the model is frozen with `compile_ahead` on."""
    return model in _FROZEN and model in _AHEAD


# Compiles under way in `compile_only` blocks, by what they compile for (`_program_key`: the function and its
# arguments' structure, shapes, dtypes and placements) -> a Future of (the outputs' shapes, the compile's Future).
# Why: the eval's first model compiles its programs on a stand-in while it loads (stages._compile_on_stand_in), and
# the model's own compile-ahead then asks for the same programs: it waits for those compiles instead of repeating
# them. An entry leaves when its compile ends; later calls find the program in jit's caches.
_UNDER_WAY: dict[tuple, Future] = {}
_UNDER_WAY_LOCK = threading.Lock()


def _program_key(fast: Callable, structure: _Structure, args: tuple) -> tuple | None:
    """What a `model_jit` program is compiled for, as a dict key (None where an argument cannot be one)."""
    leaves, treedef = jax.tree.flatten(args)
    key = (fast, structure, treedef, tuple(
        (x.shape, x.dtype, getattr(x, "sharding", None), getattr(x, "weak_type", False))
        if hasattr(x, "shape") and hasattr(x, "dtype") else x for x in leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _CompileOnly:
    """One thread's compile-only calls. Each call returns its outputs as abstract values, so that a program whose
    inputs are another's outputs (generation's loop over the prompt pass's cache) is compiled in the same pass; on
    one device the compiles themselves run in a small pool, side by side, since the outputs' placement is known
    before compiling (on a mesh it is XLA's choice: that compile runs first). A program another thread is
    compiling already is waited for, not compiled again (`_UNDER_WAY`)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="compile-only")
        self.programs: list[Future] = []

    def compile(self, fast: Any, split: tuple[_Structure, list], args: tuple, kwargs: dict) -> Any:
        key = _program_key(fast, split[0], (split[1], args, kwargs))
        with _UNDER_WAY_LOCK:
            under_way = None if key is None else _UNDER_WAY.get(key)
            if under_way is None and key is not None:
                claim = _UNDER_WAY[key] = Future()
        if under_way is not None:
            out, compiling = under_way.result()
            self.programs.append(compiling)
            return out
        try:
            out, compiling = self._start(fast.lower(*split, *args, **kwargs), split[1][0].sharding)
        except BaseException as err:
            if key is not None:
                _settle(key, claim, exception=err)
            raise
        self.programs.append(compiling)
        if key is not None:
            compiling.add_done_callback(lambda _: _settle(key))
            claim.set_result((out, compiling))
        return out

    def _start(self, lowered: jax.stages.Lowered, like: jax.sharding.Sharding) -> tuple[Any, Future]:
        """(The outputs' shapes, the compile's Future) of a lowered program."""
        if len(like.device_set) != 1:
            done: Future = Future()
            done.set_result(compiled := lowered.compile())
            return compiled.out_info, done
        # On one device every placement is the same; jit keys its programs by a mesh's, where P() stands for all.
        placed = NamedSharding(like.mesh, PartitionSpec()) if isinstance(like, NamedSharding) else \
            SingleDeviceSharding(next(iter(like.device_set)))
        out = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), lowered.out_info)
        return out, self.pool.submit(lowered.compile)


def _settle(key: tuple, claim: Future | None = None, exception: BaseException | None = None) -> None:
    """The compile for `key` is over (or failed before it began: `claim` gets the error)."""
    with _UNDER_WAY_LOCK:
        _UNDER_WAY.pop(key, None)
    if claim is not None:
        claim.set_exception(exception)


@contextmanager
def compile_only() -> Iterator[list[jax.stages.Compiled]]:
    """In this thread, `model_jit` functions called on a frozen model compile their program for the call's
    arguments (into jit's caches and the persistent compilation cache, where a later call finds it) and return
    their outputs' shapes (jax.ShapeDtypeStruct) instead of running it: `eval/batched.compile_ahead` compiles
    several shapes at once this way. Yields the list the compiled programs are added to when the block ends,
    whose `memory_analysis()` gives a call's own device peak (bench/bench_jax_llava.py)."""
    programs: list[jax.stages.Compiled] = []
    _MODE.compiled = _CompileOnly()
    try:
        yield programs
        programs.extend(p.result() for p in _MODE.compiled.programs)
    finally:
        _MODE.compiled.pool.shutdown(wait=True)
        _MODE.compiled = None


def compiling() -> bool:
    """Whether this thread is inside `compile_only`."""
    return getattr(_MODE, "compiled", None) is not None


@contextmanager
def shapes_only() -> Iterator[None]:
    """In this thread, `model_jit` functions called on a frozen model return their outputs' shapes
    (jax.ShapeDtypeStruct) from a trace alone: nothing compiles, nothing runs. For sizes a pass needs before its
    programs exist (the bytes of one image's features, `batched._eval_source`'s image cap). Why: asking the
    features of a blank image for that size ran the features program, compiling it first, in the main thread
    before compile-ahead began: 3-5 s of Llama-3.2-11B-Vision's cold eval (bench/RESULTS.md session 36)."""
    before, _MODE.shapes = getattr(_MODE, "shapes", False), True
    try:
        yield
    finally:
        _MODE.shapes = before


def abstract_calls() -> bool:
    """Whether this thread's `model_jit` calls return shapes instead of running (`compile_only`, `shapes_only`):
    what they return is no program's output and must not be kept."""
    return compiling() or getattr(_MODE, "shapes", False)


# XLA options of the eval's wide programs (the image features, the prompt pass, scoring): their gemms from cuBLAS
# alone, none generated by Triton. Why: XLA autotunes Triton's gemm configurations beside cuBLAS's algorithms while
# it compiles, and the cold eval waits for that. Llama-3.2-11B-Vision's features program compiled in 2.2 s against
# 6.3 s and ran in 0.0683 s against 0.0710 s (H200, bench/RESULTS.md session 36); at 7B-11B log-prob shapes cuBLAS
# ran 0.6-2.5 % faster (session 4). Not for generation's decode loop, whose small-row gemms Triton runs faster
# (Mllama's generation was 11 % slower on cuBLAS).
CUBLAS_GEMMS = {"xla_gpu_enable_triton_gemm": False}


def model_jit(fn: Callable[..., Any], *, static_argnames: tuple[str, ...] = (),
              donate_argnames: tuple[str, ...] = (), compiler_options: dict[str, Any] | None = None
              ) -> Callable[..., Any]:
    """`nnx.jit(fn)` for `fn(model, *args, **kwargs)` that reads the model and does not update it; on a frozen
    model the call skips the per-call graph walk. `donate_argnames`: arguments, passed by keyword, whose buffers
    the call may reuse. `compiler_options`: XLA options of the frozen model's program (e.g. CUBLAS_GEMMS)."""
    slow = nnx.jit(fn, static_argnames=static_argnames, donate_argnames=donate_argnames)

    def merged(structure: _Structure, leaves: list[jax.Array], *args: Any, **kwargs: Any) -> Any:
        return fn(nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, leaves)), *args, **kwargs)

    # jit names its program, compile logs and traces after the function: fn's name, not "merged" for every program
    merged.__name__ = merged.__qualname__ = fn.__name__

    # launched from the eval's main and batch threads (each image's features): one at a time (vlmu_jax/launches.py)
    fast = one_at_a_time(jax.jit(merged, static_argnums=0, static_argnames=static_argnames,
                                 donate_argnames=donate_argnames, compiler_options=compiler_options))

    @functools.wraps(fn)
    def call(model: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        split = _FROZEN.get(model)
        if split is None:
            return slow(model, *args, **kwargs)
        if compiling():
            return _MODE.compiled.compile(fast, split, args, kwargs)
        if abstract_calls():
            return fast.eval_shape(*split, *args, **kwargs)
        return fast(*split, *args, **kwargs)

    return call
