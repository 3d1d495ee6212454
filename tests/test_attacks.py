"""APE variants from QA records and their EM / ROUGE scoring."""

import pytest
from rouge_score import rouge_scorer

from vlmu_jax.eval import attacks

QAS = [
    {"question": "Where does Ann live?", "answer": "Ann lives in Oslo.", "keywords": ["Oslo"],
     "paraphrased_question": ["Where is Ann's HOME?", "what city does ann live in?", "Ann resides where?"]},
    {"question": "What is her job?", "answer": "She is a Pilot.", "keywords": ["pilot", "airline"],
     "paraphrased_question": "What does she do for work?"},
]


def test_variants_one_per_paraphrase():
    variants = attacks.ape_variants(QAS)
    assert [(v.qa_index, v.variant_index) for v in variants] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert variants[0].question == "Where is Ann's HOME?"  # formatting is the reader's job
    assert variants[3].keywords == ("pilot", "airline")
    assert attacks.ape_prompts(variants[:1], lambda q: f"USER: <image>\n{q} ASSISTANT:") == [
        "USER: <image>\nWhere is Ann's HOME? ASSISTANT:"]


def test_original_pairs_keywords_by_thirds():
    """get_all_evals scores APE variant n with the keywords of question n // 3."""
    two = [{"paraphrased_question": "a?", "answer": "x", "keywords": ["k0"]},
           {"paraphrased_question": ["b?", "c?"], "answer": "y", "keywords": ["k1"]}]
    assert [v.keywords for v in attacks.ape_variants(two, three_per_question=True)] == [("k0",)] * 3
    assert [v.keywords for v in attacks.ape_variants(two)] == [("k0",), ("k1",), ("k1",)]
    with pytest.raises(ValueError, match="past the last one"):
        attacks.ape_variants([{"paraphrased_question": ["a?", "b?", "c?", "d?"], "answer": "z"}],
                             three_per_question=True)


def test_score_ape_em_and_rouge():
    variants = attacks.ape_variants(QAS)
    gens = ["She lives in oslo. Oslo again", "I do not know", "Somewhere.", "A pilot at an airline."]
    got = attacks.score_ape(variants, gens)
    assert got["generated_text"] == ["She lives in oslo.", "I do not know", "Somewhere.",
                                     "A pilot at an airline."]
    assert got["exact_match"] == [1.0, 0.0, 0.0, 1.0]
    assert got["APE"] == pytest.approx(0.5)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert got["rougeL_recall"][0] == scorer.score("Ann lives in Oslo.", "She lives in oslo")["rougeL"].recall
    # original: a generation without a period becomes empty
    assert attacks.score_ape(variants, gens, original=True)["generated_text"][1] == ""
