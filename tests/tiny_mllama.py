"""A tiny random HF MllamaForConditionalGeneration and matching batches (one image per row, or none).

initializer_range is raised to 0.2 so log-probs spread; the gates (zero at HF init) are set to random values
so every gated branch (tile embeddings, cross-attention, its MLP) contributes.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

VOCAB = 512
IMAGE_TOKEN = VOCAB  # as the real checkpoint: the image token is an extra embedding row beyond lm_head
PAD, BOS, EOS = 0, 1, 2
TILE, PATCH, MAX_TILES = 14, 7, 4


def tiny_config(layers: int = 3, cross: tuple[int, ...] = (1,)) -> MllamaConfig:
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=2,
        image_size=TILE, patch_size=PATCH, max_num_tiles=MAX_TILES, intermediate_layers_indices=[0, 2],
        vision_output_dim=48, initializer_range=0.2,
    )
    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, cross_attention_layers=list(cross), rms_norm_eps=1e-5, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2,
        rope_parameters={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)


def tiny_hf_model(seed: int = 0, **shape) -> MllamaForConditionalGeneration:
    """shape: tiny_config's layers / cross."""
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(tiny_config(**shape)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.copy_(torch.rand_like(p) * 1.5 - 0.5)
    return model


def tiny_batch(rows: list[tuple[int, int, int | None]], *, padding: str = "right", seed: int = 0) -> dict:
    """rows: (text tokens before the image token, after it, n tiles or None for a text-only row).

    Returns our batch (input_ids, attention_mask, images) plus the HF inputs built as MllamaProcessor does.
    """
    rng = np.random.RandomState(seed)
    seqs = []
    for before, after, tiles in rows:
        img = [IMAGE_TOKEN] if tiles is not None else []
        seqs.append([BOS, *rng.randint(3, VOCAB, before), *img, *rng.randint(3, VOCAB, after)])
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), PAD, np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding == "right" else slice(t - len(s), t)
        ids[i, sl], mask[i, sl] = s, 1
    b = len(rows)
    pix = np.zeros((b, MAX_TILES, 3, TILE, TILE), np.float32)
    ar_ids = np.zeros((b,), np.int32)
    ar_mask = np.zeros((b, MAX_TILES), np.int32)
    ar_mask[:, 0] = 1
    grid = {1: 1, 2: 2, 3: 3, 4: 6}  # n tiles -> an aspect ratio id with that many tiles (HF's id order)
    for i, (_, _, tiles) in enumerate(rows):
        if tiles is not None:
            pix[i, :tiles] = rng.randn(tiles, 3, TILE, TILE)
            ar_ids[i], ar_mask[i, :tiles] = grid[tiles], 1
    ours = {"input_ids": ids, "attention_mask": mask,
            "images": {"pixel_values": pix, "aspect_ratio_ids": ar_ids, "aspect_ratio_mask": ar_mask}}
    num_tiles = [[tiles] if tiles is not None else [] for _, _, tiles in rows]
    token_mask = [get_cross_attention_token_mask(list(r), IMAGE_TOKEN) for r in ids]
    cross = convert_sparse_cross_attention_mask_to_dense(token_mask, num_tiles, MAX_TILES, t)
    hf = {
        "input_ids": torch.tensor(ids).long(),
        "attention_mask": torch.tensor(mask).long(),
        "position_ids": torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)).long(),
        "pixel_values": torch.tensor(pix)[:, None],
        "aspect_ratio_ids": torch.tensor(ar_ids).long()[:, None],
        "aspect_ratio_mask": torch.tensor(ar_mask).long()[:, None],
        "cross_attention_mask": torch.tensor(cross).long(),
    }
    return ours, hf


def hf_row(hf: dict, i: int, with_image: bool) -> dict:
    """Row i alone, as HF sees a text-only prompt (no image inputs) or an image prompt."""
    keys = ("input_ids", "attention_mask", "position_ids")
    if with_image:
        keys += ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
    return {k: hf[k][i : i + 1] for k in keys}
