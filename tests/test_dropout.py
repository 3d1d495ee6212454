"""LoRA dropout's keep mask (layers.dropout_keep): four 16-bit lanes per Threefry block, each element kept with
probability 1 - rate independently, the same mask however the array is sharded; kept for the backward under the
`dots_and_dropout_saveable` remat policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vlmu_jax.models.layers import REMAT_POLICIES, Dense, dropout_keep, fused_attention_saveable
from vlmu_jax.models.sharding import make_mesh


def test_keep_rate_and_independence():
    shape = (4, 733, 1027)  # last axis not a multiple of four lanes
    keep = np.asarray(dropout_keep(jax.random.key(7), shape, 0.05))
    assert keep.shape == shape and keep.dtype == bool
    n = keep.size
    drop = 1 - keep.mean()
    realised = 3277 / 65536  # round(0.05 * 65536) / 65536
    assert abs(drop - realised) < 5 * np.sqrt(realised * (1 - realised) / n)
    # Neighbours share a Threefry block (lanes 0-3 of one count) or not: both dropped as often as independence says.
    both = (~keep[..., :-1] & ~keep[..., 1:]).mean()
    assert abs(both - realised**2) < 5 * np.sqrt(realised**2 / keep[..., 1:].size)
    # Rows are hashed from different counts: no two rows alike.
    rows = keep.reshape(-1, shape[-1])
    assert len({r.tobytes() for r in rows}) == len(rows)
    # Same key, same mask; another key (what fold_in gives each projection), another mask.
    np.testing.assert_array_equal(np.asarray(dropout_keep(jax.random.key(7), shape, 0.05)), keep)
    other = np.asarray(dropout_keep(jax.random.fold_in(jax.random.key(7), 1), shape, 0.05))
    assert 0.08 < (other != keep).mean() < 0.11  # 2 p (1 - p) for independent masks
    assert np.asarray(dropout_keep(jax.random.key(0), (8, 9), 0.0)).all()
    half = np.asarray(dropout_keep(jax.random.key(0), (512, 512), 0.5)).mean()
    assert abs(half - 0.5) < 5 * 0.5 / 512


def test_mask_does_not_depend_on_sharding():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    key, shape = jax.random.key(11), (8, 64, 96)
    want = np.asarray(dropout_keep(key, shape, 0.1))
    x = jax.device_put(jnp.ones(shape), NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor")))
    got = jax.jit(lambda x: jnp.where(dropout_keep(key, x.shape, 0.1), x, 0))(x)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got) == 1, want)


def test_remat_policy_keeping_dropout_masks(capsys):
    """`dots_and_dropout_saveable` (and the presets' `dots_attention_dropout_saveable`, and
    `projections_attention_dropout_saveable`) keeps each LoRA dropout mask for the backward instead of drawing it
    again: the masks are among what it saves (not under the plain dots policy), and the gradients are those without
    remat."""
    dense = Dense(8, 6, axes=(None, None), rngs=nnx.Rngs(0))
    dense.lora_a = nnx.LoRAParam(jax.random.normal(jax.random.key(1), (8, 4)))
    dense.lora_b = nnx.LoRAParam(jax.random.normal(jax.random.key(2), (4, 6)))
    dense.lora_dropout, dense.deterministic = 0.3, False
    graphdef, lora, rest = nnx.split(dense, nnx.LoRAParam, ...)
    x, rng = jax.random.normal(jax.random.key(3), (4, 5, 8)), jax.random.key(4)

    def loss(lora, policy):
        def f(lora, x):
            return jnp.tanh(nnx.merge(graphdef, lora, rest)(x, rng)).sum()

        return (f if policy is None else jax.checkpoint(f, policy=policy))(lora, x)

    want = jax.grad(loss)(lora, None)
    for name in ("dots_with_no_batch_dims_saveable", "dots_and_dropout_saveable", "dots_attention_dropout_saveable",
                 "projections_attention_dropout_saveable"):
        got = jax.grad(loss)(lora, REMAT_POLICIES[name])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
        jax.ad_checkpoint.print_saved_residuals(lambda lora, name=name: loss(lora, REMAT_POLICIES[name]), lora)
        saved = capsys.readouterr().out
        assert ("bool[4,5,8]" in saved) == (name != "dots_with_no_batch_dims_saveable"), saved
        # the dots policies keep the base and the LoRA outputs apart (the tanh's backward adds them again); the
        # projections policy keeps their sum once, and LoRA's rank-4 hidden
        outputs = [ln for ln in saved.splitlines() if ln.startswith("f32[4,5,6]")]
        if name.startswith("projections"):
            assert [ln.split(" from")[0] for ln in outputs] == ["f32[4,5,6] named 'projection_output'"], saved
            assert "f32[4,5,4] named 'lora_hidden'" in saved and "dot_general" not in saved, saved
        else:
            assert len(outputs) == 2 and all("output of dot_general" in ln for ln in outputs), saved


def test_presets_policy_keeps_cudnn_attention_outputs():
    """LLaVA-1.5's LoRA stages' policy saves what cuDNN's fused attention forward returns (its output and softmax
    statistics), so its backward does not run that forward again; other primitives it leaves to the dots policy.
    The cuDNN primitive exists only on a GPU, so this asks the policy function about jax's primitive objects."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    for prim in (cudnn._dot_product_attention_fwd_p, cudnn._dot_product_attention_fwd_p_wrapper):
        assert fused_attention_saveable(prim)
    for prim in (cudnn._dot_product_attention_bwd_p, jax.lax.exp_p, jax.lax.dot_general_p):
        assert not fused_attention_saveable(prim)


def test_presets_pick_the_lora_policy_per_template():
    """LLaVA-1.5's (under either benchmark's template), Llama-3.2-Vision's and Qwen2(.5)-VL's LoRA stages keep the
    masks and attention outputs (measured faster on an H200), idefics2's and the families not measured both ways keep
    the matmul outputs only; FIUBench's full finetune stays on `full`."""
    from vlmu_jax import presets

    keep, dots = "dots_attention_dropout_saveable", "dots_with_no_batch_dims_saveable"
    for template, want in (("llava-1.5", keep), ("mllmu-llava", keep), ("llama-3.2-vision", keep),
                           ("qwen2-vl", keep), ("idefics2", dots), ("llava-phi", dots)):
        assert presets.mllmu(None, template=template, model_path="").model.remat == want
        fiubench = presets.fiubench(None, template=template, model_path="")
        assert (fiubench.unlearn.remat, fiubench.model.remat) == (want, "full")
