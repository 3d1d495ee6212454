"""Qwen2-VL and Qwen2.5-VL: image processor, per-token log-probs, greedy generation and checkpoint round trip equal
transformers'; sharded = single device; per-image token counts in batching; the pipeline on a tiny Qwen2.5-VL.

Tiny config: 4 px patches (merge blocks of 8 px) so images of a few dozen pixels give grids of several merge
blocks; Qwen2.5's 16 px windows (2x2 merged patches) split those grids into several windows, one block of two
uses full attention; M-RoPE sections (1, 1, 2) over head_dim 8. Rows put text before and after the image so the
3D positions' offsets and the rope delta matter, and each batch mixes two image sizes and a text-only row.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmu_jax.checkpoints.hf_export import export_hf
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.data.images import image_processor
from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.scoring import compute_token_logprobs

VOCAB, PAD, EOS = 256, 0, 2
IMAGE, VIDEO, V_START, V_END = 250, 251, 252, 253
PROC = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2,
        "size": {"shortest_edge": 8 * 8, "longest_edge": 48 * 48}}
SIZES = [(40, 23), None, (17, 30)]  # (width, height): two grids and a text-only row


def _hf_model(family: str):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.2, rms_norm_eps=1e-5,
                pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START,
               vision_end_token_id=V_END)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=4,
                      window_size=16, fullatt_block_indexes=[1], initializer_range=0.2)
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                  initializer_range=0.2)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (checkpoint folder, HF model), each saved once for the module."""
    out = {}
    for seed, family in enumerate(("qwen2_5_vl", "qwen2_vl")):
        torch.manual_seed(seed)
        hf = _hf_model(family).eval()
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        out[family] = (Path(folder), hf)
    return out


def _image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _processors():
    return image_processor({**PROC, "image_processor_type": "Qwen2VLImageProcessor"}), Qwen2VLImageProcessorPil(**PROC)


def _batch(lengths: list[int], *, padding: str, seed: int = 0):
    """Rows: 2 text tokens, <vision_start> image tokens <vision_end> (image rows), then random text. Ours from our
    processor (fixed patch padding), HF's from transformers' (ragged patches, grids of image rows only)."""
    rng = np.random.default_rng(seed)
    ours_proc, hf_proc = _processors()
    images = [None if s is None else _image(rng, *s) for s in SIZES]
    rows = []
    for im, n in zip(images, lengths, strict=True):
        img = [] if im is None else [V_START, *[IMAGE] * ours_proc.image_token_count(im), V_END]
        rows.append([*rng.integers(3, IMAGE, 2).tolist(), *img, *rng.integers(3, IMAGE, n).tolist()])
    t = max(len(r) for r in rows)
    ids, mask = np.full((len(rows), t), PAD, np.int32), np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding == "right" else slice(t - len(r), t)
        ids[i, sl], mask[i, sl] = r, 1
    ours = [ours_proc.blank() if im is None else ours_proc(im) for im in images]
    ours = {k: np.stack([o[k] for o in ours]) for k in ours[0]}
    real = hf_proc(images=[im for im in images if im is not None])
    hf = dict(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
              pixel_values=torch.tensor(np.asarray(real["pixel_values"])),
              image_grid_thw=torch.tensor(np.asarray(real["image_grid_thw"])),
              mm_token_type_ids=torch.tensor(ids == IMAGE).int())
    return {"input_ids": ids, "attention_mask": mask, "images": ours}, hf


def _hf_logprobs(hf, hf_in) -> np.ndarray:
    with torch.no_grad():
        logits = hf(**hf_in).logits.float()
    ids = hf_in["input_ids"]
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].numpy()


@nnx.jit
def _jit_logprobs(model, input_ids, attention_mask, images):
    return compute_token_logprobs(model, input_ids, attention_mask, images)


def _ours_logprobs(model, batch) -> np.ndarray:
    """Jitted: one compile per model structure beats op-by-op dispatch of the scans here."""
    return np.asarray(_jit_logprobs(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                                    jax.tree.map(jnp.asarray, batch["images"])))


