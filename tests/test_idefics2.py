"""Idefics2: image processor, logits, greedy generation and checkpoint round trip equal transformers'; LoRA
forward; batching's image-token expansion with image splitting.

Tiny config: SigLIP 28px/7px-patch position grid (4x4) fed images of up to 42x42 (6x6 patches) so the
fractional position bucketing and the patch padding mask are exercised; a 2-layer perceiver with 4 latents;
a Mistral LM with a sliding window shorter than the sequences.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Idefics2Config, Idefics2ForConditionalGeneration
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

from tests.tiny_models import causal_without_mask
from vlmu_jax.checkpoints.hf_export import export_hf
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.data.images import image_processor
from vlmu_jax.eval.generate import generate
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.stages import logps_fn
from vlmu_jax.unlearn.trainer import joined_logps

VOCAB, PAD, BOS, EOS = 256, 0, 1, 2
IMAGE, FAKE = 250, 251
LATENTS = 4
PROC = {"size": {"shortest_edge": 14, "longest_edge": 42}, "resample": 2, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3}


def _hf_config() -> Idefics2Config:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7, initializer_range=0.2)
    perceiver = dict(hidden_size=32, rms_norm_eps=1e-5, resampler_n_latents=LATENTS, resampler_depth=2,
                     resampler_n_heads=4, resampler_head_dim=8, num_key_value_heads=2, initializer_range=0.2)
    text = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=EOS, initializer_range=0.2, max_position_embeddings=128, sliding_window=12,
                rms_norm_eps=1e-5)
    return Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text, image_token_id=IMAGE,
                          tie_word_embeddings=False)


def _save(folder: Path, seed: int = 0) -> tuple[Path, Idefics2ForConditionalGeneration]:
    torch.manual_seed(seed)
    hf = Idefics2ForConditionalGeneration(_hf_config()).eval()
    with torch.no_grad():  # HF initialises latents to ones; randomise so the test sees them
        hf.model.connector.perceiver_resampler.latents.normal_()
    hf.save_pretrained(folder)
    return Path(folder), hf


def _image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _batch(sizes: list[tuple[int, int] | None], lengths: list[int], *, split: bool, padding: str, seed: int = 0):
    """Rows BOS + [image tokens] + random text; ours from our processor (fixed padding), HF's from
    transformers' processor (per-batch padding, zero image for a text-only row)."""
    rng = np.random.default_rng(seed)
    cfg = {**PROC, "image_processor_type": "Idefics2ImageProcessor", "do_image_splitting": split}
    ours_proc = image_processor(cfg)
    hf_proc = Idefics2ImageProcessorPil(**PROC, do_image_splitting=split)
    images = [None if s is None else _image(rng, *s) for s in sizes]
    run = ours_proc.image_token_ids(IMAGE, LATENTS, _FakeTokenizer())
    rows = []
    for im, n in zip(images, lengths, strict=True):
        img = [FAKE, *run, FAKE] if im is not None else []
        rows.append([BOS, *img, *rng.integers(3, IMAGE, n).tolist()])
    t = max(len(r) for r in rows)
    ids, mask = np.full((len(rows), t), PAD, np.int32), np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding == "right" else slice(t - len(r), t)
        ids[i, sl], mask[i, sl] = r, 1
    ours = [ours_proc.blank() if im is None else ours_proc(im) for im in images]
    ours = {k: np.stack([o[k] for o in ours]) for k in ours[0]}
    real = hf_proc(images=[[im] for im in images if im is not None])
    pv, pm = np.asarray(real["pixel_values"]), np.asarray(real["pixel_attention_mask"])
    hf_pv = np.zeros((len(rows), *pv.shape[1:]), np.float32)
    hf_pm = np.zeros((len(rows), *pm.shape[1:]), np.int64)
    j = 0
    for i, im in enumerate(images):
        if im is not None:
            hf_pv[i], hf_pm[i], j = pv[j], pm[j], j + 1
    hf = dict(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
              pixel_values=torch.tensor(hf_pv), pixel_attention_mask=torch.tensor(hf_pm))
    return {"input_ids": ids, "attention_mask": mask, "images": ours}, hf


class _FakeTokenizer:
    unk_token_id = 3

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<fake_token_around_image>": FAKE}[token]


