"""Schedule shape, decay mask, clipping and accumulation of the optax chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlmu_jax.unlearn.optim import decay_mask, lr_schedule, make_optimizer


def test_warmup_cosine_matches_hf_shape() -> None:
    sched = lr_schedule(1.0, total_steps=100, warmup_ratio=0.06)
    assert float(sched(0)) == 0.0 and float(sched(3)) == pytest.approx(0.5)
    assert float(sched(6)) == pytest.approx(1.0)
    # HF cosine: 0.5 * (1 + cos(pi * (s - w) / (T - w))).
    assert float(sched(53)) == pytest.approx(0.5, abs=1e-6)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)
    assert float(lr_schedule(2.0, 10, 0.0, "linear")(5)) == pytest.approx(1.0)


def test_decay_mask_skips_bias() -> None:
    mask = decay_mask({"proj": {"kernel": 0, "bias": 0}})
    assert mask == {"proj": {"kernel": True, "bias": False}}


def test_weight_decay_and_clipping() -> None:
    params = {"w": jnp.ones(3), "bias": jnp.ones(3)}
    tx, _ = make_optimizer(lr=0.1, total_steps=10, weight_decay=0.5, max_grad_norm=1.0, schedule="constant")
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    # Zero gradient: only decoupled decay moves w (by -lr * wd * w), bias stays.
    np.testing.assert_allclose(upd["w"], -0.05 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(upd["bias"], 0.0)
    clip = optax.clip_by_global_norm(1.0)
    big = {"w": jnp.full(3, 100.0), "bias": jnp.zeros(3)}
    clipped, _ = clip.update(big, clip.init(params))
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_grad_accum_averages_micro_steps() -> None:
    params = {"w": jnp.zeros(2)}
    one, _ = make_optimizer(lr=0.1, total_steps=4, max_grad_norm=None, schedule="constant")
    acc, _ = make_optimizer(lr=0.1, total_steps=4, max_grad_norm=None, schedule="constant", grad_accum=2)
    g1, g2 = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([3.0, 0.0])}
    ref, _ = one.update({"w": (g1["w"] + g2["w"]) / 2}, one.init(params), params)
    state = acc.init(params)
    u1, state = acc.update(g1, state, params)
    u2, _ = acc.update(g2, state, params)
    np.testing.assert_allclose(u1["w"], 0.0)
    np.testing.assert_allclose(u2["w"], ref["w"], rtol=1e-6)
