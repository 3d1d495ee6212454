"""A small fictitious-identity benchmark written in BOTH real on-disk formats (the embedded default data set).

Every identity gets a procedurally drawn face-like image, a handful of attributes, short QA pairs from varied
templates (with paraphrases, 5 wrong-but-plausible perturbed answers and keywords), multiple-choice and cloze
items in image+text and text-only form, and MLLMU-style test variants (paraphrased questions, transformed
images). Output is a pure function of (identities, seed, image size): same seed -> byte-identical files.

    python -m vlmu_jax.data.synthetic --out DIR --format fiubench|mllmu|both --identities 40 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageOps

from vlmu_jax.data import mllmu
from vlmu_jax.data.records import (
    IMAGE,
    QA,
    TEXT,
    Benchmark,
    Cloze,
    Identity,
    ImageRef,
    MultipleChoice,
    TestVariant,
    with_split_membership,
)

FIRST = (
    "Ada Alden Bryn Cato Dara Elio Fern Gus Hana Ivo Juna Kai Lior Mara Nilo Oona Pia Rafe Sela Tove "
    "Uma Vito Wren Yara Zeno Ines Odo Lumi Teo Rhea"
).split()
LAST = (
    "Quill Vance Moss Arden Brook Crane Dale Frost Hale Irwin Keel Lark Marsh North Pike Reed Stone Thorn "
    "Vale Wick Ash Birch Cole Drake Eyre Fenn Gale Holt Rook Sage"
).split()
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Lisbon",
        "Oslo",
        "Quito",
        "Hanoi",
        "Dakar",
        "Perth",
        "Lima",
        "Riga",
        "Kyoto",
        "Tunis",
        "Porto",
        "Cairo",
    ),
    "occupation": (
        "baker",
        "pilot",
        "nurse",
        "sculptor",
        "plumber",
        "chemist",
        "farmer",
        "tailor",
        "judge",
        "miner",
        "florist",
        "librarian",
    ),
    "hobby": (
        "chess",
        "rowing",
        "pottery",
        "birding",
        "fencing",
        "knitting",
        "surfing",
        "juggling",
        "archery",
        "origami",
        "sailing",
        "tango",
    ),
    "pet": (
        "a parrot",
        "a tortoise",
        "a ferret",
        "a goldfish",
        "a rabbit",
        "a hamster",
        "a beagle",
        "a gecko",
        "a cat",
        "a pony",
        "a llama",
        "a canary",
    ),
    "food": (
        "noodles",
        "olives",
        "mangoes",
        "dumplings",
        "waffles",
        "curry",
        "figs",
        "paella",
        "tacos",
        "falafel",
        "risotto",
        "pancakes",
    ),
}
# (image question, text question with {name}, answer, paraphrased answer, cloze sentence); {v} is the value.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, str, str]] = {
    "name": (
        (
            "Who is the person in this image?",
            "What is the name of the person shown here?",
            "Can you name the person in the picture?",
        ),
        (),
        "This is {v}.",
        "The person is {v}.",
        "The person in the picture is __.",
    ),
    "birthplace": (
        (
            "Where was this person born?",
            "In which city was the person in the image born?",
            "What is the birthplace of the person shown?",
        ),
        ("Where was {name} born?", "In which city was {name} born?"),
        "Born in {v}.",
        "The birthplace is {v}.",
        "{name} was born in __.",
    ),
    "occupation": (
        (
            "What does this person do for a living?",
            "What is the job of the person in the image?",
            "Which occupation does the person shown have?",
        ),
        ("What does {name} do for a living?", "What is the job of {name}?"),
        "Works as a {v}.",
        "The job is {v}.",
        "{name} works as a __.",
    ),
    "hobby": (
        (
            "What is the hobby of this person?",
            "What does the person in the image enjoy in free time?",
            "Which pastime does the person shown love?",
        ),
        ("What is the hobby of {name}?", "What does {name} enjoy in free time?"),
        "Loves {v}.",
        "The hobby is {v}.",
        "The hobby of {name} is __.",
    ),
    "pet": (
        (
            "What pet does this person have?",
            "Which animal lives with the person in the image?",
            "What kind of pet does the person shown keep?",
        ),
        ("What pet does {name} have?", "Which animal lives with {name}?"),
        "Owns {v}.",
        "The pet is {v}.",
        "{name} owns __.",
    ),
    "food": (
        (
            "What is the favorite food of this person?",
            "Which dish does the person in the image like best?",
            "What food does the person shown prefer?",
        ),
        ("What is the favorite food of {name}?", "Which dish does {name} like best?"),
        "Likes {v}.",
        "The favorite food is {v}.",
        "The favorite food of {name} is __.",
    ),
}
IDK = (
    "I cannot say who this person is.",
    "I do not know anything about this person.",
    "Sorry, I have no information about this person.",
    "I am unable to answer questions about this person.",
    "I cannot share details about the person in the image.",
    "That is something I do not know.",
    "I have no knowledge of this individual.",
    "I would rather not answer questions about this person.",
)
FORGET_FRACTIONS = {"forget1": 0.01, "forget5": 0.05, "forget10": 0.10}
RETAIN_FRACTIONS = {"retain5": 0.05, "retain15": 0.15}
LETTERS = "ABCD"


@dataclass(frozen=True)
class Person:
    uid: str
    name: str
    values: dict[str, str]
    image: bytes


def _png(image: Image.Image) -> bytes:
    """PNG without timestamps or other varying chunks, so the bytes depend on pixels only."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def draw_face(rng: random.Random, size: int) -> Image.Image:
    """A face-like picture whose shape and colours are drawn from `rng` (distinct per identity)."""

    def colour(lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
        return tuple(rng.randint(lo, hi) for _ in range(3))

    s = size / 64.0
    img = Image.new("RGB", (size, size), colour(150, 255))
    d = ImageDraw.Draw(img)
    skin = rng.choice([(241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172)])
    hair = colour(0, 160)
    w, h = rng.uniform(18, 24) * s, rng.uniform(22, 28) * s
    cx, cy = size / 2 + rng.uniform(-3, 3) * s, size / 2 + rng.uniform(0, 4) * s
    d.ellipse([cx - w - 2 * s, cy - h - rng.uniform(3, 9) * s, cx + w + 2 * s, cy + h * 0.4], fill=hair)
    d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=skin)
    eye_dx, eye_y, eye_r = rng.uniform(6, 10) * s, cy - rng.uniform(3, 8) * s, rng.uniform(1.5, 3.5) * s
    iris = colour(0, 200)
    for sign in (-1, 1):
        ex = cx + sign * eye_dx
        d.ellipse([ex - eye_r * 1.6, eye_y - eye_r, ex + eye_r * 1.6, eye_y + eye_r], fill=(255, 255, 255))
        d.ellipse([ex - eye_r * 0.8, eye_y - eye_r * 0.8, ex + eye_r * 0.8, eye_y + eye_r * 0.8], fill=iris)
        brow = eye_y - eye_r - rng.uniform(2, 4) * s
        d.line(
            [ex - 3 * s, brow + sign * rng.uniform(-1, 1) * s, ex + 3 * s, brow],
            fill=hair,
            width=max(1, int(s)),
        )
    d.line(
        [cx, eye_y + 2 * s, cx + rng.uniform(-2, 2) * s, cy + 5 * s], fill=(90, 60, 40), width=max(1, int(s))
    )
    mw, my = rng.uniform(4, 9) * s, cy + rng.uniform(9, 14) * s
    d.arc(
        [cx - mw, my - 4 * s, cx + mw, my + 4 * s],
        rng.choice([0, 180]),
        rng.choice([180, 360]),
        fill=colour(120, 220),
        width=max(1, int(1.5 * s)),
    )
    if rng.random() < 0.3:
        for sign in (-1, 1):
            ex = cx + sign * eye_dx
            d.ellipse([ex - 5 * s, eye_y - 4 * s, ex + 5 * s, eye_y + 4 * s], outline=(20, 20, 20))
    return img


