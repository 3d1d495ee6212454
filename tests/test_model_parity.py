"""Per-token log-probs (and min-k%++ stats) of the JAX model equal HF torch's, for Llama and Phi-3 LLaVA."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.tiny_models import save_tiny, tiny_batch, torch_logprobs
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.eval.scoring import token_logprobs


def _jax_logprobs(model, batch, **kw):
    return [
        np.asarray(x)
        for x in token_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["images"], with_stats=True, **kw
        )
    ]


@pytest.mark.parametrize("text", ["llama", "phi3"])
def test_logprobs_match_torch_with_right_padding(tmp_path, text):
    folder, hf = save_tiny(tmp_path / text, text)
    batch = tiny_batch([9, 4, 6], padding="right")
    want = torch_logprobs(hf, batch)
    valid = batch["attention_mask"][:, 1:] == 1
    assert np.ptp(want[0][valid]) > 2.0  # log-probs spread: the comparison is not trivially near-uniform
    model = load_pretrained(folder)
    got = _jax_logprobs(model, batch, chunk_size=5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[valid], w[valid], atol=1e-4, rtol=0)


def test_unrolled_and_remat_match_scan(tmp_path):
    folder, _ = save_tiny(tmp_path / "m", "llama")
    batch = tiny_batch([5, 3])
    ref = _jax_logprobs(load_pretrained(folder), batch)
    for options in ({"scan_layers": False}, {"remat": "full"}):
        got = _jax_logprobs(load_pretrained(folder, **options), batch)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-5)


def test_old_key_layout_loads_identically(tmp_path):
    folder, hf = save_tiny(tmp_path / "new", "phi3")
    tensors = load_file(folder / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("model.language_model.", "language_model.model.").replace(
            "model.vision_tower.", "vision_tower.vision_model."
        )
        k = k.replace("model.multi_modal_projector.", "multi_modal_projector.")
        k = "language_model.lm_head.weight" if k == "lm_head.weight" else k
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        renamed[k] = v
    old = tmp_path / "old"
    old.mkdir()
    save_file(renamed, old / "model.safetensors", metadata={"format": "pt"})
    (old / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text())))
    assert any(k.startswith("language_model.model.") for k in renamed)
    assert any(k.startswith("vision_tower.vision_model.") for k in renamed)
    batch = tiny_batch([6, 2])
    np.testing.assert_array_equal(
        _jax_logprobs(load_pretrained(old), batch)[0], _jax_logprobs(load_pretrained(folder), batch)[0]
    )
