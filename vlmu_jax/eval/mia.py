"""Membership-inference scores (loss, zlib, min-k%, min-k%++) per question, and their AUC.

Which tokens (gray311/VLM_Unlearned ``evaluate_util.get_all_evals``, the ``mink`` branch): ``loss`` is minus
the model's mean NLL over ALL answer tokens (HF ``outputs.loss``), while zlib's text and min-k% / min-k%++
use the answer tokens AFTER THE FIRST one. zlib divides by the zlib-compressed length of the decoded text of
those tokens (the caller decodes; we take the string).

min-k%: for ratios 0.1..0.5 with weights 0.3, 0.3, 0.2, 0.1, 0.1, ``exp(mean of the int(n * ratio) lowest
token log-probs)``; a ratio whose k is 0 gives NaN in the original and is skipped WITHOUT renormalising the
weights, which we reproduce. min-k%++ is the same on ``(log p(x_t) - mu_t) / sqrt(var_t)``.

AUC: the original imports ``sklearn.metrics.roc_curve`` but never computes an AUC; we give the ROC AUC of
"forget (member) scores higher than holdout scores" via the Mann-Whitney U statistic with average ranks for
ties (equal to sklearn's ``roc_auc_score`` with forget labelled 1).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

MINK_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
MINK_WEIGHTS = (0.3, 0.3, 0.2, 0.1, 0.1)


def weighted_min_k(values: np.ndarray) -> float:
    """Weighted sum over ratios of ``exp(mean(lowest int(n * ratio) values))``; empty ratios skipped."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    total = 0.0
    for ratio, weight in zip(MINK_RATIOS, MINK_WEIGHTS, strict=True):
        k = int(len(ordered) * ratio)
        if k > 0:
            total += weight * float(np.exp(ordered[:k].mean()))
    return total


def question_scores(logps: np.ndarray, mu: np.ndarray, var: np.ndarray,
                    text_after_first: str) -> dict[str, float]:
    """The four MIA scores of one question from its answer-token arrays (answer positions only, in order).

    ``logps``: log p of each answer token; ``mu``/``var``: mean / variance of log p under the model's own
    next-token distribution at the same positions;
    ``text_after_first``: decoded answer tokens after the first.
    """
    logps = np.asarray(logps, dtype=np.float64)
    ll = float(logps.mean())
    tail = logps[1:]
    z = (tail - np.asarray(mu, dtype=np.float64)[1:]) / np.sqrt(np.asarray(var, dtype=np.float64)[1:])
    return {
        "loss": ll,
        "zlib": ll / len(zlib.compress(text_after_first.encode("utf-8"))),
        "mink": weighted_min_k(tail),
        "mink++": weighted_min_k(z),
    }


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of separating members (forget) from non-members (holdout) by score, higher = member.

    Mann-Whitney: ``(sum of member ranks - n_m (n_m + 1) / 2) / (n_m n_n)`` with average ranks for ties.
    """
    pos = np.asarray(member_scores, dtype=np.float64)
    neg = np.asarray(nonmember_scores, dtype=np.float64)
    ranks = rankdata(np.concatenate([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
