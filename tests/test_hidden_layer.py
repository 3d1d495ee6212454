"""`output_layer=L` (RMU's hidden stream) is HF's `hidden_states[L + 1]`: the output of `model.layers[L]`, which
open-unlearning's RMU hooks. LLaVA (scanned and unrolled) and Mllama (whose layer indices count its
cross-attention layers)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import tiny_mllama
from tests.tiny_models import save_tiny, tiny_batch
from vlmu_jax.checkpoints.hf_import import load_pretrained


def _ours(model, batch: dict, layer: int) -> np.ndarray:
    images = {k: jnp.asarray(v) for k, v in batch["images"].items()}
    return np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), images,
                            output_layer=layer))


def test_llava_layer_output_matches_hf_hidden_states(tmp_path) -> None:
    folder, hf = save_tiny(tmp_path / "llava", "llama")
    batch = tiny_batch([6, 3])
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(batch["input_ids"]).long(),
                  attention_mask=torch.tensor(batch["attention_mask"]).long(),
                  pixel_values=torch.tensor(batch["images"]["pixel_values"]), output_hidden_states=True).hidden_states
    valid = batch["attention_mask"] == 1
    for options in ({}, {"scan_layers": False}):
        got = _ours(load_pretrained(folder, **options), batch, 0)
        np.testing.assert_allclose(got[valid], want[1].numpy()[valid], atol=1e-4)
    with pytest.raises(ValueError, match="outside the model's 2 decoder layers"):
        _ours(load_pretrained(folder), batch, 2)


def test_mllama_layer_output_counts_cross_attention_layers(tmp_path) -> None:
    hf = tiny_mllama.tiny_hf_model()
    hf.save_pretrained(tmp_path / "mllama")
    ours, hf_inputs = tiny_mllama.tiny_batch([(2, 4, 2)])
    layer = 1  # the cross-attention layer of the tiny model
    with torch.no_grad():
        want = hf(**tiny_mllama.hf_row(hf_inputs, 0, True), output_hidden_states=True).hidden_states[layer + 1]
    got = _ours(load_pretrained(tmp_path / "mllama"), ours, layer)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4)
