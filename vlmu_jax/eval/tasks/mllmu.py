"""MLLMU-Bench evaluation of one model: the four sets and three tasks of franciscoliu/MLLMU-Bench `eval.py`.

Sets (``eval.main``): forget (``forget_{R}``), test (``Test_Set`` rows of the forget identities: transformed
images, paraphrased questions), retain (``retain_{100-R}``) and celebrity (``Retain_Set``, real people). Tasks
per set and modality (image+text ``Image_Textual`` / text-only ``Pure_Text``):

- classification: the prompt lists the options and asks for ONE letter; the first character of the greedy
  generation is the pick (``metrics.choice_letter``). Added: the likelihood variant
  (``metrics.choice_by_likelihood``: each option text scored as the answer to the bare question).
- fill_in_the_blank (``Mask_Task``): ``__`` becomes ``[Blank]``; hit when the ground truth is a
  case-insensitive substring of the response (``metrics.cloze_correct``).
- generation: ROUGE-1/2/L F and BLEU of greedy generations against ``Ground_Truth``.

Two protocols (``vlmu_jax.protocol``):

- ``original`` (``evaluate_eval_py``): eval.py's own prompts, few-shot blocks, draws, images and answer cut,
  built in ``vlmu_jax.eval.tasks.mllmu_prompts``; the same for every model.
- ``corrected`` (``evaluate_mllmu``): every question asked alone (zero-shot: eval.py's random few-shot draw makes
  numbers depend on the draw, and skips the drawn identities' own questions), wrapped by the runner's template (the
  model's chat format); the answer is the new tokens up to a generated "ASSISTANT:" (``metrics.own_turn``); the
  test set's transformed image drawn once per row from ``seed`` for all three tasks; one ``max_new_tokens`` (the
  runner's) for every task.

Either way each set's prompts are generated in one pass and its option likelihoods scored in one more, the passes
run as one stream of device calls (``batched.run_passes``), and prompts are never cut to the training
``max_length``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx

from vlmu_jax.data.batching import Encoded, Example, encode_all, generation_rows
from vlmu_jax.data.mllmu import MODALITY_NAME
from vlmu_jax.data.records import IMAGE, QA, Benchmark, Cloze, Identity, ImageRef, MultipleChoice, TestVariant
from vlmu_jax.eval import judge, metrics
from vlmu_jax.eval.batched import Pass, after, compile_ahead, generate_pass, run_passes, score_pass
from vlmu_jax.eval.result_logs import mllmu_accuracy, mllmu_factuality, mllmu_generation
from vlmu_jax.eval.tasks import mllmu_prompts as P
from vlmu_jax.eval.tasks.fiubench import Runner

# eval.py `results_data` top-level keys.
SET_NAMES = {
    "forget": "Forget Set Results",
    "test": "Test Set Results",
    "retain": "Retain Set (shared dataset) Results",
    "celebrity": "Retain Set (real person) Results",
}
# Beside the sets in final_evaluation_results.json: the protocol that made them (name, seed, few-shot draws).
PROTOCOL_KEY = "protocol"
# evaluate_classification returns these names; evaluate_fill_in_the_blank the mllmu_accuracy ones.
CLASSIFICATION_KEYS = {
    "image_textual_accuracy": "Image-Textual Question Accuracy",
    "pure_text_accuracy": "Pure Text Question Accuracy",
}


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


@dataclass(frozen=True)
class SetInputs:
    """One set's items and tokenised rows (protocol ``corrected``): the same for every model."""

    choices: list[tuple[Person, MultipleChoice]]
    clozes: list[tuple[Person, Cloze]]
    gens: list[tuple[Person, QA]]
    prompt_rows: list[Encoded]  # classification, cloze, generation prompts, in that order
    option_rows: list[Encoded]  # every option of every classification question


