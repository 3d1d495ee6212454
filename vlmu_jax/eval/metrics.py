"""FIUBench / TOFU / MLLMU-Bench metrics as pure functions over numpy arrays and strings.

Inputs are what the model side produces: per-token log-probs ``logps [B, T-1]`` with the answer mask ``mask
[B, T-1]`` (``labels[:, 1:] != -100``), and decoded generations. No model lives here, so every number can be
checked by hand.

Differences from the originals (the FIUBench ones switched on by protocol ``original``, see ``vlmu_jax.protocol``):

- Answer loss (gray311/VLM_Unlearned ``evaluate_util.py``: ``get_all_evals`` and ``eval_perturbation_ratio``
  strip the labels to the answer tokens, slice the logits to the last n positions and then call
  ``data_module.get_batch_loss``, which shifts once more): the first answer token's NLL is dropped from the
  sum while the divisor is still the full answer length. We sum every answer token (the TOFU / BENCHMARKS.md
  definition); ``drop_first_token=True`` reproduces the original.
- Generation cut (``evaluate_util.run_generation``): ``s[:s.find(".") + 1]`` turns a generation without a
  period into the empty string. We keep the whole text when there is no period; ``original=True`` in
  :func:`truncate_at_first_period` reproduces it.
- ROUGE cut (``evaluate_util.eval_rouge_recall``): ``gen[:gen.find(".")]`` drops the last character when
  there is no period. We keep the text; ``original=True`` in :func:`fiubench_rouge_recall` reproduces it.
- Ground truth for ROUGE: the original decodes it from ``input_ids`` without skipping special tokens, so end
  markers (``<|eot_id|>``) and the tag's newlines leak into the reference; we score against the answer string
  itself (``data.fiubench_prompts`` builds the original's).
- Model Utility (``aggregate_eval_stat.get_model_utility``): an empty ``gpt``/``exact_match`` list (always
  present in the original logs) enters the harmonic mean as 0.0, forcing Model Utility to 0. See
  ``vlmu_jax.report.aggregate`` (``empty_lists_as_zero``).
- MLLMU-Bench BLEU (``eval.compute_bleu``) uses NLTK ``sentence_bleu`` with method1 smoothing;
  :func:`sentence_bleu` is our own implementation of exactly that (tested against NLTK), so NLTK is not a
  dependency.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer
from scipy import stats


# ----------------------------------------------------------------------------- per-question losses
def answer_nll(logps: np.ndarray, mask: np.ndarray, *,
               drop_first_token: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Summed answer NLL and answer length per row: ``(sum_nll [B], n_tokens [B])``.

    Returned separately because FIUBench logs both the sum (``gt_loss``) and the mean (``avg_gt_loss``).
    ``drop_first_token`` reproduces the original's off-by-one (first answer token missing from the sum, not
    from the count).
    """
    logps = np.asarray(logps, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    n_tokens = mask.sum(-1)
    summed = mask
    if drop_first_token:
        first = np.cumsum(mask, axis=-1) == 1
        summed = mask & ~first
    return -(np.where(summed, logps, 0.0)).sum(-1), n_tokens


# ----------------------------------------------------------------------------- probability / truth ratio
def probability_forget(gt_loss: np.ndarray) -> float:
    """Forget-set Probability: mean of ``exp(-loss(answer))``."""
    return float(np.mean(np.exp(-np.asarray(gt_loss, dtype=np.float64))))


def probability_retain(gt_loss: np.ndarray, perturb_loss: np.ndarray) -> float:
    """Retain-set Probability: mean of ``p_true / (p_true + sum_j p_perturbed_j)`` with ``p = exp(-loss)``."""
    p_true = np.exp(-np.asarray(gt_loss, dtype=np.float64))
    p_pert = np.exp(-np.asarray(perturb_loss, dtype=np.float64))
    return float(np.mean(p_true / (p_true + p_pert.sum(-1))))


def normalized_gt_loss(gt_loss: np.ndarray, perturb_loss: np.ndarray) -> np.ndarray:
    """``-log(p_true / (p_true + sum_j p_pert_j))``: the original's ``normalized_gt_loss`` (forget logs)."""
    p_true = np.exp(-np.asarray(gt_loss, dtype=np.float64))
    p_pert = np.exp(-np.asarray(perturb_loss, dtype=np.float64))
    return -np.log(p_true / (p_true + p_pert.sum(-1)))


def truth_ratio(paraphrased_loss: np.ndarray, perturb_loss: np.ndarray) -> np.ndarray:
    """Per question ``R = exp(mean_j loss(perturbed_j) - loss(paraphrased))`` = P_para / geo-mean P_pert."""
    pert = np.asarray(perturb_loss, dtype=np.float64).mean(-1)
    return np.exp(pert - np.asarray(paraphrased_loss, dtype=np.float64))


def truth_ratio_forget(ratio: np.ndarray) -> float:
    """Forget aggregate ``mean(min(R, 1/R))``: 1 when the model cannot tell true from false."""
    ratio = np.asarray(ratio, dtype=np.float64)
    return float(np.mean(np.minimum(ratio, 1.0 / ratio)))


def truth_ratio_retain(ratio: np.ndarray) -> float:
    """Retain aggregate ``mean(max(0, 1 - 1/R))``: high when the paraphrased truth beats the perturbations."""
    ratio = np.asarray(ratio, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / ratio)))


def forget_quality(unlearned_ratio: np.ndarray, retain_model_ratio: np.ndarray) -> dict[str, float]:
    """KS test of the unlearned model's forget-set truth ratios against the retain-only model's.

    Keys as ``aggregate_eval_stat.get_forget_quality``; Forget Quality is the p-value.
    """
    res = stats.ks_2samp(np.asarray(unlearned_ratio), np.asarray(retain_model_ratio))
    return {"Forget Quality": float(res.pvalue), "KS Test PVal Forget": float(res.pvalue),
            "KS Test Forget": float(res.statistic)}


