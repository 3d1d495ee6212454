"""Which checkpoint folder each evaluated model name stands for: the run's own models or folders named in the config.

The most common thing a benchmark is asked to do is to score a model unlearned elsewhere (another workdir, a
PyTorch run merged with PEFT, transformers' `save_pretrained`). ``eval.models=NAME=PATH,...`` names such folders;
the eval and report stages then cover them, under NAME, instead of the run's own models.
``eval.reference_model=PATH`` is the retain-only model that Forget Quality compares against; it is evaluated under
the name the run's own reference has (``retain_model``), with or without ``eval.models``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import ml_collections

REFERENCE = "retain_model"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a folder name under eval_results/ and a report row


def parse_models(spec: str) -> dict[str, Path]:
    """``NAME=PATH,NAME=PATH`` -> {NAME: PATH}, in the given order; a malformed entry is a ValueError."""
    out: dict[str, Path] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, path = (s.strip() for s in item.partition("="))
        if not sep or not name or not path:
            raise ValueError(f"config.eval.models entry {item!r} is not NAME=PATH")
        if not _NAME.fullmatch(name):
            raise ValueError(f"config.eval.models name {name!r} must be letters, digits and _ . + - (it names a "
                             "folder and a report row)")
        if name in out:
            raise ValueError(f"config.eval.models names {name!r} twice")
        out[name] = Path(path)
    return out


def given_checkpoints(eval_config: ml_collections.ConfigDict) -> dict[str, Path]:
    """Name -> folder of every checkpoint the config names: eval.models, then the reference as `retain_model`."""
    given = parse_models(eval_config.models)
    if eval_config.reference_model:
        given[REFERENCE] = Path(eval_config.reference_model)
    return given


def eval_sources(own: Mapping[str, Path], eval_config: ml_collections.ConfigDict) -> dict[str, Path]:
    """Name -> folder of every model the eval and report stages cover: the given checkpoints when eval.models is set,
    else the run's own models (`own`) with the reference replaced when eval.reference_model is set."""
    given = given_checkpoints(eval_config)
    return given if eval_config.models else {**own, **given}


def validate(eval_config: ml_collections.ConfigDict) -> None:
    """Config-time checks: well-formed names, existing folders, no second reference."""
    models = parse_models(eval_config.models)
    if eval_config.reference_model and REFERENCE in models:
        raise ValueError(f"config.eval.models names {REFERENCE!r} and config.eval.reference_model is set: give the "
                         "reference once")
    paths = {f"config.eval.models {name}": path for name, path in models.items()}
    if eval_config.reference_model:
        paths["config.eval.reference_model"] = Path(eval_config.reference_model)
    for key, path in paths.items():
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{key} {str(path)!r} is not a folder (a Hugging Face checkpoint folder)")
