"""LoRA's dropout and down-product as one kernel (models/lora_kernel.py), run through Pallas's interpreter on this
CPU: the mask is `layers.dropout_keep`'s bit for bit, the product that of the masked input, the GPU lowering one
Triton call, and a LoRA projection trains alike on both paths, the mask kept for the backward by the policies
that keep masks rather than the kernel run again."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlmu_jax.models import layers, lora_kernel
from vlmu_jax.models.layers import REMAT_POLICIES, Dense, dropout_keep


def exact_product(x: jax.Array, a: jax.Array, keep: jax.Array, rate: float) -> np.ndarray:
    """The masked input times A, summed in float64. The masked input is made on the host: the kept inputs over the
    bf16 keep rate, divided in float32 and rounded to bf16 once, as the kernel does (a GPU's own division and its
    gemm's partial sums may round otherwise, see `close`)."""
    divisor = np.float32(np.asarray(1.0 - rate, x.dtype))
    quotient = (np.asarray(x, np.float32) / divisor).astype(x.dtype)
    masked = np.where(np.asarray(keep), quotient, 0).astype(np.float64)
    return masked @ np.asarray(a, np.float64)


def close(got: jax.Array, exact: np.ndarray) -> bool:
    """Whether `got` is the exact product up to rounding: an RMS error under a bf16 ulp of the product's RMS (a
    wrong mask or a misplaced tile is off by the product's own size). The kernel on this CPU meets the tighter
    bound of the test below; on an H100 (session 31, call 110) the kernel's and XLA's products were ~0.2 % off."""
    err = np.asarray(got, np.float64) - exact
    return bool(np.sqrt(np.mean(err**2)) <= 2**-7 * np.sqrt(np.mean(exact**2)))


@pytest.mark.parametrize(("rows", "d", "rank", "rate", "programs"), [
    (128, 256, 16, 0.05, 8),  # two row blocks, two chunks a quarter, K split in two
    (192, 1024, 32, 0.3, 12),  # three row blocks, K split in four (8 chunks / 4)
    (64, 768, 16, 0.5, 64),  # six chunks a quarter split six ways
])
def test_kernel_writes_dropout_keeps_mask_and_its_product(rows, d, rank, rate, programs):
    x = jax.random.normal(jax.random.key(1), (rows, d)).astype(jnp.bfloat16)
    a = (0.1 * jax.random.normal(jax.random.key(2), (d, rank))).astype(jnp.bfloat16)
    rng = jax.random.fold_in(jax.random.key(3), rows)
    want_keep = np.asarray(dropout_keep(rng, x.shape, rate))
    h, keep = lora_kernel.fused_call(x, a, jax.random.key_data(rng).astype(jnp.uint32), rate=rate,
                                     interpret=True, programs=programs)
    assert keep.dtype == jnp.uint8  # 1 kept, 0 dropped
    np.testing.assert_array_equal(np.asarray(keep), want_keep.astype(np.uint8))
    exact = exact_product(x, a, jnp.asarray(want_keep), rate)
    assert h.dtype == jnp.bfloat16 and h.shape == (rows, rank)
    assert close(h, exact) and close(lora_kernel.reference(x, a, jnp.asarray(want_keep), rate), exact)
    if jax.default_backend() == "cpu":
        # the kernel rounds its float32 sum to bfloat16 once: within a bf16 half-ulp of the exact sum, plus
        # float32's error
        assert (np.abs(np.asarray(h, np.float64) - exact) <= 2**-8 * np.abs(exact) + 1e-5).all()


def test_what_the_kernel_takes():
    bf16 = jnp.bfloat16
    assert lora_kernel.fits((4, 704, 4096), 128, bf16) and lora_kernel.fits((4, 704, 11008), 128, bf16)
    assert lora_kernel.fits((2816, 3072), 16, jnp.float16)  # Phi-3's width
    assert not lora_kernel.fits((4, 704, 4096), 8, bf16)  # rank under the Triton dot's 16
    assert not lora_kernel.fits((4, 704, 4096), 96, bf16)  # not a power of two
    assert not lora_kernel.fits((4, 704, 4096), 256, bf16)  # not run on a GPU: XLA's path
    assert not lora_kernel.fits((4, 704, 1000), 16, bf16)  # a quarter of 250 blocks: not whole 32-block chunks
    assert not lora_kernel.fits((70, 4096), 16, bf16)  # not whole 64-row blocks
    assert not lora_kernel.fits((4, 704, 4096), 16, jnp.float32)
    assert not lora_kernel.fits((2**22 + 64, 4096), 16, bf16)  # 2**32 Threefry counts or more
    # a tiling whose chunks do not tile the quarter is refused, not run over part of it
    x, a = jnp.zeros((64, 11008), bf16), jnp.zeros((11008, 16), bf16)
    with pytest.raises(ValueError, match="four quarters"):
        lora_kernel.fused_call(x, a, jnp.zeros(2, jnp.uint32), rate=0.05, block_cols=128, interpret=True)


def test_kernel_lowers_to_one_triton_call():
    """The GPU lowering, made on this CPU, at LLaVA-7B's LoRA inputs (4 x 704 tokens): one Triton call over 44
    row blocks x 6 splits writing the float32 partials and the mask as bytes (no boolean inside Triton); around it
    only their sum and cast (no select, no Threefry, no gemm of XLA's)."""
    for d in (4096, 11008):
        args = (jax.ShapeDtypeStruct((2816, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, 128), jnp.bfloat16),
                jax.ShapeDtypeStruct((2,), jnp.uint32))
        text = lora_kernel.fused_call.trace(*args, rate=0.05).lower(lowering_platforms=("cuda",)).as_text()
        calls = [line for line in text.splitlines() if "custom_call @__gpu$xla.gpu.triton" in line]
        assert len(calls) == 1
        assert "grid_x = 44 : i32, grid_y = 6 : i32, grid_z = 1 : i32" in calls[0]
        assert f"-> (tensor<6x2816x128xf32>, tensor<2816x{d}xui8>)" in calls[0]
        around = "\n".join(line for line in text.splitlines() if line not in calls)
        assert not any(op in around for op in ("select", "threefry", "dot_general"))
        assert re.findall(r"stablehlo\.(\w+)", around) == ["constant", "reduce", "add", "convert"]


def projection(rank: int = 16) -> tuple:
    """A rank-16 LoRA projection (256 -> 24) with dropout 0.05 in train mode, bf16, split into (graph, LoRA
    params, the rest), an input [2, 64, 256] and a dropout key."""
    dense = Dense(256, 24, axes=(None, None), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    dense.lora_a = nnx.LoRAParam(0.1 * jax.random.normal(jax.random.key(1), (256, rank)))
    dense.lora_b = nnx.LoRAParam(0.1 * jax.random.normal(jax.random.key(2), (rank, 24)))
    dense.lora_dropout, dense.deterministic = 0.05, False
    x = jax.random.normal(jax.random.key(3), (2, 64, 256)).astype(jnp.bfloat16)
    return (*nnx.split(dense, nnx.LoRAParam, ...), x, jax.random.key(4))


def test_lora_projection_trains_alike_fused_and_unfused(monkeypatch):
    """On one GPU (made true here) a LoRA projection's forward runs the kernel (interpreted); its output and its
    LoRA gradients are the unfused path's (the same mask; the product sums in another order) under the policies
    the presets use. The policies that keep masks keep the kernel's rank-r output too, so its backward does not
    run the kernel again; the dots policy alone (idefics2's presets) runs it again to rebuild the mask."""
    graphdef, lora, rest, x, rng = projection()

    def run(policy: str, fused: bool):
        def loss(lora):  # a new function each run: jax.checkpoint caches its traces by function
            return jnp.square(nnx.merge(graphdef, lora, rest)(x, rng).astype(jnp.float32)).sum()

        with monkeypatch.context() as m:
            m.setattr(layers, "runs_on_one_gpu", lambda: fused)
            m.setattr(layers, "FUSED_LORA_DROPOUT", True)
            m.setattr(lora_kernel, "fused_call", interpreted)
            value_and_grad = jax.value_and_grad(jax.checkpoint(loss, policy=REMAT_POLICIES[policy]))
            kernels = str(jax.make_jaxpr(value_and_grad)(lora)).count("pallas_call")
            return value_and_grad(lora), kernels

    def interpreted(*args, **kwargs):
        return call(*args, **{**kwargs, "interpret": True})

    call = lora_kernel.fused_call
    for policy, runs in (("dots_attention_inputs_dropout_saveable", 1), ("dots_attention_dropout_saveable", 1),
                         ("dots_with_no_batch_dims_saveable", 2)):
        (want_loss, want), unfused_runs = run(policy, fused=False)
        (got_loss, got), fused_runs = run(policy, fused=True)
        assert (unfused_runs, fused_runs) == (0, runs), policy
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=2e-3)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-2, atol=2e-2 * np.abs(w).max())


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel needs a GPU")
def test_compiled_kernel_on_a_gpu():
    """On a GPU, compiled (Triton): LLaVA-7B's LoRA inputs at 4 x 704 tokens give `dropout_keep`'s mask (there its
    own kernel's) and the masked input's product; a LoRA projection's gradients match the unfused path's."""
    for d in (4096, 11008):
        x = jax.random.normal(jax.random.key(1), (2816, d)).astype(jnp.bfloat16)
        a = (0.05 * jax.random.normal(jax.random.key(2), (d, 128))).astype(jnp.bfloat16)
        rng = jax.random.key(d)
        want_keep = dropout_keep(rng, x.shape, 0.05)
        h, keep = lora_kernel.fused_call(x, a, jax.random.key_data(rng).astype(jnp.uint32), rate=0.05)
        np.testing.assert_array_equal(np.asarray(keep), np.asarray(want_keep).astype(np.uint8))
        assert close(h, exact_product(x, a, want_keep, 0.05))
    graphdef, lora, rest, x, rng = projection()

    def grads(fused: bool):
        default, layers.FUSED_LORA_DROPOUT = layers.FUSED_LORA_DROPOUT, fused
        try:
            def loss(lora):
                return jnp.square(nnx.merge(graphdef, lora, rest)(x, rng).astype(jnp.float32)).sum()

            policy = REMAT_POLICIES["dots_attention_inputs_dropout_saveable"]
            return jax.jit(jax.grad(jax.checkpoint(loss, policy=policy)))(lora)
        finally:
            layers.FUSED_LORA_DROPOUT = default

    for g, w in zip(jax.tree.leaves(grads(True)), jax.tree.leaves(grads(False)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-2, atol=2e-2 * np.abs(w).max())
