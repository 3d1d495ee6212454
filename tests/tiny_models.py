"""Tiny random HF LLaVA models (Llama or Phi-3 LM) and matching batches, shared by the model tests.

initializer_range is raised to 0.2 so log-probs spread over several nats and greedy tokens are decisive.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Phi3Config

IMAGE_TOKEN = 500
VOCAB = 512
PAD, BOS, EOS = 0, 1, 2
IMAGE_SIZE, PATCH = 28, 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def tiny_config(text: str = "llama") -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
        initializer_range=0.2,
    )
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.2,
        max_position_embeddings=64,
    )
    if text == "llama":
        rope = {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 10000.0,
        }
        lm = LlamaConfig(rope_parameters=rope, **common)
    elif text == "phi3":
        lm = Phi3Config(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            **common,
        )
    else:
        raise ValueError(text)
    return LlavaConfig(
        vision_config=vision,
        text_config=lm,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def tiny_hf_model(text: str = "llama", seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_config(text)).eval()


def save_tiny(folder: Path, text: str = "llama", seed: int = 0) -> tuple[Path, LlavaForConditionalGeneration]:
    model = tiny_hf_model(text, seed)
    model.save_pretrained(folder)
    return Path(folder), model


def tiny_batch(text_lengths: list[int], *, padding: str = "right", seed: int = 0) -> dict:
    """Rows = BOS + image tokens + random text of the given lengths, padded to the longest row."""
    rng = np.random.RandomState(seed)
    rows = [
        [BOS] + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS + list(rng.randint(3, IMAGE_TOKEN, n)) for n in text_lengths
    ]
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), PAD, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding == "right" else slice(t - len(r), t)
        ids[i, sl], mask[i, sl] = r, 1
    pix = rng.randn(len(rows), 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "images": {"pixel_values": pix}}


def torch_logprobs(
    model: LlavaForConditionalGeneration, batch: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference per-token log p(x_{t+1}) and (mu, var) of log p under p, from full torch logits."""
    with torch.no_grad():
        logits = (
            model(
                input_ids=torch.tensor(batch["input_ids"]).long(),
                attention_mask=torch.tensor(batch["attention_mask"]).long(),
                pixel_values=torch.tensor(batch["images"]["pixel_values"]),
            )
            .logits[:, :-1]
            .double()
        )
    logp = torch.log_softmax(logits, -1)
    tgt = logp.gather(-1, torch.tensor(batch["input_ids"][:, 1:]).long()[..., None])[..., 0]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp * logp).sum(-1) - mu * mu
    return tgt.numpy(), mu.numpy(), var.numpy()


def causal_without_mask(monkeypatch) -> None:
    """The decoder's attention as cuDNN's fused causal kernel runs it on GPU (`layers.attend`, impl cudnn): a causal
    call drops the explicit mask, so padding before a row's real tokens would be attended to."""
    import vlmu_jax.models.llama as llama

    real = llama.attend

    def attend(q, k, v, mask, *, impl, causal=False):
        if causal:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return real(q, k, v, mask, impl=impl, causal=causal)

    monkeypatch.setattr(llama, "attend", attend)
