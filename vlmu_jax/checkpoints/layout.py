"""Flax layout <-> HF layout of a param on its devices: a cast and a swap of the last two axes.

Why on the devices: numpy transposes and casts on the host one thread at a time over strided memory. Exporting
0.75e9 params spent 4.4 of 9.0 s transposing on the host (CPU, 2 cores), loading them 0.4 of 1.7 s in `astype`
of transposed views, and a float16 checkpoint loaded as bfloat16 converts every element through ml_dtypes. The
accelerator does both at memory speed, one param at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Executor, Future
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from vlmu_jax.launches import one_at_a_time


def _relayout(x: jax.Array, transpose: bool, dtype, sharding: Sharding | None) -> jax.Array:
    x = x if dtype is None else x.astype(dtype)
    x = jnp.swapaxes(x, -1, -2) if transpose else x
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


# `x` cast to `dtype` (if given) with its last two axes swapped (if `transpose`), placed by `sharding` (if given;
# else where XLA puts it). A freshly read input is freed as soon as its caller drops it. Launched from the threads
# that load a model ahead or write one out beside the running stage: one at a time (vlmu_jax/launches.py).
relayout = one_at_a_time(jax.jit(_relayout, static_argnames=("transpose", "dtype", "sharding")))


def block_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A shard's index as (start, stop) per axis: the same block on two devices gets the same key."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _converts(dtype, transpose: bool, to_dtype) -> bool:
    """Whether a relayout from `dtype` to `to_dtype` (None: kept) with `transpose` changes anything."""
    return transpose or (to_dtype is not None and jnp.dtype(dtype) != jnp.dtype(to_dtype))


def to_stored(x: jax.Array, transpose: bool, dtype) -> jax.Array:
    """A param of the model as an HF folder stores it (cast to `dtype` if given, last two axes swapped if
    `transpose`), converted on its devices; `x` itself when that changes nothing."""
    if not _converts(x.dtype, transpose, dtype):
        return x
    return relayout(x, transpose=transpose, dtype=dtype, sharding=None)


def to_model(stored: jax.Array, transpose: bool, dtype, sharding: Sharding) -> jax.Array:
    """A param as an HF folder stores it (placed by `swapped(sharding)` when `transpose`) in the model's dtype,
    layout and placement, converted on its devices."""
    if not _converts(stored.dtype, transpose, dtype):
        return stored
    return relayout(stored, transpose=transpose, dtype=jnp.dtype(dtype), sharding=sharding)


class ToModel(NamedTuple):
    """One `to_model` program: the stored param's shape and dtype, the model's dtype and placement, and whether
    HF stores it transposed."""

    shape: tuple[int, ...]
    stored_dtype: jnp.dtype
    transpose: bool
    dtype: jnp.dtype
    sharding: Sharding

    @property
    def stored_sharding(self) -> Sharding:
        """Where the stored param is placed before `to_model`: the model's placement, its last two axes swapped
        where HF stores it transposed."""
        return swapped(self.sharding, len(self.shape)) if self.transpose else self.sharding

    def needed(self) -> bool:
        """Whether `to_model` runs a program for it (else it returns the stored array)."""
        return _converts(self.stored_dtype, self.transpose, self.dtype)

    def compile(self) -> None:
        """Compiles the program into jit's cache, where `to_model`'s call finds it, without the launch lock."""
        stored = jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.stored_dtype), sharding=self.stored_sharding)
        relayout.lower(stored, transpose=self.transpose, dtype=jnp.dtype(self.dtype), sharding=self.sharding).compile()


def compile_to_model(programs: Iterable[ToModel], pool: Executor) -> dict[ToModel, Future]:
    """Each needed `to_model` program compiled in `pool`'s threads; a load waits for a param's future before its
    `to_model` call. Why: that call runs under the launch lock (vlmu_jax/launches.py), so a cold process compiled
    each program there, one after another, while no other thread could launch: 16 programs took 0.8 s of a tiny
    Mllama's 1.1 s first load on this project's CPU, and its second load, which compiles nothing, 0.1 s."""
    return {p: pool.submit(p.compile) for p in dict.fromkeys(programs) if p.needed()}


def swapped(sharding: Sharding, ndim: int) -> Sharding:
    """The placement of an array whose last two axes are swapped relative to one placed by `sharding`."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-2], spec[-1], spec[-2]))
