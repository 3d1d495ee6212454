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

from vlmu_jax.data.batching import Example, TextConfig, encode, generation_rows
from vlmu_jax.data.records import IMAGE, Identity
from vlmu_jax.eval import metrics, mia
from vlmu_jax.eval.batched import generate_rows, score_rows


@dataclass(frozen=True)
class Runner:
    """How to put rows through the model: everything except the model and the data."""

    text: TextConfig
    batch_size: int
    image_fn: Callable
    image_shape: tuple[int, int, int]
    max_new_tokens: int
    mesh: Mesh | None = None

    @property
    def tokenizer(self) -> Any:
        return self.text.tokenizer


def _questions(identities: Sequence[Identity]) -> list[tuple[Identity, Any]]:
    return [(ident, qa) for ident in identities for qa in ident.qa if qa.modality == IMAGE]


def evaluate_split(model: nnx.Module, identities: Sequence[Identity], runner: Runner, *,
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
    scores = score_rows(model, [encode(e, runner.text) for e in examples], batch_size=runner.batch_size,
                        pad_token_id=pad, image_fn=runner.image_fn, image_shape=runner.image_shape,
                        mesh=runner.mesh, desc=f"{desc} score")
    prompts = [Example(qa.question, "", ident.image, ident.uid) for ident, qa in items]
    generated = generate_rows(model, generation_rows(prompts, runner.text), batch_size=runner.batch_size,
                              pad_token_id=pad, eos_token_id=runner.tokenizer.eos_token_id,
                              max_new_tokens=runner.max_new_tokens, image_fn=runner.image_fn,
                              image_shape=runner.image_shape, mesh=runner.mesh, desc=f"{desc} generate")
    return _log(items, scores, generated, k, runner)


def _log(items, scores, generated, k: int, runner: Runner) -> dict[str, Any]:
    stride = 2 + k
    log: dict[str, Any] = {key: {} for key in (
        "avg_gt_loss", "gt_loss", "num_token_gt", "avg_paraphrased_loss", "paraphrased_loss",
        "num_token_paraphrased", "average_perturb_loss", "perturb_loss", "num_token_perturb", "truth_ratio",
        "generated_text", "rouge1_recall", "rougeL_recall")}
    log.update({key: [] for key in ("exact_match", "loss", "zlib", "mink", "mink++")})
    tok = runner.tokenizer
    for i, ((_, qa), gen_ids) in enumerate(zip(items, generated, strict=True)):
        gt, para, pert = scores[i * stride], scores[i * stride + 1], scores[i * stride + 2: (i + 1) * stride]
        idx = str(i)
        log["avg_gt_loss"][idx] = gt.loss
        log["gt_loss"][idx] = float(-gt.logps.sum())
        log["num_token_gt"][idx] = int(gt.logps.size)
        log["avg_paraphrased_loss"][idx] = para.loss
        log["paraphrased_loss"][idx] = float(-para.logps.sum())
        log["num_token_paraphrased"][idx] = int(para.logps.size)
        log["average_perturb_loss"][idx] = [p.loss for p in pert]
        log["perturb_loss"][idx] = [float(-p.logps.sum()) for p in pert]
        log["num_token_perturb"][idx] = [int(p.logps.size) for p in pert]
        pert_losses = np.array([p.loss for p in pert])
        log["truth_ratio"][idx] = float(metrics.truth_ratio(np.array(para.loss), pert_losses))
        text = tok.decode(gen_ids, skip_special_tokens=True).strip()
        log["generated_text"][idx] = [qa.question, text, qa.answer, qa.category]
        log["rouge1_recall"][idx], log["rougeL_recall"][idx] = metrics.rouge_recall(text, qa.answer)
        log["exact_match"].append(metrics.exact_match(text, qa.keywords))
        answer_ids = _answer_ids(runner.text, qa.question, qa.answer)
        for key, value in mia.mia_scores(gt.logps, gt.mu, gt.var, tok.decode(answer_ids[1:])).items():
            log[key].append(value)
    return log


def _answer_ids(text: TextConfig, question: str, answer: str) -> np.ndarray:
    """The labelled answer token ids of a (question, answer) row, as the seeds decode them for zlib."""
    row = encode(Example(question, answer, None), text)
    return row.input_ids[row.labels != -100]


def aggregate_model(forget_log: dict[str, Any], retain_log: dict[str, Any]) -> dict[str, float]:
    """`get_model_utility` of aggregate_eval_stat.py: forget/retain aggregates and Model Utility."""
    out: dict[str, float] = {}
    for name, log, forget in (("Forget", forget_log, True), ("Retain", retain_log, False)):
        gt = np.array(list(log["avg_gt_loss"].values()))
        pert = np.array(list(log["average_perturb_loss"].values()))
        para = np.array(list(log["avg_paraphrased_loss"].values()))
        out[f"ROUGE {name}"] = float(np.mean(list(log["rougeL_recall"].values())))
        out[f"Prob. {name}"] = metrics.probability(gt) if forget else metrics.probability(gt, pert)
        out[f"Truth Ratio {name}"] = metrics.truth_ratio_score(metrics.truth_ratio(para, pert), forget=forget)
        if not forget:
            out["EM Retain"] = float(np.mean(log["exact_match"]))
            if log.get("gpt"):
                out["GPT Retain"] = float(np.mean(log["gpt"]))
    out["Model Utility"] = metrics.model_utility([v for k, v in out.items() if k.endswith("Retain")])
    return out


def forget_quality(forget_log: dict[str, Any], reference_forget_log: dict[str, Any],
                   retain_log: dict[str, Any]) -> dict[str, float]:
    """`get_forget_quality` of aggregate_eval_stat.py plus MIA AUCs (forget vs retain questions).

    The AUCs ask whether the attack still tells forget questions apart from retain (member)
    questions: 0.5 means the forget set looks as memorised as the retain set.
    """
    def ratio(log: dict[str, Any]) -> np.ndarray:
        return metrics.truth_ratio(np.array(list(log["avg_paraphrased_loss"].values())),
                                   np.array(list(log["average_perturb_loss"].values())))

    pvalue, statistic = metrics.forget_quality(ratio(forget_log), ratio(reference_forget_log))
    out = {"Forget Quality": pvalue, "KS Test PVal Forget": pvalue, "KS Test Forget": statistic,
           "Mink": float(np.mean(forget_log["mink"])), "Mink++": float(np.mean(forget_log["mink++"])),
           "Exact Match": float(np.mean(forget_log["exact_match"]))}
    for attack in ("loss", "zlib", "mink", "mink++"):
        out[f"MIA AUC {attack}"] = mia.auc(np.array(retain_log[attack]), np.array(forget_log[attack]))
    return out
