"""The seeds' published hyperparameters as config presets, so each configs/ file is a few lines.

FIUBench values come from gray311/VLM_Unlearned config/finetune.yaml and config/forget_lora.yaml;
MLLMU-Bench values from franciscoliu/MLLMU-Bench finetune.py, baselines/*.py and their README.
"""

from __future__ import annotations

import ml_collections

from vlmu_jax.config_schema import base_config

# Qwen2-VL checkpoints allow up to 12845056 pixels (16384 patches); every row carries max_pixels' worth of patch
# slots, so presets cap images at 512 merged-patch tokens (401408 pixels), a usual Qwen2-VL fine-tuning setting.
# Neither seed ran Qwen2-VL; override `model.image_processor_overrides.max_pixels` to change it.
QWEN_VL_MAX_PIXELS = 512 * 28 * 28

# Methods beyond the seeds' own, offered on both benchmarks.
NEW_METHODS = ("wga", "satimp", "undial", "ceu", "rmu", "mmunlearner")
FIUBENCH_METHODS = ("ga", "gd", "kl", "idk", "npo", "dpo", "simnpo", *NEW_METHODS)
MLLMU_METHODS = ("ga", "ga_difference", "kl_min", "npo", *NEW_METHODS)

# Their hyperparameters on top of the benchmark's unlearning schedule: open-unlearning's
# configs/trainer/{WGA,SatImp,UNDIAL,CEU,RMU}.yaml method_args (gamma -> forget_weight, alpha -> retain_weight;
# RMU's module_regex model.layers.7 -> hidden_layer=7, as WMDP for 7B models), and MMUnlearner's README run
# (Z1zs/MMUnlearner: lr 1e-5, AdamW without weight decay) on full weights, where its saliency map is defined
# (LoRA adapters would leave it only the B matrices to choose among: A's Fisher is 0 at B = 0).
METHOD_PARAMS: dict[str, dict] = {
    "wga": dict(wga_beta=1.0, forget_weight=1.0, retain_weight=1.0),
    "satimp": dict(satimp_beta1=5.0, satimp_beta2=1.0, forget_weight=0.1, retain_weight=1.0),
    "undial": dict(undial_beta=10.0),
    "ceu": dict(ceu_ignore_first=1),
    "rmu": dict(rmu_steering=2.0, hidden_layer=7, forget_weight=1.0, retain_weight=1.0),
    "mmunlearner": dict(saliency_threshold=1.0, lora_rank=0, lr=1e-5, weight_decay=0.0),
}


def _method(variant: str | None, known: tuple[str, ...], default: str) -> str:
    method = variant or default
    if method not in known:
        raise ValueError(f"unknown method variant {method!r}; known: {list(known)}")
    return method


# LoRA training keeps the matmul outputs and recomputes the rest: LLaVA-1.5-7B's GA step ran as fast as with no
# remat (0.220 against 0.222 s) in 32.4 instead of 43.1 GB (bench/RESULTS.md, session 5). LLaVA-1.5 also keeps the
# dropout masks and cuDNN attention's outputs: its per-layer 7B step 1-3 % faster for ~3.6 GiB, still below
# PyTorch's peak (session 23; "mllmu-llava" is MLLMU-Bench's template for the same model); so do
# Llama-3.2-11B-Vision's, 5.4 % faster, and Qwen2.5-VL-7B's, 1.9 % faster at the same peak (session 24; "qwen2-vl" is
# the template of both Qwen2-VL and Qwen2.5-VL). idefics2-8b's (195 tokens a row) is 2 % slower that way (session
# 23), so it stays on the matmul outputs, as do the families not measured both ways (llava-phi). LLaVA-1.5 keeps
# attention's inputs too (q and k after the rotary, v: the backward does not redo the projections' sums and the
# rotary): its per-layer 7B GA step 0.1798 -> 0.1753 s apart, 0.1747 -> 0.1725 s with the frozen kernels joined
# (session 27, call 94); the other families are not measured that way. Full finetuning at 7B stays on "full":
# weights, gradients and AdamW moments leave less room.
LORA_REMAT = "dots_with_no_batch_dims_saveable"
LORA_REMAT_BY_TEMPLATE = {
    **{template: "dots_attention_inputs_dropout_saveable" for template in ("llava-1.5", "mllmu-llava")},
    **{template: "dots_attention_dropout_saveable" for template in ("llama-3.2-vision", "qwen2-vl")}}