def set_inputs(people: Sequence[Person], runner: Runner, *, desc: str = "") -> SetInputs:
    """`SetInputs` of a set's people under `runner`'s text config."""
    choices = [(p, mc) for p in people for mc in p.choices]
    clozes = [(p, c) for p in people for c in p.cloze]
    gens = [(p, qa) for p in people for qa in p.generation]
    if not (choices or clozes or gens):
        raise ValueError(f"{desc}: no classification, cloze or generation items")
    prompts = ([Example(P.choice_prompt(mc), "", _image(p, mc.modality), p.uid) for p, mc in choices]
               + [Example(P.cloze_prompt(c), "", _image(p, c.modality), p.uid) for p, c in clozes]
               + [Example(P.generation_prompt(qa.question, qa.modality), "", _image(p, qa.modality), p.uid)
                  for p, qa in gens])
    return SetInputs(choices, clozes, gens, generation_rows(prompts, runner.text),
                     _option_rows([(p.uid, _image(p, mc.modality), mc) for p, mc in choices], runner))


def evaluate_set(model: nnx.Module, inputs: SetInputs, runner: Runner, ready: Callable[[], None], *,
                 desc: str = "") -> dict[str, Any]:
    """``fill_in_the_blank`` / ``classification`` / ``generation`` (eval.py keys), ``classification_likelihood``
    (same keys as classification) and ``predictions`` (per-item records, in set order). `ready`: the wait for
    generation's programs (`compile_programs`)."""
    tok, generating = runner.tokenizer, runner.generating()
    generated = generate_pass(model, inputs.prompt_rows, desc=f"{desc} generate", **generating, **runner.batching())
    scores = _option_pass(model, inputs.option_rows, runner, desc)
    run_passes([*scores, after(ready, generated)])
    answers = [metrics.own_turn(tok.decode(ids, skip_special_tokens=True)) for ids in generated.out]
    choices, clozes, gens = inputs.choices, inputs.clozes, inputs.gens
    option_loss = _option_loss(scores, [mc for _, mc in choices])
    n_choice, n_cloze = len(choices), len(clozes)
    choice_rows = [_choice_row(p.uid, mc, a, loss) for (p, mc), a, loss in
                   zip(choices, answers[:n_choice], option_loss, strict=True)]
    cloze_rows = [_cloze_row(p.uid, c, a) for (p, c), a in zip(clozes, answers[n_choice:n_choice + n_cloze],
                                                                strict=True)]
    gen_rows = [_generation_row(p.uid, qa, a) for (p, qa), a in zip(gens, answers[n_choice + n_cloze:], strict=True)]
    return _aggregate(choice_rows, cloze_rows, gen_rows)


def _option_rows(choices: Sequence[tuple[str, ImageRef | None, MultipleChoice]], runner: Runner) -> list[Encoded]:
    """Every option text as the answer to the bare question, in the runner's template, question by question."""
    return encode_all([Example(mc.question, opt, image, uid) for uid, image, mc in choices for _, opt in mc.options],
                      runner.text)


def _option_pass(model: nnx.Module, rows: Sequence[Encoded], runner: Runner, desc: str) -> list[Pass]:
    """The pass that scores every option row (`_option_rows`) as the answer, or none when there are no options."""
    if not rows:
        return []
    return [score_pass(model, rows, desc=f"{desc} score", **runner.batching(), shared_prompts=runner.shared_prompts)]


def _option_loss(scores: Sequence[Pass], choices: Sequence[MultipleChoice]) -> list[list[float]]:
    """Mean NLL of each option as the answer (the likelihood variant, an addition to eval.py), from the options'
    scoring pass (`_option_pass`) once it has run."""
    losses = iter(s.loss for p in scores for s in p.out)
    return [[next(losses) for _ in mc.options] for mc in choices]


def _choice_row(uid: str, mc: MultipleChoice, answer: str, option_loss: Sequence[float]) -> dict[str, Any]:
    letters = [k for k, _ in mc.options]
    return {"image_id": uid, "question type": MODALITY_NAME[mc.modality], "question": mc.question,
            "generated_answer": answer, "predicted_answer": metrics.choice_letter(answer, letters),
            "likelihood_answer": metrics.choice_by_likelihood(np.asarray([option_loss]), letters)[0],
            "option_loss": dict(zip(letters, option_loss, strict=True)), "correct_answer": mc.answer}


