"""LoRA changes log-probs once B != 0; merging gives the same log-probs and the same HF export."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from tests.tiny_models import save_tiny, tiny_batch
from vlmu_jax.checkpoints.hf_export import hf_tensors
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.eval.scoring import token_logprobs
from vlmu_jax.models.lora import apply_lora, merge_lora, trainable_filter


def _logps(model, batch):
    return np.asarray(
        token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["images"])
    )


def _randomize_b(model):
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, new))


@pytest.mark.parametrize("text", ["llama", "phi3"])
def test_lora_merge_and_export(tmp_path, text):
    folder, _ = save_tiny(tmp_path / text, text)
    batch = tiny_batch([6, 3])
    model = load_pretrained(folder)
    base = _logps(model, batch)
    names = apply_lora(model, rank=4, alpha=8, dropout=0.0, seed=0)
    assert names and all("language_model" in n for n in names)
    assert any(("qkv_proj" if text == "phi3" else "q_proj") in n for n in names)
    np.testing.assert_allclose(_logps(model, batch), base, atol=1e-6)  # B = 0: identity
    _randomize_b(model)
    lora = _logps(model, batch)
    assert np.abs(lora - base).max() > 1e-2
    exported = hf_tensors(model)
    merge_lora(model)
    assert not nnx.state(model, nnx.LoRAParam)
    np.testing.assert_allclose(_logps(model, batch), lora, atol=1e-5)
    merged = hf_tensors(model)
    assert exported.keys() == merged.keys()
    for k in exported:
        np.testing.assert_array_equal(exported[k], merged[k])


def test_trainable_filter_and_dropout(tmp_path):
    folder, _ = save_tiny(tmp_path / "m", "llama")
    model = load_pretrained(folder)
    apply_lora(model, rank=2, alpha=4, dropout=0.5, seed=0)
    trainable = nnx.state(
        model,
        trainable_filter(
            lora=True, tune_vision_tower=False, tune_mm_projector=False, tune_language_model=False
        ),
    )
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(trainable))
    proj = nnx.state(
        model,
        trainable_filter(
            lora=False, tune_vision_tower=False, tune_mm_projector=True, tune_language_model=False
        ),
    )
    assert {p[0] for p, _ in nnx.to_flat_state(proj)} == {"multi_modal_projector"}
    _randomize_b(model)
    batch = tiny_batch([4, 4])
    model.eval()
    a, b = _logps(model, batch), _logps(model, batch)
    np.testing.assert_array_equal(a, b)
    model.train()
    assert np.abs(_logps(model, batch) - a).max() > 1e-3  # dropout active in train mode


def test_lora_keeps_language_model_base_frozen(tmp_path):
    """With LoRA on, tune_language_model switches no base LM weight on (PEFT freezes the base); the projector
    flag still trains the whole projector. Expected count from the HF model's own shapes."""
    folder, hf = save_tiny(tmp_path / "m", "llama")
    model = load_pretrained(folder)
    rank = 2
    apply_lora(model, rank=rank, alpha=4, seed=0)
    trainable = nnx.state(model, trainable_filter(lora=True, tune_mm_projector=True, tune_language_model=True))
    count = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(trainable))
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora_count = sum(rank * (m.in_features + m.out_features) for name, m in hf.named_modules()
                     if "language_model" in name and name.endswith(adapted))
    projector = sum(p.numel() for name, p in hf.named_parameters() if "multi_modal_projector" in name)
    assert count == lora_count + projector


