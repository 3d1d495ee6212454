"""MME (yes/no perception and cognition benchmark): reader for the release folders and the eval_tool scorer.

Layout read (as gray311/VLM_Unlearned ``eval/eval_mme.py`` walks ``MME_Benchmark_release_version``): one
folder per category; either ``images/<name>.{png,jpg}`` with ``questions_answers_YN/<stem>.txt``, or the
image and ``<stem>.txt`` side by side. Each txt line is ``question<TAB>answer`` (yes/no), two questions per
image.

Scoring as MME's ``eval_tool/calculation.py``, which FIUBench runs on the files ``eval_mme.py`` writes:
answers lower-cased, parsed by :func:`parse_yes_no`; per category ``acc`` (per question) and ``acc_plus``
(images with both questions right), score = 100 (acc + acc_plus); Perception and Cognition are sums over
their categories. :func:`write_eval_tool_results` writes the same per-category txt files so the official
tool can cross-check.

Differences: the eval tool pairs consecutive lines (chunks of two) and asserts two per image; we group by
image name, which is the same on well-formed files and does not break when an image has another count. The
original's ``eval_mme.py`` runs every flat-layout image twice (duplicate lines; identical under greedy
decoding, so the scores do not change). For llava-phi the original maps any reply containing "yes" to yes
and all else to no before scoring; that is ``parse_yes_no(..., style="contains_yes")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MME_TASKS = {
    "Perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "Cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
_IMAGE_SUFFIXES = (".png", ".jpg")


@dataclass(frozen=True)
class MMEItem:
    """One MME question: its category, image, question text and gold yes/no answer."""

    category: str
    image_name: str
    image_path: str
    question: str
    answer: str


def parse_yes_no(prediction: str, *, style: str = "eval_tool") -> str:
    """yes / no / other from a reply. ``eval_tool``: exact yes/no, else "yes"/"no" within the first 4 chars.

    ``contains_yes``: the original llava-phi rule (yes iff "yes" occurs anywhere, never "other").
    """
    pred = prediction.lower()
    if style == "contains_yes":
        return "yes" if "yes" in pred else "no"
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def read_mme(root: str | Path) -> list[MMEItem]:
    """All questions under an MME release folder, categories and images in sorted order."""
    items = []
    for cat_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        nested = (cat_dir / "images").is_dir()
        img_dir = cat_dir / "images" if nested else cat_dir
        txt_dir = cat_dir / "questions_answers_YN" if nested else cat_dir
        for img in sorted(p for p in img_dir.iterdir() if p.suffix in _IMAGE_SUFFIXES):
            for line in (txt_dir / f"{img.name.split('.')[0]}.txt").read_text().splitlines():
                if line.strip():
                    parts = line.split("\t")
                    items.append(MMEItem(cat_dir.name, img.name, str(img), parts[0], parts[-1].strip()))
    return items


def _binary_stats(gold: Sequence[str], parsed: Sequence[str]) -> dict[str, float]:
    """eval_tool's compute_metric: acc over all; TP/FN/FP/TN, precision, recall over non-"other" answers."""
    pairs = [(g, p) for g, p in zip(gold, parsed, strict=True) if p != "other"]
    tp = sum(g == "yes" and p == "yes" for g, p in pairs)
    fn = sum(g == "yes" and p == "no" for g, p in pairs)
    fp = sum(g == "no" and p == "yes" for g, p in pairs)
    tn = sum(g == "no" and p == "no" for g, p in pairs)
    return {"TP": tp, "FN": fn, "FP": fp, "TN": tn,
            "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "other_num": len(gold) - len(pairs),
            "acc": sum(g == p for g, p in zip(gold, parsed, strict=True)) / len(gold)}


def score_mme(items: Sequence[MMEItem], predictions: Sequence[str], *, style: str = "eval_tool") -> dict:
    """Per-category metrics and scores plus ``Perception`` / ``Cognition`` sums (of categories present)."""
    by_cat: dict[str, list[tuple[MMEItem, str]]] = {}
    for item, pred in zip(items, predictions, strict=True):
        by_cat.setdefault(item.category, []).append((item, parse_yes_no(pred, style=style)))
    out: dict = {"categories": {}}
    for cat, rows in by_cat.items():
        stats = _binary_stats([i.answer.lower() for i, _ in rows], [p for _, p in rows])
        per_image: dict[str, bool] = {}
        for item, parsed in rows:
            right = parsed == item.answer.lower()
            per_image[item.image_name] = per_image.get(item.image_name, True) and right
        stats["acc_plus"] = sum(per_image.values()) / len(per_image)
        stats["score"] = 100.0 * (stats["acc"] + stats["acc_plus"])
        out["categories"][cat] = stats
    for group, tasks in MME_TASKS.items():
        present = [t for t in tasks if t in out["categories"]]
        if present:
            out[group] = sum(out["categories"][t]["score"] for t in present)
    return out


def write_eval_tool_results(items: Sequence[MMEItem], predictions: Sequence[str],
                            out_dir: str | Path) -> None:
    """``<category>.txt`` with ``image<TAB>question<TAB>gold<TAB>prediction`` lines, as eval_mme.py writes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for item, pred in zip(items, predictions, strict=True):
        fields = [item.image_name, item.question, item.answer, pred]
        row = "\t".join(f.strip("\n") for f in fields)
        lines.setdefault(item.category, []).append(row)
    for cat, rows in lines.items():
        (out / f"{cat}.txt").write_text("".join(f"{r}\n" for r in rows))