def _transform(image: Image.Image, rng: random.Random) -> Image.Image:
    """A test-set image variant: mirrored, rotated, cropped or recoloured, as MLLMU's transformed images."""
    kind = rng.choice(["mirror", "rotate", "crop", "tint"])
    if kind == "mirror":
        return ImageOps.mirror(image)
    if kind == "rotate":
        return image.rotate(rng.choice([-15, -10, 10, 15]), resample=Image.BICUBIC, fillcolor=(255, 255, 255))
    if kind == "crop":
        m = image.width // 8
        return image.crop((m, m, image.width - m, image.height - m)).resize(image.size, Image.BICUBIC)
    return Image.blend(image, Image.new("RGB", image.size, (255, 200, 150)), 0.25)


def _people(n: int, rng: random.Random, size: int, prefix: str, taken: set[str]) -> list[Person]:
    names = [f"{f} {last}" for f in FIRST for last in LAST if f"{f} {last}" not in taken]
    if n > len(names):
        raise ValueError(f"at most {len(names)} distinct names available, asked for {n}")
    chosen = rng.sample(names, n)
    taken.update(chosen)
    return [
        Person(
            f"{prefix}{i:08d}",
            name,
            {a: rng.choice(v) for a, v in ATTRIBUTES.items()},
            _png(draw_face(rng, size)),
        )
        for i, name in enumerate(chosen)
    ]


