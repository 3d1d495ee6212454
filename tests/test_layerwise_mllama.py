"""The per-layer train step (unlearn/layerwise.py) on a tiny LoRA Mllama against the scanned one, on this CPU.

Mllama's decoder keeps its layers in several stacks (self layers before the first cross layer, the scanned blocks'
self and cross layers, the layers run one by one) and its cross layers take K/V projected from the vision states
before the decoder call, with LoRA on those k/v projections: the per-layer step must send the K/V's gradients back
through the update program to those projections (inside the stacks) and to the projector. 10 layers with cross
layers 2, 5, 8: every kind of stack is there (`mllama.stack_layout`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tests.test_layerwise import assert_forms_agree, train_run, with_lora
from tests.tiny_mllama import IMAGE_TOKEN, tiny_batch, tiny_config
from vlmu_jax.data.batching import IGNORE
from vlmu_jax.models.registry import init_model
from vlmu_jax.unlearn import layerwise

LAYERS, CROSS = 10, (2, 5, 8)
ROWS = [(3, 5, 2), (0, 2, 4), (4, 0, None), (2, 3, 1)]  # (tokens before the image, after, tiles | text-only)


class Rows:
    """A BatchSource over fixed batches of the tiny Mllama's rows (answers = each row's last 4 tokens but the image
    token, which has no row in the head); with
    `images` False the batches carry no images (the decoder skips its cross layers)."""

    def __init__(self, seed: int, images: bool = True):
        self.batches = []
        for k in range(2):
            b, _ = tiny_batch(ROWS, seed=seed + k)
            real = b["attention_mask"].sum(1)
            pos = np.arange(b["input_ids"].shape[1])
            answer = (pos[None] >= real[:, None] - 4) & (pos[None] < real[:, None]) & (b["input_ids"] != IMAGE_TOKEN)
            b["labels"] = np.where(answer, b["input_ids"], IGNORE).astype(np.int32)
            if not images:
                b["images"] = None
            self.batches.append(b)

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, index: int) -> dict:
        return self.batches[index % len(self.batches)]


def tiny_lora_mllama() -> tuple[nnx.Module, object]:
    """The tiny Mllama, its gates open, `with_lora` (the cross layers' k/v projections adapted too)."""
    model = init_model(tiny_config(LAYERS, CROSS).to_dict(), seed=0)
    gates = nnx.state(model, lambda path, _: "gate" in str(path[-1]))
    nnx.update(model, jax.tree.map(lambda x: 0.3 + 0.5 * jax.random.uniform(jax.random.key(x.size), x.shape, x.dtype),
                                   gates))
    return model, with_lora(model)


def run(tmp: Path, objective: str, mode: str, images: bool = True, **kw) -> tuple[list[float], nnx.State, nnx.Module]:
    sources = {"forget": Rows(1, images), "retain": Rows(5, images)}
    return train_run(tiny_lora_mllama, sources, tmp, objective, mode, **kw)


def test_the_tiny_decoder_has_every_kind_of_stack() -> None:
    model, _ = tiny_lora_mllama()
    stacks = layerwise.decoder_stacks(model)
    assert [s.prefix[-1] for s in stacks] == ["head_self", "block_self", "block_cross", "self", "cross"]
    assert [s.cross for s in stacks] == [False, False, True, False, True]
    assert sorted(i for s in stacks for i in s.ids) == list(range(LAYERS))
    # measured faster than the scan on an H200 for LoRA (session 23): `auto` takes it there; a full finetune stays
    assert layerwise.lora_only(model, nnx.state(model, nnx.LoRAParam))
    assert not layerwise.lora_only(model, nnx.state(model, nnx.Param))


# No GA row: GD's forget stream is GA's loss through the same layers (and GA runs per layer on LLaVA in
# test_layerwise.py); the ~45 s it took on CI's two cores pay for the real-shape CLI runs of every family. No GD row
# with images either: its two streams have one shape here, so they run as one policy call with images, as NPO's
# policy call does (beside its reference call), and GD's own loss runs per layer in the text-only row.
@pytest.mark.parametrize("objective,images,kw", [("npo", True, {}), ("gd", False, {}),
                                                 ("rmu", True, {"hidden_layer": 6})],
                         ids=["npo", "gd-text-only", "rmu"])
def test_layerwise_step_equals_scanned_step(tmp_path, objective, images, kw) -> None:
    assert_forms_agree(lambda mode: run(tmp_path, objective, mode, images, **kw), tiny_lora_mllama)


def test_stacks_of_one_layer_structure_share_their_programs(tmp_path, monkeypatch) -> None:
    """Mllama's three stacks of self-attention layers share one set of layer programs, its two stacks of cross
    layers another (compared once when the step is built): a GA step compiles two layer structures, not five."""
    steps = []
    call = layerwise.LayerwiseStep.__call__

    def kept(self, *args):
        steps.append(self)
        return call(self, *args)

    monkeypatch.setattr(layerwise.LayerwiseStep, "__call__", kept)
    run(tmp_path, "ga", "always", steps=1)
    step = steps[0]
    assert step.shares == [0, 0, 2, 0, 2]  # head_self, block_self, block_cross, self, cross
    assert sorted((role, s, type(c).__name__) for role, s, c, _ in step.programs) == [
        ("policy", 0, "LayerCall"), ("policy", 2, "CrossLayerCall")]
