"""PyTorch twin of bench_jax_families.py: HF transformers + PEFT (the seeds' stack) on the same shapes and batch.

Same measurements and method as shared/anchors/bench_hf_llava.py (medians of timed calls after warm-ups, LoRA
r=128/alpha=256 on the language model's linears, AdamW on float32 adapters under bf16 autocast), which covers
LLaVA only. Run from the repo root: `PYTHONPATH=. python bench/bench_hf_families.py --family F` (F in FAMILIES).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.family_shapes import FAMILIES, batch

EVAL = os.environ.get("EVAL", "1") == "1"  # EVAL=0: the LoRA step only (for a call with little time left)


def timeit(fn, n: int = 5, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def build(family: str):
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        MllamaConfig,
        MllamaForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    config = dict(FAMILIES[family][0])
    config.pop("architectures")
    config.pop("model_type")
    if family == "mllama":
        return MllamaForConditionalGeneration(MllamaConfig(**config)), r".*language_model.*\."
    if family == "qwen2_5_vl":
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)), r".*language_model.*\."
    return Idefics2ForConditionalGeneration(Idefics2Config(**config)), r".*text_model.*\."


def inputs(family: str, b: int, t_text: int) -> tuple[dict, int]:
    ids, images, head = batch(family, b, t_text)
    dev = "cuda"
    out = {"input_ids": torch.tensor(ids, device=dev, dtype=torch.long),
           "attention_mask": torch.ones(ids.shape, device=dev, dtype=torch.long)}
    pix = torch.tensor(images["pixel_values"], device=dev, dtype=torch.bfloat16)
    if family == "mllama":
        tiles = torch.tensor(images["aspect_ratio_mask"], device=dev, dtype=torch.long)  # [B, tiles]
        # What MllamaProcessor builds: tokens from the image token on see the image's real tiles.
        seen = (torch.arange(ids.shape[1], device=dev) >= head - 1).long()
        out.update(pixel_values=pix[:, None], aspect_ratio_mask=tiles[:, None],
                   aspect_ratio_ids=torch.tensor(images["aspect_ratio_ids"], device=dev, dtype=torch.long)[:, None],
                   cross_attention_mask=seen[None, :, None, None] * tiles[:, None, None, :])
    elif family == "qwen2_5_vl":
        # transformers packs the rows' real patches into one sequence; each row of ours is padded to a fixed count.
        grid = torch.tensor(images["image_grid_thw"], device=dev)
        n = grid.prod(-1).tolist()
        out.update(pixel_values=torch.cat([pix[i, : n[i]] for i in range(len(n))]), image_grid_thw=grid,
                   mm_token_type_ids=(out["input_ids"] == FAMILIES[family][0]["image_token_id"]).int())
    else:
        out.update(pixel_values=pix,
                   pixel_attention_mask=torch.tensor(images["pixel_attention_mask"], device=dev).bool())
    return out, head


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    args = parser.parse_args()
    b, t_text = int(os.environ.get("B", 4)), int(os.environ.get("T", 128))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model, lm = build(args.family)
    torch.cuda.synchronize()
    print(json.dumps({"what": "init", "family": args.family, "params": sum(p.numel() for p in model.parameters()),
                      "s": time.perf_counter() - t0, "attn": model.config._attn_implementation}), flush=True)
    x, head = inputs(args.family, b, t_text)
    ids = x["input_ids"]
    t = ids.shape[1]
    model.eval()

    if EVAL:
        def logprobs():
            with torch.no_grad():
                logits = model(**x).logits
                # Targets from the first text token on: Mllama's image token id lies outside its output head.
                return torch.log_softmax(logits[:, head - 1 : -1].float(), -1).gather(-1, ids[:, head:, None]).sum()

        torch.cuda.reset_peak_memory_stats()  # each workload's peak is its own (weights included)
        s = timeit(logprobs)
        print(json.dumps({"what": "eval_logprob", "B": b, "T": t, "s": s, "samples_per_s": b / s,
                          "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30}), flush=True)

        def gen():
            with torch.no_grad():
                model.generate(**x, max_new_tokens=32, min_new_tokens=32, do_sample=False)

        torch.cuda.reset_peak_memory_stats()
        s = timeit(gen, n=3, warm=1)
        print(json.dumps({"what": "generate32", "B": b, "s": s, "new_tokens_per_s": b * 32 / s,
                          "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30}), flush=True)

    from peft import LoraConfig, get_peft_model

    targets = lm + "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    peft_model = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=targets))
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    labels = ids.clone()
    labels[:, : head + t_text // 2] = -100

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = peft_model(**x, labels=labels).loss
        (-loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    s = timeit(step)
    print(json.dumps({"what": "lora_ga_step", "B": b, "T": t, "s": s, "samples_per_s": b / s,
                      "trainable": sum(p.numel() for p in trainable),
                      "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30}), flush=True)


if __name__ == "__main__":
    main()
