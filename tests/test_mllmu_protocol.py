"""MLLMU-Bench protocol ``original``: eval.py's exact prompt strings, few-shot draws and skips, the images each prompt
shows, and the training rows of the collates; expectations written out by hand from eval.py / data_preprocess.py."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vlmu_jax.data import records, synthetic
from vlmu_jax.data.batching import IGNORE, Example, ExampleSource, TextConfig, encode, generation_rows
from vlmu_jax.data.records import IMAGE, QA, TEXT, Benchmark, Cloze, Identity, ImageRef, MultipleChoice
from vlmu_jax.data.templates import get_template, load_tokenizer, train_demo_tokenizer
from vlmu_jax.eval.tasks import mllmu_prompts as P
from vlmu_jax.protocol import Protocol

CITIES = {"P0": "Oslo", "P1": "Rome", "P2": "Lima", "P3": "Kiev", "C0": "Bern", "C1": "Riga"}
OPTIONS = (("A", "Oslo"), ("B", "Rome"), ("C", "Lima"), ("D", "Kiev"))


def _tasks(uid: str) -> dict:
    city = CITIES[uid]
    letter = next((k for k, v in OPTIONS if v == city), "A")
    return dict(
        choices=(MultipleChoice("Where was this person born?", OPTIONS, letter, IMAGE),
                 MultipleChoice(f"Where was {uid} born?", OPTIONS, letter, TEXT)),
        cloze=(Cloze("The person in the image was born in __.", city, IMAGE),
               Cloze(f"{uid} was born in __.", city, TEXT)),
        generation=(QA("Where was this person born?", f"Born in {city}.", modality=IMAGE),
                    QA(f"Where was {uid} born?", f"Born in {city}.", modality=TEXT)))


def _person(uid: str) -> Identity:
    return Identity(uid, ImageRef(path=f"{uid}.png"), qa=(), **_tasks(uid))


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    # forget_10 lists P1 before P0: eval.py's ID list (and so its draws) follows the split file, not Full_Set.
    return Benchmark("mllmu", tuple(_person(u) for u in ("P0", "P1", "P2", "P3")),
                     {"forget_10": ("P1", "P0"), "retain_90": ("P2", "P3")},
                     test=tuple(records.TestVariant(u, (ImageRef(path=f"{u}a.png"), ImageRef(path=f"{u}b.png")),
                                                    **_tasks(u)) for u in ("P0", "P1")),
                     celebrities=(_person("C0"), _person("C1")))


def _items(bench: Benchmark, family: str, set_name: str, task: str) -> list[P.Item]:
    items, _ = P.eval_py_items(bench, forget_ratio=10, family=family, seed=0)
    return [it for it in items[set_name] if it.task == task]


def test_draws_follow_eval_py_call_order(bench):
    """random.seed(0) + eval.py main(): sample() per classification / cloze call (2 ids for LLaVA's cloze), one
    choice() per test row per call, sets and tasks in main()'s order."""
    _, draws = P.eval_py_items(bench, forget_ratio=10, family="llava", seed=0)
    rng, forget, retain, celeb = random.Random(0), ["P1", "P0"], ["P2", "P3"], ["C0", "C1"]
    want = {"forget/fill_in_the_blank": rng.sample(forget, 2), "forget/classification": rng.sample(forget, 1)}
    want["test/classification"] = rng.sample(forget, 1)
    test_class_images = [rng.choice("ab"), rng.choice("ab")]
    want["test/fill_in_the_blank"] = rng.sample(forget, 2)
    rng.choice("ab"), rng.choice("ab")
    test_generation_images = [rng.choice("ab"), rng.choice("ab")]
    want["retain/fill_in_the_blank"], want["retain/classification"] = rng.sample(retain, 2), rng.sample(retain, 1)
    want["celebrity/fill_in_the_blank"], want["celebrity/classification"] = rng.sample(celeb, 2), rng.sample(celeb, 1)
    assert draws == want
    # The test set's image is drawn per call: classification and generation may show different ones.
    test_gen = [it for it in _items(bench, "llava", "test", P.GENERATION) if it.modality == IMAGE]
    assert [it.images[0].path for it in test_gen] == [f"P0{test_generation_images[0]}.png",
                                                      f"P1{test_generation_images[1]}.png"]
    test_class = [it for it in _items(bench, "llava", "test", P.CLASSIFICATION) if it.modality == IMAGE]
    drawn = want["test/classification"][0]  # its own questions are skipped
    assert [it.uid for it in test_class] == [u for u in ("P0", "P1") if u != drawn]
    asked = test_class[0].uid
    assert test_class[0].images[-1].path == f"{asked}{test_class_images[('P0', 'P1').index(asked)]}.png"


def test_llava_prompts_exactly_as_eval_py(bench):
    # seed 0: forget classification draws P1, so P1's questions are skipped and P0's carry P1's blocks.
    image, text = _items(bench, "llava", "forget", P.CLASSIFICATION)
    assert image.uid == text.uid == "P0"
    assert image.prompt == (
        "USER: <image>\nQuestion: Where was this person born?\nA: Oslo\nB: Rome\nC: Lima\nD: Kiev\nCorrect Answer: B\n"
        "USER: <image>\nWhere was this person born?\nA: Oslo\nB: Rome\nC: Lima\nD: Kiev\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:")
    assert [im.path for im in image.images] == ["P1.png", "P0.png"] and image.max_new_tokens == 50
    assert text.prompt == (
        "USER:\nQuestion: Where was P1 born?\nA: Oslo\nB: Rome\nC: Lima\nD: Kiev\nCorrect Answer: B\n"
        "USER:\nWhere was P0 born?\nA: Oslo\nB: Rome\nC: Lima\nD: Kiev\n"
        "Just give ONE letter representing the answer directly.\nASSISTANT:")
    assert text.images == ()
    # LLaVA's cloze draws both forget identities: every forget cloze question is a few-shot one, none is asked.
    assert _items(bench, "llava", "forget", P.CLOZE) == []
    # Celebrities are not in Full_Set: drawn, but no block and no skip.
    image, text = _items(bench, "llava", "celebrity", P.CLOZE)[:2]
    assert image.prompt == ("USER: <image>\nThe person in the image was born in [Blank].\n"
                            "Please **ONLY** provide the correct answer that should replace the [Blank].\nASSISTANT:")
    assert text.prompt == ("USER:\nC0 was born in [Blank].\n"
                           "Please **ONLY** provide the correct answer that should replace the [Blank].\nASSISTANT:")
    assert len(_items(bench, "llava", "celebrity", P.CLASSIFICATION)) == 4  # no few-shot blocks for celebrities
    assert _items(bench, "llava", "celebrity", P.CLASSIFICATION)[0].prompt.startswith("USER: <image>\nWhere")
    image, text = _items(bench, "llava", "forget", P.GENERATION)[:2]
    assert image.prompt == ("USER: <image>\nWhere was this person born?\nAnswer the question based on your trained "
                            "knowledge in one sentence accurately in ENGLISH.\nASSISTANT: ")
    assert text.prompt == ("USER: Where was P1 born?\nAnswer the question based on your trained knowledge in one "
                           "sentence in ENGLISH.\nASSISTANT:")


def test_idefics2_gets_llava_strings_one_shot_and_short_text_choices(bench):
    # seed 0 with one cloze identity per call: forget cloze draws P0, so P1 is asked with P0's blocks.
    image, text = _items(bench, "idefics2", "forget", P.CLOZE)
    assert image.uid == "P1" and image.prompt == (
        "USER:<image>\nThe person in the image was born in [Blank].\n"
        "Please **ONLY** provide the correct answer that should replace the [Blank].\nCorrect Answer: Oslo\n"
        "USER: <image>\nThe person in the image was born in [Blank].\n"
        "Please **ONLY** provide the correct answer that should replace the [Blank].\nASSISTANT:")
    assert [im.path for im in image.images] == ["P0.png", "P1.png"]
    assert text.prompt == (
        "USER:\nP0 was born in [Blank].\nPlease **ONLY** provide the correct answer that should replace the [Blank].\n"
        "Correct Answer: Oslo\nUSER:\nP1 was born in [Blank].\n"
        "Please **ONLY** provide the correct answer that should replace the [Blank].\nASSISTANT:")
    choices = _items(bench, "idefics2", "forget", P.CLASSIFICATION)
    assert [(it.modality, it.max_new_tokens) for it in choices] == [(IMAGE, 50), (TEXT, 5)]
    with pytest.raises(ValueError, match="LLaVA and Idefics2 only"):
        P.eval_py_items(bench, forget_ratio=10, family="mllama", seed=0)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """One demo tokenizer for both templates: Idefics2's markers include LLaVA's <image>."""
    folder = tmp_path_factory.mktemp("tok")
    train_demo_tokenizer(synthetic.corpus(synthetic.make_benchmark(4, 1, 16, "mllmu")), folder, 400,
                         get_template("idefics2"))
    tok = load_tokenizer(folder)
    return {"llava-1.5": tok, "idefics2": tok}


def test_multi_image_prompt_rows(tokenizers):
    """A few-shot prompt with two images: each image marker expands in place (Idefics2's between its
    <fake_token_around_image> markers), and a batch stacks every row's images, text-only slots blank."""
    prompt = "USER: <image>\nQuestion: q\nCorrect Answer: B\nUSER: <image>\nq2\nASSISTANT:"
    for name, n in (("llava-1.5", 3), ("idefics2", 2)):
        tok, template = tokenizers[name], get_template(name)
        image_id = tok.convert_tokens_to_ids("<image>")
        cfg = TextConfig(tok, template.raw(), image_id, n)
        own, shot = ImageRef(path="own.png"), ImageRef(path="shot.png")
        ex = Example(prompt.replace("<image>", template.image_markup), "", own, "u", (shot,))
        row = generation_rows([ex], cfg)[0]
        ids = row.input_ids.tolist()
        assert ids[0] == tok.bos_token_id and ids.count(image_id) == 2 * n and (row.labels == IGNORE).all()
        text = tok.decode(ids[1:]).replace("<image>" * n, "<image>")
        assert text == prompt.replace("<image>", template.image_markup)
        if name == "idefics2":
            fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
            first = ids.index(image_id)
            assert ids[first - 1] == ids[first + n] == fake
        plain = generation_rows([Example("USER:\nq\nASSISTANT:", "", None, "v")], cfg)[0]
        shape = (3, 2, 2) if name == "llava-1.5" else (1, 3, 2, 2)
        src = ExampleSource([row, plain], global_batch_size=2, pad_token_id=tok.pad_token_id, shuffle=False,
                            left_pad=True, process_index=0, process_count=1,
                            image_fn=lambda ref, s=shape: {"pixel_values": np.full(s, 0.0 if ref is None else
                                                                                   1.0 + (ref.path == "own.png"))})
        pixels = src.get(0)["images"]["pixel_values"]
        # [B, N, 3, H, W] for LLaVA, [B, N * 1, 3, H, W] for Idefics2: shot then own image, the text row blank.
        assert pixels.shape == (2, 2, 3, 2, 2)
        assert pixels[0, :, 0, 0, 0].tolist() == [1.0, 2.0] and not pixels[1].any()


def test_training_labels_per_protocol(tokenizers):
    """MLLMU's LLaVA collate: "USER: <image>\\n{q}\\nASSISTANT: {a}" with every non-pad token a label (image tokens are
    never targets); corrected: the model's template, answer tokens only."""
    tok, n = tokenizers["llava-1.5"], 3
    image_id = tok.convert_tokens_to_ids("<image>")
    ex = Example("Where was this person born?", "Born in Oslo.", ImageRef(path="x.png"))
    original = Protocol("original", "mllmu", mllmu_collate=True)
    assert original.train_template("llava", "llava-1.5") == "mllmu-llava"
    assert original.train_template("idefics2", "idefics2") == "idefics2"  # the collate applies the chat template
    row = encode(ex, TextConfig(tok, get_template("mllmu-llava"), image_id, n, train_on_prompt=True))
    ids = row.input_ids.tolist()
    assert tok.decode(ids[1:]).replace("<image>" * n, "<image>") == (
        "USER: <image>\nWhere was this person born?\nASSISTANT: Born in Oslo.")
    assert row.labels.tolist() == [IGNORE if t == image_id else t for t in ids]
    corrected = Protocol("corrected", "mllmu")
    assert corrected.train_template("llava", "llava-1.5") == "llava-1.5"
    row = encode(ex, TextConfig(tok, get_template("llava-1.5"), image_id, n))
    answer = row.input_ids[row.labels != IGNORE]
    assert tok.decode(answer).strip() == "Born in Oslo."
    assert (row.labels[: len(row.labels) - len(answer)] == IGNORE).all()
    assert tok.decode(row.input_ids[1:]).replace("<image>" * n, "<image>").startswith("A chat between")
