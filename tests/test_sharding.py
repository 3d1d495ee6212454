"""On 8 fake CPU devices, mesh (data=2, fsdp=2, tensor=2): sharded models score and generate like
single-device ones and their big matrices really are split."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from tests.tiny_models import EOS, PAD, save_tiny, tiny_batch
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.scoring import token_logprobs
from vlmu_jax.models.registry import init_model
from vlmu_jax.models.sharding import abstract_batch, batch_shards, global_batch, make_mesh


def _logps(model, batch):
    return np.asarray(
        token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["images"])
    )


def _assert_sharded(model):
    flat = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    for path in [
        ("language_model", "layers", "mlp", "gate_proj", "kernel"),
        ("language_model", "embed_tokens"),
        ("lm_head",),
        ("vision_tower", "layers", "mlp", "fc1", "kernel"),
    ]:
        spec = flat[path].sharding.spec
        assert any(s is not None for s in spec), (path, spec)
        assert len(flat[path].sharding.device_set) == 8


def test_sharded_init_and_load_match_single_device(tmp_path):
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    folder, hf = save_tiny(tmp_path / "m", "llama")
    batch = tiny_batch([6, 3, 5, 2])
    config = hf.config.to_dict()
    single = _logps(init_model(config, seed=0), batch)
    sharded_model = init_model(config, seed=0, mesh=mesh)
    _assert_sharded(sharded_model)
    np.testing.assert_allclose(_logps(sharded_model, batch), single, atol=1e-5)
    loaded = load_pretrained(folder, mesh=mesh)
    _assert_sharded(loaded)
    np.testing.assert_allclose(_logps(loaded, batch), _logps(load_pretrained(folder), batch), atol=1e-5)


def test_sharded_generation_matches_single_device(tmp_path, sliced):
    """KV-cache decoding with params split over (fsdp, tensor) and rows over (data, fsdp) gives the same
    greedy tokens as one device: the cache, the scatter at `index` and the while_loop all run sharded."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    folder, _ = save_tiny(tmp_path / "m", "llama")
    batch = tiny_batch([7, 2, 4, 5], padding="left", seed=3)
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    want = np.asarray(generate(load_pretrained(folder), batch["input_ids"], batch["attention_mask"],
                               batch["images"], **kw))
    inputs = global_batch(batch, mesh)
    assert len(inputs["images"]["pixel_values"].sharding.device_set) == 8
    got = generate(load_pretrained(folder, mesh=mesh), inputs["input_ids"], inputs["attention_mask"],
                   inputs["images"], **kw)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got), want)
    assert (want != PAD).any()


def test_batch_shards_count_the_axes_rows_split_over() -> None:
    """A batch's rows split over data x fsdp (the rules' 'batch'), not over tensor: 4 ways on (2, 2, 2), 8 on
    (2, 4, 1), none without a mesh; `global_batch` gives each device that share of the rows."""
    assert batch_shards(None) == 1
    assert batch_shards(make_mesh(data=2, fsdp=4, tensor=1)) == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert batch_shards(mesh) == 4
    ids = global_batch({"ids": np.arange(8 * 3).reshape(8, 3)}, mesh)["ids"]
    assert {s.data.shape for s in ids.addressable_shards} == {(8 // batch_shards(mesh), 3)}


def test_abstract_batch_is_what_global_batch_places() -> None:
    """Compile-ahead lowers against `abstract_batch`, so a later call's program must be the one compiled: the same
    global shape, dtype (numpy's int64 and float64 as jax keeps them: int32, float32) and placement as the copy
    `global_batch` makes, with a mesh and without one."""
    batch = {"input_ids": np.arange(8 * 3).reshape(8, 3), "attention_mask": np.ones((8, 3), np.int32),
             "images": {"pixel_values": np.zeros((8, 2, 5), np.float64), "pixel_attention_mask": np.ones((8, 5), bool)}}
    for mesh in (None, make_mesh(data=2, fsdp=2, tensor=2), make_mesh(data=1, fsdp=8, tensor=1)):
        placed, abstract = global_batch(batch, mesh), abstract_batch(batch, mesh)
        assert jax.tree.structure(placed) == jax.tree.structure(abstract)
        for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(abstract), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), (mesh, a, b)
            if mesh is not None:
                assert a.sharding == b.sharding
    assert abstract_batch(batch, None)["input_ids"].dtype == np.int32
    assert abstract_batch(batch, None)["images"]["pixel_values"].dtype == np.float32