def _cloze_row(uid: str, c: Cloze, answer: str) -> dict[str, Any]:
    return {"image_id": uid, "question type": MODALITY_NAME[c.modality], "question": c.question,
            "generated_answer": answer, "ground_truth": c.answer, "correct": metrics.cloze_correct(answer, c.answer)}


def _generation_row(uid: str, qa: QA, answer: str) -> dict[str, Any]:
    """eval.py's `{mode}_generation_results.json` row."""
    return {"image_id": uid, "question type": MODALITY_NAME[qa.modality], "question": qa.question,
            "generated_answer": answer, "ground_truth": qa.answer}


def _aggregate(choice_rows: list[dict], cloze_rows: list[dict], gen_rows: list[dict]) -> dict[str, Any]:
    """A set's eval.py metrics from its per-item rows (``predictions`` keeps the rows)."""

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


@dataclass(frozen=True)
class EvalPyInputs:
    """eval.py's items of every set and their tokenised rows (protocol ``original``): the same for every model."""

    items: dict[str, list]  # set -> its items (`mllmu_prompts.eval_py_items`)
    draws: dict[str, list[str]]  # the few-shot IDs drawn per "set/task"
    rows: list[Encoded]  # every item's prompt, in set order
    order: list[int]  # `rows` sorted by image count and length: generation's batches
    mcs: dict[str, list[MultipleChoice]]  # each set's classification items
    option_rows: dict[str, list[Encoded]]  # and their options' rows

    @property
    def generated_rows(self) -> list[Encoded]:
        """`rows` in generation's order (`order`)."""
        return [self.rows[i] for i in self.order]


def eval_py_inputs(bench: Benchmark, runner: Runner, *, forget_ratio: int, family: str,
                   seed: int = 0) -> EvalPyInputs:
    """`EvalPyInputs`: the prompts through the model family's image markup, in the runner's tokenizer."""
    items, draws = P.eval_py_items(bench, forget_ratio=forget_ratio, family=family, seed=seed)
    text = runner.text
    raw = dataclasses.replace(text, template=text.template.raw())
    examples = [Example(it.prompt.replace(P.IMAGE_MARKER, text.template.image_markup), "",
                        it.images[-1] if it.images else None, it.uid, it.images[:-1])
                for set_items in items.values() for it in set_items]
    rows = generation_rows(examples, raw)
    # Batches of rows alike in image count and length: few compiled shapes, little padding, few blank images.
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i].images), len(rows[i].input_ids)))
    choices = {name: [it for it in set_items if it.task == P.CLASSIFICATION] for name, set_items in items.items()}
    mcs = {name: [MultipleChoice(it.question, it.options, it.gold, it.modality) for it in c]
           for name, c in choices.items()}
    option_rows = {name: _option_rows([(it.uid, it.images[-1] if it.images else None, mc)
                                       for it, mc in zip(choices[name], mcs[name], strict=True)], runner)
                   for name in choices}
    return EvalPyInputs(items, draws, rows, order, mcs, option_rows)


