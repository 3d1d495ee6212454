"""The main job end to end beside the demo's workdir: two processes against one, the MLLMU-Bench format, and
LLaVA-1.5's real image size. Each runs `python -m vlmu_jax.main` in a workdir of its own (test_pipeline.py holds
the runs on the demo's) and asserts on the files it writes, never on timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_pipeline import REPO, _main, _rows


def test_two_processes_match_one(tmp_path: Path) -> None:
    """launch/local_multiprocess.sh (2 processes x 2 CPU devices): finetune a few steps, NPO over 2 epochs (its
    reference log-probs made once, gathered from both processes' rows) + eval = one process with 4 devices, loss by
    loss and metric by metric."""
    quick = ["--config.data.synthetic_identities=10", "--config.finetune.num_steps=3",
             "--config.retain_model.num_steps=3", "--config.eval.max_new_tokens=4", "--config.unlearn.objective=npo",
             "--config.unlearn.num_epochs=2", "--config.stages=finetune,unlearn,eval"]
    single = tmp_path / "single"
    log = _main(single, *quick, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert "unlearned_npo: the reference's log-probs of streams ['forget'] made once" in log
    multi = tmp_path / "multi"
    result = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "2", "--", "--config", "configs/demo.py:ci",
         "--workdir", str(multi), *quick],
        cwd=REPO, capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-4000:]
    for model in ("finetuned", "retain_model", "unlearned_npo"):
        one, two = (json.loads((run / "eval_results" / model / "eval_log_aggregated.json").read_text())
                    for run in (single, multi))
        for task in ("eval_forget_log.json", "eval_retain_log.json"):
            # Likelihood metrics only: greedy text of a 3-step model can flip on near-ties between
            # collective implementations, which says nothing about correctness.
            for key in ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "truth_ratio"):
                np.testing.assert_allclose(np.array(list(two[task][key].values()), dtype=float),
                                           np.array(list(one[task][key].values()), dtype=float),
                                           rtol=1e-4, atol=1e-6, err_msg=f"{model} {task} {key}")
            assert len(two[task]["generated_text"]) == len(one[task]["generated_text"]) > 0
            np.testing.assert_allclose(two[task]["mink++"], one[task]["mink++"], rtol=1e-3, atol=1e-6)
    for model, steps in (("finetuned", 3), ("retain_model", 3), ("unlearned_npo", 4)):
        losses = [json.loads(line)["loss"] for line in (single / "train" / model / "metrics.jsonl").open()]
        losses_mp = [json.loads(line)["loss"] for line in (multi / "train" / model / "metrics.jsonl").open()]
        assert len(losses) == steps
        np.testing.assert_allclose(losses_mp, losses, rtol=1e-5)


def test_mllmu_pipeline(tmp_path: Path) -> None:
    """MLLMU-Bench format end to end: forget_10 / retain_90 training streams and eval.py's four result sets."""
    workdir = tmp_path / "mllmu"
    _main(workdir, "--config.benchmark=mllmu", "--config.data.synthetic_identities=8",
          "--config.data.forget_ratio=10", "--config.finetune.num_steps=4", "--config.retain_model.num_steps=4",
          "--config.unlearn.num_steps=2", "--config.eval.max_new_tokens=4", "--config.unlearn.objective=gd",
          "--config.stages=finetune,unlearn,eval,report")
    for name in ("finetuned", "retain_model", "unlearned_gd"):
        res = json.loads((workdir / "eval_results" / name / "final_evaluation_results.json").read_text())
        protocol = res.pop("protocol")  # the default, original: eval.py's prompts and its few-shot draws per call
        assert protocol["name"] == "original" and set(protocol["few_shot_ids"]) == {
            f"{s}/{t}" for s in ("forget", "test", "retain", "celebrity") for t in ("classification",
                                                                                     "fill_in_the_blank")}
        assert set(res) == {"Forget Set Results", "Test Set Results", "Retain Set (shared dataset) Results",
                            "Retain Set (real person) Results"}
        for groups in res.values():
            assert set(groups) >= {"classification", "fill_in_the_blank", "generation"}
    rows = _rows(workdir)
    assert set(rows) == {"finetuned", "retain_model", "unlearned_gd"}
    assert "Forget Set Results / classification / Image-Textual Question Accuracy" in rows["finetuned"]


@pytest.mark.parametrize("text_model,extra", [
    ("llama", ()),
    # LLaVA-Phi-3's template under the corrected protocol: the original's generation prompt splits the decoded row at
    # "<|end|><|assistant|>", which the demo tokenizer (it keeps the newline between them) never writes
    ("phi3", ("--config.model.template=llava-phi", "--config.protocol=corrected"))])
def test_llava_real_image_size(tmp_path: Path, text_model: str, extra: tuple[str, ...]) -> None:
    """LLaVA-1.5's and LLaVA-Phi-3's real image geometry (336 px, patch 14: 576 image tokens) at FIUBench's
    max_length 512 through finetune, unlearn (under its own remat policy, the LLaVA-1.5 presets' LoRA one, with LoRA
    dropout so it keeps the masks) and eval with a narrow model: the sequence buckets follow the image expansion
    (rows of 704 and 640), and the log names each loaded model's attention and remat."""
    workdir = tmp_path / "llava336"
    log = _main(workdir, *extra, f"--config.model.tiny_shape.text_model={text_model}",
          "--config.data.synthetic_identities=10", "--config.data.max_length=512",
          "--config.model.tiny_shape.image_size=336", "--config.model.tiny_shape.patch_size=14",
          "--config.model.tiny_shape.hidden_size=64", "--config.model.tiny_shape.intermediate_size=128",
          "--config.model.tiny_shape.vision_hidden_size=32", "--config.model.tiny_shape.vision_layers=1",
          "--config.finetune.num_steps=2", "--config.retain_model.num_steps=1", "--config.unlearn.num_steps=1",
          "--config.unlearn.objective=gd", "--config.unlearn.remat=dots_attention_inputs_dropout_saveable",
          "--config.unlearn.lora_dropout=0.05",
          "--config.eval.max_new_tokens=2", "--config.eval.batch_size=16", "--config.stages=finetune,unlearn,eval")
    for name in ("finetuned", "retain_model", "unlearned_gd"):
        forget = json.loads((workdir / "eval_results" / name / "eval_log_aggregated.json").read_text())[
            "eval_forget_log.json"]
        assert len(forget["avg_gt_loss"]) > 0 and np.isfinite(list(forget["avg_gt_loss"].values())).all()
        assert len(forget["generated_text"]) == len(forget["avg_gt_loss"])
    # CPU: "auto" attention resolves to XLA's; the demo config keeps remat off, the unlearn stage sets its own.
    assert f"model {workdir / 'models' / 'finetuned'}: llava in float32, attention xla (asked 'auto'), remat 'none'" \
        in log
    assert "unlearned_gd trains with remat 'dots_attention_inputs_dropout_saveable' (config.model.remat 'none')" in log
    # 576 image tokens and the text: rows padded to the bucket above them (LLaVA-1.5's longer template: 704)
    assert f"finetuned: one length {704 if text_model == 'llama' else 640}" in log
