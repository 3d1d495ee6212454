"""`layers.attend` with the key mask given as counts of valid keys (SeqLengths, the valid keys first) computes
what the explicit boolean key mask computes, for even and odd lengths and for grouped heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmu_jax.models.layers import SeqLengths, attend


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
    got = attend(q, k, v, SeqLengths(lengths), impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # a row with one valid key returns that key's value in every head of its group
    np.testing.assert_allclose(np.asarray(got[2, :, 0]), np.broadcast_to(np.asarray(v[2, 0, 0]), (t, h)), rtol=1e-6)


def test_valid_first_equals_the_both_padding_mask():
    """Mllama's vision attention (a pair masked only when both tokens are padding), tokens ordered valid first:
    the two length-masked calls give the boolean mask's result on every row, including a row with no padding."""
    from vlmu_jax.models.mllama_vision import ValidCount, vision_attention

    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    b, s, n_heads, h = 3, 12, 2, 8
    q, k, v = (jax.random.normal(key, (b, s, n_heads, h)) for key in (kq, kk, kv))
    n = jnp.array([12, 7, 1], jnp.int32)
    valid = jnp.arange(s)[None, :] < n[:, None]
    mask = (valid[:, :, None] | valid[:, None, :])[:, None]
    want = vision_attention(q, k, v, mask, "xla")
    got = vision_attention(q, k, v, ValidCount(n), "xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda q: vision_attention(q, k, v, ValidCount(n), "xla").sum())(q)
    assert np.isfinite(np.asarray(grad)).all()
