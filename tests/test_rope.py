"""Rotary embedding (`layers.rotate`) against the rotate_half formula written out per channel.

HF's layout: with F frequencies the first 2F channels rotate as pairs (j, j + F) by angle freqs[j]:
out[j] = x[j] cos - x[j + F] sin, out[j + F] = x[j + F] cos + x[j] sin; channels from 2F on pass through.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmu_jax.models.layers import rotate


def by_hand(x: np.ndarray, freqs: np.ndarray, scaling: float) -> np.ndarray:
    """The formula above, one channel pair at a time, in float64."""
    f = freqs.shape[-1]
    out = x.astype(np.float64).copy()
    for j in range(f):
        cos = np.cos(freqs[..., j])[:, :, None] * scaling
        sin = np.sin(freqs[..., j])[:, :, None] * scaling
        a, b = x[..., j].astype(np.float64), x[..., j + f].astype(np.float64)
        out[..., j], out[..., j + f] = a * cos - b * sin, b * cos + a * sin
    return out


@pytest.mark.parametrize("freqs_n,head", [(4, 8), (3, 8), (2, 10)])  # full rotation, then partial rotary
def test_rotate_matches_the_formula(freqs_n: int, head: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, head)).astype(np.float32)
    freqs = rng.uniform(0, 9, size=(2, 5, freqs_n)).astype(np.float32)
    got = np.asarray(rotate(jnp.asarray(x), jnp.asarray(freqs), 0.7))
    np.testing.assert_allclose(got, by_hand(x, freqs, 0.7), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., 2 * freqs_n :], x[..., 2 * freqs_n :])


def test_rotate_gradient_is_the_inverse_rotation() -> None:
    """A rotation's transpose is the rotation by minus the angle: d<g, rotate(x)>/dx = rotate(g, -freqs)."""
    rng = np.random.default_rng(1)
    x, g = (jnp.asarray(rng.normal(size=(2, 5, 3, 8)), jnp.float32) for _ in range(2))
    freqs = jnp.asarray(rng.uniform(0, 9, size=(2, 5, 4)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(g * rotate(x, freqs)))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(rotate(g, -freqs)), rtol=1e-5, atol=1e-5)
