"""The decode-step attention kernel (models/decode_attention.py): what jax.nn.dot_product_attention computes for
one query per row over a masked cache, through Pallas's interpreter on CPU; that it lowers to one Triton kernel
for a GPU; and that `layers.attend` routes a GPU decode step to it and nothing else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmu_jax.models import decode_attention as da
from vlmu_jax.models import layers


def _inputs(b: int, s: int, n: int, kh: int, hd: int, dtype, seed: int = 0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(b, 1, n, hd), dtype)
    k = jnp.asarray(rng.randn(b, s, kh, hd), dtype)
    v = jnp.asarray(rng.randn(b, s, kh, hd), dtype)
    valid = rng.rand(b, s) < 0.6  # holes anywhere, not only left padding
    valid[:, :3] = False  # left padding
    valid[0, -(da.BLOCK_K + 5):] = False  # slots past the last token (a cache's room), over a whole key block
    valid[-1] = False
    valid[-1, s // 2] = True  # a row that sees one key
    if b > 2:
        valid[1] = False  # a row that sees none: XLA's softmax spreads it evenly over every key
    return q, k, v, jnp.asarray(valid)[:, None, None, :]


@pytest.mark.parametrize("splits", [1, 3], ids=["whole-rows", "3-slices"])
@pytest.mark.parametrize("b,s,n,kh,hd", [(3, 150, 4, 4, 16), (2, 203, 8, 2, 32), (2, 97, 7, 1, 16)],
                         ids=["heads", "groups-of-4", "one-key-head-7-groups"])
def test_kernel_equals_masked_attention(b, s, n, kh, hd, splits):
    """Each program's query rows read and written in place (one slice), or slices merged by their maxima."""
    q, k, v, mask = _inputs(b, s, n, kh, hd, jnp.float32)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    got = da.decode_attention(q, k, v, mask, interpret=True, splits=splits)
    assert got.shape == want.shape == (b, 1, n, hd)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    # the split merge: slices beyond a row's last valid key and before its first contribute nothing
    rows = np.asarray(mask[:, 0, 0])
    one = int(np.flatnonzero(rows[-1])[0])
    np.testing.assert_allclose(np.asarray(got[-1, 0]), np.asarray(jnp.repeat(v[-1, one], n // kh, axis=0)),
                               rtol=1e-6, atol=1e-6)


def test_bfloat16_within_rounding_of_the_xla_path():
    """In bfloat16 the kernel casts unnormalised probabilities where XLA casts normalised ones: bfloat16
    rounding of values of magnitude ~1 (2**-8 relative) bounds the difference."""
    q, k, v, mask = _inputs(2, 300, 8, 8, 64, jnp.bfloat16, seed=1)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask).astype(jnp.float32)
    got = da.decode_attention(q, k, v, mask, interpret=True).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(got - want))) <= 2 ** -6


@pytest.mark.parametrize("b,kh,splits", [(4, 32, 1), (4, 8, 16)], ids=["llava-7b", "grouped-heads"])
def test_lowers_to_one_triton_kernel_per_call(b, kh, splits):
    """The GPU lowering, made on this CPU: one Triton call over (row, key head, slice) programs reading the
    [B, S, K, H] cache as it is (no transpose or copy of it). LLaVA-7B at B=4 has 4 x 32 = 128 >= 96 (row, head)
    pairs: one program each, writing the [B, 1, N, H] output itself. Grouped heads (8 key heads) at B=4 have 32:
    512 / 32 = 16 slices of the 736 slots (46 each, rounded up to one 64-slot block: cdiv(736, 64) = 12 slices),
    merged after the kernel."""
    s, n, hd = 736, 32, 128
    args = [jax.ShapeDtypeStruct(x, jnp.bfloat16) for x in ((b, 1, n, hd), (b, s, kh, hd), (b, s, kh, hd))]
    args.append(jax.ShapeDtypeStruct((b, 1, 1, s), jnp.bool_))
    text = jax.jit(da.decode_attention).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "custom_call @__gpu$xla.gpu.triton" in line]
    assert len(calls) == 1
    z = 1 if splits == 1 else 12
    assert f"grid_x = {b} : i32, grid_y = {kh} : i32, grid_z = {z} : i32" in calls[0]
    # 128 programs (fewer than two per SM of an H200) keep 3 loads in flight each; 4 x 8 x 12 = 384 keep 2
    assert f"num_stages = {3 if splits == 1 else 2} : i32" in calls[0]
    assert f"tensor<{b}x{s}x{kh}x{hd}xbf16>" in calls[0]
    assert "stablehlo.transpose" not in text
    if splits == 1:  # the kernel's own output is the result: nothing to merge
        assert f"-> tensor<{b}x{n}x{hd}xbf16>" in calls[0]


