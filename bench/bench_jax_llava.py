"""vlmu_jax counterpart of shared/anchors/bench_hf_llava.py: LLaVA-1.5-7B shape, random bf16 weights on one
device.

Times teacher-forced per-token log-probs (median of 5 after 2 warm-ups) and greedy generation of 32 new
tokens,
printing one JSON line per measurement with the anchor's keys plus peak device memory. ``--small`` = tiny
shape
that runs on CPU. Run from the repo root: ``PYTHONPATH=. python bench/bench_jax_llava.py [--small]`` (env
B, T).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.scoring import token_logprobs
from vlmu_jax.models.layers import resolve_attention_impl
from vlmu_jax.models.registry import init_model


def hf_config(small: bool) -> dict:
    if small:
        vision = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        )
        text = dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=32064,
        )
    else:
        vision = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        )
        text = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
        )
    vision.update(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text.update(
        model_type="llama",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision,
        "text_config": text,
        "image_token_index": 32000,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
    }


def timeit(fn: Callable[[], jax.Array], n: int = 5, warm: int = 2) -> float:
    for _ in range(warm):
        jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_gb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--remat", default="none")
    args = parser.parse_args()
    b, t_text, n_img = int(os.environ.get("B", 4)), int(os.environ.get("T", 128)), 576
    t0 = time.perf_counter()
    model = init_model(hf_config(args.small), seed=0, dtype=jnp.bfloat16, remat=args.remat)
    jax.block_until_ready(jax.tree.leaves(model))
    nparams = sum(x.size for x in jax.tree.leaves(model))
    print(
        json.dumps(
            {
                "what": "init",
                "params": int(nparams),
                "s": time.perf_counter() - t0,
                "attn": resolve_attention_impl(model.config.attention_impl),
                "device": str(jax.devices()[0]),
            }
        ),
        flush=True,
    )
    rng = np.random.RandomState(0)
    ids = rng.randint(100, 32000, (b, 1 + n_img + t_text)).astype(np.int32)
    ids[:, 1 : 1 + n_img], ids[:, 0] = 32000, 1
    ids, mask = jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))
    pix = jnp.asarray(rng.randn(b, 3, 336, 336), jnp.bfloat16)

    s = timeit(lambda: token_logprobs(model, ids, mask, pix))
    print(
        json.dumps(
            {
                "what": "eval_logprob",
                "B": b,
                "T": n_img + t_text + 1,
                "s": s,
                "samples_per_s": b / s,
                "max_mem_gb": peak_gb(),
            }
        ),
        flush=True,
    )
    # eos_token_id=() never stops early, like the anchor's min_new_tokens=32.
    s = timeit(lambda: generate(model, ids, mask, pix, max_new_tokens=32, eos_token_id=()), n=3, warm=1)
    print(
        json.dumps(
            {"what": "generate32", "B": b, "s": s, "new_tokens_per_s": b * 32 / s, "max_mem_gb": peak_gb()}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
