"""LoRA dropout's keep mask (layers.dropout_keep): four 16-bit lanes per Threefry block, each element kept with
probability 1 - rate independently, the same mask however the array is sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vlmu_jax.models.layers import dropout_keep
from vlmu_jax.models.sharding import make_mesh


def test_keep_rate_and_independence():
    shape = (4, 733, 1027)  # last axis not a multiple of four lanes
    keep = np.asarray(dropout_keep(jax.random.key(7), shape, 0.05))
    assert keep.shape == shape and keep.dtype == bool
    n = keep.size
    drop = 1 - keep.mean()
    realised = 3277 / 65536  # round(0.05 * 65536) / 65536
    assert abs(drop - realised) < 5 * np.sqrt(realised * (1 - realised) / n)
    # Neighbours share a Threefry block (lanes 0-3 of one count) or not: both dropped as often as independence says.
    both = (~keep[..., :-1] & ~keep[..., 1:]).mean()
    assert abs(both - realised**2) < 5 * np.sqrt(realised**2 / keep[..., 1:].size)
    # Rows are hashed from different counts: no two rows alike.
    rows = keep.reshape(-1, shape[-1])
    assert len({r.tobytes() for r in rows}) == len(rows)
    # Same key, same mask; another key (what fold_in gives each projection), another mask.
    np.testing.assert_array_equal(np.asarray(dropout_keep(jax.random.key(7), shape, 0.05)), keep)
    other = np.asarray(dropout_keep(jax.random.fold_in(jax.random.key(7), 1), shape, 0.05))
    assert 0.08 < (other != keep).mean() < 0.11  # 2 p (1 - p) for independent masks
    assert np.asarray(dropout_keep(jax.random.key(0), (8, 9), 0.0)).all()
    half = np.asarray(dropout_keep(jax.random.key(0), (512, 512), 0.5)).mean()
    assert abs(half - 0.5) < 5 * 0.5 / 512


def test_mask_does_not_depend_on_sharding():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    key, shape = jax.random.key(11), (8, 64, 96)
    want = np.asarray(dropout_keep(key, shape, 0.1))
    x = jax.device_put(jnp.ones(shape), NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor")))
    got = jax.jit(lambda x: jnp.where(dropout_keep(key, x.shape, 0.1), x, 0))(x)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got) == 1, want)
