"""What the attention-inputs remat policy keeps for a decoder layer's backward (models/layers.py REMAT_POLICIES),
on a tiny LoRA LLaVA layer on this CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.test_layerwise import tiny_lora_llava
from vlmu_jax.models.layers import REMAT_POLICIES


def test_attention_inputs_policy_keeps_them_instead_of_the_qkv_dots(capsys) -> None:
    """`dots_attention_inputs_dropout_saveable` keeps q and k after the rotary and v (named `attention_input`), so
    the backward keeps none of q's, k's and v's base and LoRA dot outputs (six arrays for three), which the presets'
    policy keeps to add them again and redo the rotary; the gradients are those without remat."""
    model, trainable = tiny_lora_llava()
    c = model.language_model.config
    graphdef, params, rest = nnx.split(model.language_model.layers, trainable, ...)
    params, rest = (jax.tree.map(lambda a: a[0], s) for s in (params, rest))
    b, t = 2, 5
    h = jax.random.normal(jax.random.key(1), (b, t, c.hidden_size), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))

    def loss(params, policy):
        def f(params, h):
            layer = nnx.merge(graphdef, params, rest)
            out = layer(h, positions, None, impl="xla", causal=True, cache=None, index=0, rng=jax.random.key(3))[0]
            return jnp.tanh(out).sum()

        return (f if policy is None else jax.checkpoint(f, policy=REMAT_POLICIES[policy]))(params, h)

    want = jax.grad(loss)(params, None)
    saved = {}
    for name in ("dots_attention_dropout_saveable", "dots_attention_inputs_dropout_saveable"):
        got = jax.grad(loss)(params, name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
        jax.ad_checkpoint.print_saved_residuals(lambda p, name=name: loss(p, name), params)
        saved[name] = [ln.split(" from")[0] for ln in capsys.readouterr().out.splitlines()]
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    assert q == c.hidden_size and kv < q  # the tiny config: q's outputs are as wide as o's and down's
    inputs = sorted([f"f32[{b},{t},{c.num_heads},{c.head_dim}] named 'attention_input'"]
                    + [f"f32[{b},{t},{c.num_kv_heads},{c.head_dim}] named 'attention_input'"] * 2)
    old, new = saved["dots_attention_dropout_saveable"], saved["dots_attention_inputs_dropout_saveable"]
    assert sorted(ln for ln in new if "attention_input" in ln) == inputs, new
    assert not any("attention_input" in ln for ln in old), old

    def dots(lines: list[str], width: int) -> int:
        return lines.count(f"f32[{b},{t},{width}] output of dot_general")

    # base and LoRA outputs: q, o and down ([b, t, hidden]) and k, v ([b, t, kv]) under the presets' policy; o and
    # down only under the attention inputs' (the MLP's gate and up, [b, t, intermediate], stay under both)
    assert (dots(old, q), dots(old, kv), dots(new, q), dots(new, kv)) == (6, 4, 4, 0), (old, new)
    assert dots(old, c.intermediate_size) == dots(new, c.intermediate_size) == 4