def model_utility(retain_aggregates: Sequence[float]) -> float:
    """Harmonic mean of the retain-side aggregates present (Prob., ROUGE, Truth Ratio, GPT, EM)."""
    return float(stats.hmean(np.asarray(retain_aggregates, dtype=np.float64)))


# ----------------------------------------------------------------------------- generations (FIUBench)
def truncate_at_first_period(text: str, *, original: bool = False) -> str:
    """FIUBench keeps a generation up to and including its first period (one-sentence answers).

    ``original=True``: a text without a period becomes "" as in ``run_generation``.
    """
    cut = text.find(".")
    if cut < 0 and not original:
        return text
    return text[: cut + 1]


def exact_match(prediction: str, keywords: Sequence[str]) -> float:
    """Fraction of keywords found case-insensitively as substrings of the prediction, capped at 1."""
    pred = prediction.lower()
    score = sum(1.0 / len(keywords) for key in keywords if key.lower() in pred)
    return min(1.0, score)


@lru_cache(maxsize=4)
def _scorer(types: tuple[str, ...]) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def fiubench_rouge_recall(generations: Sequence[str], references: Sequence[str], *,
                          original: bool = False) -> dict[str, list[float]]:
    """ROUGE-1 / ROUGE-L recall (rouge-score, ``use_stemmer=True``) of the text before the first period.

    ``original=True`` also drops the last character of a generation without a period, as the original does.
    """
    out: dict[str, list[float]] = {"rouge1_recall": [], "rougeL_recall": []}
    for gen, ref in zip(generations, references, strict=True):
        cut = gen.find(".")
        if cut >= 0 or original:
            gen = gen[:cut]
        score = _scorer(("rouge1", "rougeL")).score(ref, gen)
        out["rouge1_recall"].append(score["rouge1"].recall)
        out["rougeL_recall"].append(score["rougeL"].recall)
    return out


# ----------------------------------------------------------------------------- MLLMU-Bench
def eval_py_answer(decoded: str, *, answer_tag: bool = True) -> str:
    """MLLMU-Bench ``eval.py``'s answer from the decoded prompt + generation (protocol ``original``).

    The text after the first "ASSISTANT:" (the prompt's own) up to the next one, i.e. cut where the model starts
    another assistant turn; without an "ASSISTANT:", after the first "Answer:" (cloze and generation:
    ``answer_tag=True``; classification does not look for it), else the whole text; stripped.
    """
    for tag in ("ASSISTANT:", "Answer:") if answer_tag else ("ASSISTANT:",):
        if tag in decoded:
            return decoded.split(tag)[1].strip()
    return decoded.strip()


def own_turn(generated: str) -> str:
    """The answer in the new tokens alone (protocol ``corrected``): what the model says before it writes another
    "ASSISTANT:" turn, stripped. The same cut as :func:`eval_py_answer`, without decoding the prompt again."""
    return generated.split("ASSISTANT:")[0].strip()


def choice_letter(answer: str, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """Multiple-choice pick as ``evaluate_classification``: the answer's first character, upper-cased, if it names
    an option."""
    if answer and answer[0].upper() in options:
        return answer[0].upper()
    return None


def choice_by_likelihood(option_loss: np.ndarray, letters: Sequence[str]) -> list[str]:
    """Likelihood variant of multiple choice: the option whose answer loss is lowest, per question.

    ``option_loss [N, n_options]`` (mean NLL of each option text as the answer); not in the original, which
    only parses generations, but immune to formatting failures of small or unlearned models.
    """
    return [letters[i] for i in np.argmin(np.asarray(option_loss), axis=-1)]


def accuracy(predictions: Sequence[str | None], gold: Sequence[str]) -> float:
    """Fraction of exact matches (None = unparsable = wrong); 0.0 on an empty set, as the original."""
    if not gold:
        return 0.0
    return sum(p == g for p, g in zip(predictions, gold, strict=True)) / len(gold)


def cloze_correct(response: str, ground_truth: str) -> bool:
    """Cloze (Mask_Task) hit: the blank's answer appears case-insensitively in the response."""
    return ground_truth.lower() in response.lower()


def rouge_fmeasure(prediction: str, reference: str) -> dict[str, float]:
    """MLLMU-Bench generation ROUGE-1/2/L F-measure (rouge-score, ``use_stemmer=True``)."""
    score = _scorer(("rouge1", "rouge2", "rougeL")).score(reference, prediction)
    return {name: s.fmeasure for name, s in score.items()}


def sentence_bleu(reference: str, hypothesis: str, *, max_order: int = 4, epsilon: float = 0.1) -> float:
    """Sentence BLEU on whitespace tokens, uniform 4-gram weights, NLTK ``method1`` smoothing.

    Equals ``nltk.translate.bleu_score.sentence_bleu([ref.split()], hyp.split(),
    smoothing_function=SmoothingFunction().method1)`` as MLLMU-Bench ``eval.compute_bleu`` calls it: an
    n-gram order with no match gets precision ``epsilon / max(1, len(hyp) - n + 1)``; no unigram match
    gives 0.
    """
    ref, hyp = reference.split(), hypothesis.split()
    log_p = 0.0
    for n in range(1, max_order + 1):
        hyp_ngrams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        ref_ngrams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matches = sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
        denom = max(1, len(hyp) - n + 1)
        if n == 1 and matches == 0:
            return 0.0
        log_p += math.log((matches if matches else epsilon) / denom) / max_order
    c, r = len(hyp), len(ref)
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_p)
