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


def _pope_file(folder, labels, setting="adversarial", images=False):
    """A coco_pope_<setting>.json in the release's JSON-lines format (and its images when asked)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"coco_pope_{setting}.json"
    rows = [{"question_id": i + 1, "image": f"COCO_{i}.jpg", "text": f"Is there a dog in image {i}?",
             "label": lab} for i, lab in enumerate(labels)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if images:
        for r in rows:
            Image.new("RGB", (8, 8), (40 * r["question_id"] % 255, 0, 0)).save(folder / r["image"])
    return path


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
    labels = ["yes", "yes", "no", "no", "yes"]
    path = _pope_file(tmp_path, labels)
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


def test_checked_readers_name_what_is_wrong(tmp_path):
    from vlmu_jax.eval.tasks import utility

    _mme_tree(tmp_path / "mme")
    assert len(utility.read_mme_checked(tmp_path / "mme")) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no questions"):
        utility.read_mme_checked(tmp_path / "empty")
    (tmp_path / "mme" / "code_reasoning" / "c1.txt").write_text("Does it print 3? yes\n")  # no TAB
    with pytest.raises(ValueError, match="is not yes/no"):
        utility.read_mme_checked(tmp_path / "mme")

    path = _pope_file(tmp_path / "pope", ["yes", "no"], images=True)
    _pope_file(tmp_path / "pope", ["no"], setting="random", images=True)
    probes = utility.read_pope_checked(tmp_path / "pope")  # a folder: every coco_pope_*.json in it
    assert [(p.setting, p.label) for p, _ in probes] == [("adversarial", "yes"), ("adversarial", "no"),
                                                         ("random", "no")]
    assert probes[0][1] == str(tmp_path / "pope" / "COCO_0.jpg")
    with pytest.raises(FileNotFoundError, match="pope_image_root"):
        utility.read_pope_checked(path, tmp_path / "empty")
    path.write_text('{"question_id": 1, "image": "COCO_0.jpg", "text": "Is there a dog?"}\n')  # no label
    with pytest.raises(ValueError, match="question_id, image, text and label"):
        utility.read_pope_checked(path)
