"""FIUBench on-disk layout -> records.

Layout (gray311/VLM_Unlearned `dataset/`): `full.json` (a list of identities: unique_id, image_path, qa_list
with question / answer / paraphrased_question / paraphrased_answer / perturbed_answer / keywords),
`split.json` (forget1 / forget5 / forget10 / retain5 / retain15 -> unique_ids), `prompt.json` (key `idk`:
refusal answers). The seeds evaluate the first 400 records and define the retain set as every identity outside
forget1+5+10.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmu_jax.data.records import (
    QA,
    Benchmark,
    DataError,
    Identity,
    ImageRef,
    check_split_ids,
    with_split_membership,
)

FORGET_SPLITS = ("forget1", "forget5", "forget10")
NUM_EVAL_IDENTITIES = 400


def _load_json(path: Path) -> Any:
    """JSON, or JSON lines as the seeds' fallback accepts."""
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise DataError(f"not valid JSON ({first})", file=path) from first


def _str_list(value: Any, file: Path, record: str, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise DataError(f"must be a string or a list of strings, got {type(value).__name__}", file=file,
                    record=record, field=field)


def _parse_qa(item: Any, source: Path, record: str, field: str, capitalize: bool) -> QA:
    if not isinstance(item, dict):
        raise DataError("must be an object with question and answer", file=source, record=record, field=field)
    for key in ("question", "answer"):
        if not isinstance(item.get(key), str):
            what = "missing" if key not in item else f"must be a string, got {type(item[key]).__name__}"
            raise DataError(what, file=source, record=record, field=f"{field}.{key}")
    fix = str.capitalize if capitalize else str
    para_answer = item.get("paraphrased_answer")
    if para_answer is not None and not isinstance(para_answer, str):
        raise DataError(f"must be a string, got {type(para_answer).__name__}", file=source, record=record,
                        field=f"{field}.paraphrased_answer")
    paraphrased = _str_list(item.get("paraphrased_question"), source, record, f"{field}.paraphrased_question")
    return QA(
        question=fix(item["question"]),
        answer=fix(item["answer"]),
        paraphrased_questions=tuple(fix(q) for q in paraphrased),
        paraphrased_answer=None if para_answer is None else fix(para_answer),
        perturbed_answers=_str_list(item.get("perturbed_answer"), source, record, f"{field}.perturbed_answer"),
        keywords=_str_list(item.get("keywords"), source, record, f"{field}.keywords"),
        category=item.get("category"),
    )


def _resolve_image(image_path: str, root: Path, source: Path, record: str) -> ImageRef:
    """Paths in full.json are relative to the data folder or to the repo root above it (`./dataset/...`)."""
    candidates = (
        [Path(image_path)]
        if Path(image_path).is_absolute()
        else [root / image_path, root.parent / image_path]
    )
    for cand in candidates:
        if cand.is_file():
            return ImageRef(path=str(cand))
    raise DataError(f"image {image_path!r} not found (looked at {[str(c) for c in candidates]})", file=source,
                    record=record, field="image_path")


def _parse_identity(rec: Any, index: int, root: Path, source: Path, capitalize: bool) -> Identity:
    record = f"record {index}"
    if not isinstance(rec, dict):
        raise DataError(f"must be an object, got {type(rec).__name__}", file=source, record=record)
    for key, kind in (("unique_id", str), ("image_path", str), ("qa_list", list)):
        if not isinstance(rec.get(key), kind):
            what = "missing" if key not in rec else f"must be a {kind.__name__}, got {type(rec[key]).__name__}"
            raise DataError(what, file=source, record=record, field=key)
    record = f"record {index} (unique_id {rec['unique_id']})"
    qa = tuple(_parse_qa(item, source, record, f"qa_list[{j}]", capitalize) for j, item in enumerate(rec["qa_list"]))
    return Identity(
        uid=rec["unique_id"],
        image=_resolve_image(rec["image_path"], root, source, record),
        qa=qa,
        name=rec.get("name"),
        caption=rec.get("caption"),
    )


def read_fiubench(
    root: str | Path,
    *,
    data_file: str = "full.json",
    split_file: str = "split.json",
    prompt_file: str = "prompt.json",
    limit: int = NUM_EVAL_IDENTITIES,
    capitalize: bool = False,
) -> Benchmark:
    """Read a FIUBench folder.

    `limit` keeps the first N identities as the seeds do (`data[:400]`). `capitalize=True` is FIUBench's
    `str.capitalize()` (protocol `original`): questions, their paraphrases, answers and paraphrased answers, and
    the IdK refusals after stripping spaces, as `data_module` formats every row it trains or scores on; it also
    lower-cases the rest of each string (names). Perturbed answers and keywords keep their case, as there. Adds
    the split `retain` = identities outside forget1/5/10, as the seeds derive it.
    """
    root = Path(root)
    data_path, split_path = root / data_file, root / split_file
    for path in (data_path, split_path):
        if not path.is_file():
            raise DataError("file not found", file=path)
    data = _load_json(data_path)
    if not isinstance(data, list):
        raise DataError("top level must be a list of identities", file=data_path)
    identities = [_parse_identity(rec, i, root, data_path, capitalize) for i, rec in enumerate(data[:limit])]
    uids = [ident.uid for ident in identities]
    if len(set(uids)) != len(uids):
        dup = sorted({u for u in uids if uids.count(u) > 1})
        raise DataError(f"duplicate unique_id(s) {dup[:5]}", file=data_path)

    raw_splits = _load_json(split_path)
    if not isinstance(raw_splits, dict):
        raise DataError("top level must map split names to lists of unique_ids", file=split_path)
    splits = {name: _str_list(ids, split_path, f"split {name!r}", "ids") for name, ids in raw_splits.items()}
    check_split_ids(splits, set(uids), str(split_path))
    forgotten = {uid for name in FORGET_SPLITS for uid in splits.get(name, ())}
    splits["retain"] = tuple(u for u in uids if u not in forgotten)

    idk: tuple[str, ...] = ()
    prompt_path = root / prompt_file
    if prompt_path.is_file():
        prompts = _load_json(prompt_path)
        idk = _str_list(prompts.get("idk") if isinstance(prompts, dict) else None, prompt_path, "", "idk")
        if capitalize:
            idk = tuple(refusal.strip(" ").capitalize() for refusal in idk)
    return Benchmark(
        name="fiubench",
        identities=with_split_membership(identities, splits),
        splits=splits,
        idk=idk,
    )
