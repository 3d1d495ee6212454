"""Readers on generated data in both formats, their error cases, and the synthetic CLI's determinism."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from vlmu_jax.data import synthetic
from vlmu_jax.data.fiubench import read_fiubench
from vlmu_jax.data.mllmu import read_mllmu
from vlmu_jax.data.records import DataError, ImageRef

N, SEED, SIZE = 12, 3, 32


def _strip_images(obj):
    """Replace ImageRefs by their bytes so a path-backed and a bytes-backed record compare equal."""
    if isinstance(obj, ImageRef):
        return obj.read_bytes()
    if dataclasses.is_dataclass(obj):
        return {f.name: _strip_images(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_strip_images(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _strip_images(v) for k, v in obj.items()}
    return obj


@pytest.fixture(scope="module")
def fiu_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fiu")
    synthetic.main(
        [
            "--out",
            str(out),
            "--format",
            "fiubench",
            "--identities",
            str(N),
            "--seed",
            str(SEED),
            "--image-size",
            str(SIZE),
        ]
    )
    return out


@pytest.fixture(scope="module")
def mllmu_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mllmu")
    synthetic.main(
        [
            "--out",
            str(out),
            "--format",
            "mllmu",
            "--identities",
            str(N),
            "--seed",
            str(SEED),
            "--image-size",
            str(SIZE),
        ]
    )
    return out


def test_fiubench_roundtrip(fiu_dir):
    bench = read_fiubench(fiu_dir)
    expected = synthetic.make_benchmark(N, SEED, SIZE, "fiubench")
    assert _strip_images(bench) == _strip_images(expected)
    assert [len(bench.splits[k]) for k in ("forget1", "forget5", "forget10")] == [1, 1, 1]
    assert len(bench.splits["retain"]) == N - 3
    qa = bench.identities[0].qa[0]
    assert (
        len(qa.perturbed_answers) == 5 and qa.keywords and qa.paraphrased_questions and qa.paraphrased_answer
    )
    assert bench.idk and "forget1" in bench.split("forget1")[0].splits


def test_split_sizes_scale_like_the_original():
    splits = synthetic.make_benchmark(400, 0, 8, "fiubench").splits
    assert {k: len(v) for k, v in splits.items() if k != "retain"} == {
        "forget1": 4,
        "forget5": 20,
        "forget10": 40,
        "retain5": 20,
        "retain15": 60,
    }
    assert len(splits["retain"]) == 336


def test_mllmu_roundtrip(mllmu_dir):
    bench = read_mllmu(mllmu_dir)
    expected = synthetic.make_benchmark(N, SEED, SIZE, "mllmu")
    assert _strip_images(bench) == _strip_images(expected)
    assert set(bench.splits) == {"forget_5", "forget_10", "forget_15", "retain_95", "retain_90", "retain_85"}
    ident = bench.identities[0]
    assert {c.modality for c in ident.choices} == {"image", "text"} and ident.cloze and ident.generation
    assert all(c.answer in "ABCD" and len(c.options) == 4 for c in ident.choices)
    assert len(bench.test) == N and all(len(t.images) == 2 for t in bench.test) and bench.celebrities


def test_images_distinct_per_identity():
    bench = synthetic.make_benchmark(N, SEED, SIZE, "mllmu")
    assert len({i.image.read_bytes() for i in bench.identities + bench.celebrities}) == N + len(
        bench.celebrities
    )


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("fmt", ["fiubench", "mllmu"])
def test_same_seed_byte_identical(tmp_path, fmt):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthetic.write(tmp_path / name, fmt, identities=6, seed=seed, image_size=16)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def _copy_fiu(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_fiubench_missing_image(fiu_dir, tmp_path):
    root = _copy_fiu(fiu_dir, tmp_path / "d")
    uid = json.loads((root / "full.json").read_text())[2]["unique_id"]
    (root / "images" / f"{uid}.png").unlink()
    with pytest.raises(DataError, match=rf"full.json: record 2 \(unique_id {uid}\): image_path: image"):
        read_fiubench(root)


def test_fiubench_bad_json(fiu_dir, tmp_path):
    root = _copy_fiu(fiu_dir, tmp_path / "d")
    (root / "split.json").write_text('{"forget1": [')
    with pytest.raises(DataError, match="split.json: not valid JSON"):
        read_fiubench(root)


def test_fiubench_unknown_split_id(fiu_dir, tmp_path):
    root = _copy_fiu(fiu_dir, tmp_path / "d")
    splits = json.loads((root / "split.json").read_text())
    splits["forget5"].append("99999999")
    (root / "split.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match=r"split.json: split 'forget5': names unknown id\(s\) \['99999999'\]"):
        read_fiubench(root)


def test_fiubench_malformed_record(fiu_dir, tmp_path):
    root = _copy_fiu(fiu_dir, tmp_path / "d")
    data = json.loads((root / "full.json").read_text())
    del data[1]["qa_list"][3]["answer"]
    (root / "full.json").write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"full.json: record 1 \(unique_id \d+\): qa_list\[3\].answer: missing$"
    ):
        read_fiubench(root)


def test_mllmu_bad_row_error_or_counted_skip(mllmu_dir, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    root = tmp_path / "m"
    shutil.copytree(mllmu_dir, root)
    path = root / "Retain_Set" / "train-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[0]["metadata"] = "not json"
    synthetic._write_parquet(rows, path)
    with pytest.raises(
        DataError, match=r"Retain_Set/train-00000-of-00001.parquet: row 0 \(ID c\d+\): metadata: not valid JSON"
    ):
        read_mllmu(root)
    bench = read_mllmu(root, skip_bad_rows=True)
    assert bench.skipped == {str(path): 1} and len(bench.celebrities) == len(rows) - 1


def test_fiubench_original_capitalisation(fiu_dir, tmp_path):
    """Protocol original: data_module's str.capitalize() on every question (paraphrases too), answer, paraphrased
    answer and stripped IdK refusal; perturbed answers and keywords keep their case."""
    root = _copy_fiu(fiu_dir, tmp_path / "d")
    data = json.loads((root / "full.json").read_text())
    data[0]["qa_list"][0].update(
        question="where does Ada LEE live?", answer="ada Lee lives in OSLO.",
        paraphrased_question=["in which city is Ada's home?", "Ada lives where?"],
        paraphrased_answer="her home is Oslo.", perturbed_answer=["she lives in Lima.", "Lives in RIGA."],
        keywords=["Oslo"])
    (root / "full.json").write_text(json.dumps(data))
    (root / "prompt.json").write_text(json.dumps({"idk": ["  i do not know Ada. ", "No IDEA."]}))
    qa = read_fiubench(root, capitalize=True).identities[0].qa[0]
    assert qa.question == "Where does ada lee live?"
    assert qa.answer == "Ada lee lives in oslo."
    assert qa.paraphrased_questions == ("In which city is ada's home?", "Ada lives where?")
    assert qa.paraphrased_answer == "Her home is oslo."
    assert qa.perturbed_answers == ("she lives in Lima.", "Lives in RIGA.") and qa.keywords == ("Oslo",)
    assert read_fiubench(root, capitalize=True).idk == ("I do not know ada.", "No idea.")
    plain = read_fiubench(root)
    assert plain.identities[0].qa[0].question == "where does Ada LEE live?"
    assert plain.idk == ("  i do not know Ada. ", "No IDEA.")


def test_undecodable_image_names_its_file_or_row(tmp_path):
    """Images are decoded when a batch needs them: a truncated file or bad parquet bytes name where they came from."""
    path = tmp_path / "face.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=rf"^{path}: cannot decode the image"):
        ImageRef(path=str(path)).load()
    with pytest.raises(DataError, match=r"^x.parquet: row 3 \(ID 7\): image: cannot decode the image"):
        ImageRef(data=b"garbage", origin="x.parquet: row 3 (ID 7): image").load()