def evaluate_eval_py(model: nnx.Module, inputs: EvalPyInputs,
                     runner: Runner) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Every set as eval.py's ``main`` evaluates it (protocol ``original``): one generation per prompt cut to
    eval.py's ``max_new_tokens``, the answer cut from the decoded prompt + generation. Returns (``SET_NAMES[set]
    -> results``, the few-shot IDs drawn per "set/task")."""
    items, rows, tok, generating = inputs.items, inputs.rows, runner.tokenizer, runner.generating()
    ready = compile_programs(model, inputs, runner)
    outputs = generate_pass(model, inputs.generated_rows, desc="eval.py generate", **generating,
                            **runner.batching())
    scores = {name: _option_pass(model, inputs.option_rows[name], runner, name) for name, set_items in items.items()
              if set_items}
    run_passes([*(p for passes in scores.values() for p in passes), after(ready, outputs)])
    generated = [outputs.out[k] for k in np.argsort(inputs.order)]
    flat = [it for set_items in items.values() for it in set_items]
    answers = [metrics.eval_py_answer(tok.decode([*row.input_ids[2:].tolist(), *ids[:it.max_new_tokens].tolist()],
                                                 skip_special_tokens=True), answer_tag=it.task != P.CLASSIFICATION)
               for it, row, ids in zip(flat, rows, generated, strict=True)]
    by_item = dict(zip(map(id, flat), answers, strict=True))
    out = {}
    for name, set_items in items.items():
        if not set_items:
            continue
        mcs = inputs.mcs[name]
        choices = [it for it in set_items if it.task == P.CLASSIFICATION]
        option_loss = _option_loss(scores[name], mcs)
        out[SET_NAMES[name]] = _aggregate(
            [_choice_row(it.uid, mc, by_item[id(it)], loss) for it, mc, loss in zip(choices, mcs, option_loss,
                                                                                   strict=True)],
            [_cloze_row(it.uid, Cloze(it.question, it.gold, it.modality), by_item[id(it)])
             for it in set_items if it.task == P.CLOZE],
            [_generation_row(it.uid, QA(it.question, it.gold, modality=it.modality), by_item[id(it)])
             for it in set_items if it.task == P.GENERATION])
    return out, inputs.draws


def mllmu_inputs(bench: Benchmark, runner: Runner, *, forget_ratio: int, seed: int = 0) -> dict[str, SetInputs]:
    """Each set's `SetInputs` (protocol ``corrected``), sets the benchmark does not have left out."""
    return {name: set_inputs(people, runner, desc=name)
            for name, people in mllmu_sets(bench, forget_ratio=forget_ratio, seed=seed).items() if people}


def evaluate_mllmu(model: nnx.Module, inputs: dict[str, SetInputs], runner: Runner) -> dict[str, dict]:
    """eval.py's ``final_evaluation_results.json`` content: ``SET_NAMES[set] -> {task -> metrics}`` (protocol
    ``corrected``; ``evaluate_eval_py`` is ``original``), of `mllmu_inputs`' sets.

    Each set holds ``fill_in_the_blank`` (``image_textual_accuracy`` / ``pure_text_accuracy``),
    ``classification`` (``Image-Textual Question Accuracy`` / ``Pure Text Question Accuracy``), both in
    percent as eval.py, ``generation`` (``Average ROUGE-1/2/L (<Type>)``, ``Average BLEU (<Type>)``), plus the
    additions ``classification_likelihood`` and ``predictions``.
    """
    ready = compile_programs(model, inputs, runner)  # every set's programs at once
    return {SET_NAMES[name]: evaluate_set(model, set_in, runner, ready, desc=name) for name, set_in in inputs.items()}


def compile_programs(model: nnx.Module, inputs: EvalPyInputs | dict[str, SetInputs],
                     runner: Runner) -> Callable[[], None]:
    """`batched.compile_ahead` of every program `evaluate_eval_py` / `evaluate_mllmu` runs on `inputs` (scoring's
    compiled on return, generation's once the function returned has returned): for the model itself, or for a
    stand-in of it (shapes only) while it loads."""
    if isinstance(inputs, EvalPyInputs):
        to_score, to_generate = list(inputs.option_rows.values()), [inputs.generated_rows]
    else:
        to_score = [s.option_rows for s in inputs.values()]
        to_generate = [s.prompt_rows for s in inputs.values()]
    return compile_ahead(model, to_score=to_score, to_generate=to_generate, **runner.generating(),
                         **runner.batching(), shared_prompts=runner.shared_prompts)


def add_factuality(results: dict[str, dict], client: judge.JudgeClient,
                   prompt: judge.JudgePrompt | None = None) -> None:
    """eval_gpt.py's factuality judge on every set's generation answers (``results`` as ``evaluate_mllmu``
    returns it, predictions still inside): each generation row gets ``Factuality Score`` (None when the verdict
    has no parsable score) and ``Factuality Verdict``; each set gets ``factuality`` (see
    ``result_logs.mllmu_factuality``)."""
    for groups in results.values():
        rows = groups["predictions"]["generation"]
        scores, verdicts = judge.mllmu_factuality_scores(client, rows, prompt)
        for row, score, verdict in zip(rows, scores, verdicts, strict=True):
            row["Factuality Score"], row["Factuality Verdict"] = score, verdict
        groups["factuality"] = mllmu_factuality(scores)