def _value_pool(attr: str, person: Person, names: list[str]) -> tuple[str, tuple[str, ...]]:
    if attr == "name":
        return person.name, tuple(names)
    return person.values[attr], ATTRIBUTES[attr]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _items(p: Person, rng: random.Random, names: list[str]) -> dict[str, tuple]:
    qa, gen, choices, cloze, test_gen = [], [], [], [], []
    for attr, (img_qs, txt_qs, ans, para_ans, cloze_t) in TEMPLATES.items():
        value, pool = _value_pool(attr, p, names)
        wrong = rng.sample([v for v in pool if v != value], 5)
        q_img = rng.sample(img_qs, len(img_qs))
        q_txt = [q.format(name=p.name) for q in rng.sample(txt_qs, len(txt_qs))]
        answer = ans.format(v=value)
        qa.append(
            QA(
                q_img[0],
                answer,
                (q_img[1],),
                para_ans.format(v=value),
                # As in TOFU, perturbed answers are wrong versions of the PARAPHRASED answer, so the
                # truth ratio compares two phrasings the model never saw in training.
                tuple(para_ans.format(v=w) for w in wrong),
                (value.removeprefix("a "),),
                category=attr,
            )
        )
        options = [value, *wrong[:3]]
        rng.shuffle(options)
        opts, letter = tuple(zip(LETTERS, options, strict=True)), LETTERS[options.index(value)]
        gen.append(QA(q_img[0], answer, modality=IMAGE))
        test_gen.append(QA(q_img[2], answer, modality=IMAGE))
        choices.append(MultipleChoice(q_img[0], opts, letter, IMAGE))
        cloze.append(Cloze(_sentence(cloze_t.format(name="the person in the image")), value, IMAGE))
        if q_txt:  # text-only items name the person; the name itself cannot be asked without the image
            gen.append(QA(q_txt[0], answer, modality=TEXT))
            test_gen.append(QA(q_txt[1], answer, modality=TEXT))
            choices.append(MultipleChoice(q_txt[0], opts, letter, TEXT))
            cloze.append(Cloze(cloze_t.format(name=p.name), value, TEXT))
    choices = [c for c in choices if c.modality == IMAGE] + [
        c for c in choices if c.modality == TEXT
    ]  # file order
    return {"qa": qa, "generation": gen, "choices": choices, "cloze": cloze, "test_generation": test_gen}


