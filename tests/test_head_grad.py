"""The output head's backward: autodiff's gradients for a float32 model, gemms in the model's dtype for bf16."""

import jax
import jax.numpy as jnp
import numpy as np

from vlmu_jax.eval.scoring import WHOLE_HEAD_BYTES, eval_head_chunk, head_logprobs


def _inputs(dtype):
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (2, 9, 16), dtype)
    w = (0.5 * jax.random.normal(k[1], (40, 16))).astype(dtype)
    t = jax.random.randint(k[2], (2, 9), 0, 40)
    return h, w, t


def _direct(h, w, t):
    """Sum of log p(targets) from unchunked float32 logits, differentiated by plain autodiff."""
    logp = jax.nn.log_softmax(h.astype(jnp.float32) @ w.astype(jnp.float32).T, -1)
    return jnp.sum(jnp.take_along_axis(logp, t[..., None], -1))


def test_float32_gradients_are_autodiffs() -> None:
    h, w, t = _inputs(jnp.float32)
    got = jax.grad(lambda h, w: head_logprobs(h, w, t, chunk_size=4).sum(), argnums=(0, 1))(h, w)
    want = jax.grad(_direct, argnums=(0, 1))(h, w, t)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_bf16_backward_never_holds_a_float32_head() -> None:
    h, w, t = _inputs(jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda h: head_logprobs(h, w, t, chunk_size=4).sum()))
    # Autodiff's backward would convert the [40, 16] head to float32 for a gemm against the float32 cotangent.
    assert "tensor<40x16xf32>" not in grad.lower(h).as_text()
    got = np.asarray(grad(h), np.float32)
    want = np.asarray(jax.grad(_direct)(h, w, t), np.float32)
    # The cotangent is rounded to bf16 (8 bits of mantissa) before the gemm, as in PyTorch's bf16 backward.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())


def test_eval_head_chunk_is_every_position_while_its_logits_fit() -> None:
    """Whole-row scoring runs the head over all positions at once where the float32 logits fit WHOLE_HEAD_BYTES
    (LLaVA-1.5-7B's 4 x 703 positions: 361 MB), else over 128-position chunks (64 rows: 5.8 GB); the values are
    the chunked ones."""
    assert eval_head_chunk(4, 703, 32064) == 703
    assert 64 * 703 * 32064 * 4 > WHOLE_HEAD_BYTES and eval_head_chunk(64, 703, 32064) == 128
    h, w, t = _inputs(jnp.float32)
    whole = head_logprobs(h, w, t, with_stats=True, chunk_size=eval_head_chunk(*t.shape, w.shape[0]))
    chunked = head_logprobs(h, w, t, with_stats=True, chunk_size=4)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
