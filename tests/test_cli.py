"""The command line rejects bad configs with one clear line, a non-zero exit and no files written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], workdir: Path, entry: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(entry or [sys.executable, "-m", "vlmu_jax.main"]), "--workdir", str(workdir), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "configs/demo.py", "--config.unlearn.lrr=1"], 'Did you mean "lr"'),
        (["--config", "configs/demo.py", "--config.unlearn.lr=abc"], "could not convert string to float"),
        (["--config", "configs/demo.py", "--config.stages=finetune,dance"], "unknown stage(s) ['dance']"),
        (["--config", "configs/demo.py", "--config.protocol=tofu"],
         "config.protocol must be one of ['original', 'corrected'], got 'tofu'"),
        (["--config", "configs/demo.py", "--config.eval.layer_copies=yes"],
         "config.eval.layer_copies must be one of ('auto', 'always', 'never'), got 'yes'"),
        (["--config", "configs/demo.py", "--config.finetune.layerwise=on"],
         "config.finetune.layerwise must be one of ('auto', 'always', 'never'), got 'on'"),
        (["--config", "configs/demo.py", "--config.unlearn.reference_logps=always"],
         "config.unlearn.reference_logps must be one of ('auto', 'once', 'per_step'), got 'always'"),
        (["--config", "configs/demo.py", "--config.device_memory_fraction=1.5"],
         "config.device_memory_fraction must be in (0, 1], got 1.5"),
        (["--config", "configs/demo.py", "--config.unlearn.remat=some"],
         "config.unlearn.remat must be one of ['dots_and_dropout_saveable', 'dots_attention_dropout_saveable', "
         "'dots_attention_inputs_dropout_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable', "
         "'everything_saveable', 'full', 'none', 'projections_attention_dropout_saveable'], got 'some'"),
        (["--config", "configs/nothere.py"], "No such file or directory: 'configs/nothere.py'"),
        (["--config", "configs/fiubench_llava15.py:nosuchmethod"], "unknown method variant 'nosuchmethod'"),
        (["--config", "configs/fiubench_llava15.py"], "config.model.path is empty"),
        (["--config", "configs/fiubench_llava15.py", "--config.model.path=/no/such/ckpt"],
         "config.model.path '/no/such/ckpt' is not a folder"),
        (["--config", "configs/mllmu_llava15.py", "--config.model.path=/",
          "--config.data.root=/no/such/data"],
         "config.data.root '/no/such/data' is not a folder"),
        (["--config", "configs/demo.py", "--config.eval.models=gd"], "config.eval.models entry 'gd' is not NAME=PATH"),
        (["--config", "configs/demo.py", "--config.eval.models=gd=/no/such/ckpt"],
         "config.eval.models gd '/no/such/ckpt' is not a folder"),
        (["--config", "configs/demo.py", "--config.eval.models=retain_model=/", "--config.eval.reference_model=/"],
         "give the reference once"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path: Path, args: list[str], expected: str) -> None:
    workdir = tmp_path / "run"
    result = _run(args, workdir)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vlmu_jax: error: ")
    assert expected in lines[0]
    assert not workdir.exists()


def test_console_script_is_the_same_command_line(tmp_path: Path) -> None:
    """setup.py's `vlmu-jax` entry point parses the same flags as `python -m vlmu_jax.main`."""
    module, function = re.search(r'"vlmu-jax = ([\w.]+):(\w+)"', (REPO / "setup.py").read_text()).groups()
    entry = [sys.executable, "-c", f"from {module} import {function}; {function}()"]
    result = _run(["--config", "configs/demo.py", "--config.stages=finetune,dance"], tmp_path / "run", entry)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "vlmu_jax: error: bad config: config.stages names unknown stage(s) ['dance']; known: "
        "['finetune', 'unlearn', 'eval', 'export', 'report']"]


def test_image_processor_overrides_name_any_key() -> None:
    """`--config.model.image_processor_overrides.KEY=VALUE` names any preprocessor_config.json key, though
    config_flags overrides only keys a config has: JSON values (booleans, numbers, objects), Python's True /
    False, anything else as a string; every other flag is left to absl."""
    from vlmu_jax.cli_overrides import processor_overrides

    flag = "--config.model.image_processor_overrides."
    argv = ["prog", "--config", "configs/demo.py", f"{flag}do_image_splitting=true", f"{flag}max_pixels=401408",
            f'{flag}size={{"longest_edge": 980, "shortest_edge": 378}}', f"{flag}do_pad=False",
            f"{flag}resample=bicubic", "--config.unlearn.lr=1e-4", f"{flag}no_value"]
    rest, overrides = processor_overrides(argv)
    assert rest == ["prog", "--config", "configs/demo.py", "--config.unlearn.lr=1e-4", f"{flag}no_value"]
    assert overrides == {"do_image_splitting": True, "max_pixels": 401408,
                         "size": {"longest_edge": 980, "shortest_edge": 378}, "do_pad": False, "resample": "bicubic"}


def test_image_processor_override_of_a_preset_key_keeps_its_type(tmp_path: Path) -> None:
    """A key a preset already sets keeps its type: a value of another type is a bad config, in one line."""
    flag = "--config.model.image_processor_overrides."
    result = _run(["--config", "configs/fiubench_qwen2_5_vl.py", f"{flag}max_pixels=many"], tmp_path / "run")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "vlmu_jax: error: bad config: Could not override field 'max_pixels' (reference). many is of original type "
        "<class 'str'> and cannot be casted to type <class 'int'>"]
