"""The main job end to end on the embedded demo (reduced `ci` variant), resume/skip, and multi-process.

These run `python -m vlmu_jax.main` as a user would and assert on the files it writes and on the
direction of the unlearning effects, never on timings. The runs that do not read the demo's workdir are in
test_pipeline_runs.py (a file of their own, so parallel workers take them beside this one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _main(workdir: Path, *overrides: str, env: dict | None = None) -> str:
    """Runs the CLI and returns its log (stderr)."""
    cmd = [sys.executable, "-m", "vlmu_jax.main", "--config", "configs/demo.py:ci", "--workdir", str(workdir),
           *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _rows(workdir: Path) -> dict[str, dict]:
    return {r["Model"]: r for r in json.loads((workdir / "report" / "results.json").read_text())["rows"]}


def _first_picture_inputs(workdir: Path, overrides: dict | None = None) -> dict:
    """The run's base model's image inputs (its processor, with `overrides`) for the run's first data picture."""
    from vlmu_jax.data.images import load_image_processor

    picture = Image.open(sorted((workdir / "data").rglob("*.png"))[0])
    return load_image_processor(workdir / "models" / "base", overrides)(picture)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo's workdir and its log; its compiled programs go to a cache of this test session."""
    workdir = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.getbasetemp() / "xla_cache"
    return workdir, _main(workdir, f"--config.compilation_cache_dir={cache}")


@pytest.fixture(scope="module")
def demo(demo_run: tuple[Path, str]) -> Path:
    return demo_run[0]


