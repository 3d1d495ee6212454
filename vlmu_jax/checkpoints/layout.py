"""Flax layout <-> HF layout of a param on its devices: a cast and a swap of the last two axes.

Why on the devices: numpy transposes and casts on the host one thread at a time over strided memory. Exporting
0.75e9 params spent 4.4 of 9.0 s transposing on the host (CPU, 2 cores); loading spent its largest share in
`astype` of transposed views. The accelerator does both at memory speed, one param at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, Sharding


def _relayout(x: jax.Array, transpose: bool, dtype, sharding: Sharding | None) -> jax.Array:
    x = x if dtype is None else x.astype(dtype)
    x = jnp.swapaxes(x, -1, -2) if transpose else x
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


# `x` cast to `dtype` (if given) with its last two axes swapped (if `transpose`), placed by `sharding` (if given).
to_hf = jax.jit(_relayout, static_argnames=("transpose", "dtype", "sharding"))
# The same for a freshly read array nothing else holds: its buffer is given up to the result.
from_hf = jax.jit(_relayout, static_argnames=("transpose", "dtype", "sharding"), donate_argnums=0)


def swapped(sharding: Sharding, ndim: int) -> Sharding:
    """The placement of an array whose last two axes are swapped relative to one placed by `sharding`."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-2], spec[-1], spec[-2]))
