"""`layers.attend` with the key mask given as counts of valid keys (ValidKeys, the valid keys first) computes
what the explicit boolean key mask computes, for even and odd lengths and for grouped heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmu_jax.models.layers import ValidKeys, attend


@pytest.mark.parametrize(("s", "kv_heads"), [(10, 4), (9, 2)])
def test_valid_key_counts_equal_the_key_mask(s, kv_heads):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    b, t, n, h = 3, 7, 4, 8
    q = jax.random.normal(kq, (b, t, n, h))
    k = jax.random.normal(kk, (b, s, kv_heads, h))
    v = jax.random.normal(kv, (b, s, kv_heads, h))
    lengths = jnp.array([s, 3, 1], jnp.int32)
    mask = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    want = attend(q, k, v, mask, impl="xla")
    got = attend(q, k, v, ValidKeys(lengths), impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # a row with one valid key returns that key's value in every head of its group
    np.testing.assert_allclose(np.asarray(got[2, :, 0]), np.broadcast_to(np.asarray(v[2, 0, 0]), (t, h)), rtol=1e-6)
