"""A researcher's workflow through the command line: evaluate checkpoints made elsewhere, and bad input that ends
with one line naming the file, record and field, exit code 2, and nothing marked done.

The checkpoints are the tiny random base model a first, failing run leaves behind: evaluating them is what is
tested here, not what they score.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_ABSL_INFO = re.compile(r"^I\d{4} ")  # absl's prefix of an INFO record (Orbax, jax, absl)


def _run(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vlmu_jax.main", "--config", "configs/demo.py:ci", "--workdir", str(workdir),
           "--config.data.synthetic_identities=12", "--config.eval.max_new_tokens=4", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and one error line as its last line; no traceback and no third-party INFO."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1].startswith("vlmu_jax: error: "), result.stderr[-3000:]
    assert sum("error" in ln for ln in lines) == 1 and "Traceback" not in result.stderr
    assert not [ln for ln in lines if _ABSL_INFO.match(ln)], result.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh workdir asked only to evaluate: it writes the data and the tiny base model, then fails because no
    model was trained there."""
    workdir = tmp_path_factory.mktemp("first")
    line = _one_error_line(_run(workdir, "--config.stages=eval"))
    assert "stage eval: nothing to evaluate" in line and "--config.eval.models=NAME=PATH" in line
    assert (workdir / "models" / "base" / "DONE").exists()
    return workdir


def _as_transformers_saves_it(folder: Path, out: Path) -> Path:
    """The checkpoint re-saved by transformers (its own tensor names and config.json, as a PEFT-merged PyTorch
    model is), with the tokenizer and processor files copied beside it."""
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(folder).save_pretrained(out)
    for file in folder.iterdir():
        if not (out / file.name).exists() and file.name not in ("DONE", "model.safetensors"):
            shutil.copy2(file, out / file.name)
    return out


def test_evaluate_given_checkpoints(first: Path, tmp_path: Path) -> None:
    """`--config.stages=eval,report` with `eval.models` and `eval.reference_model` in a fresh workdir, no
    model.path: every checkpoint is evaluated under its name, the report compares against the reference."""
    base, workdir = first / "models" / "base", tmp_path / "eval_only"
    vanilla = _as_transformers_saves_it(base, tmp_path / "hf")
    result = _run(workdir, "--config.model.tiny=False", "--config.stages=eval,report",
                  f"--config.eval.models=vanilla={vanilla}", f"--config.eval.reference_model={base}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["Model"]: r for r in json.loads((workdir / "report" / "results.json").read_text())["rows"]}
    assert list(rows) == ["vanilla", "retain_model"]
    assert rows["vanilla"]["Forget Quality"] == pytest.approx(1.0)  # the same weights as the reference
    for name, folder in (("vanilla", vanilla), ("retain_model", base)):
        info = json.loads((workdir / "eval_results" / name / "eval_info.json").read_text())
        assert info["model"] == str(folder.resolve())
    page = (workdir / "report" / "index.html").read_text()
    assert str(vanilla) in page and str(base) in page and page.count("data:image/png;base64,") == 2  # no loss curves
    table = result.stdout.splitlines()
    assert table[0].split() == ["vanilla", "retain_model"] and table[1].startswith("Forget Quality")
    assert re.search(r"^\d\d:\d\d:\d\d eval: done in [\d.]+ s$", result.stderr, re.MULTILINE)


def _break_record(data: Path) -> None:
    records = json.loads((data / "full.json").read_text())
    del records[3]["qa_list"][1]["answer"]
    (data / "full.json").write_text(json.dumps(records))


@pytest.mark.parametrize("case", ["data", "truncated", "tokenizer", "workdir"])
def test_bad_input_is_one_line_and_nothing_done(first: Path, tmp_path: Path, case: str) -> None:
    base = tmp_path / "ckpt"
    shutil.copytree(first / "models" / "base", base)
    (base / "DONE").unlink()
    workdir, args = tmp_path / "run", ["--config.model.tiny=False", "--config.stages=eval,report",
                                       f"--config.eval.models=m={base}"]
    if case == "data":
        data = tmp_path / "data"
        shutil.copytree(first / "data" / "fiubench", data)
        _break_record(data)
        args += [f"--config.data.root={data}", "--config.data.synthetic_identities=0"]
        expected = f"{data / 'full.json'}: record 3 (unique_id 00000003): qa_list[1].answer: missing"
    elif case == "truncated":
        weights = base / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        expected = f"{weights}: tensor "
    elif case == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (base / name).unlink()
        expected = f"{base}: no tokenizer that transformers can load"
    else:
        (tmp_path / "file").write_text("")
        workdir = tmp_path / "file" / "run"
        expected = f"{workdir}: the workdir cannot be written"
    line = _one_error_line(_run(workdir, *args))
    assert line.startswith(f"vlmu_jax: error: {expected}"), line
    if case == "truncated":
        assert re.search(r": data_offsets: truncated: the tensor ends at byte \d+, the file has \d+ bytes", line)
    assert not list(tmp_path.rglob("eval_results/*/DONE"))
