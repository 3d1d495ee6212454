"""vlmu_jax: FIUBench and MLLMU-Bench machine-unlearning benchmarks for VLMs in JAX/Flax.

The public entry points are re-exported lazily so that `import vlmu_jax` stays cheap (no jax
compilation, no transformers import) for CLI tools such as the synthetic data writer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_pretrained": "vlmu_jax.checkpoints.hf_import",
    "export_hf": "vlmu_jax.checkpoints.hf_export",
    "token_logprobs": "vlmu_jax.eval.scoring",
    "generate": "vlmu_jax.eval.generate",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlmu_jax' has no attribute {name!r}")
