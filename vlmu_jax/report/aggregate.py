"""Eval logs (written by ``eval.result_logs``) -> ``eval_log_aggregated.json``, summary row / CSV, collection.

Key names follow gray311/VLM_Unlearned: ``eval_log_aggregated.json`` = ``{"eval_forget_log.json": log,
"eval_retain_log.json": log}``, and the summary row as ``aggregate_eval_stat.py`` (``ROUGE Forget``, ``Prob.
Retain``, ``Truth Ratio Retain``, ``GPT Retain``, ``EM Retain``, ``Model Utility``, ``Forget Quality``, ``KS
Test PVal Forget``, ``KS Test Forget``, ``Mink``, ``Mink++``, ``Exact Match``, ``Method``, ``Submitted
By``). MLLMU-Bench summaries use ``eval.py``'s key names.

Differences from ``aggregate_eval_stat.py``:
- The original writes ``gpt`` and ``exact_match`` lists into every log even when they were not computed; an
  empty list then enters Model Utility as 0.0 and forces it to 0. We leave out what is absent or empty;
  ``empty_lists_as_zero=True`` reproduces the original.
- The original leaves ``GPT Forget`` and unset metrics as empty-list placeholders in the CSV; we omit them.
- Added columns (not in the original): ``APE`` (mean EM over the APE variants, from the
  ``eval_forget_ape_log.json`` file beside the aggregated one, never inside it, so the original's
  ``aggregate_eval_stat.py`` reads our aggregated file as it is) and ``MIA AUC <score>`` (forget vs
  retain-log questions, see ``eval.mia``). In the original the APE run overwrites the forget log (early
  return), so its ``Exact Match`` column is the APE EM when ``ape`` is in the metric list.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vlmu_jax.eval import metrics, mia

FORGET, RETAIN, APE = "eval_forget_log.json", "eval_retain_log.json", "eval_forget_ape_log.json"
_TASK_NAMES = {FORGET: "Forget", RETAIN: "Retain"}
_MIA_KEYS = {"loss": "Loss", "zlib": "Zlib", "mink": "Mink", "mink++": "Mink++"}


def _values(log: Mapping, key: str) -> np.ndarray:
    return np.asarray(list(log[key].values()), dtype=np.float64)


def _ratio(log: Mapping) -> np.ndarray:
    return metrics.truth_ratio(_values(log, "avg_paraphrased_loss"), _values(log, "average_perturb_loss"))


def _mean_list(log: Mapping, key: str, empty_as_zero: bool) -> float | None:
    values = log.get(key)
    if values is None or (not values and not empty_as_zero):
        return None
    return float(sum(values) / len(values)) if values else 0.0


def fiubench_summary(aggregated: Mapping[str, Mapping], retain_reference: Mapping | None = None, *,
                     ape_log: Mapping | None = None, empty_lists_as_zero: bool = False, method: str = "",
                     submitted_by: str = "") -> dict:
    """The summary row of one checkpoint (``aggregate_eval_stat.main``): utility, forget quality, extras.

    ``retain_reference``: the retain-only model's aggregated logs or its forget log alone (both accepted, as
    the original); without it Forget Quality is left out. ``ape_log``: the checkpoint's
    ``eval_forget_ape_log.json`` (its own file: ``aggregate_eval_stat`` reads every entry of the aggregated file
    as a forget/retain log), for the APE column.
    """
    row: dict = {}
    for task, name in _TASK_NAMES.items():
        log = aggregated.get(task)
        if log is None:
            continue
        avg_gt = _values(log, "avg_gt_loss")
        if task == FORGET:
            row[f"Prob. {name}"] = metrics.probability_forget(avg_gt)
            row[f"Truth Ratio {name}"] = metrics.truth_ratio_forget(_ratio(log))
        else:
            row[f"Prob. {name}"] = metrics.probability_retain(avg_gt, _values(log, "average_perturb_loss"))
            row[f"Truth Ratio {name}"] = metrics.truth_ratio_retain(_ratio(log))
        row[f"ROUGE {name}"] = float(_values(log, "rougeL_recall").mean())
        if task == RETAIN:
            for key, col in (("gpt", "GPT"), ("exact_match", "EM")):
                value = _mean_list(log, key, empty_lists_as_zero)
                if value is not None:
                    row[f"{col} {name}"] = value
    utility = [v for k, v in row.items() if "Forget" not in k]
    if utility:
        row["Model Utility"] = metrics.model_utility(utility)
    forget_log = aggregated.get(FORGET)
    if forget_log is not None:
        if retain_reference is not None:
            ref = retain_reference.get(FORGET, retain_reference)
            row.update(metrics.forget_quality(_ratio(forget_log), _ratio(ref)))
        for key, col in (("mink", "Mink"), ("mink++", "Mink++"), ("exact_match", "Exact Match")):
            value = _mean_list(forget_log, key, empty_lists_as_zero)
            if value is not None:
                row[col] = value
        retain_log = aggregated.get(RETAIN, {})
        for key, col in _MIA_KEYS.items():
            if forget_log.get(key) and retain_log.get(key):
                row[f"MIA AUC {col}"] = mia.auc(forget_log[key], retain_log[key])
    if ape_log is not None and ape_log.get("exact_match"):
        row["APE"] = float(np.mean(ape_log["exact_match"]))
    row["Method"], row["Submitted By"] = method, submitted_by
    return row


def write_json(obj: Mapping, path: str | Path) -> Path:
    """Pretty JSON (indent 4, as the original), parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4))
    return path


def write_csv(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Rows to CSV with the union of their columns in first-seen order (missing cells empty)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_ape_log(folder: str | Path) -> dict | None:
    """A checkpoint folder's APE log, or None when APE did not run."""
    path = Path(folder) / APE
    return json.loads(path.read_text()) if path.exists() else None


def utility_columns(mme: Mapping | None = None, pope: Mapping | None = None) -> dict[str, float]:
    """Report columns of a model's MME (Perception / Cognition scores) and POPE (all settings together) results."""
    row: dict[str, float] = {}
    for group in ("Perception", "Cognition"):
        if mme is not None and group in mme:
            row[f"MME {group}"] = float(mme[group])
    if pope is not None:
        for key, col in (("accuracy", "Accuracy"), ("precision", "Precision"), ("recall", "Recall"),
                         ("f1", "F1"), ("yes_ratio", "Yes Ratio")):
            row[f"POPE {col}"] = float(pope["all"][key])
    return row
