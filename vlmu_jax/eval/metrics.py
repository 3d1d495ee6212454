"""FIUBench / TOFU metrics as pure functions of per-question losses and generations.

Definitions follow ../shared/BENCHMARKS.md and gray311/VLM_Unlearned `aggregate_eval_stat.py` /
`evaluate_util.py`: losses are length-normalised answer NLLs, Truth Ratio compares the paraphrased
answer with the mean perturbed loss, and Model Utility is the harmonic mean of the retain-side
aggregates that are present.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp


def truth_ratio(paraphrased_loss: np.ndarray, perturbed_loss: np.ndarray) -> np.ndarray:
    """R = exp(mean_j loss(perturbed_j) - loss(paraphrased)) per question; perturbed_loss is [N, K]."""
    return np.exp(np.asarray(perturbed_loss).mean(axis=-1) - np.asarray(paraphrased_loss))


def truth_ratio_score(r: np.ndarray, *, forget: bool) -> float:
    """Forget: mean(min(R, 1/R)) (1 = no preference); retain: mean(max(0, 1 - 1/R)) (1 = prefers truth)."""
    r = np.asarray(r, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1 / r)) if forget else np.mean(np.maximum(0.0, 1 - 1 / r)))


def probability(gt_loss: np.ndarray, perturbed_loss: np.ndarray | None = None) -> float:
    """Forget set: mean exp(-loss); retain set: mean p_true / (p_true + sum_j p_perturbed_j)."""
    p_true = np.exp(-np.asarray(gt_loss, dtype=np.float64))
    if perturbed_loss is None:
        return float(p_true.mean())
    p_false = np.exp(-np.asarray(perturbed_loss, dtype=np.float64)).sum(axis=-1)
    return float(np.mean(p_true / (p_true + p_false)))


_SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_recall(generation: str, reference: str) -> tuple[float, float]:
    """(ROUGE-1 recall, ROUGE-L recall) of a generation against the answer, stemmed as the seeds do."""
    s = _SCORER.score(reference, generation)
    return s["rouge1"].recall, s["rougeL"].recall


def exact_match(generation: str, keywords: Sequence[str]) -> float:
    """Fraction of keywords found (case-insensitive substring) in the generation, capped at 1."""
    if not keywords:
        return 0.0
    hits = sum(1.0 / len(keywords) for k in keywords if k.lower() in generation.lower())
    return min(1.0, hits)


def forget_quality(r_unlearned: np.ndarray, r_retain_model: np.ndarray) -> tuple[float, float]:
    """(p-value, statistic) of the KS test between the two models' forget-set truth ratios."""
    res = ks_2samp(np.asarray(r_unlearned), np.asarray(r_retain_model))
    return float(res.pvalue), float(res.statistic)


def model_utility(retain_aggregates: Sequence[float]) -> float:
    """Harmonic mean of the retain-side aggregates present (Prob., ROUGE, Truth Ratio, GPT, EM)."""
    return float(hmean(np.asarray(retain_aggregates, dtype=np.float64)))
