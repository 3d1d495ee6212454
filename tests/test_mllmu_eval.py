"""MLLMU-Bench evaluation: every eval.py set / task / modality, item counts, and the aggregation by hand."""

from __future__ import annotations

import json

import pytest

from configs.demo import get_config
from tests.stand_in_stage import compiles_around_the_first_load, stand_in_config
from vlmu_jax.data.batching import Example, generation_rows
from vlmu_jax.data.records import IMAGE, TEXT, Cloze, MultipleChoice
from vlmu_jax.eval import metrics
from vlmu_jax.eval.tasks import mllmu as task
from vlmu_jax.eval.tasks import mllmu_prompts as P
from vlmu_jax.eval.tasks.fiubench import Runner
from vlmu_jax.pipeline import Workspace, prepare_base_model, prepare_data

RATIO = 10


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    cfg = get_config("ci")
    cfg.unlock()
    cfg.benchmark = "mllmu"
    cfg.protocol = "corrected"  # evaluate_mllmu; protocol original runs in test_pipeline.py::test_mllmu_pipeline
    cfg.data.synthetic_identities = 16
    cfg.data.forget_ratio = RATIO
    cfg.eval.max_new_tokens = 8
    ws = Workspace(cfg, tmp_path_factory.mktemp("ws"))
    prepare_data(ws)
    prepare_base_model(ws)
    return ws


def _runner(ws: Workspace) -> Runner:  # as vlmu_jax.stages._runner
    return Runner(text=ws.eval_text_config, batch_size=ws.config.eval.batch_size, image_fn=ws.eval_image_fn,
                  max_new_tokens=ws.config.eval.max_new_tokens, protocol=ws.protocol, mesh=ws.mesh)


def test_question_texts_as_eval_py() -> None:
    """The question part both protocols ask (protocol corrected wraps it in the model's template)."""
    mc = MultipleChoice("Who?", (("A", "x"), ("B", "y")), "B", TEXT)
    assert P.choice_prompt(mc) == "Who?\nA: x\nB: y\nJust give ONE letter representing the answer directly."
    assert P.cloze_prompt(Cloze("She lives in __.", "Rome")) == (
        "She lives in [Blank].\nPlease **ONLY** provide the correct answer that should replace the [Blank].")
    assert P.generation_prompt("Q?", IMAGE).endswith("one sentence accurately in ENGLISH.")
    assert P.generation_prompt("Q?", TEXT).endswith("in one sentence in ENGLISH.")


