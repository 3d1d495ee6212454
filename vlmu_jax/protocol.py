"""How a benchmark is run: the one object every stage reads to format, mask, prompt, extract, train and log.

Two protocols exist for each benchmark:

- ``original`` (the default) reproduces the benchmark's own code path, quirks included, so that our numbers
  can stand next to numbers made with the original PyTorch code on the same model and data.
- ``corrected`` applies the intended definitions (see the README's table of differences).

A stage never re-derives any of this from scattered flags: it asks ``Workspace.protocol``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ml_collections

from vlmu_jax.models.lora import DEFAULT_TARGETS

PROTOCOLS = ("original", "corrected")
# gray311/VLM_Unlearned forget.py: LLaVA `.*language_model.*\.(up_proj|k_proj|linear_2|down_proj|v_proj|q_proj|
# o_proj|gate_proj|linear_1)`, Mllama the same without linear_1/2 (the projector is not under language_model, so
# those two never match): the same modules in our paths.
FIUBENCH_LORA_TARGETS = r"language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass(frozen=True)
class Protocol:
    """The decisions that differ between protocols, per benchmark.

    Fields are grouped by benchmark; a field of the other benchmark keeps its ``corrected`` value.
    """

    name: str
    benchmark: str

    # FIUBench (gray311/VLM_Unlearned)
    # data_module.MMDatasetQA / MMForgetDatasetQA pass every question (APE paraphrases included), answer,
    # paraphrased answer and IdK refusal (stripped of spaces first) through str.capitalize(), which also
    # lower-cases the rest (names); perturbed answers keep their case. Finetuning, unlearning and eval alike.
    fiubench_capitalize: bool = False
    # data_module.preprocess_v1: labels mask BOS + len(tok(instruction + answer tag)) - 2 tokens, so a space
    # token split off after the tag (before a digit with Llama's tokenizer) is labelled as answer. Corrected:
    # a token is an answer token when it carries answer characters.
    fiubench_preprocess_mask: bool = False
    # evaluate_util.run_generation: the scored row's ids decoded WITH special tokens, cut at the answer tag and
    # re-encoded with special tokens (prompt starts with two BOS); the ROUGE reference is that decoded answer,
    # and the generation is not stripped. Corrected: the template's prompt with one BOS, the answer string.
    fiubench_generation_roundtrip: bool = False
    # The metric quirks of evaluate_util.py / aggregate_eval_stat.py: the first answer token left out of the loss
    # sum, generations without a period cut to "", ROUGE's dropped last character, empty gpt / exact_match lists
    # entering Model Utility as 0, APE keywords taken from every third sample, the judge asked every item's
    # question as the split's first prompt (see vlmu_jax.eval.metrics).
    fiubench_metric_quirks: bool = False
    # evaluate_util's log fields: per-question truth_ratio = exp(paraphrased - mean perturbed loss) (the
    # reciprocal of our R), `gpt: []` written when no judge ran, generated_text = [decoded prompt with special
    # tokens, generation, decoded answer, "human_face"].
    fiubench_log_layout: bool = False
    # finetune.py / forget.py: DataLoader(shuffle=False), so finetuning and the forget (and IdK) stream go in file
    # order. Corrected: shuffled every epoch.
    fiubench_file_order: bool = False
    # finetune.yaml's retain-only reference model (split "retain") sees no identity of forget1/5/10. Corrected:
    # everything outside the configured forget split (the same when the splits are nested, as FIUBench's are).
    fiubench_reference_on_retain_split: bool = False
    # forget.py kl: kl_div(batchmean) over logits flattened to [B*T, V]: every position of the padded retain
    # batch (image, prompt, answer, the last token and padding up to the longest row) counts. Corrected: every
    # real token that predicts a next token.
    fiubench_kl_all_positions: bool = False

    # Shared: the trainable set. LoRA targets (regex searched in our module paths) when a stage's
    # `lora_targets` is empty. forget.py's per-model regexes end in `\.(q|k|v|o|gate|up|down)_proj`, so Phi-3's
    # fused qkv_proj / gate_up_proj get no adapter there; corrected adapts every LM projection.
    lora_targets: str = DEFAULT_TARGETS

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
    # language model's projections: the vision q/k/v and Idefics2's connector too) with gaussian A ~ N(0, 1/r), when
    # the stage names no lora_targets. Otherwise: `lora_targets` (the language model's projections, what skipping
    # the vision tower and projector means) and PEFT's default kaiming-uniform A.
    mllmu_peft_lora: bool = False
    # Idefics2 image splitting as each script builds its processor: off in training (do_image_splitting=False),
    # the checkpoint's own preprocessor setting in eval.py. Otherwise: off in every stage.
    mllmu_eval_image_splitting: bool = False

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
    if original and config.benchmark == "fiubench" and config.data.append_eos:
        raise ValueError("config.data.append_eos=True is not FIUBench's original protocol (its LLaVA rows end with "
                         "the answer, no EOS): set it False or use config.protocol=corrected")
    return Protocol(name=name, benchmark=config.benchmark,
                    **_fiubench(original and config.benchmark == "fiubench"),
                    **_mllmu(original and config.benchmark == "mllmu"))


def _flags(prefix: str) -> list[str]:
    """One benchmark's on/off fields of Protocol (named with its prefix), so a new field needs no list here."""
    return [f.name for f in dataclasses.fields(Protocol) if f.name.startswith(prefix) and f.type in (bool, "bool")]


def _fiubench(original: bool) -> dict:
    """FIUBench's fields: all of its original code path, or none of it."""
    return {**dict.fromkeys(_flags("fiubench_"), original),
            "lora_targets": FIUBENCH_LORA_TARGETS if original else DEFAULT_TARGETS}


def _mllmu(original: bool) -> dict:
    """MLLMU-Bench's fields: all of its original code path, or none of it."""
    return dict.fromkeys(_flags("mllmu_"), original)
