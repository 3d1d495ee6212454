"""How a benchmark is run: the one object every stage reads to format, mask, prompt, extract, train and log.

Two protocols exist for each benchmark:

- ``original`` (the default) reproduces the benchmark's own code path, quirks included, so that our numbers
  can stand next to numbers made with the original PyTorch code on the same model and data.
- ``corrected`` applies the intended definitions (see the README's table of differences).

A stage never re-derives any of this from scattered flags: it asks ``Workspace.protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_collections

PROTOCOLS = ("original", "corrected")


@dataclass(frozen=True)
class Protocol:
    """The decisions that differ between protocols, per benchmark.

    Fields are grouped by benchmark; a field of the other benchmark keeps its ``corrected`` value.
    """

    name: str
    benchmark: str

    # FIUBench (gray311/VLM_Unlearned)
    # The metric quirks of evaluate_util.py / aggregate_eval_stat.py: the first answer token left out of the loss
    # sum, generations without a period cut to "", ROUGE's dropped last character, APE questions through
    # str.capitalize(), empty gpt / exact_match lists entering Model Utility as 0 (see vlmu_jax.eval.metrics).
    fiubench_metric_quirks: bool = False

    # MLLMU-Bench (franciscoliu/MLLMU-Bench)
    # eval.py: prompts written by hand and the same for every model (few-shot blocks drawn with Python's `random`,
    # "USER: ... ASSISTANT:" strings), answers cut from the decoded prompt + generation at the prompt's own
    # "ASSISTANT:". Otherwise: the model's chat template, zero-shot, answers from the new tokens only.
    mllmu_eval_py: bool = False
    # The training collates (data_process/data_preprocess.py): every non-pad token is a label, prompt included;
    # LLaVA in the collate's "USER: <image>\n{q}\nASSISTANT: {a}"; no cut at max_length (the collates never pass
    # it). Otherwise: answer tokens only, in the model's template, cut at data.max_length.
    mllmu_collate: bool = False
    # baselines/*.py: NPO on the batch-mean losses, no retain term, against the model the run names (the retain
    # model, as reference_model_FT.py trains it); KL_Min's KL summed over every position of the padded batch / B.
    # Otherwise: per-sequence NPO plus a retain NLL against the starting model, KL over real tokens.
    mllmu_baselines: bool = False
    # finetune.py / baselines: find_all_linear_names + PEFT's suffix matching (every Linear named like one of the
    # language model's projections: the vision q/k/v and Idefics2's connector too) with gaussian A ~ N(0, 1/r).
    # Otherwise: the stage's lora_targets regex and PEFT's default kaiming-uniform A.
    mllmu_peft_lora: bool = False
    # Idefics2 image splitting as each script builds its processor: off in training (do_image_splitting=False),
    # the checkpoint's own preprocessor setting in eval.py. Otherwise: off in every stage.
    mllmu_eval_image_splitting: bool = False

    @property
    def original(self) -> bool:
        return self.name == "original"

    def train_template(self, model_type: str, template: str) -> str:
        """The prompt template of training rows: MLLMU's LLaVA collate writes its own format, whatever the model's
        chat template is; Idefics2's collate applies the model's chat template."""
        return "mllmu-llava" if self.mllmu_collate and model_type == "llava" else template

    def image_processor_overrides(self, stage: str) -> dict[str, bool]:
        """preprocessor_config.json values this protocol replaces in ``stage`` ("train" or "eval"). MLLMU-Bench: every
        training script builds Idefics2's processor with do_image_splitting=False, eval.py with the checkpoint's own
        setting (AutoProcessor.from_pretrained(model_id)); a processor without the key ignores it."""
        if self.benchmark != "mllmu" or (stage == "eval" and self.mllmu_eval_image_splitting):
            return {}
        return {"do_image_splitting": False}


def resolve(config: ml_collections.ConfigDict) -> Protocol:
    """The protocol a config asks for; an unknown name is an error that lists the known ones."""
    name = config.protocol
    if name not in PROTOCOLS:
        raise ValueError(f"config.protocol must be one of {list(PROTOCOLS)}, got {name!r}")
    original = name == "original"
    mllmu = original and config.benchmark == "mllmu"
    return Protocol(name=name, benchmark=config.benchmark,
                    fiubench_metric_quirks=original and config.benchmark == "fiubench",
                    mllmu_eval_py=mllmu, mllmu_collate=mllmu, mllmu_baselines=mllmu, mllmu_peft_lora=mllmu,
                    mllmu_eval_image_splitting=mllmu)
