"""MIA scores against a hand computation of the original's token choice, and AUC on a hand example."""

import math
import zlib

import numpy as np
import pytest

from vlmu_jax.eval import mia


def _hand_min_k(values):
    ordered = sorted(values)
    total = 0.0
    for ratio, weight in zip((0.1, 0.2, 0.3, 0.4, 0.5), (0.3, 0.3, 0.2, 0.1, 0.1), strict=True):
        k = int(len(ordered) * ratio)
        if k:  # the original's NaN for k == 0 is dropped from the sum
            total += weight * math.exp(sum(ordered[:k]) / k)
    return total


def test_question_scores_use_tokens_after_the_first():
    logps = [-5.0, -0.1, -2.0, -0.3, -1.0, -0.7]  # the first (-5.0) is left out of min-k, not of loss
    mu = [-1.0, -0.5, -1.5, -0.4, -0.9, -0.6]
    var = [1.0, 0.25, 4.0, 0.16, 1.0, 0.36]
    got = mia.question_scores(np.array(logps), np.array(mu), np.array(var), "hello world")
    ll = sum(logps) / 6
    assert got["loss"] == pytest.approx(ll)
    assert got["zlib"] == pytest.approx(ll / len(zlib.compress(b"hello world")))
    tail = logps[1:]  # 5 tokens: k = 0, 1, 1, 2, 2
    hand = 0.3 * math.exp(-2.0) + 0.2 * math.exp(-2.0) + 0.1 * math.exp(-1.5) * 2
    assert got["mink"] == pytest.approx(hand)
    assert got["mink"] == pytest.approx(_hand_min_k(tail))
    z = [(lp - m) / math.sqrt(v) for lp, m, v in zip(tail, mu[1:], var[1:], strict=True)]
    assert got["mink++"] == pytest.approx(_hand_min_k(z))


def test_auc_hand_example_with_ties():
    # (member, nonmember) pairs: 3>1, 3>2, 2>1 count 1; 2=2 and 1=1 count 1/2; 1<2 counts 0 -> 4 / 6
    assert mia.auc([3.0, 2.0, 1.0], [1.0, 2.0]) == pytest.approx(4 / 6)
    assert mia.auc([5.0, 6.0], [1.0, 2.0]) == 1.0
    assert mia.auc([1.0], [2.0]) == 0.0
