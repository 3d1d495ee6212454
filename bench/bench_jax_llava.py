"""vlmu_jax counterpart of shared/anchors/bench_hf_llava.py: LLaVA-1.5-7B shape, random bf16 weights.

Same workload as the anchor (B=4 rows of BOS + 576 image tokens + 127 text tokens = 704 tokens):
teacher-forced log-probs, greedy generation of 32 tokens, and one LoRA (r=128, all LM linears)
gradient-ascent AdamW step with and without rematerialisation. One JSON line per measurement with the
anchor's keys plus peak device memory. `--small` is a tiny shape that runs on CPU.
Run from the repo root: `PYTHONPATH=. python bench/bench_jax_llava.py [--small]`.
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
import optax
from flax import nnx

from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.scoring import head_logprobs, token_logprobs
from vlmu_jax.models.layers import resolve_attention_impl
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.models.registry import init_model, set_options


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
    # The anchor's rows are n_img + t_text tokens long (BOS, images, then t_text - 1 text tokens).
    ids = rng.randint(100, 32000, (b, n_img + t_text)).astype(np.int32)
    ids[:, 1 : 1 + n_img], ids[:, 0] = 32000, 1
    ids, mask = jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))
    pix = {"pixel_values": jnp.asarray(rng.randn(b, 3, 336, 336), jnp.bfloat16)}

    s = timeit(lambda: token_logprobs(model, ids, mask, pix))
    print(
        json.dumps(
            {
                "what": "eval_logprob",
                "B": b,
                "T": n_img + t_text,
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

    apply_lora(model, rank=128, alpha=256.0, dropout=0.05, seed=0)
    # Loss on the second half of the text, as the anchor's labels; targets are positions 1..T-1.
    answer = jnp.arange(1, ids.shape[1]) >= 1 + n_img + t_text // 2
    for remat in ("none", "full"):
        s, mem = lora_ga_step_time(model, ids, mask, pix, answer, remat)
        print(json.dumps({"what": "lora_ga_step", "remat": remat, "B": b, "T": n_img + t_text, "s": s,
                          "samples_per_s": b / s, "max_mem_gb": mem}), flush=True)


def lora_ga_step_time(model: nnx.Module, ids: jax.Array, mask: jax.Array, pix: dict, answer: jax.Array,
                      remat: str) -> tuple[float, float | None]:
    """Median time of one jitted GA step on the LoRA params only (AdamW, donated state)."""
    set_options(model, remat=remat)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    opt = optax.adamw(1e-5)
    state = {"lora": lora, "opt": opt.init(lora)}

    def neg_nll(lora: nnx.State, rest: nnx.State, key: jax.Array, batch: tuple) -> jax.Array:
        ids, mask, pix, answer = batch
        m = nnx.merge(graphdef, lora, rest)
        lp = head_logprobs(m(ids, mask, pix, dropout_rng=key)[:, :-1], m.head_weight(), ids[:, 1:])
        return (lp * answer).sum() / (answer.sum() * ids.shape[0])  # = -NLL: ascent on the forget loss

    # Everything is an argument (not a closed-over constant) so XLA does not try to constant-fold the model.
    def step(state: dict, rest: nnx.State, key: jax.Array, batch: tuple) -> tuple[dict, jax.Array]:
        loss, grads = jax.value_and_grad(neg_nll)(state["lora"], rest, key, batch)
        updates, opt_state = opt.update(grads, state["opt"], state["lora"])
        return {"lora": optax.apply_updates(state["lora"], updates), "opt": opt_state}, loss

    step = jax.jit(step, donate_argnums=0)
    keys = iter(jax.random.split(jax.random.key(0), 16))

    def run() -> jax.Array:
        nonlocal state
        state, loss = step(state, rest, next(keys), (ids, mask, pix, answer))
        return loss

    s = timeit(run)
    nnx.update(model, state["lora"])  # the model's own LoRA arrays were donated to the first step
    return s, peak_gb()


if __name__ == "__main__":
    main()
