"""The chunked full-vocabulary KL equals a direct softmax computation, including a ragged last chunk."""

import jax
import jax.numpy as jnp
import numpy as np

from vlmu_jax.eval.scoring import head_kl


def test_head_kl_matches_direct_computation() -> None:
    k = jax.random.split(jax.random.key(0), 4)
    h, r = jax.random.normal(k[0], (2, 7, 16)), jax.random.normal(k[1], (2, 7, 16))
    w, wr = jax.random.normal(k[2], (50, 16)), jax.random.normal(k[3], (50, 16))
    logp = jax.nn.log_softmax(h @ w.T, -1)
    logq = jax.nn.log_softmax(r @ wr.T, -1)
    direct = np.sum(np.exp(logq) * (logq - logp), -1)
    got = head_kl(h, r, w, wr, chunk_size=3)
    np.testing.assert_allclose(np.asarray(got), direct, rtol=1e-5, atol=1e-6)
    assert float(jnp.min(got)) >= 0.0
    np.testing.assert_allclose(np.asarray(head_kl(h, h, w, w, chunk_size=4)), 0.0, atol=1e-6)
