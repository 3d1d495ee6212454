"""APE (adversarial privacy extraction): ask each forget question in its paraphrased forms and score leaks.

How the original builds the variants (gray311/VLM_Unlearned ``config/eval.yaml``: ``robust_question_key:
[paraphrased_question, ...]`` and ``robust_eval: [[exact, match, ape], ...]``; ``data_module.MMDatasetQA``
expands a list-valued ``paraphrased_question`` into one sample per paraphrase;
``evaluate_util.get_all_evals``, ``ape`` branch): every paraphrase of a forget question is asked with the
identity's image and the usual prompt (the question formatted as the protocol's reader formats every question),
the generation greedy and cut after the first period, then scored with keyword Exact Match against the
question's keywords. The APE number is the mean EM over all variants.

Differences from the original:
- The original pairs generations with keywords by assuming exactly three paraphrases per question (each QA
  appended three times to its sample list); a QA with another number of paraphrases shifts every later
  keyword set. Each of our variants carries its own keywords; ``three_per_question=True`` (protocol
  ``original``) pairs them as the original does.
- With ``ape`` in the metric list the original returns early, so that run logs only ``exact_match``; we also
  report ROUGE-L recall of each variant (``rougeL_recall``), which costs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vlmu_jax.eval import metrics


@dataclass(frozen=True)
class ApeVariant:
    """One adversarial form of a forget question: what to ask and what counts as a leak."""

    qa_index: int
    variant_index: int
    question: str
    answer: str
    keywords: tuple[str, ...]


def ape_variants(qas: Sequence[dict], *, question_key: str = "paraphrased_question",
                 three_per_question: bool = False) -> list[ApeVariant]:
    """Variants from QA record-likes (dicts with ``question_key``, ``answer``, ``keywords``), in data order.

    A string-valued ``question_key`` is one variant; a list gives one per entry (as ``MMDatasetQA`` does).
    ``three_per_question``: variant ``n`` (counting over all questions) is scored with the keywords of question
    ``n // 3``, as ``get_all_evals`` pairs them.
    """
    out = []
    for qa_index, qa in enumerate(qas):
        questions = qa[question_key]
        if isinstance(questions, str):
            questions = [questions]
        for variant_index, question in enumerate(questions):
            keywords = tuple(qa.get("keywords", ()))
            if three_per_question:
                paired = len(out) // 3
                if paired >= len(qas):
                    raise ValueError(f"APE variant {len(out)} pairs with question {paired}, past the last one: "
                                     "the original fails here (IndexError) when questions average over three "
                                     "paraphrases")
                keywords = tuple(qas[paired].get("keywords", ()))
            out.append(ApeVariant(qa_index, variant_index, question, qa["answer"], keywords))
    return out


def ape_prompts(variants: Sequence[ApeVariant], render: Callable[[str], str]) -> list[str]:
    """The generation prompts: ``render`` is the model's chat template applied to one question."""
    return [render(v.question) for v in variants]


def score_ape(variants: Sequence[ApeVariant], generations: Sequence[str], *,
              references: Sequence[str] | None = None, original: bool = False) -> dict[str, object]:
    """Per-variant EM and ROUGE-L recall after the FIUBench period cut, plus their means.

    ``references``: ROUGE's reference per variant (default each variant's answer). ``original`` switches both
    the generation cut and the ROUGE cut to the original's behaviour.
    """
    cut = [metrics.truncate_at_first_period(g, original=original) for g in generations]
    em = [metrics.exact_match(g, v.keywords) for g, v in zip(cut, variants, strict=True)]
    answers = list(references) if references is not None else [v.answer for v in variants]
    rouge = metrics.fiubench_rouge_recall(cut, answers, original=original)["rougeL_recall"]
    return {"exact_match": em, "rougeL_recall": rouge, "generated_text": cut,
            "APE": float(np.mean(em)) if em else 0.0, "APE ROUGE": float(np.mean(rouge)) if rouge else 0.0}
