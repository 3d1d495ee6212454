"""POPE yes/no object probes: reader for ``coco_pope_{random,popular,adversarial}.json`` and scorer.

Files are JSON lines ``{"question_id", "image", "text", "label"}`` (label yes/no), one file per sampling
setting.

Parsing: FIUBench's ``eval/eval_pope.py`` lower-cases the reply and uses the MME rule (exact yes/no, else
yes/no within the first 4 characters, else "other", which counts as wrong); ``style="pope"`` is the POPE
repository rule (keep the text before the first period, drop commas, "no" if any word is "no"/"No"/"not",
else "yes").

Metrics: accuracy, precision, recall, F1 with "yes" as the positive class and yes-ratio (share of "yes"
replies), as POPE's evaluation reports them; an "other" reply is a negative prediction there.

Differences: FIUBench reports accuracy only, divided by a hard-coded 3000 (the size of each COCO POPE
setting); we divide by the number of questions read, identical on the full files. FIUBench reads the
lmms-lab parquet export; we read the original JSON lines (the parquet rows carry the same fields).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmu_jax.eval.tasks.mme import parse_yes_no


@dataclass(frozen=True)
class PopeItem:
    """One POPE probe: which setting, the COCO image file, the question and the gold yes/no."""

    setting: str
    question_id: int
    image: str
    text: str
    label: str


def read_pope(path: str | Path) -> list[PopeItem]:
    """Probes of one ``coco_pope_<setting>.json`` file; the setting is the file name's last ``_`` part."""
    path = Path(path)
    setting = path.stem.split("_")[-1]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [PopeItem(setting, r["question_id"], r["image"], r["text"], r["label"].lower()) for r in rows]


def parse_pope_answer(reply: str, *, style: str = "fiubench") -> str:
    """yes / no / other from a reply (see the module docstring for the two rules)."""
    if style == "fiubench":
        return parse_yes_no(reply.strip("\n"))
    text = reply.split(".")[0] if "." in reply else reply
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def score_pope(labels: Sequence[str], replies: Sequence[str], *, style: str = "fiubench") -> dict[str, float]:
    """Accuracy, precision, recall, F1, yes-ratio (and confusion counts) of replies against gold labels."""
    parsed = [parse_pope_answer(r, style=style) for r in replies]
    gold = [g.lower() for g in labels]
    tp = sum(g == "yes" and p == "yes" for g, p in zip(gold, parsed, strict=True))
    fp = sum(g == "no" and p == "yes" for g, p in zip(gold, parsed, strict=True))
    n_pos = sum(g == "yes" for g in gold)
    correct = sum(g == p for g, p in zip(gold, parsed, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_pos if n_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": correct / len(gold), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in parsed) / len(gold), "TP": tp, "FP": fp,
            "TN": sum(g == "no" and p != "yes" for g, p in zip(gold, parsed, strict=True)),
            "FN": n_pos - tp, "other_num": sum(p == "other" for p in parsed)}
