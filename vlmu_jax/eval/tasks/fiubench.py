"""FIUBench evaluation of one model on one split: the per-question log of `evaluate_util.py`.

Every (question, answer) pair the metrics need (ground truth, paraphrased answer, each perturbed
answer) is scored in ONE batched pass, and all generations in one more, so a split costs a few
compiled shapes however many questions it has. The returned dict uses the original key names
(avg_gt_loss, avg_paraphrased_loss, average_perturb_loss, rougeL_recall, generated_text,
exact_match, mink, mink++, loss, zlib) so existing FIUBench tooling can read our JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.data.batching import IGNORE, Example, TextConfig, encode, generation_rows
from vlmu_jax.data.records import IMAGE, Identity
from vlmu_jax.eval import attacks, judge, metrics, mia
from vlmu_jax.eval.batched import generate_rows, score_rows
from vlmu_jax.report.aggregate import FiuTaskResults, fiubench_eval_log


@dataclass(frozen=True)
class Runner:
    """How to put rows through the model: everything except the model and the data."""

    text: TextConfig
    batch_size: int
    image_fn: Callable  # ImageRef | None -> the model's image inputs for one row
    max_new_tokens: int
    mesh: Mesh | None = None
    original: bool = False  # reproduce the seeds' known bugs (see vlmu_jax.eval.metrics)

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer


def _questions(identities: Sequence[Identity]) -> list[tuple[Identity, Any]]:
    return [(ident, qa) for ident in identities for qa in ident.qa if qa.modality == IMAGE]


def evaluate_split(model: nnx.Module, identities: Sequence[Identity], runner: Runner, *, forget: bool,
                   desc: str = "") -> dict[str, Any]:
    """Per-question losses, truth ratio, generations, ROUGE, EM and MIA scores for these identities."""
    items = _questions(identities)
    if not items:
        raise ValueError(f"{desc}: no image questions to evaluate")
    n_pert = {len(qa.perturbed_answers) for _, qa in items}
    if len(n_pert) != 1 or 0 in n_pert:
        raise ValueError(f"{desc}: every question needs the same non-zero number of perturbed answers, "
                         f"found counts {sorted(n_pert)}")
    k = n_pert.pop()
    examples: list[Example] = []
    for ident, qa in items:
        examples.append(Example(qa.question, qa.answer, ident.image, ident.uid))
        examples.append(Example(qa.question, qa.paraphrased_answer or qa.answer, ident.image, ident.uid))
        examples.extend(Example(qa.question, p, ident.image, ident.uid) for p in qa.perturbed_answers)
    pad = runner.tokenizer.pad_token_id
    rows = [encode(e, runner.text) for e in examples]
    scores = score_rows(model, rows, batch_size=runner.batch_size,
                        pad_token_id=pad, image_fn=runner.image_fn, mesh=runner.mesh, desc=f"{desc} score")
    prompts = [Example(qa.question, "", ident.image, ident.uid) for ident, qa in items]
    generated = generate_rows(model, generation_rows(prompts, runner.text), batch_size=runner.batch_size,
                              pad_token_id=pad, eos_token_id=runner.tokenizer.eos_token_id,
                              max_new_tokens=runner.max_new_tokens, image_fn=runner.image_fn, mesh=runner.mesh,
                              desc=f"{desc} generate")
    return _log(items, rows, scores, generated, k, runner, forget=forget)


def _log(items, rows, scores, generated, k: int, runner: Runner, *, forget: bool) -> dict[str, Any]:
    stride, tok, original = 2 + k, runner.tokenizer, runner.original

    def nll(score) -> tuple[float, int]:
        logps = score.logps[1:] if original else score.logps  # the seeds' off-by-one, see eval.metrics
        return float(-logps.sum()), int(score.logps.size)

    gt, para, pert, mia_rows = [], [], [], []
    for i in range(len(items)):
        g = scores[i * stride]
        gt.append(nll(g))
        para.append(nll(scores[i * stride + 1]))
        pert.append([nll(p) for p in scores[i * stride + 2: (i + 1) * stride]])
        gt_row = rows[i * stride]  # the seeds decode the labelled answer tokens after the first for zlib
        tail = tok.decode(gt_row.input_ids[gt_row.labels != IGNORE][1:])
        mia_rows.append(mia.question_scores(g.logps, g.mu, g.var, tail))
    texts = [metrics.truncate_at_first_period(tok.decode(ids, skip_special_tokens=True).strip(), original=original)
             for ids in generated]
    pert_arr = np.array(pert)
    results = FiuTaskResults(
        gt_loss=np.array([x[0] for x in gt]), gt_num_tokens=np.array([x[1] for x in gt]),
        paraphrased_loss=np.array([x[0] for x in para]), paraphrased_num_tokens=np.array([x[1] for x in para]),
        perturb_loss=pert_arr[..., 0], perturb_num_tokens=pert_arr[..., 1],
        prompts=[qa.question for _, qa in items], generations=texts, references=[qa.answer for _, qa in items],
        categories=[qa.category for _, qa in items], keywords=[list(qa.keywords) for _, qa in items],
        mia_scores={key: [row[key] for row in mia_rows] for key in mia_rows[0]},
    )
    return fiubench_eval_log(results, forget=forget, original=original)


def evaluate_ape(model: nnx.Module, identities: Sequence[Identity], runner: Runner, *,
                 desc: str = "") -> dict[str, Any]:
    """Adversarial privacy extraction: every paraphrase of every forget question, asked with the image.

    The log (`eval_forget_ape_log.json`) holds per-variant EM/ROUGE and the question each came from.
    """
    items = _questions(identities)
    records = [{"paraphrased_question": list(qa.paraphrased_questions), "answer": qa.answer,
                "keywords": list(qa.keywords)} for _, qa in items]
    variants = attacks.ape_variants(records, capitalize=runner.original)
    if not variants:
        raise ValueError(f"{desc}: no paraphrased questions, APE needs them")
    prompts = [Example(v.question, "", items[v.qa_index][0].image, items[v.qa_index][0].uid) for v in variants]
    generated = generate_rows(model, generation_rows(prompts, runner.text), batch_size=runner.batch_size,
                              pad_token_id=runner.tokenizer.pad_token_id, eos_token_id=runner.tokenizer.eos_token_id,
                              max_new_tokens=runner.max_new_tokens, image_fn=runner.image_fn, mesh=runner.mesh,
                              desc=f"{desc} APE")
    texts = [runner.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    scored = attacks.score_ape(variants, texts, original=runner.original)
    scored["question"] = [v.question for v in variants]
    scored["qa_index"] = [v.qa_index for v in variants]
    return scored


def add_gpt_scores(log: dict[str, Any], client: judge.JudgeClient, prompt: judge.JudgePrompt | None = None) -> None:
    """Adds the per-question GPT score (`gpt` list, question order) of a task log's generations, and
    `gpt_unparsed`: how many verdicts had no number (scored 0.0, as the original does)."""
    rows = [log["generated_text"][str(i)] for i in range(len(log["generated_text"]))]
    log["gpt"], log["gpt_unparsed"] = judge.fiubench_gpt_scores(
        client, [(question, answer, prediction) for question, prediction, answer, _ in rows], prompt)
