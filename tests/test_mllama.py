"""Mllama (Llama-3.2-Vision) against transformers: image processor, logits, greedy generation, checkpoint
roundtrip, LoRA, remat/unrolled options. A text-only row is compared with HF run on that row alone without
image inputs (HF then skips the cross-attention layers); image rows with HF given the processor's
cross_attention_mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from tests.tiny_mllama import EOS, PAD, hf_row, tiny_batch, tiny_hf_model
from vlmu_jax.checkpoints.hf_export import export_hf, hf_tensors
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.data.images import image_processor
from vlmu_jax.eval.generate import generate
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.models.registry import set_options

ROWS = [(3, 5, 2), (0, 2, 4), (4, 0, None), (2, 3, 1)]  # (tokens before image, after, tiles | text-only)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mllama")
    hf = tiny_hf_model()
    hf.save_pretrained(folder)
    return folder, hf


def _logits(model, batch) -> np.ndarray:
    h = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
              jax.tree.map(jnp.asarray, batch["images"]))
    return np.asarray(h @ model.head_weight().T)


@pytest.mark.parametrize("size", [(56, 56), (30, 20), (112, 56), (56, 112), (200, 60), (60, 200), (120, 100),
                                  (57, 113), (10, 250)])
def test_image_processor_matches_hf(size):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    cfg = dict(size={"height": 56, "width": 56}, max_image_tiles=4, resample=2, do_pad=True, do_resize=True,
               do_rescale=True, do_normalize=True, do_convert_rgb=True, rescale_factor=1 / 255,
               image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    w, h = size
    image = Image.fromarray(np.random.RandomState(w * 1000 + h).randint(0, 255, (h, w, 3), dtype=np.uint8))
    ref = MllamaImageProcessorPil(**cfg)(images=[[image]], return_tensors="np")
    for kind in ("MllamaImageProcessor", "MllamaImageProcessorFast", "MllamaImageProcessorPil"):
        got = image_processor({"image_processor_type": kind, **cfg})(image)
        assert got["pixel_values"].shape == (4, 3, 56, 56) and got["pixel_values"].dtype == np.float32
        assert np.abs(got["pixel_values"] - ref["pixel_values"][0, 0]).max() <= 1e-5
        assert int(got["aspect_ratio_ids"]) == int(ref["aspect_ratio_ids"][0, 0])
        np.testing.assert_array_equal(got["aspect_ratio_mask"], ref["aspect_ratio_mask"][0, 0])
    blank = image_processor({"image_processor_type": "MllamaImageProcessor", **cfg}).blank()
    assert blank.keys() == got.keys() and int(blank["aspect_ratio_ids"]) == 0


@pytest.mark.parametrize("reorder", [False, True], ids=["mask", "valid_first"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_match_hf(tiny, padding, reorder, monkeypatch):
    """Both vision attention paths: the boolean both-padding mask (XLA, the CPU default) and valid tokens first
    with length masks (the fused-kernel path, here run on XLA's attention)."""
    monkeypatch.setattr("vlmu_jax.models.mllama_vision.reorder_tokens", lambda impl, dtype: reorder)
    folder, hf = tiny
    model = load_pretrained(folder)
    ours, hf_in = tiny_batch(ROWS, padding=padding)
    got = _logits(model, ours)
    for i, row in enumerate(ROWS):
        with torch.no_grad():
            ref = hf(**hf_row(hf_in, i, row[2] is not None)).logits[0].numpy()
        valid = ours["attention_mask"][i] > 0
        np.testing.assert_allclose(got[i][valid], ref[valid], atol=1e-4, rtol=0)
    # the image matters (gated branches are live), and a text-only batch (images=None) equals its rows' logits
    other = jax.tree.map(np.copy, ours)
    other["images"]["pixel_values"] = other["images"]["pixel_values"] * -1.0
    assert np.abs(_logits(model, other)[0] - got[0]).max() > 1e-2
    text_only = {k: ours[k][2:3] for k in ("input_ids", "attention_mask")}
    h = model(jnp.asarray(text_only["input_ids"]), jnp.asarray(text_only["attention_mask"]), None)
    np.testing.assert_allclose(np.asarray(h @ model.head_weight().T)[0], got[2], atol=1e-5)


def test_unrolled_and_remat_match(tiny):
    folder, _ = tiny
    ours, _ = tiny_batch(ROWS[:2])
    model = load_pretrained(folder)
    ref = _logits(model, ours)

    def loss(m):
        args = jnp.asarray(ours["input_ids"]), jnp.asarray(ours["attention_mask"])
        return jnp.mean(m(*args, jax.tree.map(jnp.asarray, ours["images"])) ** 2)

    for opts in ({"scan_layers": False}, {"remat": "full"}, {"remat": "dots_saveable", "scan_layers": False}):
        set_options(model, **opts)
        np.testing.assert_allclose(_logits(model, ours), ref, atol=1e-5)
        # jitted: op by op, the gradient through the tiny model's towers took most of this test's 40 s on 2 cores
        assert np.isfinite(float(nnx.jit(nnx.grad(loss))(model).lm_head[...].sum()))


def test_greedy_generation_matches_hf(tiny):
    folder, hf = tiny
    new = 6
    ours, hf_in = tiny_batch(ROWS, padding="left", seed=3)
    got = np.asarray(generate(load_pretrained(folder), ours["input_ids"], ours["attention_mask"], ours["images"],
                              max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD))
    for i, row in enumerate(ROWS):
        inputs = hf_row(hf_in, i, row[2] is not None)
        keep = inputs.pop("attention_mask")[0] > 0
        inputs.pop("position_ids")
        inputs["input_ids"] = inputs["input_ids"][:, keep]
        if "cross_attention_mask" in inputs:
            inputs["cross_attention_mask"] = inputs["cross_attention_mask"][:, keep]
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=EOS,
                              pad_token_id=PAD)[0, int(keep.sum()):].numpy()
        ref = np.pad(ref, (0, new - len(ref)), constant_values=PAD)
        np.testing.assert_array_equal(got[i], ref)


