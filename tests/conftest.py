"""Test-wide JAX setup: 8 fake CPU devices (sharding tests) and exact float32 matmuls (parity tests).

XLA_FLAGS must be set before jax is first imported, which is why this lives in conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(params=[False, True], ids=["stacked", "sliced"])
def sliced(request, monkeypatch):
    """Generation both ways on CPU: over the stacked weights (the CPU default) and over per-layer weight slices
    (the GPU default, llama.SlicedCache)."""
    monkeypatch.setattr("vlmu_jax.eval.generate.decode_over_slices", lambda model: request.param)
    return request.param
