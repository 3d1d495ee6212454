"""Eval calls on a frozen model (eval/frozen.py) give what nnx.jit gives, trace once for all calls of a shape,
and after the block see the model as it is then (no stale split survives it)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

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


def test_frozen_compiler_options_reach_the_program(tmp_path):
    """The options are given to XLA for the frozen model's programs: an unknown one is refused by the compiler,
    a known one compiles the same function to the same result."""
    folder, _ = save_tiny(tmp_path / "m", "llama")
    model = load_pretrained(folder)
    batch = tiny_batch([4])
    call = model_jit(lambda m, ids, mask, images: m(ids, mask, images).mean())
    args = batch["input_ids"], batch["attention_mask"], batch["images"]
    want = float(call(model, *args))
    with frozen(model, {"xla_gpu_enable_triton_gemm": False}):
        assert float(call(model, *args)) == want
    with frozen(model, {"no_such_xla_option": True}), pytest.raises(Exception, match="no_such_xla_option"):
        call(model, *args)
