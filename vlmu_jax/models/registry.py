"""Architecture registry: config.json -> model family (by ``model_type``), its config, model and HF names.

``init_model`` builds params directly in their shardings: the model is traced abstractly (nnx.eval_shape), the
shardings come from each variable's logical axes, and one jit with out_shardings materialises every array
in place.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.models import idefics2, llava, mllama, qwen2_vl
from vlmu_jax.models.architecture import Architecture
from vlmu_jax.models.hf_names import HFParam
from vlmu_jax.models.sharding import state_shardings

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (llava.ARCHITECTURE, mllama.ARCHITECTURE, idefics2.ARCHITECTURE, *qwen2_vl.ARCHITECTURES)
}


def architecture(hf_config: dict[str, Any]) -> Architecture:
    """The family of a config.json, or a clear error naming what is supported."""
    mtype = hf_config.get("model_type")
    if mtype not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture: model_type={mtype!r}, architectures={hf_config.get('architectures')}; "
            f"supported model types: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[mtype]


def model_config(hf_config: dict[str, Any], **options: Any) -> Any:
    """The family's model config from config.json; options: remat, scan_layers, attention_impl."""
    return architecture(hf_config).config(hf_config, **options)


def abstract_model(hf_config: dict[str, Any], dtype=jnp.float32, **options: Any) -> nnx.Module:
    """Shape-only model (no memory): for sharding plans and checkpoint loading."""
    arch = architecture(hf_config)
    config = arch.config(hf_config, **options)
    return nnx.eval_shape(lambda: arch.model(config, dtype=dtype, rngs=nnx.Rngs(0)))


def init_model(
    hf_config: dict[str, Any], *, seed: int, dtype=jnp.float32, mesh: Mesh | None = None, **options: Any
) -> nnx.Module:
    """Random init with every param created directly in its sharding (no full copy on one device)."""
    arch = architecture(hf_config)
    config = arch.config(hf_config, **options)
    graphdef, abstract = nnx.split(abstract_model(hf_config, dtype, **options))

    def make():
        return nnx.split(arch.model(config, dtype=dtype, rngs=nnx.Rngs(seed)))[1]

    state = jax.jit(make, out_shardings=state_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)


def set_options(model: nnx.Module, **options: Any) -> None:
    """Change runtime options (remat, scan_layers, attention_impl) on a built model, in place."""
    model.config = replace(model.config, **options)


def hf_name_map(model: nnx.Module) -> dict[tuple[str, ...], HFParam]:
    """Flax param path -> HF tensor name of every base param (LoRA params excluded)."""
    return architecture(model.config.hf_config).name_map(model)
