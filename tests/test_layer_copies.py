"""Evaluation over per-layer copies of the stacked decoder weights (eval/layer_copies.py) on a frozen model
(eval/frozen.py), as the eval stage runs it, computes what the stacked scan through nnx.jit computes: log-probs,
a layer's hidden output and greedy tokens, on one device and sharded over 8 fake ones; the copies keep the
stack's placement less the layer axis (on one device, Llama's q/k/v and gate/up kernels held joined) and are gone
after the block."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_models import EOS, PAD, save_tiny, tiny_batch
from vlmu_jax.checkpoints.hf_import import load_pretrained, placed_shapes, read_hf_config
from vlmu_jax.eval.frozen import frozen
from vlmu_jax.eval.generate import decode_over_slices, generate
from vlmu_jax.eval.layer_copies import layer_copies
from vlmu_jax.eval.scoring import token_logprobs
from vlmu_jax.models.registry import hf_name_map
from vlmu_jax.models.sharding import global_batch, make_mesh


def _outputs(model, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    args = batch["input_ids"], batch["attention_mask"], batch["images"]
    logps = np.asarray(token_logprobs(model, *args))
    hidden = np.asarray(nnx.jit(lambda m, *a: m(*a, output_layer=0))(model, *args))
    tokens = np.asarray(generate(model, *args, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD))
    return logps, hidden, tokens


@pytest.mark.parametrize("text", ["llama", "phi3"])
def test_copies_compute_what_the_stack_computes(tmp_path, text):
    folder, _ = save_tiny(tmp_path / "m", text)
    batch = tiny_batch([6, 3, 5], padding="left", seed=1)
    model = load_pretrained(folder)
    want = _outputs(model, batch)
    names = hf_name_map(model)
    with layer_copies(model) as attached:
        assert not attached  # CPU: the scan does not copy, so no second copy of the weights is taken
    before = {path: np.array(v) for path, v in nnx.to_flat_state(nnx.state(model.decoder_lm().layers))}
    stacked_arrays = [weakref.ref(a) for a in jax.tree.leaves(nnx.state(model.decoder_lm().layers, nnx.Param))]
    with layer_copies(model, "always") as attached, frozen(model):
        assert attached and decode_over_slices(model)
        copies = model.decoder_lm().layer_copies
        assert len(copies) == model.config.text.num_layers
        np.testing.assert_array_equal(np.asarray(copies[1].mlp.down_proj.kernel[...]),
                                      before[("mlp", "down_proj", "kernel")][1])
        attn = copies[1].self_attn
        if text == "llama":  # q/k/v held as one [q | k | v] kernel, their own kernels zero-size stand-ins
            joined = np.concatenate([before[("self_attn", name, "kernel")][1] for name in ("q_proj", "k_proj",
                                                                                          "v_proj")], axis=-1)
            np.testing.assert_array_equal(np.asarray(attn.qkv_kernel[...]), joined)
            assert attn.q_proj.kernel[...].shape == (0,)
            mlp = copies[1].mlp  # and gate/up as one [gate | up] kernel
            joined = np.concatenate([before[("mlp", name, "kernel")][1] for name in ("gate_proj", "up_proj")], axis=-1)
            np.testing.assert_array_equal(np.asarray(mlp.gate_up_kernel[...]), joined)
            assert mlp.gate_proj.kernel[...].shape == mlp.up_proj.kernel[...].shape == (0,)
        else:  # Phi-3's are one kernel already, and so are its gate/up (no gate_up_kernel)
            assert attn.qkv_kernel is None and not hasattr(copies[1].mlp, "gate_up_kernel")
        # the copies replace the stack: every stacked weight is a zero-size stand-in, so no second copy is held
        stacked = nnx.state(model.decoder_lm().layers, nnx.Param)
        assert all(a.shape == (0,) for a in jax.tree.leaves(stacked)) and len(jax.tree.leaves(stacked)) > 5
        gc.collect()
        assert all(r() is None for r in stacked_arrays)  # the stacked arrays are freed, not just detached
        got = _outputs(model, batch)
    for g, w in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], want[2])
    assert (want[2] != PAD).any()
    # detached: the stack is rebuilt bit for bit, and the export names are what they were
    assert model.decoder_lm().layer_copies is None
    after = dict(nnx.to_flat_state(nnx.state(model.decoder_lm().layers)))
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[path]), value)
    assert hf_name_map(model) == names
    np.testing.assert_allclose(_outputs(model, batch)[0], want[0], rtol=1e-6, atol=1e-6)
    # restore=False (a model dropped after evaluation): the copies stay attached, the stack is not rebuilt
    with layer_copies(model, "always", restore=False) as attached:
        assert attached
    assert len(model.decoder_lm().layer_copies) == model.config.text.num_layers
    assert all(a.shape == (0,) for a in jax.tree.leaves(nnx.state(model.decoder_lm().layers, nnx.Param)))


def test_sharded_copies_keep_the_stack_placement(tmp_path):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    folder, _ = save_tiny(tmp_path / "m", "llama")
    batch = tiny_batch([7, 2, 4, 5], padding="left", seed=3)
    want = _outputs(load_pretrained(folder), batch)
    model = load_pretrained(folder, mesh=mesh)
    stack = model.decoder_lm().layers.mlp.gate_proj.kernel[...]
    with layer_copies(model, "always"), frozen(model):
        copy = model.decoder_lm().layer_copies[0].mlp.gate_proj.kernel[...]
        layer = model.decoder_lm().layer_copies[0]
        assert layer.self_attn.qkv_kernel is None and layer.mlp.gate_up_kernel is None  # spread kernels stay apart
        assert tuple(copy.sharding.spec) == tuple(stack.sharding.spec[1:]) and len(copy.sharding.device_set) == 8
        got = _outputs(model, global_batch(batch, mesh))
    # rebuilt in its placement
    restacked = model.decoder_lm().layers.mlp.gate_proj.kernel[...]
    assert restacked.sharding == stack.sharding
    np.testing.assert_array_equal(np.asarray(restacked), np.asarray(stack))
    for g, w in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], want[2])
    assert jax.device_count() == 8


def test_lora_step_over_copies_equals_the_scanned_stack(tmp_path):
    """A LoRA loss and its gradients over the per-layer copies (unrolled, remat per layer, LoRA dropout drawn from
    the same per-layer keys) equal the scanned stack's; on exit the stack's LoRA params are the copies' again."""
    from vlmu_jax.eval.scoring import head_logprobs
    from vlmu_jax.models.lora import apply_lora
    from vlmu_jax.models.registry import set_options

    folder, _ = save_tiny(tmp_path / "m", "llama")
    batch = tiny_batch([6, 3, 5], padding="right", seed=2)
    model = load_pretrained(folder)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.25, seed=0)
    set_options(model, remat="dots_with_no_batch_dims_saveable")
    model.train()
    ids, mask, images = batch["input_ids"], batch["attention_mask"], batch["images"]
    key = jax.random.key(7)

    @nnx.jit
    def loss_and_grads(m):
        def loss(m):
            hidden = m(ids, mask, images, key)
            return head_logprobs(hidden[:, :-1], m.head_weight(), ids[:, 1:]).sum()
        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)

    want_loss, want_grads = loss_and_grads(model)
    stacked_b = np.asarray(model.decoder_lm().layers.mlp.up_proj.lora_b[...])
    with layer_copies(model, "always") as attached:
        assert attached
        got_loss, got_grads = loss_and_grads(model)
        copies = model.decoder_lm().layer_copies
        for i in (0, 1):  # change a copy's LoRA: the stack rebuilt on exit carries it
            b = copies[i].mlp.up_proj.lora_b
            b.set_value(b.get_value() + 1.0)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    want_flat = dict(nnx.to_flat_state(want_grads))
    got_flat = dict(nnx.to_flat_state(got_grads))
    compared = 0
    for path, g in want_flat.items():
        i = path.index("layers")
        for layer in range(model.config.text.num_layers):
            copy_path = (*path[:i], "layer_copies", layer, *path[i + 1:])
            # float32 sums in another order (scanned / unrolled): within 1e-5 of the gradient's scale
            np.testing.assert_allclose(np.asarray(got_flat[copy_path]), np.asarray(g)[layer], rtol=1e-4,
                                       atol=1e-5 * np.abs(np.asarray(g)).max())
            compared += 1
    assert compared > 10
    np.testing.assert_allclose(np.asarray(model.decoder_lm().layers.mlp.up_proj.lora_b[...]),
                               stacked_b + 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,meshed", [("llama", False), ("llama", True), ("mllama", False)])
def test_a_stand_in_gets_the_copies_the_model_gets(tmp_path, family, meshed):
    """A loaded model's stand-in (`hf_import.placed_shapes`: shapes only) with layer copies attached has the
    model's structure and, leaf for leaf, its shapes, dtypes and placements: the programs compiled for it are
    the model's (stages._compile_on_stand_in). One device joins q/k/v and gate/up; a mesh keeps them apart."""
    if family == "mllama":
        from tests.tiny_mllama import tiny_hf_model

        folder = tmp_path / "m"
        tiny_hf_model().save_pretrained(folder)
    else:
        folder, _ = save_tiny(tmp_path / "m", family)
    mesh = make_mesh(data=2, fsdp=2, tensor=2) if meshed else None
    model = load_pretrained(folder, mesh=mesh)
    stand_in = placed_shapes(read_hf_config(folder), jnp.float32, mesh)
    splits = []
    for m in (model, stand_in):
        with layer_copies(m, "always", restore=False) as attached:
            assert attached
        graphdef, state = nnx.split(m)
        leaves, treedef = jax.tree.flatten(state)
        splits.append((graphdef, treedef, [(x.shape, x.dtype, x.sharding) for x in leaves]))
    assert splits[0][0] == splits[1][0] and splits[0][1] == splits[1][1]
    assert splits[0][2] == splits[1][2]
    assert any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(stand_in)))
    joined = model.decoder_lm().layer_copies[0].self_attn.qkv_kernel if family == "llama" else None
    assert (joined is not None) == (family == "llama" and not meshed)
