"""Test-wide JAX setup: 8 fake CPU devices (sharding tests), exact float32 matmuls (parity tests), and XLA:CPU's
cheapest code generation in the test processes.

Why the last: the in-process tests run tiny models a few times, so their time is almost all XLA compiles, and
LLVM's optimisation of the generated code is most of a compile. Without it the suite took 45 instead of 54
CPU-minutes from a cold compilation cache on a 2-core machine like CI's (a Mllama gradient test: 64 instead of 128
CPU-seconds), computing the same programs: the optimisation level changes how the code is scheduled, not what it
computes. The CLI runs that tests start set their own XLA_FLAGS without it: they train and generate for long
enough that unoptimised code made them slower (the demo's pipeline 188 -> 277 s).
XLA_FLAGS must be set before jax is first imported, which is why this lives in conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
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
