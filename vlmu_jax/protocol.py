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

    @property
    def original(self) -> bool:
        return self.name == "original"


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
                    **_fiubench(original and config.benchmark == "fiubench"))


def _fiubench(original: bool) -> dict:
    """FIUBench's fields: all of its original code path, or none of it."""
    flags = ("fiubench_capitalize", "fiubench_preprocess_mask", "fiubench_generation_roundtrip",
             "fiubench_metric_quirks", "fiubench_log_layout", "fiubench_file_order",
             "fiubench_reference_on_retain_split", "fiubench_kl_all_positions")
    return {**dict.fromkeys(flags, original),
            "lora_targets": FIUBENCH_LORA_TARGETS if original else DEFAULT_TARGETS}