def test_attend_routes_only_gpu_decode_steps(monkeypatch):
    """`layers.attend` with the GPU implementation sends a one-query masked call to the kernel (its result, within
    bfloat16 rounding of XLA's) and leaves prompts, length masks and CPU calls on their paths."""
    calls = []
    kernel = da.decode_attention

    def counted(*args):
        calls.append(args[0].shape)
        return kernel(*args, interpret=True)

    q, k, v, mask = _inputs(2, 130, 8, 2, 32, jnp.bfloat16)
    one_device = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(one_device):
        assert not da.supported(q, k, mask)  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(da, "decode_attention", counted)
    monkeypatch.setattr(layers, "resolve_attention_impl", lambda impl, dtype=None: impl)
    with jax.set_mesh(one_device):
        got = layers.attend(q, k, v, mask, impl="cudnn")
    assert calls == [q.shape]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))) <= 2 ** -6
    with jax.set_mesh(one_device):
        assert da.supported(q, k, mask)
        assert not da.supported(jnp.concatenate([q, q], axis=1), k, mask)  # two queries: a prompt
        assert not da.supported(q, k, layers.SeqLengths(keys=jnp.full((2,), 130)))
        assert not da.supported(q[..., :24], k[..., :24], mask)  # a head size Triton's tiles cannot take
    # several devices to run on (XLA's partitioner would gather every operand to each): a mesh of two, or no mesh
    # in a process with this test run's 8 devices
    with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
        assert not da.supported(q, k, mask)
    assert jax.device_count() > 1 and not da.supported(q, k, mask)


def _kernel_in_decode_steps(monkeypatch, *modules) -> list:
    """Every one-query masked attention a decode step hands the model's own attention (not XLA's, which
    `decode_step` asks for with several tokens) goes through the kernel (Pallas's interpreter); the key shapes
    of those calls come back."""
    calls = []
    for module in modules:
        def attend(q, k, v, mask, *, impl, causal=False, real=module.attend):
            if q.shape[1] == 1 and impl != "xla" and isinstance(mask, jax.Array) and mask.shape[1:3] == (1, 1):
                calls.append(k.shape)
                return da.decode_attention(q, k, v, mask, interpret=True)
            return real(q, k, v, mask, impl=impl, causal=causal)

        monkeypatch.setattr(module, "attend", attend)
    return calls


def test_llava_generation_through_the_kernel(tmp_path, sliced, monkeypatch):
    """Left-padded prompts (LLaVA, Llama decoder, over the stack or its slices): the same greedy tokens with every
    decode step's attention in the kernel."""
    from tests.tiny_models import EOS, PAD, save_tiny, tiny_batch
    from vlmu_jax.checkpoints.hf_import import load_pretrained
    from vlmu_jax.eval.generate import generate
    from vlmu_jax.models import llama

    folder, _ = save_tiny(tmp_path / "llava", "llama")
    batch = tiny_batch([7, 2, 4], padding="left", seed=1)

    def tokens():
        return np.asarray(generate(load_pretrained(folder), batch["input_ids"], batch["attention_mask"],
                                   batch["images"], max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD))

    want = tokens()
    jax.clear_caches()  # the decode program is traced again, with the kernel
    calls = _kernel_in_decode_steps(monkeypatch, llama)
    np.testing.assert_array_equal(tokens(), want)
    assert calls and all(shape[0] == 3 for shape in calls)


def test_mllama_generation_through_the_kernel(tmp_path, monkeypatch):
    """Mllama (grouped key heads; rows with and without images): the same greedy tokens with every decode step's
    self- and cross-attention in the kernel."""
    from tests.tiny_mllama import EOS, PAD, tiny_batch, tiny_hf_model
    from vlmu_jax.checkpoints.hf_import import load_pretrained
    from vlmu_jax.eval.generate import generate
    from vlmu_jax.models import llama, mllama

    tiny_hf_model().save_pretrained(tmp_path)
    batch, _ = tiny_batch([(3, 5, 2), (0, 2, 4), (4, 0, None)], padding="left", seed=3)

    def tokens():
        return np.asarray(generate(load_pretrained(tmp_path), batch["input_ids"], batch["attention_mask"],
                                   batch["images"], max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD))

    want = tokens()
    jax.clear_caches()  # the decode program is traced again, with the kernel
    calls = _kernel_in_decode_steps(monkeypatch, llama, mllama)
    np.testing.assert_array_equal(tokens(), want)
    cache_len = max(shape[1] for shape in calls)
    assert any(shape[1] != cache_len for shape in calls)  # the cross layers' image keys as well as the cache
