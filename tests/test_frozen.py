"""Eval calls on a frozen model (eval/frozen.py) give what nnx.jit gives, trace once for all calls of a shape
and for every model of the same structure, and after the block see the model as it is then (no stale split
survives it)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tests.tiny_models import save_tiny, tiny_batch
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.eval.frozen import frozen, model_jit


def test_frozen_calls_match_nnx_jit_and_do_not_outlive_the_block(tmp_path):
    folder, _ = save_tiny(tmp_path / "m", "llama")
    model = load_pretrained(folder)
    batch = tiny_batch([5, 3])
    traces = []

    def mean_hidden(m, ids, mask, images, scale):
        traces.append(1)
        return m(ids, mask, images).mean() * scale

    call = model_jit(mean_hidden, static_argnames=("scale",))
    args = batch["input_ids"], batch["attention_mask"], batch["images"]
    want = float(call(model, *args, scale=2.0))
    with frozen(model):
        got = [float(call(model, *args, scale=2.0)) for _ in range(3)]
        with frozen(model):  # nested: the outer split stays
            got.append(float(call(model, *args, scale=2.0)))
    assert got == [want] * 4
    assert len(traces) == 2  # once through nnx.jit, once on the frozen split for all four calls
    norm = model.decoder_lm().norm
    norm.weight[...] = jnp.zeros_like(norm.weight[...])  # the model changes after the block
    assert float(call(model, *args, scale=2.0)) == 0.0
    with frozen(model):
        assert float(call(model, *args, scale=2.0)) == 0.0
    assert not np.isnan(want) and want != 0.0
    # Another model of the same structure (the next one an eval stage evaluates) reuses the compiled call: the
    # static structure is interned, not compared node by node at every call.
    traced = len(traces)
    other = load_pretrained(folder)
    with frozen(other):
        assert float(call(other, *args, scale=2.0)) == want
    assert len(traces) == traced
