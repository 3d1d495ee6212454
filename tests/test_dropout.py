"""LoRA dropout's keep mask (layers.dropout_keep): four 16-bit lanes per Threefry block, each element kept with
probability 1 - rate independently, the same mask however the array is sharded; kept for the backward under the
`dots_and_dropout_saveable` remat policy."""

from __future__ import annotations

import re

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
    # Elements c and q + c share a Threefry block (lanes 0 and 1 of one count), neighbours do not: both pairs are
    # dropped together as often as independence says.
    q = -(-shape[-1] // 4)
    for first, second in ((keep[..., :q], keep[..., q:2 * q]), (keep[..., :-1], keep[..., 1:])):
        both = (~first & ~second).mean()
        assert abs(both - realised**2) < 5 * np.sqrt(realised**2 / first.size)
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


def test_mask_layout_is_four_quarters_of_lanes():
    """Element l * q + c of row r (q = ceil(d / 4)) is lane l of Threefry block r * q + c, the lanes being
    (hi & 0xFFFF, hi >> 16, lo & 0xFFFF, lo >> 16), kept where the lane is >= round(rate * 65536): derived here
    from jax's own Threefry-2x32 for d = 10 (q = 3; the last quarter has one element)."""
    from jax.extend.random import threefry2x32_p

    key, rate, rows, d = jax.random.key(5), 0.5, 3, 10
    k = jax.random.key_data(key)
    counts = jnp.arange(rows * 3, dtype=jnp.uint32)
    hi, lo = (np.asarray(w).reshape(rows, 3) for w in threefry2x32_p.bind(k[0], k[1], jnp.zeros_like(counts), counts))
    lanes = (hi & 0xFFFF, hi >> 16, lo & 0xFFFF, lo >> 16)
    want = np.zeros((rows, d), bool)
    for r in range(rows):
        for e in range(d):
            want[r, e] = lanes[e // 3][r, e % 3] >= 32768
    np.testing.assert_array_equal(np.asarray(dropout_keep(key, (rows, d), rate)), want)


def test_mask_does_not_depend_on_sharding():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    key, shape = jax.random.key(11), (8, 64, 96)
    want = np.asarray(dropout_keep(key, shape, 0.1))
    x = jax.device_put(jnp.ones(shape), NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor")))
    got = jax.jit(lambda x: jnp.where(dropout_keep(key, x.shape, 0.1), x, 0))(x)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got) == 1, want)


def lora_projection(din: int, dout: int, lead: tuple[int, ...]) -> tuple:
    """A rank-4 LoRA projection with dropout 0.3 in train mode, split into (graph, LoRA params, the rest), and an
    input [*lead, din] and dropout key for it."""
    dense = Dense(din, dout, axes=(None, None), rngs=nnx.Rngs(0))
    dense.lora_a = nnx.LoRAParam(jax.random.normal(jax.random.key(1), (din, 4)))
    dense.lora_b = nnx.LoRAParam(jax.random.normal(jax.random.key(2), (4, dout)))
    dense.lora_dropout, dense.deterministic = 0.3, False
    return (*nnx.split(dense, nnx.LoRAParam, ...), jax.random.normal(jax.random.key(3), (*lead, din)),
            jax.random.key(4))


def test_remat_policy_keeping_dropout_masks(capsys):
    """`dots_and_dropout_saveable` (and the presets' `dots_attention_dropout_saveable`, and
    `projections_attention_dropout_saveable`) keeps each LoRA dropout mask for the backward instead of drawing it
    again: the masks are among what it saves (not under the plain dots policy), and the gradients are those without
    remat."""
    graphdef, lora, rest, x, rng = lora_projection(8, 6, (4, 5))

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
    """LLaVA-1.5's LoRA stages (under either benchmark's template) keep the masks, attention's inputs and outputs;
    Llama-3.2-Vision's and Qwen2(.5)-VL's the masks and attention's outputs (each measured faster on an H200);
    idefics2's and the families not measured both ways the matmul outputs only; FIUBench's full finetune stays on
    `full`."""
    from vlmu_jax import presets

    inputs, keep, dots = ("dots_attention_inputs_dropout_saveable", "dots_attention_dropout_saveable",
                          "dots_with_no_batch_dims_saveable")
    for template, want in (("llava-1.5", inputs), ("mllmu-llava", inputs), ("llama-3.2-vision", keep),
                           ("qwen2-vl", keep), ("idefics2", dots), ("llava-phi", dots)):
        assert presets.mllmu(None, template=template, model_path="").model.remat == want
        fiubench = presets.fiubench(None, template=template, model_path="")
        assert (fiubench.unlearn.remat, fiubench.model.remat) == (want, "full")


def test_threefry_in_kernel_form_is_jaxs():
    """`dropout_kernel.threefry2x32` (plain uint32 ops, for use inside a kernel) gives jax's Threefry-2x32 words."""
    from jax.extend.random import threefry2x32_p

    from vlmu_jax.models.dropout_kernel import threefry2x32

    k = jax.random.key_data(jax.random.key(123))
    x0 = jnp.asarray(np.random.RandomState(0).randint(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32))
    x1 = jnp.arange(2**32 - 1000, 2**32, dtype=jnp.uint32)  # counts near the top: uint32 wrap-around
    for got, want in zip(threefry2x32(k[0], k[1], x0, x1), threefry2x32_p.bind(k[0], k[1], x0, x1), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_mask_kernel_gives_dropout_keeps_bits():
    """The mask kernel (through Pallas's interpreter on this CPU) writes `dropout_keep`'s mask bit for bit: tiles
    past the rows or blocks (rows not a multiple of 64, a last axis not a multiple of 4 or of 256), three rates,
    and a tiling other than the default."""
    from vlmu_jax.models.dropout_kernel import keep_mask

    for shape, rate in (((3, 5, 64), 0.05), ((2, 70, 44), 0.05), ((1, 9, 10), 0.5), ((130, 300), 0.3)):
        key = jax.random.fold_in(jax.random.key(7), len(shape))
        want = np.asarray(dropout_keep(key, shape, rate))
        got = np.asarray(keep_mask(key, shape, rate, interpret=True))
        assert got.dtype == bool and got.shape == shape
        np.testing.assert_array_equal(got, want)
    # another tiling (what bench_dropout.py's MASK_TILINGS sweeps) writes the same bits
    got = keep_mask(key, (130, 300), 0.3, interpret=True, block_rows=16, block_cols=32, warps=2)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_mask_kernel_lowers_to_one_triton_call():
    """The GPU lowering, made on this CPU: one Triton call per mask over (64-row, 64-block) programs writing the
    [rows, 4, blocks] booleans that are the mask in its own element order (no transpose, concatenate or uint32
    array around it). LLaVA-7B's 4096-wide masks at 4 x 704 tokens: 44 x 16 programs; the 11008-wide: 44 x 43."""
    from vlmu_jax.models.dropout_kernel import keep_mask

    for d, blocks in ((4096, 1024), (11008, 2752)):
        text = keep_mask.trace(jax.random.key(0), (4, 704, d), 0.05).lower(lowering_platforms=("cuda",)).as_text()
        calls = [line for line in text.splitlines() if "custom_call @__gpu$xla.gpu.triton" in line]
        assert len(calls) == 1
        assert f"grid_x = 44 : i32, grid_y = {blocks // 64} : i32, grid_z = 1 : i32" in calls[0]
        assert f"-> tensor<2816x4x{blocks}xi1>" in calls[0]
        around = "\n".join(line for line in text.splitlines() if line not in calls)  # the kernel's IR names its code
        assert not any(op in around for op in ("transpose", "concatenate", "threefry"))
        assert re.findall(r"tensor<[0-9x]*ui32>", around) == ["tensor<2xui32>"] * around.count("ui32>")  # the key


def test_mask_kernel_in_a_lora_step(monkeypatch):
    """On one GPU (`sharding.runs_on_one_gpu`, made true here) `dropout_keep` draws each mask with the kernel,
    and a LoRA projection's gradients are those of XLA's path (this CPU's), with the mask kept for the backward or
    drawn again there: the kernel (interpreted) sits inside jax.grad and remat."""
    import functools

    from vlmu_jax.models import dropout_kernel, layers
    from vlmu_jax.models.dropout_kernel import keep_mask

    assert not layers.runs_on_one_gpu()  # no GPU here

    graphdef, lora, rest, x, rng = lora_projection(40, 24, (2, 70))

    def grads(policy):
        def f(lora):
            return jnp.tanh(nnx.merge(graphdef, lora, rest)(x, rng)).sum()

        return jax.grad(jax.checkpoint(f, policy=REMAT_POLICIES[policy]))(lora)

    drawn = []

    def kernel(*args):
        drawn.append(args[1])
        return functools.partial(keep_mask, interpret=True)(*args)

    for policy in ("dots_with_no_batch_dims_saveable", "dots_attention_dropout_saveable"):
        want = grads(policy)
        monkeypatch.setattr(layers, "runs_on_one_gpu", lambda: True)
        monkeypatch.setattr(dropout_kernel, "keep_mask", kernel)
        got = grads(policy)
        monkeypatch.undo()
        assert drawn and drawn[-1] == (2, 70, 40)  # the kernel drew the mask
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
