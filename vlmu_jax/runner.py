"""Runs a config's stages in order (`vlmu_jax.main` calls `run`): the workspace and the stage inputs come from
`pipeline`, the stages from `stages`; this module is the only one that needs both, so neither imports the other
back.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from vlmu_jax import compile_cache, device_memory, logs, pipeline, provenance, stages
from vlmu_jax.config_schema import stage_list
from vlmu_jax.errors import InputError


def check_writable(workdir: Path) -> None:
    """An unwritable workdir fails before any work, not after an hour of training when the first file is saved."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(f"the workdir cannot be written ({err.strerror or err})", file=workdir) from err


def run(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Runs the configured stages in order, one line each with its duration; finished ones are skipped unless
    config.force."""
    device_memory.configure(config.device_memory_fraction)  # before provenance.write's device query
    check_writable(workdir)
    names = stage_list(config)
    logs.say(f"{config.name}: {config.benchmark}, stages {', '.join(names)} -> {workdir}")
    provenance.write(workdir, config.to_json_best_effort(indent=2))
    compile_cache.configure(config.compilation_cache_dir)
    ws = pipeline.Workspace(config, workdir)
    pipeline.prepare_data(ws)
    pipeline.prepare_base_model(ws)
    for name in names:
        with logs.timed(name):
            getattr(stages, name)(ws)
    pipeline.wait_for_writes()  # the trained models' HF folders written in the background
