"""MLLMU-Bench evaluation of one model: the four sets and three tasks of franciscoliu/MLLMU-Bench `eval.py`.

Sets (``eval.main``): forget (``forget_{R}``), test (``Test_Set`` rows of the forget identities: transformed
images, paraphrased questions), retain (``retain_{100-R}``) and celebrity (``Retain_Set``, real people). Tasks
per set and modality (image+text ``Image_Textual`` / text-only ``Pure_Text``):

- classification: the prompt lists the options and asks for ONE letter; the first character of the greedy
  generation is the pick (``metrics.parse_choice_letter``). Added: the likelihood variant
  (``metrics.choice_by_likelihood``: each option text scored as the answer to the bare question).
- fill_in_the_blank (``Mask_Task``): ``__`` becomes ``[Blank]``; hit when the ground truth is a
  case-insensitive substring of the response (``metrics.cloze_correct``).
- generation: ROUGE-1/2/L F and BLEU of greedy generations against ``Ground_Truth``.

All prompts of a set (classification, cloze, generation) are generated in ONE ``generate_rows`` call and all
option likelihoods scored in ONE ``score_rows`` call. The question text is wrapped by the runner's template
(``mllmu-llava``: ``USER: <image>\\n{text}\\nASSISTANT: ``), which is what ``eval.py`` writes for LLaVA.

Deliberate differences from ``eval.py``:
- Zero-shot. ``eval.py`` prepends few-shot examples (1-2 random identities of ``Full_Set``, images included)
  for the forget / retain_shared / test modes (and the celebrity cloze), and skips those identities' own
  questions when they are in the evaluated set. Our rows carry one image each, and a random few-shot draw
  makes numbers depend on the seed; so every question is asked alone and none is skipped.
- Test set: ``eval.py`` draws ``random.choice(row["images"])`` independently in each task function; we draw
  one transformed image per Test_Set row from ``seed`` and use it for all three tasks (reproducible).
- Prompts are never cut to the training ``max_length`` (the eval Runner's text config has none).
- One ``max_new_tokens`` (the runner's) for every task; ``eval.py`` uses 50 (5 for Idefics2 text-only
  classification).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx

from vlmu_jax.data.batching import Example, encode, generation_rows
from vlmu_jax.data.mllmu import MODALITY_NAME
from vlmu_jax.data.records import IMAGE, QA, TEXT, Benchmark, Cloze, Identity, ImageRef, MultipleChoice, TestVariant
from vlmu_jax.eval import judge, metrics
from vlmu_jax.eval.batched import generate_rows, score_rows
from vlmu_jax.eval.tasks.fiubench import Runner
from vlmu_jax.report.aggregate import mllmu_accuracy, mllmu_factuality, mllmu_generation

# eval.py `results_data` top-level keys.
SET_NAMES = {
    "forget": "Forget Set Results",
    "test": "Test Set Results",
    "retain": "Retain Set (shared dataset) Results",
    "celebrity": "Retain Set (real person) Results",
}
# evaluate_classification returns these names; evaluate_fill_in_the_blank the mllmu_accuracy ones.
CLASSIFICATION_KEYS = {
    "image_textual_accuracy": "Image-Textual Question Accuracy",
    "pure_text_accuracy": "Pure Text Question Accuracy",
}
CHOICE_INSTRUCTION = "Just give ONE letter representing the answer directly."
CLOZE_INSTRUCTION = "Please **ONLY** provide the correct answer that should replace the [Blank]."
GENERATION_INSTRUCTION = {
    IMAGE: "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH.",
    TEXT: "Answer the question based on your trained knowledge in one sentence in ENGLISH.",
}


# ----------------------------------------------------------------------------- prompts (eval.py wording)
def choice_prompt(mc: MultipleChoice) -> str:
    """``formulate_prompt_with_options`` + the one-letter instruction (question, "A: ..." lines, instruction)."""
    options = "\n".join(f"{key}: {value}" for key, value in mc.options)
    return f"{mc.question}\n{options}\n{CHOICE_INSTRUCTION}"


def cloze_prompt(cloze: Cloze) -> str:
    """Blank ``__`` written as ``[Blank]``, then the answer-only instruction."""
    return cloze.question.replace("__", "[Blank]") + "\n" + CLOZE_INSTRUCTION


def generation_prompt(qa: QA) -> str:
    """The question and the one-sentence instruction (``accurately`` only in the image+text prompt)."""
    return f"{qa.question}\n{GENERATION_INSTRUCTION[qa.modality]}"


# ----------------------------------------------------------------------------- sets
@dataclass(frozen=True)
class Person:
    """What one set row contributes: its id, the image its image questions are asked with, its tasks."""

    uid: str
    image: ImageRef
    generation: tuple[QA, ...]
    choices: tuple[MultipleChoice, ...]
    cloze: tuple[Cloze, ...]


def from_identities(identities: Sequence[Identity]) -> list[Person]:
    return [Person(i.uid, i.image, i.generation, i.choices, i.cloze) for i in identities]


def from_test(variants: Sequence[TestVariant], uids: Sequence[str], *, seed: int = 0) -> list[Person]:
    """Test_Set rows of these identities (eval.py filters by the forget IDs), one transformed image each."""
    keep, rng = set(uids), np.random.default_rng(seed)
    out = []
    for v in variants:
        if v.uid in keep:
            image = v.images[int(rng.integers(len(v.images)))]
            out.append(Person(v.uid, image, v.generation, v.choices, v.cloze))
    return out


def _image(person: Person, modality: str) -> ImageRef | None:
    return person.image if modality == IMAGE else None


def evaluate_set(model: nnx.Module, people: Sequence[Person], runner: Runner, *, desc: str = "") -> dict[str, Any]:
    """``fill_in_the_blank`` / ``classification`` / ``generation`` (eval.py keys), ``classification_likelihood``
    (same keys as classification) and ``predictions`` (per-item records, in set order)."""
    choices = [(p, mc) for p in people for mc in p.choices]
    clozes = [(p, c) for p in people for c in p.cloze]
    gens = [(p, qa) for p in people for qa in p.generation]
    if not (choices or clozes or gens):
        raise ValueError(f"{desc}: no classification, cloze or generation items")
    prompts = ([Example(choice_prompt(mc), "", _image(p, mc.modality), p.uid) for p, mc in choices]
               + [Example(cloze_prompt(c), "", _image(p, c.modality), p.uid) for p, c in clozes]
               + [Example(generation_prompt(qa), "", _image(p, qa.modality), p.uid) for p, qa in gens])
    tok, pad, text = runner.tokenizer, runner.tokenizer.pad_token_id, runner.text
    common = dict(batch_size=runner.batch_size, pad_token_id=pad, image_fn=runner.image_fn, mesh=runner.mesh)
    generated = generate_rows(model, generation_rows(prompts, text), eos_token_id=tok.eos_token_id,
                              max_new_tokens=runner.max_new_tokens, desc=f"{desc} generate", **common)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in generated]
    options = [Example(mc.question, opt, _image(p, mc.modality), p.uid) for p, mc in choices for _, opt in mc.options]
    scores = (score_rows(model, [encode(e, text) for e in options], desc=f"{desc} score", **common)
              if options else [])
    return _results(choices, clozes, gens, texts, [s.loss for s in scores])


def _results(choices, clozes, gens, texts: list[str], option_loss: list[float]) -> dict[str, Any]:
    n_choice, n_cloze = len(choices), len(clozes)
    choice_rows, start = [], 0
    for (p, mc), text in zip(choices, texts[:n_choice], strict=True):
        letters = [k for k, _ in mc.options]
        loss = option_loss[start:start + len(letters)]
        start += len(letters)
        choice_rows.append({
            "image_id": p.uid, "question type": MODALITY_NAME[mc.modality], "question": mc.question,
            "generated_answer": text, "predicted_answer": metrics.parse_choice_letter(text, mc.option_dict),
            "likelihood_answer": metrics.choice_by_likelihood(np.asarray([loss]), letters)[0],
            "option_loss": dict(zip(letters, loss, strict=True)), "correct_answer": mc.answer,
        })
    cloze_rows = []
    for (p, c), text in zip(clozes, texts[n_choice:n_choice + n_cloze], strict=True):
        response = metrics.assistant_response(text)
        cloze_rows.append({
            "image_id": p.uid, "question type": MODALITY_NAME[c.modality], "question": c.question,
            "generated_answer": response, "ground_truth": c.answer,
            "correct": metrics.cloze_correct(response, c.answer),
        })
    gen_rows = [{  # eval.py's `{mode}_generation_results.json` rows
        "image_id": p.uid, "question type": MODALITY_NAME[qa.modality], "question": qa.question,
        "generated_answer": metrics.assistant_response(text), "ground_truth": qa.answer,
    } for (p, qa), text in zip(gens, texts[n_choice + n_cloze:], strict=True)]

    def choice_acc(key: str) -> dict[str, float]:
        acc = mllmu_accuracy([r[key] == r["correct_answer"] for r in choice_rows],
                             [r["question type"] for r in choice_rows])
        return {CLASSIFICATION_KEYS[k]: v for k, v in acc.items()}

    return {
        "fill_in_the_blank": mllmu_accuracy([r["correct"] for r in cloze_rows],
                                            [r["question type"] for r in cloze_rows]),
        "classification": choice_acc("predicted_answer"),
        "classification_likelihood": choice_acc("likelihood_answer"),
        "generation": mllmu_generation([r["generated_answer"] for r in gen_rows],
                                       [r["ground_truth"] for r in gen_rows],
                                       [r["question type"] for r in gen_rows]),
        "predictions": {"classification": choice_rows, "fill_in_the_blank": cloze_rows, "generation": gen_rows},
    }


def mllmu_sets(bench: Benchmark, *, forget_ratio: int, seed: int = 0) -> dict[str, list[Person]]:
    """The rows of each eval.py set (short names as in ``SET_NAMES``); empty when the bench lacks the set."""
    forget = bench.split(f"forget_{forget_ratio}")
    return {
        "forget": from_identities(forget),
        "test": from_test(bench.test, [i.uid for i in forget], seed=seed),
        "retain": from_identities(bench.split(f"retain_{100 - forget_ratio}")),
        "celebrity": from_identities(bench.celebrities),
    }


def evaluate_mllmu(model: nnx.Module, bench: Benchmark, runner: Runner, *, forget_ratio: int,
                   seed: int = 0) -> dict[str, dict]:
    """eval.py's ``final_evaluation_results.json`` content: ``SET_NAMES[set] -> {task -> metrics}``.

    Each set holds ``fill_in_the_blank`` (``image_textual_accuracy`` / ``pure_text_accuracy``),
    ``classification`` (``Image-Textual Question Accuracy`` / ``Pure Text Question Accuracy``), both in
    percent as eval.py, ``generation`` (``Average ROUGE-1/2/L (<Type>)``, ``Average BLEU (<Type>)``), plus the
    additions ``classification_likelihood`` and ``predictions``. Sets the benchmark does not have (no
    Test_Set / Retain_Set folder) are left out.
    """
    out = {}
    for name, people in mllmu_sets(bench, forget_ratio=forget_ratio, seed=seed).items():
        if people:
            out[SET_NAMES[name]] = evaluate_set(model, people, runner, desc=name)
    return out


def add_factuality(results: dict[str, dict], client: judge.JudgeClient,
                   prompt: judge.JudgePrompt | None = None) -> None:
    """eval_gpt.py's factuality judge on every set's generation answers (``results`` as ``evaluate_mllmu``
    returns it, predictions still inside): each generation row gets ``Factuality Score`` (None when the verdict
    has no parsable score) and ``Factuality Verdict``; each set gets ``factuality`` (see
    ``report.aggregate.mllmu_factuality``)."""
    for groups in results.values():
        rows = groups["predictions"]["generation"]
        scores, verdicts = judge.mllmu_factuality_scores(client, rows, prompt)
        for row, score, verdict in zip(rows, scores, verdicts, strict=True):
            row["Factuality Score"], row["Factuality Verdict"] = score, verdict
        groups["factuality"] = mllmu_factuality(scores)
