"""Through `python -m vlmu_jax.main`: the MLLMU-Bench eval stage with a local judge (factuality per set) and MME /
POPE answered by every evaluated model, their results in eval_results and their columns in the report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.judge_models import constant_judge
from tests.test_mme_pope import _mme_tree, _pope_file
from tests.test_pipeline import REPO, _main, _rows
from vlmu_jax.eval.tasks import mme, pope

MODELS = ("finetuned", "retain_model", "unlearned_gd")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("extras")
    judge_path = constant_judge(root / "judge")
    _mme_tree(root / "mme")
    _pope_file(root / "pope", ["yes", "no", "no", "yes", "no"], images=True)
    workdir = root / "run"
    # protocol corrected: short zero-shot prompts (eval.py's few-shot path runs in test_pipeline.py)
    _main(workdir, "--config.benchmark=mllmu", "--config.protocol=corrected", "--config.data.synthetic_identities=12",
          "--config.finetune.num_steps=2", "--config.retain_model.num_steps=1", "--config.unlearn.num_steps=1",
          "--config.eval.max_new_tokens=4", "--config.unlearn.objective=gd",
          "--config.stages=finetune,unlearn,eval,report",
          "--config.eval.judge_backend=local", f"--config.eval.judge_model_path={judge_path}",
          "--config.eval.judge_max_tokens=1", f"--config.eval.mme_root={root / 'mme'}",
          f"--config.eval.pope_path={root / 'pope'}")
    return workdir, root / "mme", root / "pope"


def test_factuality_per_set_in_logs_and_report(run):
    workdir, _, _ = run
    for name in MODELS:
        res = json.loads((workdir / "eval_results" / name / "final_evaluation_results.json").read_text())
        preds = json.loads((workdir / "eval_results" / name / "predictions.json").read_text())
        assert res.pop("protocol")["name"] == "corrected" and len(res) == 4
        for set_name, groups in res.items():
            rows = preds[set_name]["generation"]
            assert rows and all(r["Factuality Score"] == 7 for r in rows)  # the judge checkpoint's verdict
            assert groups["factuality"] == {"Average Generation Factuality Score": 7.0, "Judged": len(rows),
                                            "Unparsed Verdicts": 0}
    cache = json.loads((workdir / "judge_cache.json").read_text())
    assert cache and set(cache.values()) == {"Factuality Score: 7"}
    rows = _rows(workdir)
    for name in MODELS:
        assert rows[name]["Forget Set Results / factuality / Average Generation Factuality Score"] == 7.0
        assert rows[name]["Retain Set (real person) Results / factuality / Unparsed Verdicts"] == 0
    with (workdir / "report" / "results.csv").open() as f:
        header = next(csv.reader(f))
    assert "Test Set Results / factuality / Average Generation Factuality Score" in header


def test_mme_and_pope_scores_per_model(run):
    workdir, mme_root, pope_root = run
    items, probes = mme.read_mme(mme_root), pope.read_pope(pope_root / "coco_pope_adversarial.json")
    rows = _rows(workdir)
    for name in MODELS:
        got_mme = json.loads((workdir / "eval_results" / name / "mme.json").read_text())
        replies = [p["prediction"] for p in got_mme["predictions"]]
        assert len(replies) == len(items)
        want = mme.score_mme(items, replies)  # the stored scores are those of the stored replies
        assert got_mme["Perception"] == pytest.approx(want["Perception"])
        assert got_mme["Cognition"] == pytest.approx(want["Cognition"])
        tool = workdir / "eval_results" / name / "mme_eval_tool"  # what MME's calculation.py reads
        lines = [line.split("\t") for cat in sorted({i.category for i in items})
                 for line in (tool / f"{cat}.txt").read_text().splitlines()]
        assert sorted(lines) == sorted([i.image_name, i.question, i.answer, r.strip("\n")]
                                       for i, r in zip(items, replies, strict=True))
        got_pope = json.loads((workdir / "eval_results" / name / "pope.json").read_text())
        replies = [p["prediction"] for p in got_pope["predictions"]]
        want = pope.score_pope([p.label for p in probes], replies)
        assert got_pope["all"] == pytest.approx(want) and got_pope["settings"]["adversarial"] == pytest.approx(want)
        assert rows[name]["MME Perception"] == pytest.approx(got_mme["Perception"])
        assert rows[name]["MME Cognition"] == pytest.approx(got_mme["Cognition"])
        for key, col in (("accuracy", "Accuracy"), ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1"),
                         ("yes_ratio", "Yes Ratio")):
            assert rows[name][f"POPE {col}"] == pytest.approx(want[key])


def test_missing_benchmark_path_is_a_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "vlmu_jax.main", "--config", "configs/demo.py:ci", "--workdir", str(tmp_path / "w"),
           f"--config.eval.pope_path={tmp_path / 'nope.json'}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "config.eval.pope_path" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "w").exists()
