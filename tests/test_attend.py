"""`layers.attend` with the key mask given as counts of valid keys (SeqLengths, the valid keys first) computes
what the explicit boolean key mask computes, for even and odd lengths and for grouped heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmu_jax.models.layers import SeqLengths, attend, attend_blocks, attend_with_lse


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


def test_attend_with_lse_is_attention_and_its_log_sum_exp():
    """Output as `attend` with the keys given as counts; the log-sum-exp that of the scaled scores over the valid
    keys, computed by hand."""
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    b, t, s, n, h = 3, 5, 8, 2, 4
    q = jax.random.normal(kq, (b, t, n, h))
    k = jax.random.normal(kk, (b, s, n, h))
    v = jax.random.normal(kv, (b, s, n, h))
    lengths = jnp.array([8, 3, 1], jnp.int32)
    out, lse = attend_with_lse(q, k, v, lengths, impl="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(attend(q, k, v, SeqLengths(lengths), impl="xla")),
                               rtol=1e-5, atol=1e-6)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    for row, m in enumerate(np.asarray(lengths)):
        scores = np.einsum("tnh,snh->tns", qn[row], kn[row, :m]) / np.sqrt(h)
        want = np.log(np.exp(scores).sum(-1))
        np.testing.assert_allclose(np.asarray(lse[row]), want, rtol=1e-5, atol=1e-5)
    assert lse.shape == (b, t, n) and lse.dtype == jnp.float32


def test_valid_first_equals_the_both_padding_mask():
    """Mllama's vision attention (a pair masked only when both tokens are padding), tokens ordered valid first:
    attention over the valid keys merged with attention over the padding keys gives the boolean mask's result on
    every row, including a row with no padding, and the same gradient."""
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
    weights = jax.random.normal(jax.random.key(3), q.shape)  # a loss that weighs every output differently
    grads = [jax.grad(lambda q, k, v, m=m: (vision_attention(q, k, v, m, "xla") * weights).sum(), argnums=(0, 1, 2))(
        q, k, v) for m in (mask, ValidCount(n))]
    for want_g, got_g in zip(*grads, strict=True):
        np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_over_key_blocks_is_attention_over_their_concatenation(kv_heads):
    """A continuation's attention over a left-padded prompt cache and over its own causal keys, given as two blocks,
    equals one attention over the keys side by side with the joined mask (float32; bfloat16 within its rounding),
    including a query whose only valid key is in the second block."""
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    b, t, p, n, h = 3, 4, 6, 4, 8
    q = jax.random.normal(kq, (b, t, n, h))
    k = jax.random.normal(kk, (b, p + t, kv_heads, h))
    v = jax.random.normal(kv, (b, p + t, kv_heads, h))
    prompt = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0] * 6], bool)  # left-padded; row 2 has no prompt keys
    own = jnp.tril(jnp.ones((t, t), bool))
    first = jnp.broadcast_to(prompt[:, None, None, :], (b, 1, t, p))
    second = jnp.broadcast_to(own[None, None], (b, 1, t, t))
    want = attend(q, k, v, jnp.concatenate([first, second], axis=-1), impl="xla")
    blocks = ((k[:, :p], v[:, :p], first), (k[:, p:], v[:, p:], second))
    np.testing.assert_allclose(np.asarray(attend_blocks(q, blocks)), np.asarray(want), rtol=1e-5, atol=1e-6)
    # row 2's first query sees its own key only
    np.testing.assert_allclose(np.asarray(attend_blocks(q, blocks)[2, 0, 0]), np.asarray(v[2, p, 0]), rtol=1e-6)
    half = attend_blocks(q.astype(jnp.bfloat16), tuple((x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), m)
                                                       for x, y, m in blocks))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(want), rtol=0.05, atol=0.05)


def _numpy_attention(q, k, v, allowed):
    """Softmax attention in float64, `allowed` [B, T, S] (heads share it; k/v heads equal q's)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("case", ["no_mask", "causal", "key_counts"])
def test_odd_lengths_keep_the_fused_kernel_padded_to_even(case, monkeypatch):
    """impl="cudnn" with an odd sequence (CLIP's 577 tokens) pads q, k and v by one token, hides the added key
    (as a key count, or by causality) and drops the added query: the kernel is called with even lengths only, and
    the result is attention over the real tokens. The kernel is XLA's here (no cuDNN on the CPU)."""
    real, lengths_seen = jax.nn.dot_product_attention, []

    def kernel(q, k, v, *args, implementation=None, **kw):
        assert implementation == "cudnn"
        lengths_seen.append((q.shape[1], k.shape[1]))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", kernel)
    b, t, n, h = 2, 7, 2, 8
    q, k, v = (jax.random.normal(key, (b, t, n, h), jnp.bfloat16) for key in jax.random.split(jax.random.key(3), 3))
    allowed = np.ones((b, t, t), bool)
    if case == "no_mask":
        got = attend(q, k, v, None, impl="cudnn")
    elif case == "causal":  # the explicit mask is dropped by the fused causal kernel
        allowed = np.broadcast_to(np.tri(t, dtype=bool), (b, t, t))
        got = attend(q, k, v, jnp.asarray(allowed)[:, None], impl="cudnn", causal=True)
    else:
        keys = np.array([t, 4])
        allowed = np.broadcast_to(np.arange(t)[None, None, :] < keys[:, None, None], (b, t, t))
        got = attend(q, k, v, SeqLengths(jnp.asarray(keys, jnp.int32)), impl="cudnn")
    assert lengths_seen == [(t + 1, t + 1)]
    assert got.shape == (b, t, n, h)
    np.testing.assert_allclose(np.asarray(got, np.float64), _numpy_attention(q, k, v, allowed), atol=2e-2)


def test_odd_lengths_with_a_mask_and_no_causality_stay_on_xla(monkeypatch):
    real = jax.nn.dot_product_attention
    seen = []
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **kw: seen.append(implementation) or real(*a, **kw))
    x = jax.random.normal(jax.random.key(4), (1, 5, 2, 8), jnp.bfloat16)
    attend(x, x, x, jnp.ones((1, 1, 5, 5), bool), impl="cudnn")
    assert seen == [None]
