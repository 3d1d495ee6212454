"""Export from an unlearning run's Orbax checkpoint (`export.from_checkpoint`): the HF folder transformers loads
has the logits of our model at that step.

The step-4 (latest) export is compared with the run's own final model; the step-2 export with the final model
of a second run trained for 2 steps on the same trajectory (constant learning rate, same seed, same data order).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.test_pipeline import _main
from tests.tiny_models import torch_logprobs
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.eval.scoring import token_logprobs

_TRAIN = ("--config.stages=finetune,unlearn", "--config.data.synthetic_identities=12",
          "--config.finetune.num_steps=3", "--config.retain_model.num_steps=1", "--config.unlearn.objective=gd",
          "--config.unlearn.lr_schedule=constant", "--config.unlearn.save_every=2",
          "--config.unlearn.keep_checkpoints=3")


def _batch(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    vision = cfg["vision_config"]
    n_image = (vision["image_size"] // vision["patch_size"]) ** 2
    rng = np.random.RandomState(0)
    rows = [[1] + [cfg["image_token_index"]] * n_image + list(rng.randint(10, 500, n)) for n in (7, 7)]
    pix = rng.randn(2, 3, vision["image_size"], vision["image_size"]).astype(np.float32)
    return {"input_ids": np.asarray(rows, np.int32), "attention_mask": np.ones((2, len(rows[0])), np.int32),
            "images": {"pixel_values": pix}}


def _ours(folder: Path, batch: dict) -> np.ndarray:
    model = load_pretrained(folder)
    return np.asarray(token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["images"]))


def _hf(folder: Path, batch: dict) -> np.ndarray:
    from transformers import LlavaForConditionalGeneration

    return torch_logprobs(LlavaForConditionalGeneration.from_pretrained(folder).float().eval(), batch)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    four = tmp_path_factory.mktemp("four")
    _main(four, *_TRAIN, "--config.unlearn.num_steps=4")
    two = tmp_path_factory.mktemp("two")
    for part in ("data", "models/base", "models/finetuned", "models/retain_model"):
        shutil.copytree(four / part, two / part)
    _main(two, *_TRAIN, "--config.unlearn.num_steps=2")
    _main(four, "--config.stages=export", "--config.data.synthetic_identities=12", "--config.unlearn.objective=gd",
          "--config.export.from_checkpoint=latest")
    _main(four, "--config.stages=export", "--config.data.synthetic_identities=12", "--config.unlearn.objective=gd",
          "--config.export.from_checkpoint=2")
    return four, two


def test_export_of_latest_checkpoint_matches_final_model(runs):
    four, _ = runs
    out = four / "export" / "unlearned_gd_step4"
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors", "DONE"):
        assert (out / name).exists(), name
    info = json.loads((out / "export_info.json").read_text())
    assert info["step"] == 4 and info["source"].endswith("train/unlearned_gd/checkpoints/4")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert info["commit"].startswith(head)
    batch = _batch(out)
    want = _ours(four / "models" / "unlearned_gd", batch)  # the model the training stage itself saved
    np.testing.assert_allclose(_hf(out, batch), want, atol=2e-4, rtol=0)
    assert np.abs(_ours(four / "models" / "finetuned", batch) - want).max() > 1e-3  # unlearning moved it


def test_export_of_chosen_step_matches_a_run_stopped_there(runs):
    four, two = runs
    out = four / "export" / "unlearned_gd_step2"
    assert json.loads((out / "export_info.json").read_text())["step"] == 2
    batch = _batch(out)
    want = _ours(two / "models" / "unlearned_gd", batch)
    np.testing.assert_allclose(_hf(out, batch), want, atol=2e-4, rtol=0)
    assert np.abs(_ours(four / "models" / "unlearned_gd", batch) - want).max() > 1e-3  # step 2 != step 4


def test_missing_step_is_a_clear_error(runs, tmp_path):
    four, _ = runs
    with pytest.raises(AssertionError, match="has steps"):
        _main(four, "--config.stages=export", "--config.data.synthetic_identities=12",
              "--config.unlearn.objective=gd", "--config.export.from_checkpoint=3")
