"""The demo's tiny LLaVA: an HF-format config built from `config.model.tiny_shape` and a tokenizer.

It goes through the same `init_model` / `export_hf` / `load_pretrained` path as a real checkpoint, so
the demo exercises the code a 7B run uses.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def tiny_llava_config(shape: ml_collections.ConfigDict, *, vocab_size: int, image_token_id: int,
                      bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict[str, Any]:
    """config.json contents of a LlavaForConditionalGeneration with a CLIP tower and a Llama/Phi-3 LM."""
    text_type = {"llama": "llama", "phi3": "phi3"}[shape.text_model]
    text = dict(model_type=text_type, vocab_size=vocab_size, hidden_size=shape.hidden_size,
                intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
                max_position_embeddings=1024, rms_norm_eps=1e-5, initializer_range=0.02,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(model_type="clip_vision_model", hidden_size=shape.vision_hidden_size,
                  intermediate_size=2 * shape.vision_hidden_size, num_hidden_layers=shape.vision_layers,
                  num_attention_heads=shape.vision_heads, image_size=shape.image_size,
                  patch_size=shape.patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=shape.vision_hidden_size)
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "text_config": text, "vision_config": vision, "image_token_index": image_token_id,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu", "pad_token_id": pad_token_id,
    }


def clip_preprocessor_config(image_size: int) -> dict[str, Any]:
    """preprocessor_config.json of a CLIP processor at the tiny model's resolution."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
