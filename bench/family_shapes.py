"""Full-size Llama-3.2-11B-Vision, idefics2-8b and Qwen2.5-VL-7B shapes (random weights) and one shared batch for
the bench.

Both benches (ours and the PyTorch twin) build the model from these config.json dicts and the batch through
vlmu_jax's image processors, so the two sides see identical inputs. Rows: BOS, the family's image tokens, then
text tokens up to T (default 128) positions after the image tokens (Qwen2.5-VL: <|im_start|> instead of BOS).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

MLLAMA = {
    "model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256,
    "text_config": dict(
        model_type="mllama_text_model", hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
        cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004, tie_word_embeddings=False),
    "vision_config": dict(
        model_type="mllama_vision_model", hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_global_layers=8, attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4,
        intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680, norm_eps=1e-5, hidden_act="gelu",
        supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]),
}
MLLAMA_PREPROCESSOR = {
    "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_resize": True,
    "size": {"height": 560, "width": 560}, "max_image_tiles": 4, "do_pad": True, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "resample": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}

IDEFICS2 = {
    "model_type": "idefics2", "architectures": ["Idefics2ForConditionalGeneration"], "image_token_id": 32001,
    "tie_word_embeddings": False,
    "text_config": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32003, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=32768, sliding_window=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False),
    "vision_config": dict(
        model_type="idefics2_vision", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "perceiver_config": dict(
        model_type="idefics2_perceiver", hidden_act="silu", resampler_n_latents=64, resampler_depth=3,
        resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4, rms_norm_eps=1e-6),
}
IDEFICS2_PREPROCESSOR = {
    "image_processor_type": "Idefics2ImageProcessor", "do_convert_rgb": True, "do_resize": True,
    "size": {"shortest_edge": 378, "longest_edge": 980}, "resample": 2, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "do_pad": True, "do_image_splitting": False,
}
IDEFICS2_FAKE_TOKEN = 32000

QWEN2_5_VL = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": dict(
        model_type="qwen2_5_vl_text", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
        max_position_embeddings=128000, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    "vision_config": dict(
        model_type="qwen2_5_vl_vision", depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
        out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
}
# 448 x 448 pixels at most: 32 x 32 patches, 256 image tokens per row.
QWEN2_5_VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_resize": True,
    "min_pixels": 56 * 56, "max_pixels": 448 * 448, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
    "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}

FAMILIES = {"mllama": (MLLAMA, MLLAMA_PREPROCESSOR), "idefics2": (IDEFICS2, IDEFICS2_PREPROCESSOR),
            "qwen2_5_vl": (QWEN2_5_VL, QWEN2_5_VL_PREPROCESSOR)}


def batch(family: str, b: int = 4, t_text: int = 128) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """(input_ids [B, T], image inputs as our processor makes them, index of the first text token)."""
    from vlmu_jax.data.images import image_processor

    config, preprocessor = FAMILIES[family]
    rng = np.random.RandomState(0)
    process = image_processor(preprocessor)
    # 1120 x 1120 -> a 2 x 2 tile grid for Mllama; 980 x 980 -> one full-resolution image for Idefics2.
    # IMAGE_HW=H,W picks another size (e.g. 1120,700: Idefics2 then has padded patches, as real batches do).
    h, w = (int(x) for x in os.environ.get("IMAGE_HW", "1120,1120").split(","))
    pictures = [Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8)) for _ in range(b)]
    rows = [process(p) for p in pictures]
    images = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if family == "mllama":
        image = [config["image_token_index"]]
        bos, vocab = 128000, 128000
    elif family == "qwen2_5_vl":  # no BOS: the row opens with "<|im_start|>user" (an even T keeps cuDNN attention)
        image = [872, 151652] + [config["image_token_id"]] * process.image_token_count(pictures[0]) + [151653]
        bos, vocab = 151644, 151000
    else:
        image = [IDEFICS2_FAKE_TOKEN] + [config["image_token_id"]] * 64 + [IDEFICS2_FAKE_TOKEN]
        bos, vocab = 1, 32000
    head = [bos, *image]
    ids = np.concatenate([np.tile(head, (b, 1)), rng.randint(100, vocab, (b, t_text))], axis=1).astype(np.int32)
    return ids, images, len(head)
