"""Tiny random checkpoints of every supported family, built from `config.model.tiny_shape` and a tokenizer.

They go through the same `init_model` / `export_hf` / `load_pretrained` path as a real checkpoint, so the
demo and the pipeline tests exercise the code a 7B run uses. Each builder returns the two JSON files a
checkpoint folder needs: config.json and preprocessor_config.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_collections

from vlmu_jax.data.mllama_images import supported_aspect_ratios


@dataclass(frozen=True)
class TokenIds:
    """What a config.json needs from the tokenizer."""

    vocab_size: int
    image_token_id: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


Shape = ml_collections.ConfigDict
Builder = Callable[[Shape, TokenIds], tuple[dict[str, Any], dict[str, Any]]]


def _llama_text(shape: Shape, ids: TokenIds, model_type: str) -> dict[str, Any]:
    return dict(model_type=model_type, vocab_size=ids.vocab_size, hidden_size=shape.hidden_size,
                intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
                max_position_embeddings=1024, rms_norm_eps=1e-5, initializer_range=0.02,
                bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id,
                tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def tiny_llava(shape: Shape, ids: TokenIds) -> tuple[dict[str, Any], dict[str, Any]]:
    """A LlavaForConditionalGeneration with a CLIP tower and a Llama/Phi-3 LM, and its CLIP processor."""
    text = _llama_text(shape, ids, {"llama": "llama", "phi3": "phi3"}[shape.text_model])
    vision = dict(model_type="clip_vision_model", hidden_size=shape.vision_hidden_size,
                  intermediate_size=2 * shape.vision_hidden_size, num_hidden_layers=shape.vision_layers,
                  num_attention_heads=shape.vision_heads, image_size=shape.image_size,
                  patch_size=shape.patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=shape.vision_hidden_size)
    config = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "text_config": text, "vision_config": vision, "image_token_index": ids.image_token_id,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu", "pad_token_id": ids.pad_token_id,
    }
    size = shape.image_size
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    return config, preprocessor


def tiny_mllama(shape: Shape, ids: TokenIds) -> tuple[dict[str, Any], dict[str, Any]]:
    """A MllamaForConditionalGeneration (Llama-3.2-Vision layout) and its tiled image processor.

    max(num_layers, 2) decoder layers with one cross-attention layer in the middle; tiles of image_size
    (at most max_tiles per image, in every arrangement of at most that many), 1 global vision layer, the first
    local layer's output as intermediate feature.
    """
    layers = max(shape.num_layers, 2)
    text = _llama_text(shape, ids, "mllama_text_model")
    text.update(num_hidden_layers=layers, cross_attention_layers=[layers // 2], rope_theta=10000.0)
    vh, tiles = shape.vision_hidden_size, shape.max_tiles
    vision = dict(model_type="mllama_vision_model", hidden_size=vh, intermediate_size=2 * vh,
                  num_hidden_layers=shape.vision_layers, num_global_layers=1, attention_heads=shape.vision_heads,
                  image_size=shape.image_size, patch_size=shape.patch_size, max_num_tiles=tiles,
                  supported_aspect_ratios=[list(r) for r in supported_aspect_ratios(tiles)],
                  intermediate_layers_indices=[0],
                  vision_output_dim=2 * vh, hidden_act="gelu", norm_eps=1e-5, initializer_range=0.02)
    config = {
        "model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"],
        "text_config": text, "vision_config": vision, "image_token_index": ids.image_token_id,
        "pad_token_id": ids.pad_token_id,
    }
    size = shape.image_size
    preprocessor = {
        "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"height": size, "width": size}, "max_image_tiles": tiles, "do_pad": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "resample": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    return config, preprocessor


def tiny_idefics2(shape: Shape, ids: TokenIds) -> tuple[dict[str, Any], dict[str, Any]]:
    """An Idefics2ForConditionalGeneration (SigLIP-style tower, 2-layer perceiver with perceiver_latents latents,
    Mistral LM) and its processor: images resized to at most image_size (at least 2 patches) and padded to
    image_size."""
    text = _llama_text(shape, ids, "mistral")
    text.update(sliding_window=4096, head_dim=shape.hidden_size // shape.num_heads)
    vision = dict(model_type="idefics2_vision", hidden_size=shape.vision_hidden_size,
                  intermediate_size=2 * shape.vision_hidden_size, num_hidden_layers=shape.vision_layers,
                  num_attention_heads=shape.vision_heads, image_size=shape.image_size,
                  patch_size=shape.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                  initializer_range=0.02)
    heads = 4 if shape.hidden_size % 4 == 0 else 1
    perceiver = dict(model_type="idefics2_perceiver", hidden_size=shape.hidden_size, hidden_act="silu",
                     rms_norm_eps=1e-5, resampler_n_latents=shape.perceiver_latents, resampler_depth=2,
                     resampler_n_heads=heads, resampler_head_dim=shape.hidden_size // heads,
                     num_key_value_heads=max(1, heads // 2),
                     initializer_range=0.02)
    config = {
        "model_type": "idefics2", "architectures": ["Idefics2ForConditionalGeneration"],
        "text_config": text, "vision_config": vision, "perceiver_config": perceiver,
        "image_token_id": ids.image_token_id, "tie_word_embeddings": False, "pad_token_id": ids.pad_token_id,
    }
    preprocessor = {
        "image_processor_type": "Idefics2ImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": 2 * shape.patch_size, "longest_edge": shape.image_size},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True, "do_image_splitting": False,
    }
    return config, preprocessor


def _tiny_qwen_vl(shape: Shape, ids: TokenIds, model_type: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Qwen2-VL / Qwen2.5-VL (Qwen2 LM with M-RoPE sections in the 7B's 2:3:3 proportions) and its processor:
    images resized to at most image_size^2 pixels, so at most (image_size / patch_size)^2 patches per row."""
    text = _llama_text(shape, ids, f"{model_type}_text")
    half = shape.hidden_size // shape.num_heads // 2
    text["rope_parameters"]["mrope_section"] = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    vh, p = shape.vision_hidden_size, shape.patch_size
    common = dict(depth=shape.vision_layers, num_heads=shape.vision_heads, patch_size=p, spatial_merge_size=2,
                  temporal_patch_size=2, initializer_range=0.02)
    if model_type == "qwen2_5_vl":  # windows of 2x2 merged patches, the last block attends over the whole image
        vision = dict(model_type="qwen2_5_vl_vision", hidden_size=vh, intermediate_size=2 * vh,
                      out_hidden_size=shape.hidden_size, window_size=4 * p,
                      fullatt_block_indexes=[shape.vision_layers - 1], **common)
    else:
        vision = dict(model_type="qwen2_vl_vision", embed_dim=vh, hidden_size=shape.hidden_size, mlp_ratio=2,
                      **common)
    config = {
        "model_type": model_type,
        "architectures": [{"qwen2_vl": "Qwen2VLForConditionalGeneration",
                           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[model_type]],
        "text_config": text, "vision_config": vision, "image_token_id": ids.image_token_id,
        "tie_word_embeddings": False, "pad_token_id": ids.pad_token_id,
    }
    factor = 2 * p
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": factor * factor, "longest_edge": shape.image_size**2}, "patch_size": p,
        "merge_size": 2, "temporal_patch_size": 2, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    return config, preprocessor


def tiny_qwen2_vl(shape: Shape, ids: TokenIds) -> tuple[dict[str, Any], dict[str, Any]]:
    return _tiny_qwen_vl(shape, ids, "qwen2_vl")


def tiny_qwen2_5_vl(shape: Shape, ids: TokenIds) -> tuple[dict[str, Any], dict[str, Any]]:
    return _tiny_qwen_vl(shape, ids, "qwen2_5_vl")


# config.model.tiny_shape.architecture (= the family's HF model_type) -> builder.
BUILDERS: dict[str, Builder] = {"llava": tiny_llava, "mllama": tiny_mllama, "idefics2": tiny_idefics2,
                                "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


def tiny_checkpoint(shape: Shape, ids: TokenIds) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, preprocessor_config.json) of the tiny model `shape.architecture` names."""
    if shape.architecture not in BUILDERS:
        raise ValueError(f"unknown model.tiny_shape.architecture {shape.architecture!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[shape.architecture](shape, ids)
