"""What LoRA dropout costs in the GA step at LLaVA-1.5-7B shape (bench/RESULTS.md, session 2 of 2026-12-01).

bench_jax_llava.py's LoRA r=128 GA step (`unlearn_step_time`, B=4 x 704) with the dropout rate `DROP` (default
0.05, the anchor's) and, with `RNGIMPL=rbg|unsafe_rbg`, the dropout keys drawn from that PRNG implementation.
Run from the repo root: `PYTHONPATH=. DROP=0 python bench/dropout_cost.py`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.bench_jax_llava import hf_config, unlearn_step_time
from vlmu_jax.data.batching import IGNORE
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.models.registry import init_model


def main() -> None:
    drop = float(os.environ.get("DROP", "0.05"))
    impl = os.environ.get("RNGIMPL", "")
    model = init_model(hf_config(bool(os.environ.get("SMALL"))), seed=0, dtype=jnp.bfloat16)
    rng = np.random.RandomState(0)
    ids = rng.randint(100, 32000, (4, 704)).astype(np.int32)
    ids[:, 1:577], ids[:, 0] = 32000, 1
    ids = jnp.asarray(ids)
    images = {"pixel_values": jnp.asarray(rng.randn(4, 3, 336, 336), jnp.bfloat16)}
    apply_lora(model, rank=128, alpha=256.0, dropout=drop, seed=0)
    if impl and drop > 0:
        model.lora_rngs = nnx.Rngs(dropout=jax.random.key(0, impl=impl))
    labels = jnp.where(jnp.arange(704) >= 577 + 64, ids, IGNORE)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": labels, "images": images}
    r = unlearn_step_time(model, "ga", "none", batch)
    print(json.dumps({"drop": drop, "impl": impl or "default", "ga_s": r.s, "mem": r.process_peak_gb}), flush=True)


if __name__ == "__main__":
    main()
