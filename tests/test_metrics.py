"""Metric functions against hand computations and against scipy / rouge-score / NLTK called directly."""

import math

import numpy as np
import pytest
from rouge_score import rouge_scorer
from scipy import stats

from vlmu_jax.eval import metrics


def test_answer_nll_sums_answer_tokens_and_original_drops_first():
    logps = np.array([[-9.0, -1.0, -2.0, -9.0], [-0.5, -0.25, -9.0, -9.0]])
    mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], bool)
    total, n = metrics.answer_nll(logps, mask)
    np.testing.assert_allclose(total, [3.0, 0.75])
    np.testing.assert_array_equal(n, [2, 2])
    total, n = metrics.answer_nll(logps, mask, drop_first_token=True)
    np.testing.assert_allclose(total, [2.0, 0.25])


def test_probability_and_truth_ratio_by_hand():
    gt, para = np.array([0.5, 1.0]), np.array([0.2, 2.0])
    pert = np.array([[1.0, 2.0], [0.5, 1.5]])
    assert metrics.probability_forget(gt) == pytest.approx((math.exp(-0.5) + math.exp(-1.0)) / 2)
    p = [math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1) + math.exp(-2)),
         math.exp(-1) / (math.exp(-1) + math.exp(-0.5) + math.exp(-1.5))]
    assert metrics.probability_retain(gt, pert) == pytest.approx(sum(p) / 2)
    np.testing.assert_allclose(metrics.normalized_gt_loss(gt, pert), -np.log(p))
    r = [math.exp(1.5 - 0.2), math.exp(1.0 - 2.0)]
    np.testing.assert_allclose(metrics.truth_ratio(para, pert), r)
    assert metrics.truth_ratio_forget(np.array(r)) == pytest.approx((1 / r[0] + r[1]) / 2)
    assert metrics.truth_ratio_retain(np.array(r)) == pytest.approx((1 - 1 / r[0] + 0.0) / 2)


def test_forget_quality_and_model_utility_match_scipy():
    a, b = np.array([0.1, 0.5, 0.9, 1.3]), np.array([0.2, 0.3, 2.0])
    res = stats.ks_2samp(a, b)
    fq = metrics.forget_quality(a, b)
    assert fq["Forget Quality"] == fq["KS Test PVal Forget"] == res.pvalue
    assert fq["KS Test Forget"] == res.statistic
    assert metrics.model_utility([0.5, 0.25, 1.0]) == pytest.approx(3 / (2 + 4 + 1))


def test_generation_cut_exact_match_and_rouge():
    assert metrics.truncate_at_first_period("Paris. And more.") == "Paris."
    assert metrics.truncate_at_first_period("no period here") == "no period here"
    assert metrics.truncate_at_first_period("no period here", original=True) == ""
    em = metrics.exact_match("She lives in PARIS near Lyon", ["paris", "lyon", "rome"])
    assert em == pytest.approx(2 / 3)
    assert metrics.exact_match("x", []) == 0.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    gens = ["He works as a baker in town. Extra", "baker runs"]
    refs = ["He is a baker.", "The baker running."]
    got = metrics.fiubench_rouge_recall(gens, refs)
    assert got["rougeL_recall"][0] == scorer.score(refs[0], "He works as a baker in town")["rougeL"].recall
    assert got["rougeL_recall"][1] == scorer.score(refs[1], "baker runs")["rougeL"].recall
    orig = metrics.fiubench_rouge_recall(gens, refs, original=True)
    assert orig["rouge1_recall"][1] == scorer.score(refs[1], "baker run")["rouge1"].recall


def test_mllmu_answer_extraction():
    """eval.py cuts the answer out of decode(prompt + generation): after the prompt's "ASSISTANT:", up to a generated
    one; "Answer:" only when there is no "ASSISTANT:" at all (never for classification). Protocol corrected reads
    the new tokens alone with the same cut."""
    opts = {"A": "x", "B": "y", "C": "z", "D": "w"}
    prompt = "USER:\nWho?\nA: x\nB: y\nJust give ONE letter representing the answer directly.\nASSISTANT:"
    # the model answers, then writes a new turn of its own
    decoded = prompt + " b) y\nUSER: and?\nASSISTANT: C"
    assert metrics.eval_py_answer(decoded, answer_tag=False) == "b) y\nUSER: and?"
    assert metrics.choice_letter(metrics.eval_py_answer(decoded, answer_tag=False), opts) == "B"
    assert metrics.own_turn(" b) y\nUSER: and?\nASSISTANT: C") == "b) y\nUSER: and?"
    # an empty turn before a generated "ASSISTANT:" is no answer, whatever follows
    assert metrics.eval_py_answer(prompt + "ASSISTANT: A", answer_tag=False) == ""
    assert metrics.choice_letter("", opts) is None and metrics.own_turn("ASSISTANT: A") == ""
    # "Answer:" is looked for only without any "ASSISTANT:" (decoded text that lost its prompt's tag)
    assert metrics.eval_py_answer("Q: where?\nAnswer: Rome. Answer: Oslo") == "Rome."
    assert metrics.eval_py_answer("Q: where?\nAnswer: Rome.", answer_tag=False) == "Q: where?\nAnswer: Rome."
    assert metrics.eval_py_answer(prompt + " Answer: Oslo") == "Answer: Oslo"
    assert metrics.own_turn(" Answer: Oslo ") == "Answer: Oslo"
    # the pick is the first character only
    assert metrics.choice_letter("The answer is A", opts) is None and metrics.choice_letter("d", opts) == "D"
    assert metrics.choice_letter("E", opts) is None


def test_mllmu_parsing_and_scores():
    assert metrics.choice_by_likelihood(np.array([[2.0, 0.5, 1.0], [0.1, 0.2, 0.3]]), "ABC") == ["B", "A"]
    assert metrics.accuracy(["A", None, "C"], ["A", "B", "D"]) == pytest.approx(1 / 3)
    assert metrics.cloze_correct("It was in PARIS.", "Paris")
    ref, pred = "the cat sat on the mat", "the cat is on the mat"
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    assert metrics.rouge_fmeasure(pred, ref)["rougeL"] == direct


@pytest.mark.parametrize("ref,hyp", [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("a b c d e f", "a b"),
    ("he was born in 1990 in Paris", "born in Paris in 1990 he was"),
    ("x y z", "q r s"),
    ("x y z", ""),
    ("one two", "one two three four five six"),
])
def test_sentence_bleu_equals_nltk_method1(ref, hyp):
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    smooth = bleu.SmoothingFunction().method1
    expected = bleu.sentence_bleu([ref.split()], hyp.split(), smoothing_function=smooth)
    assert metrics.sentence_bleu(ref, hyp) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_sentence_bleu_by_hand():
    # hyp "a b", ref "a b c": p1 = 1, p2 = 1, p3 = 0.1/1, p4 = 0.1/1; BP = exp(1 - 3/2)
    expected = math.exp(1 - 1.5) * math.exp((math.log(0.1) * 2) / 4)
    assert metrics.sentence_bleu("a b c", "a b") == pytest.approx(expected)
