"""Architecture registry: config.json -> model class, its config, and the explicit HF <-> Flax name map.

``init_model`` builds params directly in their shardings: the model is traced abstractly (nnx.eval_shape), the
shardings come from each variable's logical axes, and one jit with out_shardings materialises every array
in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.models.clip import VisionConfig
from vlmu_jax.models.llama import TextConfig
from vlmu_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration
from vlmu_jax.models.phi3 import phi3_text_config
from vlmu_jax.models.sharding import state_shardings

TEXT_CONFIGS = {"llama": TextConfig.from_hf, "phi3": phi3_text_config}
ARCHITECTURES = {"LlavaForConditionalGeneration": "llava"}


@dataclass(frozen=True)
class HFParam:
    """Where one Flax param lives in an HF checkpoint: name (``{i}`` = layer index when stacked) and
    layout."""

    name: str
    transpose: bool
    stacked: bool


def check_architecture(hf_config: dict[str, Any]) -> None:
    """Raise a clear error for checkpoints we cannot build."""
    arch = (hf_config.get("architectures") or [None])[0]
    mtype = hf_config.get("model_type")
    if mtype != "llava" or (arch is not None and arch not in ARCHITECTURES):
        raise ValueError(
            f"unknown architecture: model_type={mtype!r}, architectures={hf_config.get('architectures')}"
            f"; supported: model_type 'llava' with {sorted(ARCHITECTURES)}"
        )
    text_type = hf_config.get("text_config", {}).get("model_type", "llama")
    if text_type not in TEXT_CONFIGS:
        raise ValueError(
            f"unknown architecture: text_config.model_type={text_type!r}; supported {sorted(TEXT_CONFIGS)}"
        )
    vis_type = hf_config.get("vision_config", {}).get("model_type", "clip_vision_model")
    if vis_type != "clip_vision_model":
        raise ValueError(
            f"unknown architecture: vision_config.model_type={vis_type!r}; supported 'clip_vision_model'"
        )


def model_config(hf_config: dict[str, Any], **options: Any) -> LlavaConfig:
    """LlavaConfig from config.json; options: remat, scan_layers, attention_impl."""
    check_architecture(hf_config)
    tc, vc = hf_config.get("text_config", {}), hf_config.get("vision_config", {})
    text = TEXT_CONFIGS[tc.get("model_type", "llama")](tc)
    vision = VisionConfig.from_hf(vc)
    layer = hf_config.get("vision_feature_layer", -2)
    strategy = hf_config.get("vision_feature_select_strategy", "default")
    eos = tc.get("eos_token_id", hf_config.get("eos_token_id"))
    return LlavaConfig(
        text=text,
        vision=vision,
        image_token_id=hf_config.get("image_token_id", hf_config.get("image_token_index", 32000)),
        num_image_tokens=vision.num_patches + (strategy == "full"),
        vocab_size=text.vocab_size,
        pad_token_id=tc.get("pad_token_id", hf_config.get("pad_token_id")),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=hf_config.get("projector_hidden_act", "gelu"),
        projector_bias=hf_config.get("multimodal_projector_bias", True),
        hf_config=hf_config,
        **options,
    )


def abstract_model(
    hf_config: dict[str, Any], dtype=jnp.float32, **options: Any
) -> LlavaForConditionalGeneration:
    """Shape-only model (no memory): for sharding plans and checkpoint loading."""
    config = model_config(hf_config, **options)
    return nnx.eval_shape(lambda: LlavaForConditionalGeneration(config, dtype=dtype, rngs=nnx.Rngs(0)))


def init_model(
    hf_config: dict[str, Any], *, seed: int, dtype=jnp.float32, mesh: Mesh | None = None, **options: Any
) -> LlavaForConditionalGeneration:
    """Random init with every param created directly in its sharding (no full copy on one device)."""
    config = model_config(hf_config, **options)
    graphdef, abstract = nnx.split(abstract_model(hf_config, dtype, **options))

    def make():
        return nnx.split(LlavaForConditionalGeneration(config, dtype=dtype, rngs=nnx.Rngs(seed)))[1]

    state = jax.jit(make, out_shardings=state_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)


def set_options(model: nnx.Module, **options: Any) -> None:
    """Change runtime options (remat, scan_layers, attention_impl) on a built model, in place."""
    model.config = replace(model.config, **options)


# ----------------------------------------------------------------------------------------------- HF name map
_PREFIXES = {
    "vision_tower": "model.vision_tower",
    "multi_modal_projector": "model.multi_modal_projector",
    "language_model": "model.language_model",
}
_STACKS = {"vision_tower": "encoder.layers.{i}", "language_model": "layers.{i}"}
_LEAVES = {
    "kernel": ("weight", True),
    "bias": ("bias", False),
    "weight": ("weight", False),
    "embed_tokens": ("embed_tokens.weight", False),
    "patch_embedding": ("patch_embedding.weight", False),
    "class_embedding": ("class_embedding", False),
    "position_embedding": ("position_embedding.weight", False),
}


def hf_name_map(model: nnx.Module) -> dict[tuple[str, ...], HFParam]:
    """Flax param path -> HF (transformers-5 layout) tensor name, for every base param (LoRA params
    excluded)."""
    out = {}
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        if isinstance(var, nnx.LoRAParam) or path[-1].startswith("lora_"):
            continue
        if path == ("lm_head",):
            out[path] = HFParam("lm_head.weight", False, False)
            continue
        top, *mid, leaf = path
        stacked = "layers" in mid
        mid = [_STACKS[top] if p == "layers" else p for p in mid]
        name, transpose = _LEAVES[leaf]
        out[path] = HFParam(".".join([_PREFIXES[top], *mid, name]), transpose, stacked)
    return out


# Other on-disk layouts -> the transformers-5 names above (llava-hf checkpoints and transformers' own save
# use these).
_ALIASES = [
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^(model\.)?vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
]


def canonical_hf_name(name: str) -> str:
    """Map any known llava key layout to the transformers-5 in-memory name."""
    for pattern, repl in _ALIASES:
        name, n = pattern.subn(repl, name)
        if n:
            break
    return name
