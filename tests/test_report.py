"""End to end over the pure layer: fixed per-token log-probs and generations -> every number by hand."""

import csv
import json
import math
import re

import numpy as np
import pytest
from PIL import Image
from rouge_score import rouge_scorer
from scipy import stats

from vlmu_jax.eval import attacks, metrics, result_logs
from vlmu_jax.report import aggregate, plots

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _padded(rows):
    """Answer-token log-prob lists -> ([B, T-1] logps, mask) with two prompt positions in front."""
    width = 2 + max(len(r) for r in rows)
    logps, mask = np.full((len(rows), width), -7.0), np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        logps[i, 2:2 + len(r)], mask[i, 2:2 + len(r)] = r, True
    return logps, mask


def _task(gt, para, pert, gens, refs, keywords=None, mia_scores=None, gpt=None):
    g_sum, g_n = metrics.answer_nll(*_padded(gt))
    p_sum, p_n = metrics.answer_nll(*_padded(para))
    k = len(pert[0])
    flat_sum, flat_n = metrics.answer_nll(*_padded([r for q in pert for r in q]))
    return result_logs.FiuTaskResults(
        g_sum, g_n, p_sum, p_n, flat_sum.reshape(-1, k), flat_n.reshape(-1, k),
        [f"Q{i}" for i in range(len(gt))],
        [metrics.truncate_at_first_period(g) for g in gens], refs, ["human_face"] * len(gt), keywords,
        mia_scores, gpt)


def _avg(tokens):
    return -sum(tokens) / len(tokens)


F_GT = [[-0.5, -1.0], [-2.0, -1.0, -3.0]]
F_PARA = [[-1.0, -1.0, -0.4], [-0.2]]
F_PERT = [[[-2.0, -1.0], [-3.0]], [[-0.1, -0.3], [-1.0, -2.0, -0.6]]]
R_GT = [[-0.1, -0.2], [-0.3]]
R_PARA = [[-0.2], [-0.4, -0.6]]
R_PERT = [[[-2.0], [-1.5, -2.5]], [[-1.0, -1.0], [-3.0]]]
REF_PARA = [[-1.2], [-0.9, -1.1]]
REF_PERT = [[[-1.0], [-1.4]], [[-0.5], [-2.0]]]
F_GENS, F_REFS = ["He is a pilot. Yes", "She lives in Rome"], ["He works as a pilot.", "She lives in Oslo."]
R_GENS, R_REFS = ["It was red.", "Blue sky"], ["The car was red.", "The sky is blue."]
F_MIA = {"loss": [-1.0, -2.0], "zlib": [-0.1, -0.2], "mink": [0.4, 0.2], "mink++": [0.3, 0.5]}
R_MIA = {"loss": [-0.5, -3.0], "zlib": [-0.05, -0.3], "mink": [0.3, 0.1], "mink++": [0.6, 0.1]}


def _ratio(para, pert):
    return [math.exp(sum(_avg(p) for p in perts) / len(perts) - _avg(pa)) for pa, perts in zip(para, pert,
                                                                                                 strict=True)]


@pytest.fixture
def aggregated():
    forget = _task(F_GT, F_PARA, F_PERT, F_GENS, F_REFS, [["pilot"], ["Oslo", "Rome"]], F_MIA, None)
    retain = _task(R_GT, R_PARA, R_PERT, R_GENS, R_REFS, [["red", "car"], ["blue"]], R_MIA, [0.8, 0.4])
    return {aggregate.FORGET: result_logs.fiubench_eval_log(forget, forget=True),
            aggregate.RETAIN: result_logs.fiubench_eval_log(retain, forget=False)}


@pytest.fixture
def ape():
    qa = {"paraphrased_question": ["a?", "b?"], "answer": "x", "keywords": ["pilot"]}
    return attacks.score_ape(attacks.ape_variants([qa]), ["A pilot.", "No idea."])


def _reference():
    ref = _task(R_GT, REF_PARA, REF_PERT, R_GENS, R_REFS)
    return {aggregate.FORGET: result_logs.fiubench_eval_log(ref, forget=True)}


def test_eval_log_keys_and_values(aggregated):
    log = aggregated[aggregate.FORGET]
    assert log["avg_gt_loss"]["1"] == pytest.approx(2.0) and log["gt_loss"]["1"] == pytest.approx(6.0)
    assert log["num_token_gt"]["1"] == 3 and log["num_token_perturb"]["1"] == [2, 3]
    assert log["average_perturb_loss"]["0"] == pytest.approx([1.5, 3.0])
    assert log["truth_ratio"]["0"] == pytest.approx(_ratio(F_PARA, F_PERT)[0])
    assert log["generated_text"]["0"] == ["Q0", "He is a pilot.", "He works as a pilot.", "human_face"]
    p0 = math.exp(-0.75) / (math.exp(-0.75) + math.exp(-1.5) + math.exp(-3.0))
    assert log["normalized_gt_loss"]["0"] == pytest.approx(-math.log(p0))
    assert "normalized_gt_loss" not in aggregated[aggregate.RETAIN]
    assert json.loads(json.dumps(log)) == log  # already in its JSON form