def test_export_roundtrip_bit_identical(tiny, tmp_path):
    from transformers import MllamaForConditionalGeneration

    folder, hf = tiny
    out = export_hf(load_pretrained(folder), tmp_path / "out", max_shard_bytes=50_000)
    back = MllamaForConditionalGeneration.from_pretrained(out)
    want, have = hf.state_dict(), back.state_dict()
    assert want.keys() == have.keys()
    for k in want:
        assert torch.equal(want[k], have[k]), k


def test_lora_forward_and_merge(tiny):
    folder, _ = tiny
    model = load_pretrained(folder)
    ours, _ = tiny_batch(ROWS[:2])
    base = _logits(model, ours)
    names = apply_lora(model, rank=2, alpha=4.0, targets=r".*_proj")
    assert any("cross_attn.q_proj" in n for n in names) and any("vision_tower" in n for n in names)
    np.testing.assert_allclose(_logits(model, ours), base, atol=1e-6)  # B = 0
    dense = model.language_model.layers["cross"].cross_attn.k_proj
    dense.lora_b.set_value(jnp.ones_like(dense.lora_b.get_value()) * 0.1)
    changed = _logits(model, ours)
    assert np.abs(changed - base).max() > 1e-3
    merged = hf_tensors(model)["model.language_model.layers.1.cross_attn.k_proj.weight"]
    assert not np.allclose(merged, hf_tensors(load_pretrained(folder))[
        "model.language_model.layers.1.cross_attn.k_proj.weight"])


