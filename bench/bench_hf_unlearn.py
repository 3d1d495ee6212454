"""PyTorch twin of bench_jax_llava.py's unlearning steps: GA, GD and NPO on the anchor's stack (HF transformers +
PEFT), so each gets a same-device ratio; first the anchor's teacher-forced log-probs, for their peak memory.

Same model, batch and method as shared/anchors/bench_hf_llava.py: LLaVA-1.5-7B shape with random bf16 weights,
sdpa, B=4 rows of BOS + 576 image tokens + 127 text tokens, labels on the second half of the text, LoRA r=128 /
alpha 256 / dropout 0.05 on the language model's linears, AdamW on float32 adapters under bf16 autocast. The steps
do what FIUBench's trainer does for each objective, with every stream given the same batch: GA the negated forget
NLL; GD adds the retain NLL (a second forward); NPO adds the reference forward (adapters disabled, no grad) and the
retain NLL, as our pipeline runs it when a retain stream exists.
Run from the repo root: `PYTHONPATH=. python bench/bench_hf_unlearn.py [--small]`; B and T set the batch,
OBJECTIVES=ga,gd,npo the steps (empty: the log-probs alone).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from bench.bench_hf_families import timeit

N_IMG = 576


def llava(small: bool):
    """The anchor's LLaVA-1.5-7B-shaped model (its `cfg`), random bf16 weights on the GPU."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if small:
        v = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=336, patch_size=14, projection_dim=64)
        t = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)
    else:
        v = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5)
        t = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    c = LlavaConfig(vision_config=v, text_config=t, image_token_index=32000, vision_feature_layer=-2,
                    vision_feature_select_strategy="default", projector_hidden_act="gelu")
    c._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        return LlavaForConditionalGeneration(c)


def answer_logps(model, ids, pix, labels) -> torch.Tensor:
    """Summed answer-token log-probs per row (FIUBench's get_batch_loss, negated)."""
    logits = model(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = llava(args.small)
    b, t_text = int(os.environ.get("B", 4)), int(os.environ.get("T", 128))
    ids = torch.randint(100, 32000, (b, N_IMG + t_text), device="cuda")
    ids[:, 1 : 1 + N_IMG], ids[:, 0] = 32000, 1
    pix = torch.randn(b, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    labels = ids.clone()
    labels[:, : 1 + N_IMG + t_text // 2] = -100
    # The anchor's teacher-forced log-probs, for their peak (the anchor prints none): against the eval call's own
    # peak that bench_jax_llava.py reads from XLA's memory analysis.
    model.eval()
    torch.cuda.reset_peak_memory_stats()

    def logprobs() -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids))
            return torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).sum()

    s = timeit(logprobs)
    print(json.dumps({"what": "eval_logprob", "B": b, "T": N_IMG + t_text, "s": s,
                      "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30}), flush=True)
    lc = LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05,
                    target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    pm = get_peft_model(model, lc)
    pm.train()
    trainable = [p for p in pm.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01)
    count = (labels[:, 1:] != -100).sum()

    def nll(logps: torch.Tensor) -> torch.Tensor:
        return -logps.sum() / count

    def loss_of(objective: str) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            forget = answer_logps(pm, ids, pix, labels)
            if objective == "ga":
                return -nll(forget)
            retain = nll(answer_logps(pm, ids, pix, labels))
            if objective == "gd":
                return -nll(forget) + retain
            with torch.no_grad(), pm.disable_adapter():
                ref = answer_logps(pm, ids, pix, labels)
            beta = 0.1
            return -F.logsigmoid(beta * (ref - forget)).mean() * 2 / beta + retain

    for objective in [o for o in os.environ.get("OBJECTIVES", "ga,gd,npo").split(",") if o]:
        torch.cuda.reset_peak_memory_stats()

        def step(objective=objective):
            loss_of(objective).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        s = timeit(step)
        print(json.dumps({"what": f"lora_{objective}_step", "B": b, "T": N_IMG + t_text, "s": s, "samples_per_s": b / s,
                          "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30}), flush=True)


if __name__ == "__main__":
    main()
