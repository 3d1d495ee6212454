"""Mllama's decoder in stacks run as scanned blocks [self layers + cross layer]: the schedule and stack layout
(derived by hand), HF's logits and checkpoint names at a depth with a head, two blocks and a tail, the scanned
pass equal to the layer-by-layer one (forward, LoRA gradients with dropout, a hidden layer's output), and
evaluation over per-layer copies of every stack equal to the stacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.tiny_mllama import EOS, PAD, hf_row, tiny_batch, tiny_hf_model
from vlmu_jax.checkpoints.hf_export import export_hf
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.eval.frozen import frozen
from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.layer_copies import layer_copies
from vlmu_jax.eval.scoring import head_logprobs, token_logprobs
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.models.mllama import schedule, stack_layout
from vlmu_jax.models.registry import set_options

# 10 layers, cross-attention at 2, 5, 8: a scan over layers 0-1, layer 2, blocks [3, 4, 5x] and [6, 7, 8x], layer 9
LAYERS, CROSS = 10, (2, 5, 8)
ROWS = [(3, 5, 2), (0, 2, 4), (4, 0, None), (2, 3, 1)]


def test_schedule_of_llama_3_2_vision():
    cross = (3, 8, 13, 18, 23, 28, 33, 38)
    plan = schedule(40, cross, 40, scan=True)
    assert (plan.head, plan.first, plan.period, plan.count) == (3, 4, 5, 7)  # 0-2 scanned, 4..38 seven blocks
    assert plan.kinds[3] == (True, 0) and plan.kinds[4] == (False, 3) and plan.kinds[38] == (True, 7)
    assert plan.kinds[39] == (False, 31) and sum(not c for c, _ in plan.kinds) == 32
    assert schedule(40, cross, 40, scan=False)[1:] == (0, 0, 1, 0)
    assert schedule(40, cross, 2, scan=True).head == 2 and schedule(40, cross, 1, scan=True).head == 0
    assert schedule(40, cross, 14, scan=True).count == 2  # a hidden layer's pass: only whole blocks scan
    assert schedule(40, cross, 13, scan=True).count == 0  # one whole block is not worth a scan
    assert schedule(40, (3, 8, 14, 18), 40, scan=True)[1:] == (3, 0, 1, 0)  # uneven spacing: only the head scans
    assert len(schedule(40, cross, 12, scan=True).kinds) == 12
    layout = stack_layout(40, cross)
    assert layout["head_self"] == (0, 1, 2) and layout["block_self"][:5] == (4, 5, 6, 7, 9)
    assert len(layout["block_self"]) == 28 and layout["block_self"][-1] == 37
    assert layout["block_cross"] == (8, 13, 18, 23, 28, 33, 38)
    assert layout["self"] == (39,) and layout["cross"] == (3,)
    assert sorted(i for ids in layout.values() for i in ids) == list(range(40))
    assert stack_layout(3, (1,)) == {"self": (0, 2), "cross": (1,)}  # no blocks, a head of one layer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mllama10")
    hf = tiny_hf_model(seed=1, layers=LAYERS, cross=CROSS)
    hf.save_pretrained(folder)
    return folder, hf


def _args(batch):
    return (jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
            jax.tree.map(jnp.asarray, batch["images"]))


def test_scanned_blocks_match_hf(tiny):
    folder, hf = tiny
    model = load_pretrained(folder)
    assert schedule(LAYERS, CROSS, LAYERS, scan=True)[1:] == (2, 3, 3, 2)
    assert dict(model.language_model.layout) == {"head_self": (0, 1), "block_self": (3, 4, 6, 7),
                                                 "block_cross": (5, 8), "self": (9,), "cross": (2,)}
    ours, hf_in = tiny_batch(ROWS, padding="left")
    got = np.asarray(nnx.jit(lambda m, *a: m(*a) @ m.head_weight().T)(model, *_args(ours)))
    for i, row in enumerate(ROWS):
        with torch.no_grad():
            ref = hf(**hf_row(hf_in, i, row[2] is not None)).logits[0].numpy()
        valid = ours["attention_mask"][i] > 0
        np.testing.assert_allclose(got[i][valid], ref[valid], atol=1e-4, rtol=0)


def test_export_names_each_slice_by_its_hf_layer(tiny, tmp_path):
    from transformers import MllamaForConditionalGeneration

    folder, hf = tiny
    back = MllamaForConditionalGeneration.from_pretrained(export_hf(load_pretrained(folder), tmp_path / "out"))
    want, have = hf.state_dict(), back.state_dict()
    assert want.keys() == have.keys()
    for k in want:
        assert torch.equal(want[k], have[k]), k


def test_scanned_pass_equals_layer_by_layer(tiny):
    """Forward, a hidden layer's output (layer 8: both blocks scanned) and LoRA gradients under dropout (each
    layer's key folded from its HF index either way)."""
    folder, _ = tiny
    model = load_pretrained(folder)
    apply_lora(model, rank=2, alpha=4.0, dropout=0.25, seed=0)
    set_options(model, remat="dots_with_no_batch_dims_saveable")
    layers = model.language_model.layers
    for seed, dense in enumerate((layers["head_self"].mlp.up_proj, layers["block_self"].self_attn.v_proj,
                                  layers["block_cross"].cross_attn.o_proj, layers["cross"].cross_attn.o_proj)):
        b = dense.lora_b
        b.set_value(jax.random.normal(jax.random.key(seed), b.shape) * 0.1)
    model.train()
    ours, _ = tiny_batch(ROWS, padding="right", seed=2)
    ids, mask, images = _args(ours)
    key = jax.random.key(7)

    @nnx.jit
    def outputs(m):
        def loss(m):
            hidden = m(ids, mask, images, key)
            return head_logprobs(hidden[:, :-1], m.head_weight(), ids[:, 1:]).sum()

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        return value, grads, m(ids, mask, images, key, output_layer=8)

    scanned = outputs(model)
    set_options(model, scan_layers=False)
    unrolled = outputs(model)
    np.testing.assert_allclose(float(scanned[0]), float(unrolled[0]), rtol=1e-5)
    for got, want in zip(scanned[2:], unrolled[2:], strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    want_flat = dict(nnx.to_flat_state(unrolled[1]))
    got_flat = dict(nnx.to_flat_state(scanned[1]))
    assert want_flat.keys() == got_flat.keys() and len(want_flat) > 10
    for path, g in want_flat.items():
        np.testing.assert_allclose(np.asarray(got_flat[path]), np.asarray(g), rtol=1e-3, atol=1e-5)
    for stack in ("block_cross", "cross"):  # every cross layer's adapter gets its gradient
        grad = np.asarray(want_flat[("language_model", "layers", stack, "cross_attn", "o_proj", "lora_a")])
        assert (np.abs(grad).reshape(grad.shape[0], -1).max(axis=1) > 0).all()


def test_copies_of_every_stack_compute_what_the_stacks_compute(tiny):
    folder, hf = tiny
    model = load_pretrained(folder)
    ours, _ = tiny_batch(ROWS, padding="left", seed=4)
    args = _args(ours)

    def outputs():
        logps = np.asarray(token_logprobs(model, *args))
        tokens = np.asarray(generate(model, *args, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD))
        return logps, tokens

    want = outputs()
    hf_weights = hf.state_dict()
    with layer_copies(model, "always") as attached, frozen(model):
        lm = model.language_model
        assert attached and len(lm.layer_copies) == LAYERS
        for i in range(LAYERS):  # each HF layer's copy holds that layer's weights
            np.testing.assert_array_equal(np.asarray(lm.layer(i).mlp.down_proj.kernel[...]),
                                          hf_weights[f"model.language_model.layers.{i}.mlp.down_proj.weight"].numpy().T)
        assert all(a.shape == (0,) for a in jax.tree.leaves(nnx.state(lm.layers, nnx.Param)))
        got = outputs()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])
    assert (want[1] != PAD).any()
    assert model.language_model.layers["block_cross"].mlp.down_proj.kernel[...].shape[0] == 2  # the stack is back
