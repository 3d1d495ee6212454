"""HF tiny -> load_pretrained -> export_hf -> transformers.from_pretrained is bit-identical; bad inputs
fail clearly."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlavaForConditionalGeneration

from tests.tiny_models import save_tiny
from vlmu_jax.checkpoints.hf_export import export_hf
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.errors import InputError


def _assert_same(a: LlavaForConditionalGeneration, b: LlavaForConditionalGeneration) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("text,shard", [("llama", False), ("phi3", True)])
def test_export_roundtrip_bit_identical(tmp_path, text, shard):
    folder, hf = save_tiny(tmp_path / "src", text)
    out = export_hf(load_pretrained(folder), tmp_path / "out", max_shard_bytes=20_000 if shard else 2**30)
    assert (out / "model.safetensors.index.json").exists() == shard
    _assert_same(hf, LlavaForConditionalGeneration.from_pretrained(out))


def test_export_bf16_preserves_dtype(tmp_path):
    folder, _ = save_tiny(tmp_path / "src", "llama")
    model = load_pretrained(folder, dtype=jnp.bfloat16)
    out = export_hf(model, tmp_path / "out")
    back = LlavaForConditionalGeneration.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    again = export_hf(load_pretrained(out, dtype=jnp.bfloat16), tmp_path / "again")
    _assert_same(back, LlavaForConditionalGeneration.from_pretrained(again, dtype="auto"))


def test_missing_safetensors(tmp_path):
    folder, _ = save_tiny(tmp_path / "m", "llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no model.safetensors"):
        load_pretrained(folder)


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
    """An interrupted copy: the header promises bytes the file no longer has."""
    folder, _ = save_tiny(tmp_path / "m", "llama")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"model.safetensors: tensor \S+: data_offsets: truncated: the tensor ends "
                                         r"at byte \d+, the file has \d+ bytes"):
        load_pretrained(folder)


def test_wrong_shape_names_tensor(tmp_path):
    folder, _ = save_tiny(tmp_path / "m", "llama")
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.q_proj.weight") and "language" in k)
    tensors[key] = np.zeros((3, 3), np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(InputError, match=r"layers\.1\.self_attn\.q_proj\.weight: shape: \(3, 3\), but config.json"):
        load_pretrained(folder)


def test_missing_tensor_named(tmp_path):
    folder, _ = save_tiny(tmp_path / "m", "llama")
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("norm.weight") and "layers" not in k and "language" in k)
    del tensors[key]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(InputError, match="tensor model.language_model.norm.weight: missing"):
        load_pretrained(folder)


def test_unknown_architecture(tmp_path):
    folder, _ = save_tiny(tmp_path / "m", "llama")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"], config["architectures"] = "blip-2", ["Blip2ForConditionalGeneration"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="config.json: model_type: unknown architecture.*blip-2"):
        load_pretrained(bad)


def test_fp16_checkpoint_loads_as_bf16_sharded(tmp_path):
    """A float16 checkpoint (llava-hf's own dtype) loaded as bfloat16 on a (data, fsdp, tensor) mesh: each param
    holds numpy's rounding of the stored value and is split over the mesh. The cast and the transposes run on
    the devices (checkpoints/layout.py), on arrays placed in HF layout first."""
    import jax
    from flax import nnx

    from vlmu_jax.models.sharding import make_mesh

    _, hf = save_tiny(tmp_path / "src", "llama")
    hf.half().save_pretrained(tmp_path / "fp16")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    got = dict(nnx.to_flat_state(nnx.state(load_pretrained(tmp_path / "fp16", dtype=jnp.bfloat16, mesh=mesh))))
    want = dict(nnx.to_flat_state(nnx.state(load_pretrained(tmp_path / "fp16", dtype=jnp.float32))))
    assert got.keys() == want.keys()
    split = 0
    for path, var in got.items():
        g = var.get_value()
        assert g.dtype == jnp.bfloat16, path
        expect = np.asarray(want[path].get_value()).astype(jnp.bfloat16)  # float16 -> float32 is exact
        np.testing.assert_array_equal(np.asarray(g), expect, err_msg=str(path))
        split += len(g.sharding.device_set) == 8 and any(s is not None for s in g.sharding.spec)
    assert split > 10 and jax.device_count() == 8


def test_load_holds_at_most_its_host_byte_budget(tmp_path, monkeypatch):
    """Params are read from several threads, but only as many at once as fit the host byte budget; a budget
    smaller than any param reads them one at a time. The loaded model is the same either way."""
    import threading
    import time

    from flax import nnx

    from vlmu_jax.checkpoints import hf_import

    folder, _ = save_tiny(tmp_path / "src", "llama")
    inner, lock = hf_import._make_array, threading.Lock()

    def loads_at_once(budget: int) -> tuple[int, dict]:
        at_once = [0, 0]  # now, most

        def counted(*args, **kwargs):
            with lock:
                at_once[0] += 1
                at_once[1] = max(at_once)
            time.sleep(0.02)  # long enough for the other threads to start theirs if the budget lets them
            try:
                return inner(*args, **kwargs)
            finally:
                with lock:
                    at_once[0] -= 1

        monkeypatch.setattr(hf_import, "_LOAD_HOST_BYTES", budget)
        monkeypatch.setattr(hf_import, "_make_array", counted)
        state = nnx.to_flat_state(nnx.state(load_pretrained(folder)))
        return at_once[1], {k: np.asarray(v.get_value()) for k, v in state}

    one, tight = loads_at_once(1)
    many, roomy = loads_at_once(1 << 30)
    assert one == 1
    if hf_import._LOAD_THREADS > 1:
        assert many > 1
    assert tight.keys() == roomy.keys() and len(tight) > 10
    for k in tight:
        np.testing.assert_array_equal(tight[k], roomy[k])