@pytest.mark.parametrize("w,h", [(50, 50), (200, 120), (33, 150), (42, 42), (10, 12), (300, 97)])
@pytest.mark.parametrize("split", [False, True])
def test_processor_matches_transformers(w, h, split):
    rng = np.random.default_rng(w * h)
    cfg = {**PROC, "image_processor_type": "Idefics2ImageProcessor", "do_image_splitting": split}
    for im in (_image(rng, w, h), Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")):
        want = Idefics2ImageProcessorPil(**PROC, do_image_splitting=split)(images=[[im]])
        got = image_processor(cfg)(im)
        pv, pm = np.asarray(want["pixel_values"])[0], np.asarray(want["pixel_attention_mask"])[0]
        assert got["pixel_values"].shape == (5 if split else 1, 3, 42, 42)
        for n in range(pv.shape[0]):
            m = pm[n].astype(bool)
            rh, rw = m.sum(0).max(), m.sum(1).max()
            np.testing.assert_array_equal(got["pixel_attention_mask"][n][: pm.shape[1], : pm.shape[2]], pm[n])
            assert got["pixel_attention_mask"][n].sum() == pm[n].sum()
            np.testing.assert_allclose(got["pixel_values"][n][:, :rh, :rw], pv[n][:, :rh, :rw], atol=1e-5, rtol=0)
            assert not got["pixel_values"][n][:, rh:, :].any() and not got["pixel_values"][n][:, :, rw:].any()


def _logits(model, batch) -> np.ndarray:
    hidden = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                   {k: jnp.asarray(v) for k, v in batch["images"].items()})
    return np.asarray(hidden @ model.head_weight().T)


@pytest.mark.parametrize("split", [False, True])
def test_logits_match_transformers(tmp_path, split):
    folder, hf = _save(tmp_path / "m")
    sizes = [(40, 23), None, (13, 42), (30, 30)]
    ours, hf_in = _batch(sizes, [9, 6, 3, 5], split=split, padding="right")
    assert hf_in["pixel_values"].shape[-1] < ours["images"]["pixel_values"].shape[-1]  # we pad further
    with torch.no_grad():
        want = hf(**hf_in).logits.numpy()
    valid = ours["attention_mask"] == 1
    assert np.ptp(want[valid]) > 2.0
    model = load_pretrained(folder)
    np.testing.assert_allclose(_logits(model, ours)[valid], want[valid], atol=1e-4, rtol=0)
    if not split:
        unrolled = load_pretrained(folder, scan_layers=False, remat="full")
        np.testing.assert_allclose(_logits(unrolled, ours)[valid], want[valid], atol=1e-4, rtol=0)


def test_joined_streams_score_as_separate(tmp_path):
    """The trainer joins same-shape streams into one batch (images, pixel masks and all) and splits the result:
    each stream's log-probs are those of its own pass."""
    folder, _ = _save(tmp_path / "m")
    model = load_pretrained(folder)
    streams = {}
    for name, seed in (("forget", 0), ("retain", 1)):
        batch, _ = _batch([(40, 23), None, (30, 30)], [6, 9, 4], split=False, padding="right", seed=seed)
        streams[name] = {**batch, "labels": np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)}
    calls = []

    def counted(m, b):
        calls.append(len(b["input_ids"]))
        return logps_fn(m, b)

    joined = joined_logps(model, streams, 0, counted, join=set(streams))
    assert calls == [6]
    for name, batch in streams.items():
        want, mask = logps_fn(model, batch)
        np.testing.assert_allclose(np.asarray(joined[name][0]), np.asarray(want), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(joined[name][1]), np.asarray(mask))