@pytest.mark.parametrize("protocol", ["original", "corrected"])
def test_mllmu_preset_lora_trainable_count(tmp_path, protocol):
    """The MLLMU preset's LoRA on a tiny LLaVA. original: find_all_linear_names + PEFT suffix matching adapt every
    Linear named like a language-model projection (the CLIP tower's q/k/v_proj too; not its out_proj / fc1 / fc2,
    not the projector), A ~ N(0, 1/r); corrected: the language model's projections only, what skipping the vision
    tower and projector means. Only adapters train. Expected counts from the HF model's own modules."""
    import torch

    from vlmu_jax import presets, stages
    from vlmu_jax.protocol import resolve

    c = presets.mllmu(None, template="llava-1.5", model_path="")
    c.unlock()
    c.protocol = protocol
    folder, hf = save_tiny(tmp_path / "m", "llama")
    model = load_pretrained(folder)
    trainable = stages._prepare_trainable(model, c.unlearn, 0, resolve(c))
    flat = nnx.to_flat_state(nnx.state(model, trainable))
    assert all(isinstance(v, nnx.LoRAParam) for _, v in flat)
    lm = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    linear = {n: m for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    adapted = [m for n, m in linear.items() if n.endswith(lm) and (protocol == "original" or "language_model" in n)]
    rank = c.unlearn.lora_rank
    assert sum(int(np.prod(v.get_value().shape)) for _, v in flat) == sum(
        rank * (m.in_features + m.out_features) for m in adapted)
    if protocol == "original":
        clip_layers = hf.config.vision_config.num_hidden_layers
        assert len(adapted) == len(linear) - 3 * clip_layers - 2  # CLIP's out_proj, fc1, fc2; the projector's 2
        a = np.concatenate([np.ravel(v.get_value()) for p, v in flat if p[-1] == "lora_a"])
        assert abs(a.std() - 1 / rank) < 0.1 / rank


def test_fiubench_preset_trainable_set_per_protocol(tmp_path):
    """Unlearning with the FIUBench preset (LoRA r128 a256, projector tuned) on a tiny LLaVA-Phi-3. forget.py's
    target regexes end in `\\.(q|k|v|o|gate|up|down)_proj`, so Phi-3's fused qkv_proj / gate_up_proj get no adapter
    (protocol original); corrected adapts every LM projection. Expected counts from the HF model's shapes."""
    from vlmu_jax import presets, stages
    from vlmu_jax.config_schema import base_config
    from vlmu_jax.protocol import resolve

    folder, hf = save_tiny(tmp_path / "m", "phi3")
    stage = presets.fiubench("ga", template="llava-phi", model_path=str(folder)).unlearn
    rank = stage.lora_rank

    def ours(protocol: str) -> int:
        config = base_config()
        config.protocol = protocol
        model = load_pretrained(folder)
        trainable = stages._prepare_trainable(model, stage, 0, resolve(config))
        return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, trainable)))

    def adapters(suffixes: tuple[str, ...]) -> int:
        return sum(rank * (m.in_features + m.out_features) for name, m in hf.named_modules()
                   if "language_model" in name and name.endswith(suffixes))

    projector = sum(p.numel() for name, p in hf.named_parameters() if "multi_modal_projector" in name)
    assert rank == 128 and adapters((".qkv_proj",)) > 0
    assert ours("original") == adapters((".o_proj", ".down_proj")) + projector
    assert ours("corrected") == adapters((".qkv_proj", ".o_proj", ".gate_up_proj", ".down_proj")) + projector


def test_reference_objective_with_lora_dropout(tmp_path):
    """NPO's LoRA-off reference forward on a model with LoRA dropout (FIUBench's 0.05): the reference draws its
    dropout key inside the gradient trace too, and the first step's policy equals the reference."""
    from vlmu_jax.stages import logps_fn
    from vlmu_jax.unlearn.trainer import TrainConfig, train

    class Fixed:
        def __len__(self):
            return 2

        def get(self, index):
            return batch

    folder, _ = save_tiny(tmp_path / "m", "llama")
    batch = tiny_batch([6, 3])
    batch["labels"] = np.where(batch["attention_mask"] > 0, batch["input_ids"], -100)
    model = load_pretrained(folder)
    apply_lora(model, rank=2, alpha=4, dropout=0.05, seed=0)
    cfg = TrainConfig(objective="npo", lr=1e-3, num_steps=1, beta=0.5, progress=False)
    result = train(model, cfg, sources={"forget": Fixed()}, logps_fn=logps_fn, trainable=nnx.LoRAParam,
                   workdir=tmp_path / "npo")
    assert result.losses[0] == pytest.approx(2 / 0.5 * np.log(2), rel=1e-5)