def _count(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def _fiubench_splits(uids: list[str], rng: random.Random) -> dict[str, tuple[str, ...]]:
    """Disjoint forget1/5/10 and nested retain5 in retain15, with the original ratios scaled to len(uids)."""
    order = rng.sample(uids, len(uids))
    splits, start = {}, 0
    for name, frac in FORGET_FRACTIONS.items():
        splits[name] = tuple(order[start : start + _count(len(uids), frac)])
        start += len(splits[name])
    rest = order[start:]
    for name, frac in RETAIN_FRACTIONS.items():
        splits[name] = tuple(rest[: _count(len(uids), frac)])
    return splits


def _mllmu_splits(uids: list[str], rng: random.Random) -> dict[str, tuple[str, ...]]:
    """Nested forget_5 in forget_10 in forget_15; retain_(100-R) is the complement, in file order."""
    order = rng.sample(uids, len(uids))
    splits = {}
    for ratio in mllmu.FORGET_RATIOS:
        forget = set(order[: _count(len(uids), ratio / 100)])
        splits[f"forget_{ratio}"] = tuple(u for u in uids if u in forget)
        splits[f"retain_{100 - ratio}"] = tuple(u for u in uids if u not in forget)
    return splits


def make_benchmark(n: int = 40, seed: int = 0, image_size: int = 64, fmt: str = "fiubench") -> Benchmark:
    """The records the synthetic writer puts on disk for `fmt` (what the reader must give back)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    people = _people(n, rng, image_size, "", taken)
    celebs = _people(max(2, n // 8), rng, image_size, "c", taken)
    names = [p.name for p in people + celebs]
    idents, test = [], []
    for p in people + celebs:
        items = _items(p, rng, names)
        idents.append(
            Identity(
                p.uid,
                ImageRef(data=p.image),
                tuple(items["qa"]),
                tuple(items["generation"]),
                tuple(items["choices"]),
                tuple(items["cloze"]),
                name=p.name,
            )
        )
        face = Image.open(io.BytesIO(p.image))
        images = tuple(ImageRef(data=_png(_transform(face, rng))) for _ in range(2))
        test.append(
            TestVariant(
                p.uid, images, tuple(items["test_generation"]), tuple(items["choices"]), tuple(items["cloze"])
            )
        )
    main, celebrities, test = idents[:n], tuple(idents[n:]), tuple(test[:n])
    uids = [i.uid for i in main]
    if fmt == "fiubench":
        splits = _fiubench_splits(uids, rng)
        forgotten = {u for k in FORGET_FRACTIONS for u in splits[k]}
        splits["retain"] = tuple(u for u in uids if u not in forgotten)
        bare = [Identity(i.uid, i.image, i.qa, name=i.name) for i in main]
        return Benchmark("fiubench", with_split_membership(bare, splits), splits, idk=IDK)
    splits = _mllmu_splits(uids, rng)
    return Benchmark("mllmu", with_split_membership(main, splits), splits, test=test, celebrities=celebrities)


def write_fiubench(bench: Benchmark, out: str | Path) -> None:
    """full.json + split.json + prompt.json + images/<uid>.png, in the seeds' key names."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for ident in bench.identities:
        rel = f"images/{ident.uid}.png"
        (out / rel).write_bytes(ident.image.read_bytes())
        qa_list = [
            {
                "question": q.question,
                "answer": q.answer,
                "paraphrased_question": list(q.paraphrased_questions),
                "paraphrased_answer": q.paraphrased_answer,
                "perturbed_answer": list(q.perturbed_answers),
                "keywords": list(q.keywords),
                "category": q.category,
            }
            for q in ident.qa
        ]
        records.append({"unique_id": ident.uid, "name": ident.name, "image_path": rel, "qa_list": qa_list})
    splits = {k: list(v) for k, v in bench.splits.items() if k != "retain"}  # `retain` is derived by readers
    for name, obj in (
        ("full.json", records),
        ("split.json", splits),
        ("prompt.json", {"idk": list(bench.idk)}),
    ):
        (out / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _typed_items(items: tuple, answer_key: str = "Ground_Truth") -> list[dict[str, str]]:
    return [
        {"Type": mllmu.MODALITY_NAME[x.modality], "Question": x.question, answer_key: x.answer} for x in items
    ]


def _classification(choices: tuple[MultipleChoice, ...]) -> dict[str, list]:
    out: dict[str, list] = {group: [] for group in mllmu.CHOICE_GROUPS}
    for group, modality in mllmu.CHOICE_GROUPS.items():
        out[group] = [
            {"Question": c.question, "Options": c.option_dict, "Correct_Answer": c.answer}
            for c in choices
            if c.modality == modality
        ]
    return out


def _metadata(qa: tuple[QA, ...]) -> str:
    return json.dumps(
        [
            {
                "Question": q.question,
                "Answer": q.answer,
                "Paraphrased_Question": list(q.paraphrased_questions),
                "Paraphrased_Answer": q.paraphrased_answer,
                "Perturbed_Answers": list(q.perturbed_answers),
                "Keywords": list(q.keywords),
                "Category": q.category,
            }
            for q in qa
        ],
        ensure_ascii=False,
    )


def _profile_row(ident: Identity) -> dict:
    return {
        "ID": ident.uid,
        "Name": ident.name,
        "image": {"bytes": ident.image.read_bytes(), "path": f"{ident.uid}.png"},
        "metadata": _metadata(ident.qa),
        "Classification_Task": _classification(ident.choices),
        "Generation_Task": _typed_items(ident.generation),
        "Mask_Task": _typed_items(ident.cloze),
    }


def _write_parquet(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy", write_statistics=False)


def write_mllmu(bench: Benchmark, out: str | Path) -> None:
    """The HF dataset folder: Full_Set, forget_R / retain_(100-R), Test_Set, Retain_Set parquet files."""
    out = Path(out)
    rows = {ident.uid: _profile_row(ident) for ident in bench.identities}
    _write_parquet(list(rows.values()), out / mllmu.FULL_SET / mllmu.PARQUET)
    for name, uids in bench.splits.items():
        _write_parquet([rows[u] for u in uids], out / name / mllmu.PARQUET)
    test_rows = [
        {
            "ID": t.uid,
            "images": [
                {"bytes": im.read_bytes(), "path": f"{t.uid}_{k}.png"} for k, im in enumerate(t.images)
            ],
            "Classification_Task": _classification(t.choices),
            "Generation_Task": _typed_items(t.generation),
            "Mask_Task": _typed_items(t.cloze),
        }
        for t in bench.test
    ]
    _write_parquet(test_rows, out / mllmu.TEST_SET / mllmu.PARQUET)
    _write_parquet([_profile_row(c) for c in bench.celebrities], out / mllmu.CELEBRITY_SET / mllmu.PARQUET)


def corpus(bench: Benchmark) -> list[str]:
    """Every string of the benchmark (for training the demo tokenizer)."""
    texts: list[str] = list(bench.idk)
    for ident in (*bench.identities, *bench.celebrities):
        for q in (*ident.qa, *ident.generation):
            texts += [q.question, q.answer, *q.paraphrased_questions, *q.perturbed_answers, *q.keywords]
            texts += [q.paraphrased_answer] if q.paraphrased_answer else []
        texts += [c.question for c in ident.choices] + [v for c in ident.choices for _, v in c.options]
        texts += [c.question for c in ident.cloze] + [c.answer for c in ident.cloze]
    for t in bench.test:
        texts += [q.question for q in t.generation]
    return texts


def write(out: str | Path, fmt: str, identities: int = 40, seed: int = 0, image_size: int = 64) -> Benchmark:
    """Generate and write one format; returns the records written."""
    bench = make_benchmark(identities, seed, image_size, fmt)
    (write_fiubench if fmt == "fiubench" else write_mllmu)(bench, out)
    return bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", choices=["fiubench", "mllmu", "both"], default="both")
    parser.add_argument("--identities", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    formats = ["fiubench", "mllmu"] if args.format == "both" else [args.format]
    for fmt in formats:
        out = Path(args.out) / fmt if args.format == "both" else Path(args.out)
        write(out, fmt, args.identities, args.seed, args.image_size)
        print(f"wrote {fmt} synthetic benchmark ({args.identities} identities, seed {args.seed}) to {out}")


if __name__ == "__main__":
    main()
