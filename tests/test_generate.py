"""Greedy generations equal HF model.generate(do_sample=False) token for token, left-padded batch, with the
decoder's layers scanned over the stacked weights (CPU, TPU) and run over weight slices (GPU, llama.SlicedCache)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from tests.tiny_models import EOS, PAD, causal_without_mask, save_tiny, tiny_batch
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.eval.generate import generate

NEW = 10


@pytest.mark.parametrize("text", ["llama", "phi3"])
@pytest.mark.parametrize("fused_causal", [False, True], ids=["masked", "fused_causal"])
def test_greedy_matches_hf(tmp_path, text, sliced, fused_causal, monkeypatch):
    """Also with the prefill's attention run as the fused causal kernel runs it (no mask): the prefill moves each
    left-padded prompt's tokens to the front first, so causality alone is exact."""
    if fused_causal:
        causal_without_mask(monkeypatch)
    folder, hf = save_tiny(tmp_path / text, text)
    batch = tiny_batch([7, 2, 4], padding="left", seed=1)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(batch["input_ids"]).long(),
            attention_mask=torch.tensor(batch["attention_mask"]).long(),
            pixel_values=torch.tensor(batch["images"]["pixel_values"]),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )[:, batch["input_ids"].shape[1] :].numpy()
    ref = np.pad(ref, ((0, 0), (0, NEW - ref.shape[1])), constant_values=PAD)
    got = np.asarray(
        generate(
            load_pretrained(folder),
            batch["input_ids"],
            batch["attention_mask"],
            batch["images"],
            max_new_tokens=NEW,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    )
    np.testing.assert_array_equal(got, ref)


def test_sampling_runs_and_respects_shape(tmp_path):
    folder, _ = save_tiny(tmp_path / "m", "llama")
    batch = tiny_batch([3, 5], padding="left")
    out = generate(
        load_pretrained(folder),
        batch["input_ids"],
        batch["attention_mask"],
        batch["images"],
        max_new_tokens=4,
        temperature=0.7,
        top_p=0.9,
        rng=jax.random.key(1),
    )
    assert out.shape == (2, 4) and out.dtype == np.int32


def test_decode_over_slices_when_the_device_has_room(tmp_path, monkeypatch):
    """Weight slices (llama.SlicedCache) only on GPU and only when the device's free memory holds them with a tenth
    to spare; a model without a stacked decoder and CPU decode over the stacked weights."""
    from flax import nnx

    import vlmu_jax.eval.generate as gen
    from vlmu_jax.eval.layer_copies import room_for_copy

    folder, _ = save_tiny(tmp_path / "m", "llama")
    model = load_pretrained(folder)
    assert not room_for_copy(model.decoder_lm())  # CPU
    need = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.decoder_lm().layers)))

    class Device:
        def __init__(self, free):
            self.free = free

        def memory_stats(self):
            return {"bytes_limit": 10 * need + self.free, "bytes_in_use": 10 * need}

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for free, want in ((2 * need, True), (need, False)):
        monkeypatch.setattr(jax, "local_devices", lambda free=free: [Device(free)])
        assert room_for_copy(model.decoder_lm()) is want
    assert not gen.decode_over_slices(type("NoStack", (), {})())
    # decided once per model: the allocator's state between batches cannot flip it (and recompile the loop)
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(2 * need)])
    fresh = load_pretrained(folder)
    assert gen.decode_over_slices(fresh)
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(0)])
    assert gen.decode_over_slices(fresh)
