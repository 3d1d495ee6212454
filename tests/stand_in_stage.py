"""The eval stage run with its first model's load held until the model's stand-in has compiled its programs
(`stages._compile_on_stand_in`): which programs compiled before that load, and which after it."""

from __future__ import annotations

import threading

import jax
import ml_collections

from vlmu_jax.pipeline import Workspace


def stand_in_config(config: ml_collections.ConfigDict, model: str, batch_size: int) -> ml_collections.ConfigDict:
    """`config` evaluating one model, "standin" (`model`'s folder, again if evaluated before), with per-layer copies
    and compile-ahead on, at shapes no other test compiles: `batch_size` (a multiple of 8) a test's own, 3 new
    tokens, fsdp 2 (the params sharded, so their placements are part of each program)."""
    config = config.copy_and_resolve_references()
    config.eval.models, config.eval.reference_model = f"standin={model}", ""
    config.force = True  # evaluated again where an earlier test left its results
    config.eval.layer_copies, config.eval.compile_ahead = "always", True
    config.eval.batch_size, config.eval.max_new_tokens = batch_size, 3
    config.mesh.data, config.mesh.fsdp = 4, 2
    return config


def compiles_around_the_first_load(ws: Workspace, monkeypatch) -> tuple[set[str], list[str]]:
    """(The programs compiled before the first model's load returned, those compiled after it) over `ws`'s eval
    stage, with that load held until the stand-in's compiles are done."""
    from vlmu_jax import stages

    compiled: list[str] = []
    recording = threading.Event()  # jax.monitoring keeps its listeners: this one records during the stage only
    recording.set()
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, fun_name="", **kw: compiled.append(fun_name)
        if recording.is_set() and event == "/jax/core/compile/backend_compile_duration" else None)
    done, at_load = threading.Event(), []
    on_stand_in, load = stages._compile_on_stand_in, Workspace.load

    def stand_in_then_done(*args):
        try:
            on_stand_in(*args)
        finally:
            done.set()

    def load_once_done(self, name):
        assert done.wait(600)
        model = load(self, name)
        at_load.append(len(compiled))
        return model

    monkeypatch.setattr(stages, "_compile_on_stand_in", stand_in_then_done)
    monkeypatch.setattr(Workspace, "load", load_once_done)
    try:
        stages.eval(ws)
    finally:
        recording.clear()
    return set(compiled[:at_load[0]]), compiled[at_load[0]:]