@pytest.mark.slow
def test_pipeline_finetune_and_eval(tmp_path):
    """The demo pipeline with a narrow Mllama at Llama-3.2-11B-Vision's image geometry (560 px tiles, patch 14,
    up to 4 tiles: 1601 vision tokens per tile, 4 tiles for the 1120 px pictures) and the llama-3.2-vision
    template: finetune + eval write finite logs."""
    import json

    from tests.test_pipeline import _first_picture_inputs, _main

    shape = "--config.model.tiny_shape."
    _main(tmp_path, "--config.model.template=llama-3.2-vision", f"{shape}architecture=mllama",
          "--config.stages=finetune,eval", "--config.data.synthetic_identities=5",
          "--config.data.synthetic_image_size=1120", "--config.finetune.num_steps=2",
          "--config.retain_model.num_steps=1", "--config.finetune.batch_size=4", "--config.retain_model.batch_size=4",
          "--config.eval.batch_size=8", "--config.eval.max_new_tokens=2", f"{shape}hidden_size=32",
          f"{shape}intermediate_size=64", f"{shape}vision_hidden_size=16", f"{shape}vision_heads=1",
          f"{shape}vision_layers=1", f"{shape}vocab_size=512", f"{shape}image_size=560", f"{shape}patch_size=14",
          f"{shape}max_tiles=4")
    base = json.loads((tmp_path / "models" / "base" / "config.json").read_text())
    assert base["model_type"] == "mllama"
    vision = base["vision_config"]
    assert (vision["image_size"], vision["patch_size"], vision["max_num_tiles"]) == (560, 14, 4)
    assert _first_picture_inputs(tmp_path)["pixel_values"].shape == (4, 3, 560, 560)
    for name in ("finetuned", "retain_model"):
        losses = [json.loads(line)["loss"] for line in (tmp_path / "train" / name / "metrics.jsonl").open()]
        assert len(losses) == {"finetuned": 2, "retain_model": 1}[name] and np.isfinite(losses).all()
        logs = json.loads((tmp_path / "eval_results" / name / "eval_log_aggregated.json").read_text())
        forget = logs["eval_forget_log.json"]
        n = len(forget["avg_gt_loss"])
        assert n > 0 and len(forget["generated_text"]) == n
        assert all(np.isfinite(v) for v in forget["avg_gt_loss"].values())
        assert logs["eval_retain_log.json"]["avg_gt_loss"]


def test_hub_layout_loads_identically(tiny, tmp_path):
    """meta-llama's published layout (language_model.model.*, vision_model.*, ...) loads like transformers-5's."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder, _ = tiny
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    tensors = load_file(old / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("model.language_model.", "language_model.model.").replace("model.vision_model.", "vision_model.")
        k = k.replace("model.multi_modal_projector.", "multi_modal_projector.")
        renamed["language_model.lm_head.weight" if k == "lm_head.weight" else k] = v
    assert "language_model.lm_head.weight" in renamed and "vision_model.class_embedding" in renamed
    save_file(renamed, old / "model.safetensors")
    ours, _ = tiny_batch(ROWS)
    np.testing.assert_array_equal(_logits(load_pretrained(old), ours), _logits(load_pretrained(folder), ours))


def test_sharded_scoring_and_generation_match_single_device(tiny):
    from vlmu_jax.models.sharding import global_batch, make_mesh

    folder, _ = tiny
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ours, _ = tiny_batch(ROWS, padding="left", seed=5)
    single = load_pretrained(folder)
    sharded = load_pretrained(folder, mesh=mesh)
    kernel = sharded.language_model.layers["cross"].cross_attn.q_proj.kernel.get_value()
    assert len(kernel.sharding.device_set) == 8 and any(s is not None for s in kernel.sharding.spec)
    inputs = global_batch(ours, mesh)
    with jax.set_mesh(mesh):
        got = _logits(sharded, inputs)
    np.testing.assert_allclose(got, _logits(single, ours), atol=1e-5)
    # the vision towers' valid-first path (its gathers over batch-sharded tokens) too
    with pytest.MonkeyPatch.context() as patch, jax.set_mesh(mesh):
        patch.setattr("vlmu_jax.models.mllama_vision.reorder_tokens", lambda impl, dtype: True)
        np.testing.assert_allclose(_logits(sharded, inputs), got, atol=1e-5)
    kw = dict(max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    want = np.asarray(generate(single, ours["input_ids"], ours["attention_mask"], ours["images"], **kw))
    got = generate(sharded, inputs["input_ids"], inputs["attention_mask"], inputs["images"], **kw)
    np.testing.assert_array_equal(np.asarray(got), want)
