"""MLLMU-Bench HF dataset folder -> records.

Layout (franciscoliu/MLLMU-Bench `eval.py`, `finetune.py`, `data_process/data_preprocess.py`):
  Full_Set/train-00000-of-00001.parquet      fictitious profiles (finetuning + few-shot source)
  forget_{R}/train-00000-of-00001.parquet    R in 5/10/15; retain_{100-R}/ the complement
  Test_Set/*.parquet                         paraphrased questions + transformed images (column `images`)
  Retain_Set/train-00000-of-00001.parquet    real celebrities
Columns: `ID`, `image` ({bytes, path}), `metadata` (JSON string: list of {Question, Answer}),
`Classification_Task` ({Image_Textual_Questions, Pure_Text_Questions}: {Question, Options{A..D},
Correct_Answer}), `Generation_Task` and `Mask_Task` (lists of {Type: Image_Textual|Pure_Text, Question,
Ground_Truth}; cloze blanks are written `__`). Keys `Paraphrased_Question`, `Paraphrased_Answer`,
`Perturbed_Answers`, `Keywords`, `Category` inside a metadata item are a vlmu_jax extension (the synthetic set
writes them; the seeds ignore unknown keys).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vlmu_jax.data.records import (
    IMAGE,
    QA,
    TEXT,
    Benchmark,
    Cloze,
    DataError,
    Identity,
    ImageRef,
    MultipleChoice,
    TestVariant,
    check_split_ids,
    with_split_membership,
)

PARQUET = "train-00000-of-00001.parquet"
FULL_SET, TEST_SET, CELEBRITY_SET = "Full_Set", "Test_Set", "Retain_Set"
FORGET_RATIOS = (5, 10, 15)
MODALITY = {"Image_Textual": IMAGE, "Pure_Text": TEXT}
MODALITY_NAME = {v: k for k, v in MODALITY.items()}
CHOICE_GROUPS = {"Image_Textual_Questions": IMAGE, "Pure_Text_Questions": TEXT}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Where:
    """The parquet file and row a value comes from, for errors that name file, record and field."""

    file: Path
    record: str

    def error(self, what: str, field: str | None = None) -> DataError:
        return DataError(what, file=self.file, record=self.record, field=field)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError("file not found", file=path)
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read parquet ({err})", file=path) from err


def _image(value: Any, where: _Where, field: str) -> ImageRef:
    if not isinstance(value, dict) or not value.get("bytes"):
        raise where.error("missing image bytes", field)
    return ImageRef(data=value["bytes"], origin=f"{where.file}: {where.record}: {field}")


def _typed(items: Any, where: _Where, key: str) -> list[tuple[str, str, str]]:
    """(modality, question, ground truth) triples of Generation_Task / Mask_Task."""
    out = []
    for j, item in enumerate(items or ()):
        try:
            out.append((MODALITY[item["Type"]], item["Question"], item["Ground_Truth"]))
        except (KeyError, TypeError) as err:
            raise where.error(f"malformed ({err!r})", f"{key}[{j}]") from err
    return out


def _choices(task: Any, where: _Where) -> tuple[MultipleChoice, ...]:
    out = []
    for group, modality in CHOICE_GROUPS.items():
        for j, item in enumerate((task or {}).get(group) or ()):
            try:
                options = tuple(sorted((k, v) for k, v in item["Options"].items() if v is not None))
                out.append(MultipleChoice(item["Question"], options, item["Correct_Answer"], modality))
            except (KeyError, TypeError, AttributeError) as err:
                raise where.error(f"malformed ({err!r})", f"Classification_Task.{group}[{j}]") from err
    return tuple(out)


def _metadata_qa(raw: Any, where: _Where) -> tuple[QA, ...]:
    try:
        items = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as err:
        raise where.error(f"not valid JSON ({err})", "metadata") from err
    out = []
    for j, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("Question") or not item.get("Answer"):
            raise where.error("lacks Question/Answer", f"metadata[{j}]")
        para = item.get("Paraphrased_Question")
        out.append(
            QA(
                question=item["Question"],
                answer=item["Answer"],
                paraphrased_questions=tuple([para] if isinstance(para, str) else para or ()),
                paraphrased_answer=item.get("Paraphrased_Answer"),
                perturbed_answers=tuple(item.get("Perturbed_Answers") or ()),
                keywords=tuple(item.get("Keywords") or ()),
                category=item.get("Category"),
            )
        )
    return tuple(out)


def _tasks(row: dict[str, Any], where: _Where) -> dict[str, tuple]:
    return {
        "generation": tuple(
            QA(q, a, modality=m) for m, q, a in _typed(row.get("Generation_Task"), where, "Generation_Task")
        ),
        "choices": _choices(row.get("Classification_Task"), where),
        "cloze": tuple(Cloze(q, a, m) for m, q, a in _typed(row.get("Mask_Task"), where, "Mask_Task")),
    }


def _profile(row: dict[str, Any], path: Path, index: int) -> Identity:
    if row.get("ID") is None:
        raise DataError("missing", file=path, record=f"row {index}", field="ID")
    where = _Where(path, f"row {index} (ID {row['ID']})")
    return Identity(
        uid=str(row["ID"]),
        image=_image(row.get("image"), where, "image"),
        qa=_metadata_qa(row.get("metadata"), where),
        name=row.get("Name"),
        **_tasks(row, where),
    )


def _read_profiles(path: Path, skip_bad_rows: bool, skipped: dict[str, int]) -> list[Identity]:
    out = []
    for i, row in enumerate(_rows(path)):
        try:
            out.append(_profile(row, path, i))
        except DataError as err:
            if not skip_bad_rows:
                raise
            skipped[str(path)] = skipped.get(str(path), 0) + 1
            log.warning("skipping %s", err)
    return out


def _read_test(folder: Path) -> tuple[TestVariant, ...]:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DataError("no parquet files", file=folder)
    out = []
    for path in files:
        for i, row in enumerate(_rows(path)):
            if row.get("ID") is None:
                raise DataError("missing", file=path, record=f"row {i}", field="ID")
            where = _Where(path, f"row {i} (ID {row['ID']})")
            images = row.get("images") or ([row["image"]] if row.get("image") else [])
            if not images:
                raise where.error("no images", "images")
            out.append(
                TestVariant(
                    uid=str(row["ID"]), images=tuple(_image(im, where, f"images[{j}]") for j, im in enumerate(images)),
                    **_tasks(row, where)
                )
            )
    return tuple(out)


def read_mllmu(root: str | Path, *, skip_bad_rows: bool = False) -> Benchmark:
    """Read an MLLMU-Bench folder: Full_Set, every forget_R/retain_(100-R) split present, Test_Set,
    Retain_Set.

    Split names are the folder names (`forget_5`, `retain_95`, ...). The seeds print and skip rows whose
    image or metadata does not decode; here that is an error unless `skip_bad_rows=True`, and then the
    count per file is returned in `Benchmark.skipped`.
    """
    root = Path(root)
    skipped: dict[str, int] = {}
    identities = _read_profiles(root / FULL_SET / PARQUET, skip_bad_rows, skipped)
    splits: dict[str, tuple[str, ...]] = {}
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and re.fullmatch(r"(forget|retain)_\d+", folder.name):
            splits[folder.name] = tuple(str(row["ID"]) for row in _rows(folder / PARQUET))
    check_split_ids(splits, {ident.uid for ident in identities}, str(root))
    test = _read_test(root / TEST_SET) if (root / TEST_SET).is_dir() else ()
    check_split_ids({TEST_SET: tuple(t.uid for t in test)}, {i.uid for i in identities}, str(root / TEST_SET))
    celeb_path = root / CELEBRITY_SET / PARQUET
    celebrities = _read_profiles(celeb_path, skip_bad_rows, skipped) if celeb_path.exists() else []
    return Benchmark(
        name="mllmu",
        identities=with_split_membership(identities, splits),
        splits=splits,
        test=test,
        celebrities=tuple(celebrities),
        skipped=skipped,
    )
