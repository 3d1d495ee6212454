"""Command line: `python -m vlmu_jax.main --config configs/X.py[:variant] --workdir DIR [--config.k=v]`.

Parses flags, checks the config, joins the distributed job and runs the configured stages; all
work lives in `vlmu_jax.pipeline`. A bad config fails here with one line and exit code 2 before
anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for data, checkpoints, models and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (explicit multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (explicit multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (explicit multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


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
        config_schema.validate(config)
    except (KeyError, TypeError, AttributeError, ValueError, OSError) as e:
        _fail(f"bad config: {_describe(e)}")

    from vlmu_jax import distributed, pipeline

    distributed.initialize(
        distributed.ClusterSpec(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    )
    logging.info("stages: %s", config_schema.stage_list(config))
    pipeline.run(config, Path(_WORKDIR.value))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with its tracebacks and usage dumps replaced by one line.

    The config file is executed and `--config.*` overrides are applied while flags are parsed, so
    any exception here (unknown key, wrong type, missing file, bad variant) is a bad command line.
    """
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - every failure here is reported the same way
        _fail(f"bad config or flag: {_describe(e)}")
        raise


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