def test_demo_writes_everything(demo: Path) -> None:
    config = json.loads((demo / "config.json").read_text())
    assert config["unlearn"]["objective"] == "gd,ga"
    assert config["compilation_cache_dir"].endswith("xla_cache")
    assert config["data"]["single_length_max_padding"] == 0.25 and config["model"]["keep_in_memory"] == 2
    env = json.loads((demo / "environment.json").read_text())
    assert env["packages"]["jax"] and env["devices"]
    # XLA's GPU pool as config.device_memory_fraction set it, or as this environment already did
    assert env["xla_python_client_mem_fraction"] == os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    # Each eval folder as FIUBench's aggregate_eval_stat.py reads it: the aggregated file holds exactly the forget
    # and retain logs (it reads every entry as one of them), each with the keys get_model_utility and
    # get_forget_quality index (gpt: [] when no judge ran, as evaluate_util writes it); APE has its own file.
    read = {"avg_gt_loss", "average_perturb_loss", "avg_paraphrased_loss", "rougeL_recall", "gpt", "exact_match"}
    for name in ("finetuned", "retain_model", "unlearned_gd", "unlearned_ga"):
        folder = demo / "eval_results" / name
        logs = json.loads((folder / "eval_log_aggregated.json").read_text())
        assert set(logs) == {"eval_forget_log.json", "eval_retain_log.json"}
        for log in logs.values():
            assert read <= set(log) and log["gpt"] == [] and log["protocol"] == "original"
        forget = logs["eval_forget_log.json"]
        n = len(forget["avg_gt_loss"])
        assert n > 0 and len(forget["mink++"]) == n and len(forget["average_perturb_loss"]["0"]) == 5
        assert len(forget["mink"]) == len(forget["exact_match"]) == n
        assert json.loads((folder / "eval_forget_ape_log.json").read_text())["exact_match"]
    for png in ("tradeoff.png", "metrics.png", "loss_curves.png"):
        with Image.open(demo / "report" / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    header = (demo / "report" / "results.csv").read_text().splitlines()[0].split(",")
    for column in ("Prob. Forget", "Truth Ratio Retain", "ROUGE Retain", "Model Utility", "Forget Quality",
                   "KS Test Forget", "Mink++", "Exact Match", "MIA AUC Mink++", "APE", "Protocol"):
        assert column in header
    for name in ("unlearned_gd", "unlearned_ga"):
        exported = demo / "export" / name
        assert (exported / "config.json").exists() and (exported / "tokenizer.json").exists()
        assert list(exported.glob("*.safetensors"))


def test_models_from_memory_score_like_their_folders(demo_run: tuple[Path, str]) -> None:
    """Unlearning started from the finetuned model in memory and eval took it and unlearned_ga from memory (the
    two models keep_in_memory=2 still holds then); scoring their folders in a fresh process, over per-layer
    copies of the decoder weights (eval.layer_copies=always, the GPU default, here with the vision tower run in
    every batch) or with no programs compiled ahead and the next model loaded during an evaluation, gives the same
    logs.
    Training streams were padded to one length each, and the log says what that cost."""
    demo, log = demo_run
    assert f"compilation cache: {json.loads((demo / 'config.json').read_text())['compilation_cache_dir']}" in log
    assert "finetuned: every batch padded to" in log or "finetuned: one length" in log
    assert "eval finetuned: each image's features computed once" in log  # eval.image_embeddings_mb
    # the demo's stages train the projector, as FIUBench's do: their batches carry the vision tower's states
    for name in ("finetuned", "retain_model", "unlearned_gd", "unlearned_ga"):
        assert f"{name}: each image's vision-tower states made once for the stage" in log, name
    from_memory = [line for line in log.splitlines() if line.endswith(", from memory")]
    for name in ("finetuned", "unlearned_ga"):
        assert any(f"model {demo / 'models' / name}: " in line for line in from_memory), name
    # and with nothing compiled ahead (eval.compile_ahead, on in the demo run), the second model loaded while the
    # first is evaluated (eval.load_ahead; auto does on a GPU with room): the same logs
    log = _main(demo, "--config.stages=eval", "--config.eval.compile_ahead=False", "--config.eval.load_ahead=always",
                f"--config.eval.models=disk_unlearned_ga={demo / 'models' / 'unlearned_ga'},"
                f"disk_finetuned={demo / 'models' / 'finetuned'}")
    assert f"eval: loading {demo / 'models' / 'finetuned'} while the model before it is evaluated" in log
    logs = {n: json.loads((demo / "eval_results" / n / "eval_log_aggregated.json").read_text())
            for n in ("finetuned", "unlearned_ga", "disk_finetuned", "disk_unlearned_ga")}
    for name in ("finetuned", "unlearned_ga"):
        assert logs[f"disk_{name}"] == logs[name], name
    # two models over copies in one stage: each is dropped with its copies attached (its stack is not rebuilt);
    # and the vision tower run in every batch (no image features made ahead): the same logs up to rounding
    log = _main(demo, "--config.stages=eval", "--config.eval.layer_copies=always",
                "--config.eval.image_embeddings_mb=0",
                f"--config.eval.models=copies_finetuned={demo / 'models' / 'finetuned'},"
                f"copies_unlearned_ga={demo / 'models' / 'unlearned_ga'}")
    assert "features computed once" not in log
    for name in ("finetuned", "unlearned_ga"):
        assert f"eval copies_{name}: decoder weights copied per layer" in log
        copies = json.loads((demo / "eval_results" / f"copies_{name}" / "eval_log_aggregated.json").read_text())
        _assert_same_log(copies, logs[name])


def _assert_same_log(got, want, where: str = "") -> None:
    """Equal eval logs up to float rounding: the same keys, texts and generations, numbers within 1e-4
    relative (the unrolled program over layer copies sums in another order than the scan)."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _assert_same_log(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same_log(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), where
    else:
        assert got == want, where


@pytest.mark.parametrize("tuned", ["projector_frozen", "projector_trains"])
def test_stage_with_a_frozen_vision_tower_trains_on_images_made_once(demo: Path, tmp_path: Path, tuned: str) -> None:
    """Unlearning with the vision tower frozen: each image is made once before the first step into what the steps
    read past the frozen part (<stage>.image_embeddings_mb), once for all of the stage's methods, and the steps
    leave the vision tower out: its features where the projector is frozen too (MLLMU-Bench's stages), the tower's
    states where the projector trains (FIUBench's). The losses and the unlearned weights are those of the vision
    tower run in every step; both run layer by layer, as LoRA stages do on a GPU."""
    from safetensors.numpy import load_file

    what = {"projector_frozen": "features", "projector_trains": "vision-tower states"}[tuned]
    runs = {}
    for name, extra in (("once", ("--config.unlearn.objective=npo,ga",)),
                        ("every_step", ("--config.unlearn.objective=npo", "--config.unlearn.image_embeddings_mb=0"))):
        workdir = tmp_path / name
        (workdir / "models").mkdir(parents=True)
        (workdir / "data").symlink_to(demo / "data")
        for model in ("base", "finetuned"):
            (workdir / "models" / model).symlink_to(demo / "models" / model)
        runs[name] = workdir, _main(workdir, "--config.stages=unlearn", "--config.unlearn.num_steps=3",
                                    f"--config.unlearn.tune_mm_projector={tuned == 'projector_trains'}",
                                    "--config.unlearn.layerwise=always", *extra)
    assert f"unlearned_npo: each image's {what} made once for the stage" in runs["once"][1]
    # GA, the stage's second method, starts from the same finetuned model and takes NPO's images
    assert f"unlearned_ga: each image's {what} made once for the stage" in runs["once"][1]
    assert runs["once"][1].count(f"{what} of its") == 1
    assert "made once for the stage" not in runs["every_step"][1]
    losses = {name: [json.loads(line)["loss"] for line in (w / "train" / "unlearned_npo" / "metrics.jsonl").open()]
              for name, (w, _) in runs.items()}
    assert len(losses["once"]) == 3 and losses["once"] == pytest.approx(losses["every_step"], rel=1e-5, abs=1e-6)

    def read(folder: Path) -> dict[str, np.ndarray]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    weights = {name: read(w / "models" / "unlearned_npo") for name, (w, _) in runs.items()}
    assert weights["once"].keys() == weights["every_step"].keys()
    start = read(demo / "models" / "finetuned")
    moved = [k for k, v in weights["once"].items() if "multi_modal_projector" in k and not np.array_equal(v, start[k])]
    assert bool(moved) == (tuned == "projector_trains")
    for key, value in weights["once"].items():
        np.testing.assert_allclose(value, weights["every_step"][key], rtol=0, atol=1e-5, err_msg=key)


def test_demo_shows_the_unlearning_tradeoff(demo: Path) -> None:
    rows = _rows(demo)
    vanilla, retain_ref, gd, ga = (rows[n] for n in ("finetuned", "retain_model", "unlearned_gd", "unlearned_ga"))
    # Finetuning taught the identities: the vanilla model beats the retain-only model on forget questions.
    assert vanilla["Prob. Forget"] > retain_ref["Prob. Forget"]
    # Unlearning makes the forget answers far less likely ...
    assert gd["Prob. Forget"] < 0.5 * vanilla["Prob. Forget"]
    assert ga["Prob. Forget"] < 0.5 * vanilla["Prob. Forget"]
    # ... and GradDiff keeps more of the retain set than plain gradient ascent.
    assert gd["Prob. Retain"] > ga["Prob. Retain"]
    assert gd["ROUGE Retain"] > ga["ROUGE Retain"]
    assert retain_ref["Forget Quality"] == pytest.approx(1.0)


def test_rerun_skips_finished_stages(demo: Path) -> None:
    log = demo / "train" / "finetuned" / "metrics.jsonl"
    stamp = log.stat().st_mtime_ns
    before = _rows(demo)
    _main(demo)
    assert log.stat().st_mtime_ns == stamp
    assert _rows(demo) == before


def test_sweep_collects_runs(demo: Path, tmp_path: Path) -> None:
    """`python -m vlmu_jax.sweep --collect_only` over two finished runs: one table, one trade-off plot."""
    for seed in ("0", "1"):
        (tmp_path / f"seed{seed}_forget10").symlink_to(demo)
    result = subprocess.run(
        [sys.executable, "-m", "vlmu_jax.sweep", "--config", "configs/demo.py:ci", "--workdir", str(tmp_path),
         "--seeds", "0,1", "--collect_only"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["Seed"], r["Model"]) for r in rows] == [
        (s, m) for s in "01" for m in ("finetuned", "retain_model", "unlearned_gd", "unlearned_ga")]
    assert rows[2]["Prob. Forget"] == _rows(demo)["unlearned_gd"]["Prob. Forget"]
    with Image.open(tmp_path / "sweep_tradeoff.png") as im:
        assert im.size[0] > 100


def test_every_method_lowers_forget_probability(demo: Path) -> None:
    """The remaining objectives, unlearned from the same finetuned model in the same workdir, in one run (one
    process: the models load and the eval programs compile once for all eleven). The ci variant's lr (1e-2) is
    one at which the retain-regularised new methods (WGA, SatImp, UNDIAL, CE-U, RMU, MMUnlearner) move within
    its 12 steps.

    The report of this run lists only the models of its own objectives; GA's numbers come from its logs.
    """
    from vlmu_jax.presets import NEW_METHODS
    from vlmu_jax.report.aggregate import fiubench_summary

    methods = ("kl", "idk", "npo", "dpo", "simnpo")
    _main(demo, f"--config.unlearn.objective={','.join(methods + NEW_METHODS)}", "--config.stages=unlearn,eval,report")
    rows = _rows(demo)
    assert set(rows) == {"finetuned", "retain_model", *(f"unlearned_{m}" for m in methods + NEW_METHODS)}
    for method in methods:
        assert rows[f"unlearned_{method}"]["Prob. Forget"] < rows["finetuned"]["Prob. Forget"], method
    for method in NEW_METHODS:
        assert rows[f"unlearned_{method}"]["Prob. Forget"] < rows["finetuned"]["Prob. Forget"] - 0.01, method
    ga_logs = json.loads((demo / "eval_results" / "unlearned_ga" / "eval_log_aggregated.json").read_text())
    # KL to the finetuned model keeps the retain set better than plain gradient ascent.
    assert rows["unlearned_kl"]["Prob. Retain"] > fiubench_summary(ga_logs)["Prob. Retain"]
