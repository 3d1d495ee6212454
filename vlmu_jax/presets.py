"""The seeds' published hyperparameters as config presets, so each configs/ file is a few lines.

FIUBench values come from gray311/VLM_Unlearned config/finetune.yaml and config/forget_lora.yaml;
MLLMU-Bench values from franciscoliu/MLLMU-Bench finetune.py, baselines/*.py and their README.
"""

from __future__ import annotations

import ml_collections

from vlmu_jax.config_schema import base_config

FIUBENCH_METHODS = ("ga", "gd", "kl", "idk", "npo", "dpo", "simnpo")
MLLMU_METHODS = ("ga", "ga_difference", "kl_min", "npo")


def _method(variant: str | None, known: tuple[str, ...], default: str) -> str:
    method = variant or default
    if method not in known:
        raise ValueError(f"unknown method variant {method!r}; known: {list(known)}")
    return method


def fiubench(variant: str | None, *, template: str, model_path: str) -> ml_collections.ConfigDict:
    """FIUBench: full finetune (vision tower frozen), then LoRA r128/a256 unlearning of forget10."""
    c = base_config()
    c.benchmark = "fiubench"
    c.name = f"fiubench_{template}_{_method(variant, FIUBENCH_METHODS, 'ga')}"
    c.model.path = model_path
    c.model.template = template
    c.model.remat = "full"
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
                     tune_vision_tower=False, tune_mm_projector=True, tune_language_model=True)
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
    c.model.remat = "full"
    c.data.forget_ratio = 5
    c.data.max_length = 384
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
    return c
