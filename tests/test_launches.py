"""Programs and copies go onto the devices from one host thread at a time: a launch or copy from another thread
waits while one is under way (vlmu_jax/launches.py says why), for the eval's programs on a frozen model, the
batches the batch threads copy, and what the load-ahead and writer threads copy and cast; a load compiles its casts
without the lock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from tests.tiny_models import save_tiny
from vlmu_jax.checkpoints.hf_export import export_hf
from vlmu_jax.checkpoints.hf_import import TensorIndex, _make_array, load_pretrained
from vlmu_jax.checkpoints.in_memory import HostCopy, ModelCache
from vlmu_jax.checkpoints.layout import ToModel, to_model
from vlmu_jax.eval.frozen import frozen, model_jit
from vlmu_jax.launches import launching, one_at_a_time
from vlmu_jax.models.sharding import global_batch


def _waits_for_launch(call: Callable[[], jax.Array]) -> jax.Array:
    """Runs `call` in a thread while another launch is under way (held open until released) and returns its result;
    asserts that `call` did not return before the other launch ended."""
    entered, release = threading.Event(), threading.Event()
    holding = one_at_a_time(lambda: (entered.set(), release.wait(timeout=600)))
    holder = threading.Thread(target=holding)
    holder.start()
    assert entered.wait(timeout=60)
    done, out = threading.Event(), []
    worker = threading.Thread(target=lambda: (out.append(call()), done.set()))
    worker.start()
    try:
        assert not done.wait(timeout=1.0), "a launch went ahead while another thread's was under way"
    finally:
        release.set()
        holder.join()
    assert done.wait(timeout=120)
    worker.join()
    return out[0]


def test_frozen_model_programs_launch_one_at_a_time() -> None:
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    apply = model_jit(lambda m, x: m(x))
    x = jnp.arange(8.0).reshape(2, 4)
    want = model(x)
    with frozen(model):
        apply(model, x).block_until_ready()  # compiled before the timed wait
        got = _waits_for_launch(lambda: apply(model, x))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_layout_casts_launch_one_at_a_time() -> None:
    stored = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    to_model(stored, True, jnp.bfloat16, sharding).block_until_ready()  # compiled before the timed wait
    got = _waits_for_launch(lambda: to_model(stored, True, jnp.bfloat16, sharding))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(stored).T)


def test_batch_copies_one_at_a_time() -> None:
    batch = {"ids": np.arange(12, dtype=np.int32).reshape(3, 4)}
    got = _waits_for_launch(lambda: global_batch(batch, None)["ids"])
    np.testing.assert_array_equal(np.asarray(got), batch["ids"])


def test_checkpoint_params_copy_one_at_a_time(tmp_path: Path) -> None:
    """A param read from its safetensors file (read first, then copied under the lock; no cast or transpose here,
    so the copy is the only thing that can wait), and a held param copied back to the devices."""
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_file({"w": value}, str(tmp_path / "model.safetensors"))
    index = TensorIndex(tmp_path)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    plain = SimpleNamespace(stacked=False, swaps=lambda ndim: False)
    program = ToModel((3, 4), jnp.dtype(jnp.float32), False, jnp.dtype(jnp.float32), sharding)
    got = _waits_for_launch(lambda: _make_array(index, ["w"], plain, program))
    np.testing.assert_array_equal(np.asarray(got), value)
    held = HostCopy.of(jnp.asarray(value))
    back = _waits_for_launch(lambda: held.on_devices(sharding))
    np.testing.assert_array_equal(np.asarray(back), value)


def test_a_launch_that_launches_does_not_wait_for_itself() -> None:
    """Re-entrant: a launched function whose tracing launches (a jitted cast inside) runs in one thread."""
    inner = one_at_a_time(jax.jit(lambda x: x * 2))
    outer = one_at_a_time(lambda x: inner(x) + 1)
    assert float(outer(jnp.float32(3.0))) == 7.0
    assert inner.lower(jnp.float32(1.0)).compile() is not None  # the jitted function's own attributes pass through


def test_a_cold_load_compiles_its_casts_without_the_launch_lock(tmp_path: Path) -> None:
    """Every cast / transpose program of a load from a folder, and of a held model's load, compiles in the load's
    compile threads, none while the loading thread holds the launch lock (where a cold Llama-3.2-11B-Vision load
    compiled them one after another: layout.compile_to_model), and the loaded params are the folder's."""
    folder, _ = save_tiny(tmp_path / "src")
    compiles: list[tuple[str, bool]] = []  # (thread, whether it held the launch lock)

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append((threading.current_thread().name, launching()._is_owned()))

    model = load_pretrained(folder, dtype=jnp.float32)
    want = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    cache = ModelCache(capacity=1)  # what a stage holds after writing its model's folder
    export_hf(model, tmp_path / "out")
    cache.put(tmp_path / "out", model, dtype=jnp.float32)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        for load in (lambda: load_pretrained(folder, dtype=jnp.bfloat16),
                     lambda: cache.load(tmp_path / "out", jnp.bfloat16)):
            jax.clear_caches()
            compiles.clear()
            model = load()
            assert compiles, "a cold load compiles its casts"
            assert {(name.split("_")[0], held) for name, held in compiles} == {("load-compile", False)}, compiles
            got = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
            assert got.keys() == want.keys()
            for p, v in got.items():
                assert v.dtype == jnp.bfloat16, p
                np.testing.assert_array_equal(np.asarray(v, np.float32),
                                              np.asarray(want[p].astype(jnp.bfloat16), np.float32), err_msg=str(p))
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)