def lora_remat(template: str) -> str:
    """The presets' remat policy for a LoRA stage of a model with this chat template (measured per family)."""
    return LORA_REMAT_BY_TEMPLATE.get(template, LORA_REMAT)


def fiubench(variant: str | None, *, template: str, model_path: str) -> ml_collections.ConfigDict:
    """FIUBench: full finetune (vision tower frozen), then LoRA r128/a256 unlearning of forget10."""
    c = base_config()
    c.benchmark = "fiubench"
    c.name = f"fiubench_{template}_{_method(variant, FIUBENCH_METHODS, 'ga')}"
    c.model.path = model_path
    c.model.template = template
    c.model.remat = "full"
    if template == "qwen2-vl":
        c.model.image_processor_overrides.max_pixels = QWEN_VL_MAX_PIXELS
    c.data.forget_split = "forget10"
    c.data.max_length = 512
    c.seed = 233
    finetune = dict(objective="finetune", lr=1e-5, lr_schedule="cosine", warmup_ratio=0.0, weight_decay=0.01,
                    max_grad_norm=1.0, batch_size=12, grad_accum=1, num_epochs=10, lora_rank=0,
                    tune_vision_tower=False, tune_mm_projector=True, tune_language_model=True)
    c.finetune.update(finetune)
    c.retain_model.update(finetune)
    c.unlearn.update(objective=_method(variant, FIUBENCH_METHODS, "ga"), lr=1e-4, lr_schedule="cosine",
                     warmup_ratio=0.06, weight_decay=0.01, max_grad_norm=1.0, batch_size=4, grad_accum=16,
                     num_epochs=5, lora_rank=128, lora_alpha=256.0, lora_dropout=0.05,
                     tune_vision_tower=False, tune_mm_projector=True, tune_language_model=True,
                     remat=lora_remat(template))
    c.unlearn.update(METHOD_PARAMS.get(c.unlearn.objective, {}))
    c.eval.max_new_tokens = 50
    return c


def mllmu(variant: str | None, *, template: str, model_path: str) -> ml_collections.ConfigDict:
    """MLLMU-Bench: LoRA r16/a16 finetune for 5 epochs, then 1 epoch of LoRA unlearning at 2e-5.

    Only the adapters train (prepare_model_for_kbit_training + get_peft_model freeze every base weight, the
    projector's too). Every script builds ``transformers.AdamW(params, lr)`` (weight decay 0, eps 1e-6), clips no
    gradient (its accumulation branch, the only one that clips, is off by default) and steps a linear schedule
    without warmup per batch, except GA_Difference and KL_Min, which step it once per epoch: constant over their
    one epoch.
    """
    c = base_config()
    c.benchmark = "mllmu"
    method = _method(variant, MLLMU_METHODS, "ga")
    c.name = f"mllmu_{template}_{method}"
    c.model.path = model_path
    c.model.template = template
    c.model.remat = lora_remat(template)  # every stage trains LoRA adapters only
    c.data.forget_ratio = 5
    c.data.max_length = 384
    if template == "qwen2-vl":
        c.model.image_processor_overrides.max_pixels = QWEN_VL_MAX_PIXELS
    c.seed = 42
    # lora_targets stays the language model's projections: what find_all_linear_names means by skipping the vision
    # tower and projector (protocol original adds what PEFT's suffix matching also catches, see stages.lora_targets).
    lora = dict(lora_rank=16, lora_alpha=16.0, lora_dropout=0.05, lr_schedule="linear", warmup_ratio=0.0,
                weight_decay=0.0, adam_eps=1e-6, max_grad_norm=0.0, batch_size=4, grad_accum=1,
                tune_vision_tower=False, tune_mm_projector=False)
    c.finetune.update(objective="finetune", lr=2e-5, num_epochs=5, **lora)
    c.retain_model.update(objective="finetune", lr=2e-5, num_epochs=5, **lora)
    c.unlearn.update(objective=method, lr=2e-5, num_epochs=1, beta=0.4, npo_batch_mean=False, **lora)
    if method in ("ga_difference", "kl_min"):
        c.unlearn.lr_schedule = "constant"
    c.unlearn.update(METHOD_PARAMS.get(method, {}))
    return c
