"""The embedded demo: synthetic FIUBench-format data, a tiny random LLaVA, the whole pipeline on CPU.

    python -m vlmu_jax.main --config configs/demo.py --workdir /tmp/vlmu_demo
    python -m vlmu_jax.main --config configs/demo.py:npo,kl --workdir /tmp/vlmu_demo_npo
    python -m vlmu_jax.main --config configs/demo.py:ci --workdir /tmp/vlmu_ci   # reduced, for CI

The tiny model is first finetuned on all synthetic identities until it knows them, a retain-only
twin is finetuned for the KS-test reference, then forget10 is unlearned with each chosen method
(default GradDiff and plain GA, whose collapse the report shows next to GradDiff's trade-off).
"""

from vlmu_jax.config_schema import base_config


def get_config(arg: str | None = None):
    variant = arg or ""
    c = base_config()
    c.name = f"demo_{variant or 'gd,ga'}"
    c.benchmark = "fiubench"
    c.stages = "finetune,unlearn,eval,export,report"
    c.seed = 0
    c.data.synthetic_identities = 40
    c.data.synthetic_image_size = 64
    c.data.forget_split = "forget10"
    c.data.max_length = 128
    c.model.tiny = True
    c.model.template = "llava-1.5"
    c.model.dtype = "float32"
    c.mesh.data = -1
    for stage in (c.finetune, c.retain_model):
        stage.update(num_epochs=30, batch_size=16, lr=3e-3, lr_schedule="cosine", warmup_ratio=0.05,
                     weight_decay=0.0, tune_mm_projector=True, tune_language_model=True, save_every=50)
    # LoRA (and the projector) is all that unlearning trains, as in FIUBench: lr 5e-3 lets 36 steps show GA's
    # collapse and GradDiff's trade-off on the tiny model.
    c.unlearn.update(objective="gd,ga", num_epochs=6, batch_size=4, grad_accum=1, lr=5e-3, warmup_ratio=0.0,
                     lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, save_every=10, beta=0.1,
                     hidden_layer=0)  # RMU steers the first of the tiny model's 2 layers
    c.eval.batch_size = 32
    c.eval.max_new_tokens = 24
    if variant == "ci":
        c.data.synthetic_identities = 20
        for stage in (c.finetune, c.retain_model):
            stage.num_epochs = 15
        c.unlearn.update(num_epochs=4, lr=1e-2)  # 12 LoRA steps: a larger step shows the same effects
    elif variant:
        c.unlearn.objective = variant
    return c.lock()
