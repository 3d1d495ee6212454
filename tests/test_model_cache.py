"""`ModelCache` builds the model `load_pretrained` would read back from the folder just written: same values
(LoRA merged, cast to the folder's dtype, then to the load dtype), same sharding and config; every model it hands
out owns its arrays; at most `capacity` models are held; the folder written from a held model (in the background,
by the stages) is byte for byte the one `export_hf` writes."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_models import tiny_config
from vlmu_jax.checkpoints import in_memory
from vlmu_jax.checkpoints.hf_export import export_held, export_hf
from vlmu_jax.checkpoints.hf_import import load_pretrained
from vlmu_jax.checkpoints.in_memory import ModelCache, _HostCopier
from vlmu_jax.models import lora
from vlmu_jax.models.registry import init_model
from vlmu_jax.models.sharding import make_mesh

OPTIONS = {"scan_layers": True, "remat": "none", "attention_impl": "xla"}


def _trained(seed: int = 0) -> nnx.Module:
    """A float32 model with non-zero LoRA adapters, as a training stage leaves it."""
    model = init_model(tiny_config("llama").to_dict(), seed=seed)
    lora.apply_lora(model, rank=2, alpha=4.0, targets=r".*q_proj", seed=seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(jax.random.normal(jax.random.key(len(path)), var.get_value().shape, var.get_value().dtype))
    return model


def _saved(folder: Path, cache: ModelCache, seed: int = 0, dtype=None) -> None:
    """What stages._save_model + ModelCache.put do: merge LoRA, write the folder, hold the model."""
    model = lora.merge_lora(_trained(seed))
    export_hf(model, folder, dtype=dtype)
    cache.put(folder, model, dtype=dtype)


def _params(model: nnx.Module) -> dict:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize(("save_dtype", "load_dtype"), [(None, jnp.float32), (jnp.bfloat16, jnp.float32),
                                                        (None, jnp.bfloat16)])
def test_held_model_is_the_reloaded_folder(tmp_path: Path, save_dtype, load_dtype) -> None:
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cache = ModelCache(capacity=1)
    _saved(tmp_path / "m", cache, dtype=save_dtype)
    held = cache.load(tmp_path / "m", load_dtype, mesh, **OPTIONS)
    disk = load_pretrained(tmp_path / "m", dtype=load_dtype, mesh=mesh, **OPTIONS)
    assert held.config == disk.config
    want, got = _params(disk), _params(held)
    assert set(got) == set(want)
    for path, value in want.items():
        assert got[path].dtype == value.dtype and got[path].sharding == value.sharding, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))


def test_each_load_owns_its_arrays(tmp_path: Path) -> None:
    cache = ModelCache(capacity=1)
    _saved(tmp_path / "m", cache)
    first = cache.load(tmp_path / "m", jnp.float32, **OPTIONS)
    want = {p: np.asarray(v) for p, v in _params(first).items()}
    for value in _params(first).values():
        value.delete()  # what donating them to a train step does
    second = _params(cache.load(tmp_path / "m", jnp.float32, **OPTIONS))
    for path, value in want.items():
        np.testing.assert_array_equal(np.asarray(second[path]), value)


def test_capacity_drops_the_least_recently_used(tmp_path: Path) -> None:
    cache = ModelCache(capacity=2)
    for seed, name in enumerate("abc"):
        if name == "c":
            assert cache.load(tmp_path / "a", jnp.float32, **OPTIONS) is not None  # a is now the most recent
        _saved(tmp_path / name, cache, seed=seed)
    held = {n for n in "abc" if cache.load(tmp_path / n, jnp.float32, **OPTIONS) is not None}
    assert held == {"a", "c"}
    off = ModelCache(capacity=0)
    _saved(tmp_path / "d", off)
    assert off.load(tmp_path / "d", jnp.float32, **OPTIONS) is None


@pytest.mark.parametrize("save_dtype", [None, jnp.bfloat16])
def test_folder_written_from_the_held_copy_is_the_exported_one(tmp_path: Path, save_dtype,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A model trained on a (data, fsdp, tensor) mesh, held sharded in host memory in HF layout: the folder
    written from that copy alone (no device work) has the files, and the bytes, of `export_hf`'s, sharded files
    included. Each block is copied out of its staging buffer by several host threads (a chunk of 1 kB each here,
    64 MB in use), into memory of its own; params above STAGE_MAX_BYTES (4 kB here) are copied straight out, in
    between the staged ones, and the folder's order is kept."""
    monkeypatch.setattr(_HostCopier, "_CHUNK", 1024)
    monkeypatch.setattr(_HostCopier, "_THREADS", 3)
    monkeypatch.setattr(in_memory, "STAGE_MAX_BYTES", 4096)
    direct = []
    monkeypatch.setattr(in_memory.HostCopy, "of", classmethod(
        lambda cls, x, of=in_memory.HostCopy.of.__func__: direct.append(x.shape) or of(cls, x)))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    first = tmp_path / "first"
    export_hf(lora.merge_lora(_trained()), first)
    model = load_pretrained(first, mesh=mesh, **OPTIONS)
    want = export_hf(model, tmp_path / "a", dtype=save_dtype, max_shard_bytes=60_000)
    cache = ModelCache(capacity=1)
    cache.put(tmp_path / "b", model, dtype=save_dtype)
    config, params = cache.held(tmp_path / "b")
    # In pageable host memory, each distinct block once: over (data=2, fsdp=2, tensor=2) a param held by 8 devices
    # is at most 4 distinct blocks (rows over data are replicas), and the blocks add up to the param's size.
    assert all(isinstance(b, np.ndarray) and b.flags.owndata for v in params.values() for b in v.blocks.values())
    assert max(b.nbytes for v in params.values() for b in v.blocks.values()) > 3 * 1024  # split over 3 threads
    assert all(sum(b.nbytes for b in v.blocks.values()) == np.prod(v.shape) * v.dtype.itemsize
               for v in params.values())
    assert max(len(v.blocks) for v in params.values()) == 4
    assert 0 < len(direct) < len(params)  # both ways out were taken
    # Held as the folder stores it (HF layout): the writer streams bytes, it transposes nothing on the host.
    kernel = params[("language_model", "layers", "mlp", "down_proj", "kernel")]
    flax_kernel = model.language_model.layers.mlp.down_proj.kernel[...]
    assert kernel.shape == flax_kernel.shape[:1] + flax_kernel.shape[1:][::-1] != flax_kernel.shape
    got = export_held(tmp_path / "b", config, params, max_shard_bytes=60_000)
    names = sorted(f.name for f in want.iterdir())
    assert sorted(f.name for f in got.iterdir()) == names and len(names) > 3  # config, index, several shards
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    assert cache.held(tmp_path / "nothing") is None