def test_logits_match_transformers_without_padded_patches(tmp_path):
    """Images that fill the padded size leave no patch padded (the vision tower's real-first reorder is the
    identity and every image's real-patch count is the whole grid) and match transformers."""
    folder, hf = _save(tmp_path / "m")
    ours, hf_in = _batch([(42, 42), (42, 42), None], [6, 3, 5], split=False, padding="right")
    assert ours["images"]["pixel_attention_mask"][:2].all()  # the blank row gets a full dummy mask
    with torch.no_grad():
        want = hf(**hf_in).logits.numpy()
    valid = ours["attention_mask"] == 1
    np.testing.assert_allclose(_logits(load_pretrained(folder), ours)[valid], want[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fused_causal", [False, True], ids=["masked", "fused_causal"])
def test_greedy_generation_matches_transformers(tmp_path, sliced, fused_causal, monkeypatch):
    """Also with the prefill's attention run mask-free, as cuDNN's causal kernel runs it on GPU. Mistral's sliding
    window (12 here, shorter than the prompts) makes decoding count cache slots: the prefill must hand back the
    prompt's slot order."""
    if fused_causal:
        causal_without_mask(monkeypatch)
    folder, hf = _save(tmp_path / "m", seed=1)
    ours, hf_in = _batch([(30, 20), None, (42, 17)], [7, 2, 4], split=False, padding="left", seed=1)
    new = 10
    with torch.no_grad():
        ref = hf.generate(**hf_in, max_new_tokens=new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    ref = ref[:, ours["input_ids"].shape[1] :].numpy()
    ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])), constant_values=PAD)
    got = generate(load_pretrained(folder), ours["input_ids"], ours["attention_mask"], ours["images"],
                   max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("fused_causal", [False, True], ids=["masked", "fused_causal"])
def test_continuations_over_a_sliding_window_score_as_whole_rows(tmp_path, fused_causal, monkeypatch):
    """Shared-prompt scoring (eval/scoring.py): a prompt's K answers run at once over its cache. With Mistral's
    12-token window shorter than prompt + answer, each answer token's log-prob is the one of its whole row
    (prompt left-padded, answer after it) scored by the model's forward, which matches transformers (above)."""
    from vlmu_jax.eval.scoring import continuation_logprobs

    if fused_causal:
        causal_without_mask(monkeypatch)
    folder, _ = _save(tmp_path / "m", seed=2)
    model = load_pretrained(folder)
    prompts, _ = _batch([(30, 20), None, (42, 17)], [7, 2, 4], split=False, padding="left", seed=2)
    rng = np.random.default_rng(3)
    b, k, c = 3, 3, 16
    lengths = np.array([[14, 5, 1], [16, 9, 3], [2, 12, 7]])
    cont = np.full((b, k, c), PAD, np.int32)
    cmask = (np.arange(c) < lengths[..., None]).astype(np.int32)
    cont[cmask == 1] = rng.integers(3, IMAGE, int(cmask.sum()))
    images = {n: jnp.asarray(v) for n, v in prompts["images"].items()}
    got = continuation_logprobs(model, jnp.asarray(prompts["input_ids"]), jnp.asarray(prompts["attention_mask"]),
                                images, jnp.asarray(cont), jnp.asarray(cmask))[0]
    p = prompts["input_ids"].shape[1]
    for j in range(k):
        whole = {"input_ids": np.concatenate([prompts["input_ids"], cont[:, j]], axis=1),
                 "attention_mask": np.concatenate([prompts["attention_mask"], cmask[:, j]], axis=1),
                 "images": prompts["images"]}
        logits = _logits(model, whole)[:, p - 1: p + c - 1]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        want = np.take_along_axis(logp, cont[:, j, :, None], axis=-1)[..., 0]
        m = cmask[:, j] == 1
        np.testing.assert_allclose(np.asarray(got)[:, j][m], want[m], atol=2e-4, rtol=0)


def test_export_roundtrip_bit_identical(tmp_path):
    folder, hf = _save(tmp_path / "src")
    out = export_hf(load_pretrained(folder), tmp_path / "out")
    back = Idefics2ForConditionalGeneration.from_pretrained(out)
    sa, sb = hf.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_lora_forward(tmp_path):
    folder, _ = _save(tmp_path / "m")
    ours, _ = _batch([(30, 30), None], [5, 4], split=False, padding="right")
    model = load_pretrained(folder)
    base = _logits(model, ours)
    names = apply_lora(model, rank=2, alpha=4.0, targets=r".*_proj|.*fc\d", seed=0)
    assert {n.split(".")[0] for n in names} == {"vision_tower", "multi_modal_projector", "language_model"}
    np.testing.assert_allclose(_logits(model, ours), base, atol=1e-6)  # B = 0: identity
    for _, dense in [(n, d) for n, d in _dense(model)]:
        dense.lora_b.set_value(0.1 * np.ones(dense.lora_b.get_value().shape, np.float32))
    assert np.abs(_logits(model, ours) - base).max() > 1e-2


def _dense(model):
    from vlmu_jax.models.lora import _dense_modules

    return [(n, d) for n, d in _dense_modules(model, ".*") if d.lora_b is not None]


def test_split_image_expansion_and_labels(tmp_path):
    """With image splitting, the template's <fake><image><fake> becomes <fake>(<image>*n<fake>)*5 (as
    transformers' processor writes it); image tokens never carry labels; generation prompts expand alike."""
    from vlmu_jax.data import synthetic
    from vlmu_jax.data.batching import IGNORE, Example, TextConfig, encode, generation_rows
    from vlmu_jax.data.records import ImageRef
    from vlmu_jax.data.templates import get_template, load_tokenizer, train_demo_tokenizer

    template = get_template("idefics2")
    train_demo_tokenizer(synthetic.corpus(synthetic.make_benchmark(4, 1, 16, "mllmu")), tmp_path, 400, template)
    tok = load_tokenizer(tmp_path)
    image_id, fake = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<fake_token_around_image>")
    proc = image_processor({**PROC, "image_processor_type": "Idefics2ImageProcessor", "do_image_splitting": True})
    seq = proc.image_token_ids(image_id, LATENTS, tok)
    cfg = TextConfig(tok, template, image_id, LATENTS, train_on_prompt=True, image_tokens=seq)
    ex = Example("What is the job of Ada Moss?", "Works as a baker.", ImageRef(data=b""))
    row = encode(ex, cfg)
    ids = row.input_ids.tolist()
    start = ids.index(image_id) - 1
    want = [fake]
    for _ in range(5):
        want += [image_id] * LATENTS + [fake]
    assert ids[start : start + len(want)] == want and ids.count(image_id) == 5 * LATENTS
    assert ((row.labels == IGNORE) == (row.input_ids == image_id)).all()
    prompt = generation_rows([ex], cfg)[0].input_ids.tolist()
    assert prompt[start : start + len(want)] == want
    assert proc.blank()["pixel_values"].shape == (5, 3, 42, 42)


def test_mllmu_image_splitting_per_stage():
    """MLLMU-Bench's training scripts build Idefics2's processor with do_image_splitting=False, eval.py with the
    checkpoint's own setting (protocol original); protocol corrected turns splitting off in every stage."""
    from configs.mllmu_idefics2 import get_config
    from vlmu_jax.protocol import resolve

    c = get_config("npo")
    assert c.model.template == "idefics2" and c.unlearn.objective == "npo"
    original = resolve(c)
    assert original.image_processor_overrides("train") == {"do_image_splitting": False}
    assert original.image_processor_overrides("eval") == {}
    c.unlock()
    c.protocol = "corrected"
    assert resolve(c).image_processor_overrides("eval") == {"do_image_splitting": False}


def test_mllmu_pipeline_on_tiny_idefics2(tmp_path):
    """`python -m vlmu_jax.main` on the MLLMU format with a tiny Idefics2 (demo tokenizer, idefics2 template):
    finetune trains (finite, logged loss) and eval writes MLLMU's four result sets."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "vlmu_jax.main", "--config", "configs/demo.py:ci", "--workdir", str(workdir),
           "--config.benchmark=mllmu", "--config.model.template=idefics2",
           "--config.model.tiny_shape.architecture=idefics2", "--config.data.synthetic_identities=8",
           "--config.data.forget_ratio=10", "--config.finetune.num_steps=2", "--config.retain_model.num_steps=2",
           "--config.eval.max_new_tokens=2", "--config.stages=finetune,eval"]
    result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    hf_config = json.loads((workdir / "models" / "base" / "config.json").read_text())
    assert hf_config["model_type"] == "idefics2"
    for name in ("finetuned", "retain_model"):
        losses = [json.loads(line)["loss"] for line in (workdir / "train" / name / "metrics.jsonl").open()]
        assert len(losses) == 2 and np.isfinite(losses).all()
        res = json.loads((workdir / "eval_results" / name / "final_evaluation_results.json").read_text())
        assert res.pop("protocol")["few_shot_ids"]["forget/fill_in_the_blank"]  # eval.py's draws, one identity
        assert set(res) == {"Forget Set Results", "Test Set Results", "Retain Set (shared dataset) Results",
                            "Retain Set (real person) Results"}
        for groups in res.values():
            assert set(groups) >= {"classification", "fill_in_the_blank", "generation"}


def test_sharded_load_matches_single_device(tmp_path, sliced):
    """Params split over (fsdp, tensor) by their logical axes and rows over (data, fsdp): same logits and
    greedy tokens as one device."""
    import jax

    from vlmu_jax.models.sharding import global_batch, make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    folder, _ = _save(tmp_path / "m")
    ours, _ = _batch([(40, 23), None, (13, 42), (30, 30)], [5, 3, 2, 4], split=False, padding="left")
    single = load_pretrained(folder)
    sharded = load_pretrained(folder, mesh=mesh)
    kernel = sharded.multi_modal_projector.perceiver_resampler.layers.self_attn.q_proj.kernel.get_value()
    assert len(kernel.sharding.device_set) == 8 and any(s is not None for s in kernel.sharding.spec)
    inputs = global_batch(ours, mesh)
    want = _logits(single, ours)
    got = np.asarray(jax.jit(lambda b: sharded(b["input_ids"], b["attention_mask"], b["images"]))(inputs)
                     @ np.asarray(sharded.head_weight()).T)
    valid = ours["attention_mask"] == 1
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    kw = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    ref = np.asarray(generate(single, ours["input_ids"], ours["attention_mask"], ours["images"], **kw))
    out = generate(sharded, inputs["input_ids"], inputs["attention_mask"], inputs["images"], **kw)
    np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.slow
def test_pipeline_at_idefics2_8b_sequence_shape(tmp_path):
    """FIUBench's finetune + eval with a narrow Idefics2 at idefics2-8b's sequence shape: 980 px images, image
    splitting (asked for on the command line, a key the demo config does not have), 64 perceiver latents per crop,
    so 5 x 64 = 320 image tokens per row, under an eval image cap of 200 MB (three rows of five crops a batch). The
    tower's patches are 70 px rather than the 8b's 14 (4900 patches a crop, whose XLA attention scores this CPU
    would hold per crop); the LM's rows and the image inputs are the real ones."""
    import json

    from tests.test_pipeline import _first_picture_inputs, _main

    shape = "--config.model.tiny_shape."
    log = _main(tmp_path, "--config.model.template=idefics2", f"{shape}architecture=idefics2",
                f"{shape}image_size=980", f"{shape}patch_size=70", f"{shape}perceiver_latents=64",
                "--config.model.image_processor_overrides.do_image_splitting=true",
                "--config.data.synthetic_identities=10", "--config.finetune.num_steps=2",
                "--config.retain_model.num_steps=1", "--config.finetune.batch_size=4",
                "--config.retain_model.batch_size=4", "--config.eval.max_new_tokens=2",
                "--config.eval.max_batch_image_mb=200", "--config.stages=finetune,eval")
    # 320 image tokens and the question's text: every training row pads to 384 (the demo's max_length is 128)
    assert "finetuned: one length 384" in log and "retain_model: one length 384" in log
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["model"]["image_processor_overrides"] == {"do_image_splitting": True}
    base = json.loads((tmp_path / "models" / "base" / "config.json").read_text())
    assert base["perceiver_config"]["resampler_n_latents"] == 64 and base["vision_config"]["image_size"] == 980
    inputs = _first_picture_inputs(tmp_path, resolved["model"]["image_processor_overrides"])
    assert inputs["pixel_values"].shape == (5, 3, 980, 980)
    for name in ("finetuned", "retain_model"):
        logs = json.loads((tmp_path / "eval_results" / name / "eval_log_aggregated.json").read_text())
        forget = logs["eval_forget_log.json"]
        assert len(forget["avg_gt_loss"]) > 0 and len(forget["generated_text"]) == len(forget["avg_gt_loss"])
        assert np.isfinite(list(forget["avg_gt_loss"].values())).all()
