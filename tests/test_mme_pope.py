"""MME and POPE readers on small files in the release formats, and their scorers by hand."""

import json

import pytest
from PIL import Image

from vlmu_jax.eval.tasks import mme, pope


def _mme_tree(root):
    nested = root / "artwork"
    (nested / "images").mkdir(parents=True)
    (nested / "questions_answers_YN").mkdir()
    for name, qa in {"a1": [("Is it a painting?", "Yes"), ("Is it a photo?", "No")],
                     "a2": [("Is it blue?", "Yes"), ("Is it red?", "No")]}.items():
        Image.new("RGB", (4, 4)).save(nested / "images" / f"{name}.jpg")
        (nested / "questions_answers_YN" / f"{name}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa))
    flat = root / "code_reasoning"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "c1.png")
    (flat / "c1.txt").write_text("Does it print 3?\tyes\nDoes it print 4?\tno\n")


def test_mme_read_and_score(tmp_path):
    _mme_tree(tmp_path)
    items = mme.read_mme(tmp_path)
    assert [(i.category, i.image_name, i.answer) for i in items] == [
        ("artwork", "a1.jpg", "Yes"), ("artwork", "a1.jpg", "No"), ("artwork", "a2.jpg", "Yes"),
        ("artwork", "a2.jpg", "No"), ("code_reasoning", "c1.png", "yes"), ("code_reasoning", "c1.png", "no")]
    preds = ["Yes, it is.", "no", "Maybe", "No.", "yes", "No"]
    got = mme.score_mme(items, preds)
    art = got["categories"]["artwork"]
    # parsed: yes, no, other, no -> 3/4 right; image a1 fully right, a2 not -> acc+ 1/2
    assert art["acc"] == pytest.approx(0.75) and art["acc_plus"] == pytest.approx(0.5)
    assert art["score"] == pytest.approx(125.0) and art["other_num"] == 1
    assert (art["TP"], art["FN"], art["FP"], art["TN"]) == (1, 0, 0, 2)
    assert got["Perception"] == pytest.approx(125.0) and got["Cognition"] == pytest.approx(200.0)
    assert mme.parse_yes_no("Maybe yes") == "other"
    assert mme.parse_yes_no("Maybe yes", style="contains_yes") == "yes"
    mme.write_eval_tool_results(items, preds, tmp_path / "out")
    lines = (tmp_path / "out" / "artwork.txt").read_text().splitlines()
    assert lines[0] == "a1.jpg\tIs it a painting?\tYes\tYes, it is."


def test_pope_read_and_score(tmp_path):
    path = tmp_path / "coco_pope_adversarial.json"
    labels = ["yes", "yes", "no", "no", "yes"]
    rows = [{"question_id": i + 1, "image": f"COCO_{i}.jpg", "text": f"Is there a dog in image {i}?",
             "label": lab} for i, lab in enumerate(labels)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = pope.read_pope(path)
    assert items[0].setting == "adversarial" and items[2].label == "no" and items[4].question_id == 5
    replies = ["Yes, there is a dog.", "No.", "Yes", "no", "There is a dog."]
    got = pope.score_pope([i.label for i in items], replies)
    # fiubench parse: yes, no, yes, no, other -> right: 1, 0, 0, 1, 0
    assert got["accuracy"] == pytest.approx(2 / 5)
    assert got["precision"] == pytest.approx(1 / 2) and got["recall"] == pytest.approx(1 / 3)
    assert got["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert got["yes_ratio"] == pytest.approx(2 / 5) and got["other_num"] == 1
    pope_style = pope.score_pope([i.label for i in items], replies, style="pope")
    # pope parse: yes, no, yes, no, yes -> right: 1, 0, 0, 1, 1
    assert pope_style["accuracy"] == pytest.approx(3 / 5) and pope_style["yes_ratio"] == pytest.approx(3 / 5)
    assert pope.parse_pope_answer("I do not see one, sorry.", style="pope") == "no"