def test_every_summary_number_by_hand(aggregated, ape):
    row = aggregate.fiubench_summary(aggregated, _reference(), ape_log=ape, method="ga")
    f_gt, r_gt = [_avg(t) for t in F_GT], [_avg(t) for t in R_GT]
    f_r, r_r, ref_r = _ratio(F_PARA, F_PERT), _ratio(R_PARA, R_PERT), _ratio(REF_PARA, REF_PERT)
    r_pert = [[_avg(p) for p in q] for q in R_PERT]
    expected = {
        "Prob. Forget": sum(math.exp(-x) for x in f_gt) / 2,
        "Truth Ratio Forget": sum(min(r, 1 / r) for r in f_r) / 2,
        "ROUGE Forget": (SCORER.score(F_REFS[0], "He is a pilot")["rougeL"].recall
                         + SCORER.score(F_REFS[1], "She lives in Rome")["rougeL"].recall) / 2,
        "Prob. Retain": sum(math.exp(-g) / (math.exp(-g) + sum(math.exp(-p) for p in ps))
                            for g, ps in zip(r_gt, r_pert, strict=True)) / 2,
        "Truth Ratio Retain": sum(max(0.0, 1 - 1 / r) for r in r_r) / 2,
        "ROUGE Retain": (SCORER.score(R_REFS[0], "It was red")["rougeL"].recall
                         + SCORER.score(R_REFS[1], "Blue sky")["rougeL"].recall) / 2,
        "GPT Retain": 0.6,
        "EM Retain": (0.5 + 1.0) / 2,
        "Mink": 0.3, "Mink++": 0.4, "Exact Match": (1.0 + 0.5) / 2, "APE": 0.5,
        "Method": "ga", "Submitted By": "",
    }
    retain_vals = [expected[k] for k in ("Prob. Retain", "Truth Ratio Retain", "ROUGE Retain", "GPT Retain",
                                         "EM Retain")]
    expected["Model Utility"] = len(retain_vals) / sum(1 / v for v in retain_vals)
    ks = stats.ks_2samp(f_r, ref_r)
    expected.update({"Forget Quality": ks.pvalue, "KS Test PVal Forget": ks.pvalue,
                     "KS Test Forget": ks.statistic})
    # AUC by pair counting: forget member wins / ties over retain scores
    for key, col in (("loss", "Loss"), ("zlib", "Zlib"), ("mink", "Mink"), ("mink++", "Mink++")):
        wins = sum((a > b) + 0.5 * (a == b) for a in F_MIA[key] for b in R_MIA[key])
        expected[f"MIA AUC {col}"] = wins / 4
    assert set(row) == set(expected)
    for key, value in expected.items():
        assert row[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key


def test_original_log_layout():
    """evaluate_util logs truth_ratio = exp(paraphrased - mean perturbed loss) and always writes gpt."""
    forget = _task(F_GT, F_PARA, F_PERT, F_GENS, F_REFS, [["pilot"], ["Oslo", "Rome"]])
    log = result_logs.fiubench_eval_log(forget, forget=True, original_layout=True)
    # question 0: paraphrased loss (1 + 1 + 0.4) / 3 = 0.8, perturbed (1.5 + 3.0) / 2 = 2.25
    assert log["truth_ratio"]["0"] == pytest.approx(math.exp(0.8 - 2.25))
    assert result_logs.fiubench_eval_log(forget, forget=True)["truth_ratio"]["0"] == pytest.approx(math.exp(2.25 - 0.8))
    assert log["gpt"] == [] and "gpt" not in result_logs.fiubench_eval_log(forget, forget=True)


def test_original_empty_lists_force_zero_utility(aggregated):
    aggregated[aggregate.RETAIN]["gpt"] = []
    assert "GPT Retain" not in aggregate.fiubench_summary(aggregated)
    assert aggregate.fiubench_summary(aggregated, empty_lists_as_zero=True)["Model Utility"] == 0.0


def test_ape_log_beside_the_aggregated_one_and_csv(aggregated, ape, tmp_path):
    aggregate.write_json(ape, tmp_path / "runs" / "ga" / aggregate.APE)
    (tmp_path / "runs" / "kl").mkdir()
    rows = [aggregate.fiubench_summary(aggregated, _reference(), ape_log=aggregate.read_ape_log(tmp_path / "runs" / m),
                                       method=m) for m in ("ga", "kl")]
    assert [r["Method"] for r in rows] == ["ga", "kl"]
    assert rows[0]["APE"] == 0.5 and "APE" not in rows[1]
    assert rows[0]["Forget Quality"] == aggregate.fiubench_summary(aggregated, _reference())["Forget Quality"]
    aggregate.write_csv(rows + [{"Method": "extra", "New": 1}], tmp_path / "all.csv")
    with open(tmp_path / "all.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["Method"] == "ga" and table[2]["New"] == "1" and table[2]["Model Utility"] == ""
    assert float(table[1]["Model Utility"]) == pytest.approx(rows[1]["Model Utility"])


def test_mllmu_summaries():
    mods = ["Image_Textual", "Image_Textual", "Pure_Text"]
    acc = result_logs.mllmu_accuracy([True, False, True], mods)
    assert acc == {"image_textual_accuracy": 50.0, "pure_text_accuracy": 100.0}
    gen = result_logs.mllmu_generation(["a b c", "x", "the cat"], ["a b d", "x y", "the cat sat"], mods)
    assert gen["Average ROUGE-L (Pure_Text)"] == pytest.approx(
        SCORER.score("the cat sat", "the cat")["rougeL"].fmeasure)
    assert gen["Average BLEU (Image_Textual)"] == pytest.approx(
        (metrics.sentence_bleu("a b d", "a b c") + metrics.sentence_bleu("x y", "x")) / 2)


def test_plots_are_pngs_of_the_requested_size(tmp_path):
    rows = [{"Method": "ga", "Model Utility": 0.5, "Forget Quality": 1e-3, "ROUGE Forget": 0.2},
            {"Method": "npo", "Model Utility": 0.6, "Forget Quality": 0.2, "ROUGE Forget": 0.4}]
    log = tmp_path / "train.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(5)))
    outs = [plots.plot_fq_vs_mu(rows, tmp_path / "fq.png", size=(6, 4.5), dpi=50),
            plots.plot_metric_bars(rows, ["ROUGE Forget", "Model Utility"], tmp_path / "bars.png",
                                   size=(8, 4), dpi=50),
            plots.plot_loss_curves({"ga": log}, tmp_path / "loss.png", size=(6, 4), dpi=50)]
    for path, dims in zip(outs, [(300, 225), (400, 200), (300, 200)], strict=True):
        assert path.stat().st_size > 0
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == dims


def test_plots_titled_labelled_nothing_clipped_reference_marked(tmp_path, monkeypatch):
    """Everything drawn (titles, axis labels, tick labels, legends) lies inside the saved image."""
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: (figures.append(fig), save(fig, path, dpi))[1])
    rows = [{"Method": "retain_model", "Model Utility": 0.5, "Forget Quality": 1.0, "ROUGE Forget": 0.2},
            {"Method": "npo", "Model Utility": 0.45, "Forget Quality": 3e-7, "ROUGE Forget": 0.4}]
    log = tmp_path / "train.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(5)))
    plots.plot_fq_vs_mu(rows, tmp_path / "fq.png", reference="retain_model")
    long_names = ["Retain Set (shared dataset) Results / classification / Image-Textual Question Accuracy",
                  "Forget Set Results / classification / Pure Text Question Accuracy"]
    plots.plot_metric_bars([{"Method": "a very long model name", **dict.fromkeys(long_names, 50.0)}], long_names,
                           tmp_path / "bars.png", horizontal=True)
    plots.plot_loss_curves({"unlearned_npo": log}, tmp_path / "loss.png")
    for fig in figures:
        fig.canvas.draw()
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and (ax.get_ylabel() or fig is figures[1])  # bars: names on y
        drawn, (width, height) = fig.get_tightbbox(), fig.get_size_inches()  # all drawn artists, in inches
        assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01
    fq = figures[0].axes[0]
    assert fq.get_yscale() == "log"
    assert [t.get_text() for t in fq.get_legend().get_texts()] == ["retain_model (reference)", "npo"]


def test_results_table_and_self_contained_index():
    from vlmu_jax.report import html, table

    rows = [{"Model": "finetuned", "Forget Quality": 1.234567e-5, "Model Utility": 0.5, "Method": "finetuned"},
            {"Model": "unlearned_npo", "Forget Quality": 0.25, "Prob. Forget": 0.1, "Method": "npo"}]
    headline = table.headline_columns(rows, "fiubench")
    assert headline == ["Forget Quality", "Model Utility", "Prob. Forget"]
    assert table.format_table(rows, headline).splitlines() == [
        "                finetuned  unlearned_npo",
        "Forget Quality  1.235e-05           0.25",
        "Model Utility         0.5              -",
        "Prob. Forget            -            0.1"]
    png = b"\x89PNG\r\n\x1a\n<fake>"
    page = html.render_index(title="run <1>", rows=rows, headline=headline, plots={"tradeoff.png": png},
                             sources={"unlearned_npo": "/ckpt/npo"}, config={"benchmark": "fiubench", "protocol":
                                                                             "corrected", "data": {}},
                             environment={"git_commit": "abc123"})
    assert "run &lt;1&gt;" in page and "/ckpt/npo" in page and "corrected" in page and "abc123" in page
    assert "data:image/png;base64,iVBORw0KGgo8ZmFrZT4=" in page and "1.235e-05" in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing outside the file
