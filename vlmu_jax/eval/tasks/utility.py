"""MME and POPE answered by the model under evaluation (FIUBench's utility benchmarks, ``eval/eval_mme.py`` and
``eval/eval_pope.py``): read, generate in batches, score with ``mme.score_mme`` / ``pope.score_pope``.

Each question is asked as written in the file, with its image, through the runner's template (the original
writes it into the model's chat prompt the same way); greedy decoding with the originals' budgets: 3 new tokens
for MME, 5 for POPE. The image goes through the architecture's image processor (the runner's ``image_fn``).

Inputs are checked before any generation: a folder with no MME questions, an answer that is not yes/no, a POPE
line that is not ``{"question_id", "image", "text", "label"}`` JSON or an image that is not on disk is a
``ValueError`` / ``FileNotFoundError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from vlmu_jax.data.batching import Example, generation_rows
from vlmu_jax.data.records import ImageRef
from vlmu_jax.eval.batched import generate_rows
from vlmu_jax.eval.tasks import mme, pope
from vlmu_jax.eval.tasks.fiubench import Runner

MME_MAX_NEW_TOKENS, POPE_MAX_NEW_TOKENS = 3, 5


def _answers(model: nnx.Module, questions: Sequence[tuple[str, str]], runner: Runner, max_new_tokens: int,
             desc: str) -> list[str]:
    """Greedy replies to (question, image path) pairs, in order."""
    prompts = [Example(q, "", ImageRef(path=image), str(i)) for i, (q, image) in enumerate(questions)]
    runner = dataclasses.replace(runner, max_new_tokens=max_new_tokens)
    tok = runner.tokenizer
    generated = generate_rows(model, generation_rows(prompts, runner.text), **runner.batching(),
                              **runner.generating(), desc=desc)
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in generated]


def read_mme_checked(root: str | Path) -> list[mme.MMEItem]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME root {str(root)!r} is not a folder")
    try:
        items = mme.read_mme(root)
    except (OSError, IndexError) as err:
        raise ValueError(f"MME root {root}: not the release layout (category folders of images + "
                         f"question<TAB>answer txt files): {err}") from err
    if not items:
        raise ValueError(f"MME root {root} holds no questions: expected one folder per category with images and "
                         "question<TAB>answer txt files")
    bad = [i for i in items if i.answer.lower() not in ("yes", "no")]
    if bad:
        raise ValueError(f"MME {bad[0].category}/{bad[0].image_name}: answer {bad[0].answer!r} is not yes/no "
                         "(lines must be question<TAB>answer)")
    return items


def pope_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"POPE path {str(path)!r} does not exist")
    files = sorted(path.glob("*pope*.json")) or sorted(path.glob("*.json"))
    if not files:
        raise ValueError(f"POPE folder {path} has no coco_pope_<setting>.json files")
    return files


def read_pope_checked(path: str | Path, image_root: str | Path | None = None) -> list[tuple[pope.PopeItem, str]]:
    """Every probe of the POPE file(s) at ``path`` with its image path (under ``image_root`` or the file's folder)."""
    out = []
    for file in pope_files(path):
        try:
            items = pope.read_pope(file)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"POPE file {file}: every line must be JSON with question_id, image, text and "
                             f"label ({type(err).__name__}: {err})") from err
        if not items:
            raise ValueError(f"POPE file {file} has no probes")
        folder = Path(image_root) if image_root else file.parent
        for item in items:
            if item.label not in ("yes", "no"):
                raise ValueError(f"POPE file {file}: question {item.question_id} label {item.label!r} is not yes/no")
            out.append((item, str(folder / item.image)))
    missing = [image for _, image in out if not Path(image).is_file()]
    if missing:
        raise FileNotFoundError(f"POPE image {missing[0]} not found ({len(missing)} missing): set "
                                "eval.pope_image_root to the COCO image folder")
    return out


def evaluate_mme(model: nnx.Module, items: Sequence[mme.MMEItem], runner: Runner, *, desc: str = "") -> dict[str, Any]:
    """``Perception`` / ``Cognition`` (sums of category scores present), per-category metrics, predictions."""
    replies = _answers(model, [(i.question, i.image_path) for i in items], runner, MME_MAX_NEW_TOKENS,
                       f"{desc} MME")
    out = mme.score_mme(items, replies)
    out["predictions"] = [{"category": i.category, "image": i.image_name, "question": i.question,
                           "answer": i.answer, "prediction": r} for i, r in zip(items, replies, strict=True)]
    return out


def evaluate_pope(model: nnx.Module, probes: Sequence[tuple[pope.PopeItem, str]], runner: Runner, *,
                  desc: str = "") -> dict[str, Any]:
    """POPE metrics (accuracy, precision, recall, F1, yes-ratio) over all probes (``all``) and per setting."""
    replies = _answers(model, [(item.text, image) for item, image in probes], runner, POPE_MAX_NEW_TOKENS,
                       f"{desc} POPE")
    labels = [item.label for item, _ in probes]
    out: dict[str, Any] = {"all": pope.score_pope(labels, replies), "settings": {}}
    for setting in dict.fromkeys(item.setting for item, _ in probes):
        keep = [k for k, (item, _) in enumerate(probes) if item.setting == setting]
        out["settings"][setting] = pope.score_pope([labels[k] for k in keep], [replies[k] for k in keep])
    out["predictions"] = [{"setting": item.setting, "question_id": item.question_id, "image": item.image,
                           "question": item.text, "label": item.label, "prediction": r}
                          for (item, _), r in zip(probes, replies, strict=True)]
    return out
