"""Command-line overrides that ml_collections' config_flags cannot apply, parsed here and set by `main`.

config_flags overrides only keys a config already has (it reads each key's type from the config), even on an
unlocked ConfigDict. `config.model.image_processor_overrides` is meant to take any key of a checkpoint's
preprocessor_config.json (do_image_splitting, max_pixels, size, ...), so its flags are taken out of the command
line before absl parses it. No jax here: `main` parses flags before jax is first imported (vlmu_jax.logs).
"""

from __future__ import annotations

import json
from typing import Any

PROCESSOR_FLAG = "--config.model.image_processor_overrides."


def processor_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """argv without its `--config.model.image_processor_overrides.KEY=VALUE` flags, and those as {KEY: VALUE}.
    VALUE is read as JSON (`true`, `980`, `{"longest_edge": 980}`), Python's `True` / `False` as booleans (as
    config_flags reads them), anything else as a string."""
    rest, overrides = [], {}
    for arg in argv:
        key, eq, value = arg.removeprefix(PROCESSOR_FLAG).partition("=")
        if not arg.startswith(PROCESSOR_FLAG) or not eq or not key:
            rest.append(arg)
            continue
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = {"True": True, "False": False}.get(value, value)
    return rest, overrides
