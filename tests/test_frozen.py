"""Eval calls on a frozen model (eval/frozen.py) give what nnx.jit gives, trace once for all calls of a shape
and for every model of the same structure, and after the block see the model as it is then (no stale split
survives it)."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from tests.tiny_models import save_tiny, tiny_batch
from vlmu_jax.checkpoints.hf_import import load_pretrained, placed_shapes, read_hf_config
from vlmu_jax.eval import frozen as frozen_module
from vlmu_jax.eval.frozen import compile_only, frozen, model_jit


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


def test_a_program_another_thread_compiles_is_waited_for_not_compiled_again(tmp_path, monkeypatch):
    """On one device, a compile-only call for a program whose compile another thread began (a stand-in of the
    model, shapes only: `stages._compile_on_stand_in`) takes that compile rather than starting its own; the model
    then runs on the program compiled for its stand-in."""
    folder, _ = save_tiny(tmp_path / "m", "llama")
    model = load_pretrained(folder)
    stand_in = placed_shapes(read_hf_config(folder), jnp.float32)
    batch = tiny_batch([3, 7])
    args = batch["input_ids"], batch["attention_mask"], batch["images"]

    def last_hidden(m, ids, mask, images):
        return m(ids, mask, images)[:, -1]

    call = model_jit(last_hidden)
    go, compiles, compile = threading.Event(), [], jax.stages.Lowered.compile

    def held_compile(self, *a, **kw):
        compiles.append(threading.current_thread().name)
        assert go.wait(60)
        return compile(self, *a, **kw)

    monkeypatch.setattr(jax.stages.Lowered, "compile", held_compile)

    def on_stand_in():
        with frozen(stand_in), compile_only():
            call(stand_in, *args)

    first = threading.Thread(target=on_stand_in)
    first.start()
    while not (frozen_module._UNDER_WAY and all(f.done() for f in frozen_module._UNDER_WAY.values())):
        time.sleep(0.01)  # the stand-in's program is lowered and its compile held
    with frozen(model):
        with compile_only() as programs:
            out = call(model, *args)
            go.set()
        first.join()
        assert compiles == ["compile-only_0"], compiles  # one compile, the stand-in's
        assert len(programs) == 1
        got = call(model, *args)
    assert len(compiles) == 1
    want = call(model, *args)  # through nnx.jit: the model's own program
    assert out.shape == want.shape and out.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
