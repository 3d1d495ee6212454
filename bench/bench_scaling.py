"""Issue 13: throughput over 1, 2, 4, 8 GPUs of one host at LLaVA-1.5-7B shape, random bf16 weights.

For each device count n and each layout (`data`: params replicated, rows split; `fsdp`: params and rows split over
the same axis) at a fixed per-device batch: the pipeline's own LoRA r=128 GD step (`unlearn_step_time`: forget and
retain streams, AdamW, donated state), teacher-forced log-probs and greedy generation of 32 tokens (the KV cache
sharded with the rows). One JSON line per measurement with samples/s, the speed-up over the first (smallest)
device count of the same layout, scaled per device, and the largest per-device peak memory. `--full_finetune`
times a full-parameter step instead of the LoRA one (with `--family mllama` and fsdp: does Llama-3.2-11B-Vision
with AdamW fit over 4 GPUs).

Run from the repo root on the device: `PYTHONPATH=. python bench/bench_scaling.py --devices 1,2,4,8`; on CPU with
fake devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu ... --small`.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.bench_jax_llava import hf_config, timeit, unlearn_step_time
from bench.family_shapes import FAMILIES
from bench.family_shapes import batch as family_batch
from vlmu_jax.data.batching import IGNORE
from vlmu_jax.eval.frozen import frozen
from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.layer_copies import layer_copies
from vlmu_jax.eval.scoring import token_logprobs
from vlmu_jax.models.lora import apply_lora
from vlmu_jax.models.registry import init_model
from vlmu_jax.models.sharding import global_batch, make_mesh, shard_model

N_IMG = 576
_ONE_DEVICE: dict[tuple[str, str], float] = {}  # (layout, workload) -> per_s on the fewest devices measured


def peak_gb(devices) -> float | None:
    """The largest peak memory among `devices` (process peaks: earlier measurements included)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return max(peaks) / 2**30 if all(p is not None for p in peaks) else None


def llava_rows(b: int, small: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """bench_jax_llava's rows: BOS + 576 image tokens + 127 text tokens, one 336 px image each."""
    rng = np.random.RandomState(0)
    ids = rng.randint(100, 32000, (b, N_IMG + 128)).astype(np.int32)
    ids[:, 1 : 1 + N_IMG], ids[:, 0] = 32000, 1
    return ids, {"pixel_values": rng.randn(b, 3, 336, 336).astype(jnp.bfloat16)}


def run(n: int, layout: str, args) -> None:
    devices = jax.devices()[:n]
    mesh = make_mesh(data=n, fsdp=1, devices=devices) if layout == "data" else make_mesh(data=1, fsdp=n,
                                                                                       devices=devices)
    b = args.per_device_batch * n
    if args.family == "llava":
        config = hf_config(args.small)
        ids, images = llava_rows(b, args.small)
        text_from = 1 + N_IMG + 64
    else:
        config = FAMILIES[args.family][0]
        ids, images, text_from = family_batch(args.family, b)
    with jax.set_mesh(mesh):
        model = init_model(config, seed=0, dtype=jnp.bfloat16, mesh=mesh)
        host = {"input_ids": ids, "attention_mask": np.ones_like(ids), "images": images,
                "labels": np.where(np.arange(ids.shape[1]) >= text_from, ids, IGNORE).astype(np.int32)}
        batch = global_batch(host, mesh)
        common = {"layout": layout, "devices": n, "global_batch": b, "T": int(ids.shape[1])}

        def report(what: str, s: float, units: int) -> None:
            base = _ONE_DEVICE.setdefault((layout, what), units / s / n)  # per device, from the first count run
            row = {"what": what, **common, "s": round(s, 4), "per_s": round(units / s, 2),
                   "speedup": round(units / s / base, 2), "peak_gb_per_device": peak_gb(devices)}
            print(json.dumps(row), flush=True)

        # Eval as the eval stage runs it: the model frozen, with per-layer decoder copies where there is room.
        with layer_copies(model), frozen(model):
            if "score" in args.workloads:
                s = timeit(lambda: token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                                  batch["images"]))
                report("logprobs", s, b)
            if "generate" in args.workloads:
                s = timeit(lambda: generate(model, batch["input_ids"], batch["attention_mask"], batch["images"],
                                            max_new_tokens=32, eos_token_id=()), n=3, warm=1)
                report("generate32", s, b * 32)
        if "step" in args.workloads:
            if not args.full_finetune:
                apply_lora(model, rank=128, alpha=256.0, dropout=0.05, seed=0)
                shard_model(model, mesh)
            s = unlearn_step_time(model, "gd", "full" if args.full_finetune else "none", batch,
                                  trainable=nnx.Param if args.full_finetune else nnx.LoRAParam).s
            report("full_gd_step" if args.full_finetune else "lora_gd_step", s, b)
    jax.clear_caches()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--layouts", default="data,fsdp")
    parser.add_argument("--workloads", default="step,score,generate")
    parser.add_argument("--per_device_batch", type=int, default=int(os.environ.get("B", 4)))
    parser.add_argument("--family", default="llava", choices=["llava", *sorted(FAMILIES)])
    parser.add_argument("--full_finetune", action="store_true")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    print(json.dumps({"what": "devices", "count": jax.device_count(), "kind": jax.devices()[0].device_kind}),
          flush=True)
    for layout in args.layouts.split(","):
        for n in (int(x) for x in args.devices.split(",")):
            if n <= jax.device_count():
                run(n, layout, args)


if __name__ == "__main__":
    main()