@pytest.mark.parametrize("w,h", [(40, 23), (17, 30), (9, 9), (200, 120), (33, 150)])
def test_processor_matches_transformers(w, h):
    ours_proc, hf_proc = _processors()
    im = _image(np.random.default_rng(w * h), w, h)
    want = hf_proc(images=[im])
    got = ours_proc(im)
    grid = np.asarray(want["image_grid_thw"])[0]
    np.testing.assert_array_equal(got["image_grid_thw"], grid)
    n = int(np.prod(grid))
    assert ours_proc.image_token_count(im) == n // 4 and got["pixel_values"].shape == (ours_proc.max_patches, 96)
    np.testing.assert_allclose(got["pixel_values"][:n], np.asarray(want["pixel_values"]), atol=1e-5, rtol=0)
    assert not got["pixel_values"][n:].any()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_logprobs_match_transformers(tiny, family):
    """Right and left padding, two image sizes and a text-only row in one batch; and the unrolled + remat path."""
    folder, hf = tiny[family]
    model = load_pretrained(folder)
    for padding in ("right", "left"):
        ours, hf_in = _batch([7, 5, 3], padding=padding)
        want, got = _hf_logprobs(hf, hf_in), _ours_logprobs(model, ours)
        valid = (ours["attention_mask"][:, 1:] == 1) & (ours["attention_mask"][:, :-1] == 1)
        assert np.ptp(want[valid]) > 2.0
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    unrolled = load_pretrained(folder, scan_layers=False, remat="full")
    np.testing.assert_allclose(_ours_logprobs(unrolled, ours)[valid], want[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_greedy_generation_matches_transformers(tiny, family, sliced):
    folder, hf = tiny[family]
    ours, hf_in = _batch([4, 2, 6], padding="left", seed=1)
    new = 8
    with torch.no_grad():
        ref = hf.generate(**hf_in, max_new_tokens=new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    ref = ref[:, ours["input_ids"].shape[1] :].numpy()
    ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])), constant_values=PAD)
    got = generate(load_pretrained(folder), ours["input_ids"], ours["attention_mask"], ours["images"],
                   max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_export_roundtrip_bit_identical(tiny, family, tmp_path):
    folder, hf = tiny[family]
    out = export_hf(load_pretrained(folder), tmp_path / "out")
    back = type(hf).from_pretrained(out)
    sa, sb = hf.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_lora_targets_every_tower(tiny):
    """MLLMU's LoRA targets reach the vision MLPs, the merger and the LM; B = 0 is the identity, and an adapter on
    the merger changes the log-probs."""
    from vlmu_jax.models.lora import apply_lora

    model = load_pretrained(tiny["qwen2_5_vl"][0])
    ours, _ = _batch([7, 5, 3], padding="right")  # the parity test's shapes: its compiled base is reused
    base = _ours_logprobs(model, ours)
    names = apply_lora(model, rank=2, alpha=4.0, targets=r".*_proj|.*fc\d|.*linear_\d")
    assert {n.split(".")[0] for n in names} == {"vision_tower", "multi_modal_projector", "language_model"}
    np.testing.assert_allclose(_ours_logprobs(model, ours), base, atol=1e-6)
    dense = model.multi_modal_projector.linear_2
    dense.lora_b.set_value(0.1 * jnp.ones_like(dense.lora_b.get_value()))
    assert np.abs(_ours_logprobs(model, ours) - base).max() > 1e-3


def test_hub_layout_loads_identically(tiny, tmp_path):
    """Qwen's published layout (flat text config, rope_scaling type "mrope", visual.* and model.layers.* tensors)
    loads like transformers-5's."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    folder, _ = tiny["qwen2_5_vl"]
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    config = json.loads((old / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update(text, model_type="qwen2_5_vl", rope_theta=rope["rope_theta"],
                  rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    (old / "config.json").write_text(json.dumps(config))
    tensors = load_file(old / "model.safetensors")
    renamed = {k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v
               for k, v in tensors.items()}
    assert "visual.merger.mlp.0.weight" in renamed and "model.layers.0.self_attn.q_proj.bias" in renamed
    save_file(renamed, old / "model.safetensors")
    ours, _ = _batch([7, 5, 3], padding="right")  # the parity test's shapes: its compiled base is reused
    np.testing.assert_array_equal(_ours_logprobs(load_pretrained(old), ours),
                                  _ours_logprobs(load_pretrained(folder), ours))


def test_sharded_matches_single_device(tiny, sliced):
    """Params split over (fsdp, tensor) by their logical axes and rows over (data, fsdp): same log-probs and
    greedy tokens as one device."""
    from vlmu_jax.models.sharding import global_batch, make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    folder, _ = tiny["qwen2_5_vl"]
    ours, _ = _batch([5, 3, 4], padding="left")
    ours = {k: (jax.tree.map(lambda a: np.concatenate([a, a[:1]]), v)) for k, v in ours.items()}  # 4 rows
    single, sharded = load_pretrained(folder), load_pretrained(folder, mesh=mesh)
    kernel = sharded.vision_tower.layers.attn.qkv.kernel.get_value()
    assert len(kernel.sharding.device_set) == 8 and any(s is not None for s in kernel.sharding.spec)
    inputs = global_batch(ours, mesh)
    want = _ours_logprobs(single, ours)
    got = np.asarray(jax.jit(lambda b: compute_token_logprobs(sharded, b["input_ids"], b["attention_mask"],
                                                               b["images"]))(inputs))
    valid = ours["attention_mask"][:, 1:] == 1
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    kw = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    ref = np.asarray(generate(single, ours["input_ids"], ours["attention_mask"], ours["images"], **kw))
    out = generate(sharded, inputs["input_ids"], inputs["attention_mask"], inputs["images"], **kw)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_image_token_count_follows_each_image(tmp_path):
    """The qwen template's one <|image_pad|> becomes as many image tokens as the image has merged patches, in
    training rows and generation prompts alike; image tokens never carry labels."""
    import io

    from vlmu_jax.data import synthetic
    from vlmu_jax.data.batching import IGNORE, Example, checkpoint_text_config, encode, generation_rows
    from vlmu_jax.data.records import ImageRef
    from vlmu_jax.data.templates import get_template, load_tokenizer, train_demo_tokenizer
    from vlmu_jax.models.registry import model_config

    template = get_template("qwen2-vl")
    train_demo_tokenizer(synthetic.corpus(synthetic.make_benchmark(4, 1, 16, "fiubench")), tmp_path, 400, template)
    tok = load_tokenizer(tmp_path)
    image_id = tok.convert_tokens_to_ids(template.image_token)
    hf_config = {**_hf_model("qwen2_5_vl").config.to_dict(), "image_token_id": image_id}
    proc, _ = _processors()
    cfg = checkpoint_text_config(tok, template, model_config(hf_config), proc)
    for (w, h), count in (((40, 23), 15), ((17, 30), 8)):
        buf = io.BytesIO()
        _image(np.random.default_rng(0), w, h).save(buf, format="PNG")
        ex = Example("Who is this?", "Ada Moss.", ImageRef(data=buf.getvalue()))
        row = encode(ex, cfg)
        assert (row.input_ids == image_id).sum() == count
        assert ((row.labels == IGNORE) | (row.input_ids != image_id)).all()
        assert (generation_rows([ex], cfg)[0].input_ids == image_id).sum() == count
    assert (encode(Example("Who?", "Ada.", None), cfg).input_ids == image_id).sum() == 0


# Qwen2.5-VL at the presets' image cap (max_pixels = 512 merged tokens): 640 px pictures become 616 px, 44 x 44
# patches, 22 x 22 = 484 image tokens a row (every training row then pads to 576); Qwen2-VL at the tiny shape.
REAL_SHAPE = ["--config.data.synthetic_image_size=640", "--config.model.tiny_shape.patch_size=14",
              "--config.model.image_processor_overrides.max_pixels=401408", "--config.eval.batch_size=8"]


@pytest.mark.parametrize(("family", "shape"), [("qwen2_5_vl", REAL_SHAPE), ("qwen2_vl", [])])
def test_pipeline_on_tiny_qwen(tmp_path, family, shape):
    """`python -m vlmu_jax.main` (demo, reduced) with a narrow Qwen2.5-VL or Qwen2-VL and the qwen template:
    finetune trains (finite logged losses) and eval writes FIUBench's results; Qwen2.5-VL at the presets' real
    sequence shape."""
    import json

    from tests.test_pipeline import _first_picture_inputs, _main

    workdir = tmp_path / "w"
    log = _main(workdir, "--config.model.template=qwen2-vl", f"--config.model.tiny_shape.architecture={family}",
                f"--config.data.synthetic_identities={5 if shape else 8}", "--config.finetune.num_steps=2",
                "--config.retain_model.num_steps=2", "--config.eval.max_new_tokens=2",
                "--config.stages=finetune,eval", *shape)
    hf_config = json.loads((workdir / "models" / "base" / "config.json").read_text())
    assert hf_config["model_type"] == family
    for name in ("finetuned", "retain_model"):
        losses = [json.loads(line)["loss"] for line in (workdir / "train" / name / "metrics.jsonl").open()]
        assert len(losses) == 2 and np.isfinite(losses).all()
        assert list((workdir / "eval_results" / name).glob("*.json"))
    if shape:
        assert "finetuned: one length 576" in log
        assert _first_picture_inputs(workdir, {"max_pixels": 401408})["image_grid_thw"].tolist() == [1, 44, 44]


@pytest.mark.parametrize("name", ["fiubench_qwen2_5_vl", "mllmu_qwen2_vl"])
def test_presets_cap_image_size(name):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config("npo")
    assert c.model.template == "qwen2-vl" and c.model.image_processor_overrides.max_pixels == 512 * 28 * 28
    assert c.unlearn.objective == "npo"
