"""vlmu_jax on full-size Llama-3.2-11B-Vision (Mllama), idefics2-8b and Qwen2.5-VL-7B shapes, random bf16 weights.

The workload of bench_jax_llava.py (teacher-forced log-probs, greedy generation of 32 tokens, one LoRA r=128
gradient-ascent AdamW step) on the batch of bench/family_shapes.py; bench_hf_families.py is its PyTorch twin.
Also reports how far the log-probs of the default attention path (cuDNN on GPU) are from XLA's attention on the
same weights, which checks the masked vision / cross-attention kernels at full size.
Run from the repo root: `PYTHONPATH=. python bench/bench_jax_families.py --family mllama|idefics2|qwen2_5_vl`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.bench_jax_llava import compiled_ahead, peak_gb, timeit, unlearn_step_time
from bench.family_shapes import FAMILIES, batch
from vlmu_jax import device_memory
from vlmu_jax.config_schema import base_config
from vlmu_jax.data.batching import IGNORE, label_index, label_slots
from vlmu_jax.eval.frozen import frozen
from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.layer_copies import layer_copies
from vlmu_jax.eval.scoring import token_logprobs
from vlmu_jax.models import layers
from vlmu_jax.models.layers import resolve_attention_impl
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.models.registry import architecture, model_config, set_options
from vlmu_jax.unlearn import layerwise

# The eval calls run in each of these eval.layer_copies modes, the LoRA steps (OBJECTIVES) under each remat policy.
COPIES = os.environ.get("COPIES", "auto").split(",")
REMAT = tuple(x for x in os.environ.get("REMAT", "none").split(",") if x)  # REMAT="": no step
# The step layer by layer (unlearn/layerwise.py: the pipeline's default on GPU for LoRA) and as one scanned program.
LAYERWISE = tuple(x for x in os.environ.get("LAYERWISE", "auto,never").split(",") if x)
EVAL = os.environ.get("EVAL", "1") == "1"  # EVAL=0: the LoRA step only (for a call with little time left)
OBJECTIVES = tuple(x for x in os.environ.get("OBJECTIVES", "ga").split(",") if x)  # gd / npo: both streams = the batch
# KERNELS=joined,apart: the per-layer step with the frozen q/k/v and gate/up kernels joined and apart
# (layerwise.JOIN_FROZEN_KERNELS; default: its default)
KERNELS = tuple(x for x in os.environ.get("KERNELS", "").split(",") if x) or (None,)
# LORA=fused,unfused: LoRA's dropout and down-product as models/lora_kernel.py's one kernel (on one GPU) and as the
# mask kernel, XLA's select and a gemm (layers.FUSED_LORA_DROPOUT; default: its default)
LORA = tuple(x for x in os.environ.get("LORA", "").split(",") if x) or (None,)


def eval_calls(model: nnx.Module, ids: jax.Array, mask: jax.Array, images: dict, head: int) -> None:
    """The eval calls as the eval stage runs them: the model frozen (eval/frozen.py), with per-layer decoder copies in
    each of the COPIES modes (eval/layer_copies.py); then log-probs through nnx.jit for comparison, and the default
    attention path's log-probs against XLA's."""
    b, t = ids.shape

    def logprobs() -> jax.Array:
        return token_logprobs(model, ids, mask, images)

    def generate32() -> jax.Array:
        return generate(model, ids, mask, images, max_new_tokens=32, eos_token_id=())

    for mode in COPIES:
        with layer_copies(model, mode) as copied, frozen(model):
            ahead_s, own_gb = compiled_ahead(logprobs)
            s = timeit(logprobs)
            print(json.dumps({"what": "eval_logprob", "frozen": True, "layer_copies": copied, "B": b, "T": t,
                              "s": s, "samples_per_s": b / s, "compile_ahead_s": ahead_s, "own_peak_gb": own_gb,
                              "max_mem_gb": peak_gb()}), flush=True)
            ahead_s, own_gb = compiled_ahead(generate32)
            s = timeit(generate32, n=3, warm=1)
            print(json.dumps({"what": "generate32", "frozen": True, "layer_copies": copied, "B": b, "s": s,
                              "compile_ahead_s": ahead_s, "own_peak_gb": own_gb, "max_mem_gb": peak_gb()}),
                  flush=True)
    s = timeit(logprobs)
    print(json.dumps({"what": "eval_logprob", "frozen": False, "layer_copies": False, "B": b, "T": t, "s": s,
                      "samples_per_s": b / s, "max_mem_gb": peak_gb()}), flush=True)
    # Targets from the first text token on: Mllama's image token id lies outside its output head.
    default = np.asarray(logprobs(), np.float32)[:, head - 1 :]
    set_options(model, attention_impl="xla")
    xla = np.asarray(logprobs(), np.float32)[:, head - 1 :]
    set_options(model, attention_impl="auto")
    diff = np.abs(default - xla)
    print(json.dumps({"what": "attention_paths_agree", "mean_abs_logprob_diff": float(diff.mean()),
                      "max_abs_logprob_diff": float(diff.max()), "mean_logprob": float(xla.mean()),
                      "finite": bool(np.isfinite(default).all())}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    args = parser.parse_args()
    device_memory.configure(base_config().device_memory_fraction)  # the pipeline's GPU pool
    b, t_text = int(os.environ.get("B", 4)), int(os.environ.get("T", 128))
    t0 = time.perf_counter()
    # Eager init: op by op, each parameter shape compiles once (one jitted init of a full-size Mllama, before its
    # decoder was stacked, compiled for minutes on GPU).
    hf_config = FAMILIES[args.family][0]
    model = architecture(hf_config).model(model_config(hf_config), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    jax.block_until_ready(jax.tree.leaves(model))
    print(json.dumps({"what": "init", "family": args.family, "params": int(sum(x.size for x in jax.tree.leaves(model))),
                      "s": time.perf_counter() - t0, "attn": resolve_attention_impl(model.config.attention_impl),
                      "device": str(jax.devices()[0])}), flush=True)
    ids_np, images_np, head = batch(args.family, b, t_text)
    ids = jnp.asarray(ids_np)
    mask = jnp.ones_like(ids)
    images = {k: jnp.asarray(v, jnp.bfloat16 if v.dtype.kind == "f" else jnp.int32) for k, v in images_np.items()}
    t = ids.shape[1]

    if EVAL:
        eval_calls(model, ids, mask, images, head)
    apply_lora(model, rank=128, alpha=256.0, dropout=0.05, seed=0)
    answer = jnp.arange(t) >= head + 1 + t_text // 2  # the second half of the text is the answer
    labels = jnp.where(answer[None, :], ids, IGNORE)
    labels_np = np.asarray(labels)
    step_batch = {"input_ids": ids, "attention_mask": mask, "images": images, "labels": labels,  # as the pipeline's
                  "label_index": jnp.asarray(label_index(labels_np, label_slots(labels_np)))}  # sources give them
    join_default, fused_default = layerwise.JOIN_FROZEN_KERNELS, layers.FUSED_LORA_DROPOUT
    for objective, remat, form, kernels, lora in itertools.product(OBJECTIVES, REMAT, LAYERWISE, KERNELS, LORA):
        layerwise.JOIN_FROZEN_KERNELS = join_default if kernels is None else kernels == "joined"
        layers.FUSED_LORA_DROPOUT = fused_default if lora is None else lora == "fused"
        r = unlearn_step_time(model, objective, remat, step_batch, layerwise_mode=form)
        print(json.dumps({"what": f"lora_{objective}_step", "remat": remat, "layerwise": form, "B": b, "T": t, "s": r.s,
                          "frozen_kernels": "joined" if layerwise.JOIN_FROZEN_KERNELS else "apart",
                          "lora_dropout": "fused" if layers.FUSED_LORA_DROPOUT else "unfused",
                          "samples_per_s": b / r.s,
                          "compile_s": r.compile_s, "max_mem_gb": r.process_peak_gb, "step_peak_gb": r.step_peak_gb}),
              flush=True)
    layerwise.JOIN_FROZEN_KERNELS, layers.FUSED_LORA_DROPOUT = join_default, fused_default


if __name__ == "__main__":
    main()
