"""Per-question results -> the benchmarks' eval log layouts: FIUBench's eval logs as gray311/VLM_Unlearned's
``evaluate_util.get_all_evals`` writes them (dicts keyed by question index for losses / ROUGE / generations, lists
for ``exact_match``, ``gpt``, ``loss``, ``zlib``, ``mink``, ``mink++``), and MLLMU-Bench's per-set accuracy,
generation and factuality groups with ``eval.py``'s key names. The eval tasks write these; ``report.aggregate``
reads them back into summary rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vlmu_jax.eval import metrics


@dataclass
class FiuTaskResults:
    """Everything the model side measured on one FIUBench task (one row per question, same order everywhere).

    Loss sums and token counts come from ``metrics.answer_nll``; ``perturb_*`` are ``[N, K]``. ``generations``
    are already cut by ``metrics.truncate_at_first_period``. Optional parts are None when not computed.
    """

    gt_loss: np.ndarray
    gt_num_tokens: np.ndarray
    paraphrased_loss: np.ndarray
    paraphrased_num_tokens: np.ndarray
    perturb_loss: np.ndarray
    perturb_num_tokens: np.ndarray
    prompts: Sequence[str]
    generations: Sequence[str]
    references: Sequence[str]
    categories: Sequence[str]
    keywords: Sequence[Sequence[str]] | None = None
    mia_scores: Mapping[str, Sequence[float]] | None = None
    gpt: Sequence[float] | None = None


def _indexed(values) -> dict[str, object]:
    return {str(i): (v.tolist() if isinstance(v, np.ndarray) else v) for i, v in enumerate(values)}


def fiubench_eval_log(res: FiuTaskResults, *, forget: bool, original_metrics: bool = False,
                      original_layout: bool = False) -> dict:
    """One task's eval log with the original key names (indices as strings, as after a JSON round trip).

    ``original_metrics``: ROUGE's dropped last character (``metrics.fiubench_rouge_recall``). ``original_layout``:
    per-question ``truth_ratio`` as ``eval_perturbation_ratio`` logs it, exp(paraphrased - mean perturbed loss),
    the reciprocal of our R; and ``gpt: []`` when no judge ran, as ``get_all_evals`` always writes the key.
    """
    avg_gt = np.asarray(res.gt_loss) / np.asarray(res.gt_num_tokens)
    avg_para = np.asarray(res.paraphrased_loss) / np.asarray(res.paraphrased_num_tokens)
    avg_pert = np.asarray(res.perturb_loss) / np.asarray(res.perturb_num_tokens)
    ratio = metrics.truth_ratio(avg_para, avg_pert)
    log: dict = {
        "average_perturb_loss": _indexed(avg_pert), "avg_paraphrased_loss": _indexed(avg_para.tolist()),
        "truth_ratio": _indexed((1.0 / ratio if original_layout else ratio).tolist()),
        "paraphrased_loss": _indexed(np.asarray(res.paraphrased_loss).tolist()),
        "perturb_loss": _indexed(np.asarray(res.perturb_loss)),
        "num_token_paraphrased": _indexed(np.asarray(res.paraphrased_num_tokens).tolist()),
        "num_token_perturb": _indexed(np.asarray(res.perturb_num_tokens)),
        "avg_gt_loss": _indexed(avg_gt.tolist()), "gt_loss": _indexed(np.asarray(res.gt_loss).tolist()),
        "num_token_gt": _indexed(np.asarray(res.gt_num_tokens).tolist()),
        "generated_text": _indexed([list(t) for t in zip(res.prompts, res.generations, res.references,
                                                         res.categories, strict=True)]),
    }
    rouge = metrics.fiubench_rouge_recall(res.generations, res.references, original=original_metrics)
    log.update({key: _indexed(values) for key, values in rouge.items()})
    if res.keywords is not None:
        pairs = zip(res.generations, res.keywords, strict=True)
        log["exact_match"] = [metrics.exact_match(g, k) for g, k in pairs]
    if res.gpt is not None or original_layout:
        log["gpt"] = list(res.gpt or [])
    if res.mia_scores is not None:
        log.update({k: list(v) for k, v in res.mia_scores.items()})
    if forget:
        log["normalized_gt_loss"] = _indexed(metrics.normalized_gt_loss(avg_gt, avg_pert).tolist())
    return log


_MODALITIES = {"Image_Textual": "image_textual", "Pure_Text": "pure_text"}


def mllmu_accuracy(correct: Sequence[bool], modality: Sequence[str], *,
                   prefix: str = "") -> dict[str, float]:
    """``image_textual_accuracy`` / ``pure_text_accuracy`` in percent (0 for an empty modality, as eval.py).

    ``correct``: classification hits (parsed letter == gold) or cloze hits (``metrics.cloze_correct``).
    """
    out = {}
    for mod, key in _MODALITIES.items():
        hits = [c for c, m in zip(correct, modality, strict=True) if m == mod]
        out[f"{prefix}{key}_accuracy"] = 100.0 * sum(hits) / len(hits) if hits else 0
    return out


def mllmu_generation(predictions: Sequence[str], references: Sequence[str],
                     modality: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure and BLEU per modality present, keyed as ``evaluate_generation``."""
    out = {}
    for mod in _MODALITIES:
        pairs = [(p, r) for p, r, m in zip(predictions, references, modality, strict=True) if m == mod]
        if not pairs:
            continue
        rouge = [metrics.rouge_fmeasure(p, r) for p, r in pairs]
        for name, col in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
            out[f"Average {col} ({mod})"] = float(np.mean([s[name] for s in rouge]))
        out[f"Average BLEU ({mod})"] = float(np.mean([metrics.sentence_bleu(r, p) for p, r in pairs]))
    return out


def mllmu_factuality(scores: Sequence[int | None]) -> dict[str, float | int | None]:
    """Mean judge factuality (1..10) of a set's generations, as eval_gpt.py's ``Average Generation Factuality
    Score`` (over parsable verdicts only), with the number judged and the number whose verdict had no score.

    Difference: eval_gpt.py reports 0 when no verdict parses; we report None (an empty CSV cell)."""
    parsed = [s for s in scores if s is not None]
    return {"Average Generation Factuality Score": float(np.mean(parsed)) if parsed else None,
            "Judged": len(scores), "Unparsed Verdicts": len(scores) - len(parsed)}
