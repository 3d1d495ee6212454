"""Command line: `python -m vlmu_jax.main --config configs/X.py[:variant] --workdir DIR [--config.k=v]`, also
installed as the `vlmu-jax` console script.

Parses flags, checks the config, joins the distributed job and runs the configured stages; all work lives in
`vlmu_jax.runner` (stages in order), `vlmu_jax.pipeline` and `vlmu_jax.stages`. A bad config fails here with one
line and exit code 2 before anything is written; so does bad input found later (a data file, a checkpoint,
tokenizer or processor files, the workdir: `vlmu_jax.errors.InputError` or an OSError naming its file).
`--verbosity=1` (absl's flag) also prints the traceback and lets third-party loggers through (see `vlmu_jax.logs`).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from vlmu_jax import logs
from vlmu_jax.cli_overrides import processor_overrides
from vlmu_jax.errors import InputError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for data, checkpoints, models and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (explicit multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (explicit multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (explicit multi-host).")
flags.mark_flags_as_required(["config", "workdir"])

# KEY -> VALUE of each `--config.model.image_processor_overrides.KEY=VALUE` (taken out of argv by `_parse_flags`)
_PROCESSOR_OVERRIDES: dict[str, Any] = {}


def _fail(message: str) -> None:
    one_line = " ".join(message.replace("\\n", " ").split())
    print(f"vlmu_jax: error: {one_line}", file=sys.stderr)
    sys.exit(2)


def _describe(e: BaseException) -> str:
    """config_flags wraps the config file's own traceback into its messages; keep the last line."""
    message = str(e).strip()
    if "Traceback" in message or "Failed loading config file" in message:
        message = message.splitlines()[-1]
    return message


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    from vlmu_jax import config_schema

    try:
        config = _CONFIG.value  # loading the file and applying --config.* overrides happens here
        with config.unlocked():
            for key, value in _PROCESSOR_OVERRIDES.items():
                config.model.image_processor_overrides[key] = value
        config_schema.validate(config)
    except (KeyError, TypeError, AttributeError, ValueError, OSError) as e:
        _fail(f"bad config: {_describe(e)}")

    verbosity = flags.FLAGS.verbosity
    logs.configure(verbosity)
    from vlmu_jax import distributed, runner

    distributed.initialize(
        distributed.ClusterSpec(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    )
    try:
        runner.run(config, Path(_WORKDIR.value))
    except (InputError, OSError) as e:
        logs.close_bars()
        if verbosity >= 1:
            traceback.print_exc()
        _fail(_input_message(e))


def _input_message(e: InputError | OSError) -> str:
    """`<file>: <record>: <field>: <what>` of an InputError; `<file>: <reason>` of an OSError that names its file."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with its tracebacks and usage dumps replaced by one line.

    The config file is executed and `--config.*` overrides are applied while flags are parsed, so
    any exception here (unknown key, wrong type, missing file, bad variant) is a bad command line.
    The image processor's overrides are taken out first (`processor_overrides`) and set by `main`.
    """
    argv, overrides = processor_overrides(argv)
    sys.argv = processor_overrides(sys.argv)[0]  # config_flags finds its --config.* overrides in sys.argv itself
    _PROCESSOR_OVERRIDES.update(overrides)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every failure here is reported the same way
        _fail(f"bad config or flag: {_describe(e)}")
        raise


def cli() -> None:
    """The `vlmu-jax` console script: the same flags as `python -m vlmu_jax.main`."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
