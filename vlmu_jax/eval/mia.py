"""Membership-inference scores per question and their AUC, as FIUBench's `evaluate_util.py` computes them.

`loss` is the mean answer log-likelihood (-NLL over every answer token); the token-level attacks use
the answer tokens after the first (the seeds slice `labels[labels != -100][1:]`). min-k% averages the
lowest k-fraction of token log-probs, min-k%++ the same on log-probs standardised by the mean and
variance of log p under the model's own next-token distribution; both combine k in
{0.1,...,0.5} with weights {0.3,0.3,0.2,0.1,0.1}, skipping ratios whose k-fraction is empty.
"""

from __future__ import annotations

import zlib

import numpy as np

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
WEIGHTS = (0.3, 0.3, 0.2, 0.1, 0.1)


def _min_k(values: np.ndarray) -> float:
    ordered = np.sort(values)
    total = 0.0
    for ratio, weight in zip(RATIOS, WEIGHTS, strict=True):
        k = int(len(values) * ratio)
        if k > 0:
            total += weight * float(np.exp(ordered[:k].mean()))
    return total


def mia_scores(logps: np.ndarray, mu: np.ndarray, var: np.ndarray, tail_text: str) -> dict[str, float]:
    """loss, zlib, mink, mink++ for one answer; `tail_text` is the decoded answer after its first token."""
    logps, mu, var = (np.asarray(a, dtype=np.float64) for a in (logps, mu, var))
    ll = float(logps.mean())
    tail = slice(1, None)
    standardised = (logps[tail] - mu[tail]) / np.sqrt(var[tail])
    return {
        "loss": ll,
        "zlib": ll / len(zlib.compress(tail_text.encode("utf-8"))),
        "mink": _min_k(logps[tail]),
        "mink++": _min_k(standardised),
    }


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score(member) > score(non-member)) with ties counted half: the ROC AUC of an attack whose
    higher score means "was trained on"."""
    a, b = np.asarray(members, dtype=np.float64), np.asarray(non_members, dtype=np.float64)
    greater = (a[:, None] > b[None, :]).sum()
    ties = (a[:, None] == b[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(a) * len(b)))
