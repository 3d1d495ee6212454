"""Phi-3 decoder (xtuner/llava-phi-3-mini-hf LM): Llama skeleton with fused qkv_proj and gate_up_proj,
partial rotary and an optional sliding window."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from vlmu_jax.models.layers import Dense, FusedGatedMLP, fold
from vlmu_jax.models.llama import DecoderLayer, LlamaAttention, TextConfig, split_qkv


def phi3_text_config(c: dict[str, Any]) -> TextConfig:
    return TextConfig.from_hf(c, arch="phi3", sliding_window=c.get("sliding_window"))


class Phi3Attention(LlamaAttention):
    """qkv_proj output is [q | k | v] along the feature axis, exactly as HF slices it."""

    def __init__(self, c: TextConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        kw = dict(stack=stack, std=c.init_std, dtype=dtype, rngs=rngs)
        d, hd = c.hidden_size, c.head_dim
        self.qkv_proj = Dense(d, (c.num_heads + 2 * c.num_kv_heads) * hd, axes=("embed", "qkv"), **kw)
        self.o_proj = Dense(c.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.qkv_kernel = nnx.data(None)  # never joined (`joining`)
        self.config = c

    def qkv(self, x: jax.Array, rng: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        return split_qkv(self.qkv_proj(x, fold(rng, 0)), self.config)

    def joining(self) -> None:
        """Nothing to join: q/k/v are one kernel already."""
        return None


def phi3_layer(c: TextConfig, *, stack: tuple[int, ...], dtype, rngs: nnx.Rngs) -> DecoderLayer:
    attn = Phi3Attention(c, stack=stack, dtype=dtype, rngs=rngs)
    mlp = FusedGatedMLP(
        c.hidden_size, c.intermediate_size, c.hidden_act, stack=stack, std=c.init_std, dtype=dtype, rngs=rngs
    )
    return DecoderLayer(c, attn, mlp, stack=stack, dtype=dtype)
