"""LoRA on chosen Dense projections (PEFT semantics: y += (alpha / rank) * dropout(x) @ A @ B, B zero-init).

A and B are ``nnx.LoRAParam`` variables on the Dense itself, stacked like its kernel ([L, in, r] / [L, r,
out] in
scanned layers), so one filter (``nnx.LoRAParam``) selects everything that trains and the frozen base stays
put.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from vlmu_jax.models.layers import Dense
from vlmu_jax.models.sharding import variable_sharding

# Every linear projection of the language model, fused ones (Phi-3's qkv_proj / gate_up_proj) included.
DEFAULT_TARGETS = (
    r"language_model.*(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|down_proj)"
)


def _dense_modules(model: nnx.Module, targets: str) -> list[tuple[str, Dense]]:
    pattern = re.compile(targets)
    found = []
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(node, Dense) and pattern.search(name):
            found.append((name, node))
    return found


def suffix_targets(model: nnx.Module, *, skip: tuple[str, ...]) -> str:
    """PEFT's matching of a list of module names, as a ``targets`` regex: the last names of the Dense layers
    outside the top-level modules ``skip``, matched at the end of any module path (so also inside ``skip``).

    This is what MLLMU-Bench's ``find_all_linear_names`` + ``LoraConfig(target_modules=...)`` adapt.
    """
    names = sorted({path.rsplit(".", 1)[-1] for path, _ in _dense_modules(model, ".*")
                    if path.split(".", 1)[0] not in skip})
    if not names:
        raise ValueError(f"no Dense layer outside {skip}")
    return r"(^|\.)(" + "|".join(re.escape(n) for n in names) + r")$"


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: str = DEFAULT_TARGETS,
    seed: int = 0,
    init: str = "kaiming",
) -> list[str]:
    """Add float32 LoRA A/B to every Dense whose dotted module path matches ``targets`` (re.search); in place.

    Returns the adapted module paths. B = 0; A as PEFT's ``init_lora_weights``: ``kaiming`` (its default,
    kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in))) or ``gaussian`` (N(0, 1/rank), MLLMU-Bench's choice).
    """
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"LoRA init must be 'kaiming' or 'gaussian', got {init!r}")
    modules = _dense_modules(model, targets)
    if not modules:
        raise ValueError(f"LoRA targets {targets!r} match no projection")
    key = jax.random.key(seed)
    for i, (_, dense) in enumerate(modules):
        kernel = dense.kernel.get_value()
        *stack, din, dout = kernel.shape
        axes = dense.kernel.get_metadata().get("axes") or (None,) * kernel.ndim
        shape, k = (*stack, din, rank), jax.random.fold_in(key, i)
        if init == "gaussian":
            a = jax.random.normal(k, shape, jnp.float32) / rank
        else:
            a = jax.random.uniform(k, shape, jnp.float32, -1.0 / din**0.5, 1.0 / din**0.5)
        lora_a = nnx.LoRAParam(a, axes=(*axes[:-1], "lora_rank"))
        lora_b = nnx.LoRAParam(
            jnp.zeros((*stack, rank, dout), jnp.float32), axes=(*axes[:-2], "lora_rank", axes[-1])
        )
        if isinstance(getattr(kernel, "sharding", None), NamedSharding):
            for var in (lora_a, lora_b):
                var.set_value(jax.device_put(var.get_value(), variable_sharding(var, kernel.sharding.mesh)))
        dense.lora_a, dense.lora_b = lora_a, lora_b
        dense.lora_scale = alpha / rank
        dense.lora_dropout = dropout
    if dropout > 0.0:
        model.lora_rngs = nnx.Rngs(dropout=seed)
    return [name for name, _ in modules]


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel and remove the LoRA params (in place)."""
    for _, dense in _dense_modules(model, ".*"):
        if dense.lora_a is None:
            continue
        kernel = dense.kernel.get_value()
        delta = jnp.einsum("...ir,...ro->...io", dense.lora_a.get_value(), dense.lora_b.get_value())
        dense.kernel.set_value((kernel.astype(jnp.float32) + dense.lora_scale * delta).astype(kernel.dtype))
        dense.lora_a = dense.lora_b = None
    model.lora_rngs = None
    return model


def trainable_filter(
    *,
    lora: bool,
    tune_vision_tower: bool = False,
    tune_mm_projector: bool = False,
    tune_language_model: bool = False,
) -> nnx.filterlib.Filter:
    """NNX filter of what trains: LoRA params and/or the full Params of the tuned towers.

    With ``lora`` the language model's base weights (and its head) stay frozen whatever ``tune_language_model``
    says: LoRA on the LM means the adapters are what adapts it, as PEFT's ``get_peft_model`` freezes the base.
    The vision tower and projector flags still switch their full weights on next to the adapters, as the seeds
    do after wrapping the model.
    """
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    parts: list = [nnx.LoRAParam] if lora else []
    if tune_vision_tower:
        parts.append(nnx.All(base, nnx.PathContains("vision_tower")))
    if tune_mm_projector:
        parts.append(nnx.All(base, nnx.PathContains("multi_modal_projector")))
    if tune_language_model and not lora:
        parts.append(nnx.All(base, nnx.Any(nnx.PathContains("language_model"), nnx.PathContains("lm_head"))))
    return nnx.Any(*parts) if parts else nnx.Nothing
