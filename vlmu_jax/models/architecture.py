"""What the registry, the checkpoint reader/writer and the data pipeline need of one model family.

Each family module (llava.py, ...) defines one ``Architecture``; registry.py picks it by config.json's
``model_type``. The model config it builds must carry ``image_token_id``, ``num_image_tokens``,
``eos_token_id``, ``pad_token_id`` and the verbatim ``hf_config`` (for export), and its model the surface
described in llava.py's docstring. ``num_image_tokens`` is 0 where the count depends on the image (Qwen2-VL): the
image processor's ``image_token_count`` then gives it per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx

from vlmu_jax.models.hf_names import HFParam

# The key of a batch's images holding what each row's images become inside the model before the decoder reads
# them (its `image_embeddings`), made once per image ahead of the batch instead of from its pixels.
IMAGE_EMBEDDINGS = "image_embeddings"
# The key holding the vision tower's part of them (its `vision_states`), before the projector: what a batch carries
# when the projector trains and the tower does not (FIUBench's unlearning).
VISION_STATES = "vision_states"


@dataclass(frozen=True)
class Architecture:
    model_type: str
    config: Callable[..., Any]  # (hf_config dict, **options) -> model config; raises on unsupported parts
    model: type[nnx.Module]  # model(config, dtype=, rngs=)
    name_map: Callable[[nnx.Module], dict[tuple[str, ...], HFParam]]  # Flax path -> HF tensor
    canonical_name: Callable[[str], str]  # any known on-disk tensor name -> the name name_map uses


def project_images(model: nnx.Module, images: dict[str, jax.Array]) -> jax.Array:
    """`model.project` of the batch's VISION_STATES where it carries them, else of `model.vision_states(images)`:
    every family's `image_embeddings`, so both ways of feeding the images run one projector."""
    states = images[VISION_STATES] if VISION_STATES in images else model.vision_states(images)
    return model.project(states, images)


def special_token_ids(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``pad_token_id`` / ``eos_token_id`` of a VLM config.json: the text config's when it names them, else the top
    level's (transformers has kept them in either place); a list of EOS ids becomes a tuple, so configs stay
    hashable."""
    tc = hf_config.get("text_config") or {}
    eos = tc.get("eos_token_id", hf_config.get("eos_token_id"))
    return {"pad_token_id": tc.get("pad_token_id", hf_config.get("pad_token_id")),
            "eos_token_id": tuple(eos) if isinstance(eos, list) else eos}
