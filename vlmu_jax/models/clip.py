"""CLIP ViT vision tower (HF CLIPVisionModel semantics): patch conv, class token, learned positions,
pre-LN, pre-norm encoder layers. Only layers up to the selected feature layer run; post_layernorm is kept
for export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlmu_jax.models.layers import Dense, LayerNorm, activation, attend, run_layers
from vlmu_jax.models.sharding import constrain


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    init_std: float

    @classmethod
    def from_hf(cls, c: dict[str, Any]) -> VisionConfig:
        return cls(
            hidden_size=c.get("hidden_size", 768),
            intermediate_size=c.get("intermediate_size", 3072),
            num_layers=c.get("num_hidden_layers", 12),
            num_heads=c.get("num_attention_heads", 12),
            image_size=c.get("image_size", 224),
            patch_size=c.get("patch_size", 32),
            num_channels=c.get("num_channels", 3),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5),
            hidden_act=c.get("hidden_act", "quick_gelu"),
            init_std=c.get("initializer_range", 0.02),
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ClipAttention(nnx.Module):
    """Bidirectional multi-head attention with biased projections."""

    def __init__(self, c: VisionConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        d = c.hidden_size
        kw = dict(stack=stack, use_bias=True, std=c.init_std, dtype=dtype, rngs=rngs)
        self.q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, axes=("heads", "embed"), **kw)
        self.num_heads = c.num_heads

    def __call__(self, x: jax.Array, impl: str, mask: jax.Array | None = None) -> jax.Array:
        """mask: optional boolean key mask broadcastable to [B, N, T, T] (Idefics2's padded patches)."""
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        a = attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask, impl=impl)
        return self.out_proj(a.reshape(b, t, d))


class ClipMLP(nnx.Module):
    def __init__(self, c: VisionConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, use_bias=True, std=c.init_std, dtype=dtype, rngs=rngs)
        self.fc1 = Dense(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(c.intermediate_size, c.hidden_size, axes=("mlp", "embed"), **kw)
        self.act = c.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.act)(self.fc1(x)))


class ClipLayer(nnx.Module):
    """One pre-norm encoder layer (params stacked over layers)."""

    def __init__(self, c: VisionConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(c.hidden_size, c.layer_norm_eps, stack=stack, dtype=dtype)
        self.self_attn = ClipAttention(c, stack=stack, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(c.hidden_size, c.layer_norm_eps, stack=stack, dtype=dtype)
        self.mlp = ClipMLP(c, stack=stack, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array, impl: str, mask: jax.Array | None = None) -> jax.Array:
        h = h + self.self_attn(self.layer_norm1(h), impl, mask)
        return h + self.mlp(self.layer_norm2(h))


class ClipEmbeddings(nnx.Module):
    """Patch conv (as one matmul over non-overlapping patches), class token, learned positions."""

    def __init__(self, c: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d, p = c.hidden_size, c.patch_size
        normal = lambda shape: (c.init_std * jax.random.normal(rngs.params(), shape)).astype(dtype)
        self.patch_embedding = nnx.Param(normal((d, c.num_channels, p, p)), axes=("embed", None, None, None))
        self.class_embedding = nnx.Param(normal((d,)), axes=("norm",))
        self.position_embedding = nnx.Param(normal((c.num_patches + 1, d)), axes=(None, "embed"))
        self.patch_size = p

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        w, p = self.patch_embedding[...], self.patch_size
        b, ch, hh, ww = pixel_values.shape
        x = pixel_values.astype(w.dtype).reshape(b, ch, hh // p, p, ww // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (hh // p) * (ww // p), ch * p * p)
        patches = x @ w.reshape(w.shape[0], -1).T
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, w.shape[0])).astype(w.dtype)
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...]


class ClipVisionTower(nnx.Module):
    """Returns the hidden states after ``num_layers`` encoder layers (0 = embeddings after pre_layrnorm)."""

    def __init__(self, c: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.config = c
        self.embeddings = ClipEmbeddings(c, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(c.hidden_size, c.layer_norm_eps, dtype=dtype)
        self.layers = ClipLayer(c, stack=(c.num_layers,), dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(c.hidden_size, c.layer_norm_eps, dtype=dtype)

    def __call__(
        self, pixel_values: jax.Array, num_layers: int, *, impl: str, remat: str, scan: bool
    ) -> jax.Array:
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        if num_layers == 0:
            return h
        h = constrain(h, ("batch", None, None))
        h, _ = run_layers(
            self.layers,
            lambda layer, c, _: (layer(c, impl), None),
            h,
            remat=remat,
            scan=scan,
            limit=num_layers,
        )
        return h