def test_evaluate_mllmu(workspace: Workspace) -> None:
    ws = workspace
    bench = ws.bench
    runner = _runner(ws)
    results = task.evaluate_mllmu(ws.load("base"), task.mllmu_inputs(bench, runner, forget_ratio=RATIO), runner)
    assert list(results) == list(task.SET_NAMES.values())
    sets = task.mllmu_sets(bench, forget_ratio=RATIO)
    forget_uids = {i.uid for i in bench.split(f"forget_{RATIO}")}
    assert {p.uid for p in sets["test"]} == forget_uids
    for short, name in task.SET_NAMES.items():
        res = results[name]
        assert set(res["classification"]) == {"Image-Textual Question Accuracy", "Pure Text Question Accuracy"}
        assert set(res["classification_likelihood"]) == set(res["classification"])
        assert set(res["fill_in_the_blank"]) == {"image_textual_accuracy", "pure_text_accuracy"}
        for mod in ("Image_Textual", "Pure_Text"):
            for col in ("ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU"):
                assert 0.0 <= res["generation"][f"Average {col} ({mod})"] <= 1.0
        for group in ("classification", "classification_likelihood", "fill_in_the_blank"):
            for value in res[group].values():
                assert 0.0 <= value <= 100.0  # percent, as eval.py
        people = sets[short]
        preds = res["predictions"]
        assert len(preds["classification"]) == sum(len(p.choices) for p in people) > 0
        assert len(preds["fill_in_the_blank"]) == sum(len(p.cloze) for p in people) > 0
        assert len(preds["generation"]) == sum(len(p.generation) for p in people) > 0
        for mod, modality in (("Image_Textual", IMAGE), ("Pure_Text", TEXT)):
            n = sum(mc.modality == modality for p in people for mc in p.choices)
            assert sum(r["question type"] == mod for r in preds["classification"]) == n > 0

    # prompts longer than the training max_length keep their end (options, instruction, answer tag)
    text = ws.eval_text_config
    tag = ws.tokenizer(text.template.answer_prefix, add_special_tokens=False)["input_ids"]
    examples = [Example(P.choice_prompt(mc), "", p.image if mc.modality == IMAGE else None)
                for people in sets.values() for p in people for mc in p.choices]
    rows = generation_rows(examples, text)
    assert max(len(r.input_ids) for r in rows) > ws.config.data.max_length  # the case exists in this data
    assert all(r.input_ids[-len(tag):].tolist() == tag for r in rows)

    # hand check on the retain set: accuracies from the per-item records
    res = results[task.SET_NAMES["retain"]]
    rows = res["predictions"]["classification"]
    img = [r for r in rows if r["question type"] == "Image_Textual"]
    hits = sum(metrics.choice_letter(r["generated_answer"], r["option_loss"]) == r["correct_answer"]
               for r in img)
    assert res["classification"]["Image-Textual Question Accuracy"] == pytest.approx(100.0 * hits / len(img))
    txt = [r for r in rows if r["question type"] == "Pure_Text"]
    hits = sum(min(r["option_loss"], key=r["option_loss"].get) == r["correct_answer"] for r in txt)
    assert res["classification_likelihood"]["Pure Text Question Accuracy"] == pytest.approx(100.0 * hits / len(txt))
    cloze = [r for r in res["predictions"]["fill_in_the_blank"] if r["question type"] == "Pure_Text"]
    hits = sum(r["ground_truth"].lower() in r["generated_answer"].lower() for r in cloze)
    assert res["fill_in_the_blank"]["pure_text_accuracy"] == pytest.approx(100.0 * hits / len(cloze))
    gen = [r for r in res["predictions"]["generation"] if r["question type"] == "Image_Textual"]
    bleu = sum(metrics.sentence_bleu(r["ground_truth"], r["generated_answer"]) for r in gen) / len(gen)
    assert res["generation"]["Average BLEU (Image_Textual)"] == pytest.approx(bleu)


@pytest.mark.parametrize("protocol,batch_size", [("corrected", 40), ("original", 32)])
def test_eval_stage_compiles_the_first_models_programs_on_its_stand_in(workspace: Workspace, monkeypatch,
                                                                       protocol: str, batch_size: int) -> None:
    """MLLMU-Bench's eval stage, either protocol (eval.py's prompts: `evaluate_eval_py`; one question at a time:
    `evaluate_mllmu`), compiles its first model's programs on a stand-in while it loads: held until those compiles
    are done, the model's own evaluation compiles none of them (as FIUBench's, test_batched_eval.py). Each protocol
    at its own batch size, so each compiles its own programs (the layer copies' slicing, the same model's, compiles
    in the first one)."""
    config = stand_in_config(workspace.config, str(workspace.base_model), batch_size)
    config.protocol = protocol
    ws = Workspace(config, workspace.workdir)
    ahead, after = compiles_around_the_first_load(ws, monkeypatch)
    assert {"jit(prefill)", "jit(_continuations_over_cache)", "jit(_decode)"} <= ahead, ahead
    assert not [name for name in after if name in ahead], after
    results = json.loads((ws.workdir / "eval_results" / "standin" / "final_evaluation_results.json").read_text())
    assert results["protocol"]["eval_py_prompts"] == (protocol == "original")
    assert set(task.SET_NAMES.values()) <= set(results)
