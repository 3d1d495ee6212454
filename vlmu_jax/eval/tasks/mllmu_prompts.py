"""MLLMU-Bench ``eval.py`` as data: every prompt it writes, the images it passes, its few-shot draws and how it cuts
the answer out of the decoded text (protocol ``original``; ``vlmu_jax.eval.tasks.mllmu`` runs the items).

What eval.py does, reproduced here because each point changes the numbers:

- ``main`` evaluates the sets in a fixed order, each set's tasks in a fixed order (``CALLS``). Every
  classification and cloze call first draws few-shot identities with ``random.sample(ids of the set, k)`` (k: 1, or
  2 for LLaVA's cloze), also where the few-shot blocks are then not used; every call on the test set draws one
  transformed image per row with ``random.choice``. eval.py never seeds ``random``; we seed it with ``seed`` and make
  the same calls in the same order, so ``random.seed(seed)`` before eval.py's ``main`` gives the same draws.
- The few-shot identities' ``Full_Set`` rows (in ``Full_Set`` order) give the few-shot blocks: all their image
  questions (each with the identity's image) for image prompts, all their text questions for text prompts. Rows of
  the evaluated set with the same ID skip the questions at those indices. Celebrities are not in ``Full_Set``, so
  their draws find no example.
- Prompts are written by hand, the same strings for LLaVA and Idefics2 (below, ``<image>`` where eval.py writes it;
  the processor expands it).
- ``max_new_tokens`` is 50, except 5 for Idefics2's text-only classification.
- The answer comes from ``decode(prompt + generation ids [2:], skip_special_tokens=True)``
  (``vlmu_jax.eval.metrics.eval_py_answer``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from vlmu_jax.data.records import IMAGE, QA, TEXT, Benchmark, Cloze, Identity, ImageRef, MultipleChoice

CLASSIFICATION, CLOZE, GENERATION = "classification", "fill_in_the_blank", "generation"
# eval.py main(): (set, task) in call order. Sets by our short names (eval.py modes: forget, test, retain_shared,
# retain_celebrity).
CALLS = (
    ("forget", CLOZE), ("forget", CLASSIFICATION), ("forget", GENERATION),
    ("test", CLASSIFICATION), ("test", CLOZE), ("test", GENERATION),
    ("retain", CLOZE), ("retain", CLASSIFICATION), ("retain", GENERATION),
    ("celebrity", CLOZE), ("celebrity", CLASSIFICATION), ("celebrity", GENERATION),
)
# Sets whose prompts carry the few-shot blocks (the draw happens in every set).
FEW_SHOT_SETS = {CLASSIFICATION: ("forget", "retain", "test"), CLOZE: ("forget", "retain", "test", "celebrity")}
FAMILIES = ("llava", "idefics2")  # the two model families eval.py handles (its model_id prefixes)
IMAGE_MARKER = "<image>"
log = logging.getLogger(__name__)
CHOICE_INSTRUCTION = "Just give ONE letter representing the answer directly."
CLOZE_INSTRUCTION = "Please **ONLY** provide the correct answer that should replace the [Blank]."
GENERATION_INSTRUCTION = {
    IMAGE: "Answer the question based on your trained knowledge in one sentence accurately in ENGLISH.",
    TEXT: "Answer the question based on your trained knowledge in one sentence in ENGLISH.",
}


def few_shot_count(task: str, family: str) -> int:
    """Identities eval.py draws per call: one, but two for LLaVA's cloze."""
    return 2 if (task, family) == (CLOZE, "llava") else 1


def max_new_tokens(task: str, modality: str, family: str) -> int:
    """eval.py's generation length per call (its greedy answers are cut to it before the answer is read)."""
    return 5 if (task, modality, family) == (CLASSIFICATION, TEXT, "idefics2") else 50


# ----------------------------------------------------------------------------- prompt strings
def choice_prompt(mc: MultipleChoice) -> str:
    """The question, one "X: option" line per option (``formulate_prompt_with_options``) and the one-letter
    instruction: what both protocols ask."""
    options = "\n".join(f"{key}: {value}" for key, value in mc.options)
    return f"{mc.question}\n{options}\n{CHOICE_INSTRUCTION}"


def cloze_prompt(cloze: Cloze) -> str:
    """Blank ``__`` written as ``[Blank]``, then the answer-only instruction."""
    return cloze.question.replace("__", "[Blank]") + "\n" + CLOZE_INSTRUCTION


def generation_prompt(question: str, modality: str) -> str:
    """The question and the one-sentence instruction (``accurately`` only in the image+text prompt)."""
    return f"{question}\n{GENERATION_INSTRUCTION[modality]}"


def choice_example(mc: MultipleChoice) -> str:
    """One few-shot block of classification (after its "USER: <image>\\n" or "USER:\\n"): always the four letters
    A-D, a missing option written "None" as eval.py's f-string does."""
    opts = mc.option_dict
    letters = "".join(f"{k}: {opts.get(k)}\n" for k in "ABCD")
    return f"Question: {mc.question}\n{letters}Correct Answer: {mc.answer}\n"


def eval_py_choice(mc: MultipleChoice, shots: Sequence[MultipleChoice]) -> str:
    """``evaluate_classification``'s prompt: the few-shot blocks, then the question (image+text or text-only)."""
    user = "USER: <image>\n" if mc.modality == IMAGE else "USER:\n"
    return "".join(user + choice_example(s) for s in shots) + f"{user}{choice_prompt(mc)}\nASSISTANT:"


def eval_py_cloze(cloze: Cloze, shots: Sequence[Cloze]) -> str:
    """``evaluate_fill_in_the_blank``'s prompt: the few-shot blocks of the question's modality, then the question."""
    user = "USER:<image>\n" if cloze.modality == IMAGE else "USER:\n"  # the blocks have no space after "USER:"
    blocks = "".join(f"{user}{cloze_prompt(s)}\nCorrect Answer: {s.answer}\n" for s in shots)
    head = "USER: <image>\n" if cloze.modality == IMAGE else "USER:\n"
    return f"{blocks}{head}{cloze_prompt(cloze)}\nASSISTANT:"


def eval_py_generation(question: str, modality: str) -> str:
    """``evaluate_generation``'s prompt: "USER: <image>\\n...ASSISTANT: " (trailing space) with an image, "USER: ...
    ASSISTANT:" without."""
    if modality == IMAGE:
        return f"USER: <image>\n{generation_prompt(question, IMAGE)}\nASSISTANT: "
    return f"USER: {generation_prompt(question, TEXT)}\nASSISTANT:"


# ----------------------------------------------------------------------------- items
@dataclass(frozen=True)
class Item:
    """One generate call of eval.py: its prompt (``<image>`` markers), images in prompt order, and what scores it."""

    set: str
    task: str
    uid: str
    modality: str
    question: str
    prompt: str
    images: tuple[ImageRef, ...]
    gold: str
    options: tuple[tuple[str, str], ...] = ()  # classification: (letter, option text)
    max_new_tokens: int = 50


@dataclass(frozen=True)
class _Row:
    """A row of the evaluated set as eval.py reads it (the test set's image is drawn per call)."""

    uid: str
    images: tuple[ImageRef, ...]
    choices: tuple[MultipleChoice, ...]
    cloze: tuple[Cloze, ...]
    generation: tuple[QA, ...]


def _rows(bench: Benchmark, forget_ratio: int) -> dict[str, tuple[list[str], list[_Row]]]:
    """(the set's ID list, its rows) per set, both in the set file's order."""
    full = {i.uid: i for i in bench.identities}

    def of(ident: Identity) -> _Row:
        return _Row(ident.uid, (ident.image,), ident.choices, ident.cloze, ident.generation)

    forget_ids = list(bench.splits[f"forget_{forget_ratio}"])
    retain_ids = list(bench.splits[f"retain_{100 - forget_ratio}"])
    keep = set(forget_ids)
    test = [_Row(v.uid, v.images, v.choices, v.cloze, v.generation) for v in bench.test if v.uid in keep]
    celeb = [of(c) for c in bench.celebrities]
    return {
        "forget": (forget_ids, [of(full[u]) for u in forget_ids]),
        "test": (forget_ids, test),
        "retain": (retain_ids, [of(full[u]) for u in retain_ids]),
        "celebrity": (list(dict.fromkeys(c.uid for c in bench.celebrities)), celeb),
    }


def _choice_items(set_name: str, rows: list[_Row], images: list[ImageRef], shots: list[Identity],
                  family: str) -> list[Item]:
    use = set_name in FEW_SHOT_SETS[CLASSIFICATION]
    shown = {m: [mc for s in shots for mc in s.choices if mc.modality == m] if use else [] for m in (IMAGE, TEXT)}
    shown_images = tuple(s.image for s in shots for mc in s.choices if mc.modality == IMAGE) if use else ()
    n_skip = {(s.uid, m): sum(mc.modality == m for mc in s.choices) for s in shots for m in (IMAGE, TEXT)}
    out = []
    for row, image in zip(rows, images, strict=True):
        for modality in (IMAGE, TEXT):  # a row's image questions, then its text questions
            asked = [mc for mc in row.choices if mc.modality == modality][n_skip.get((row.uid, modality), 0):]
            out += [Item(set_name, CLASSIFICATION, row.uid, modality, mc.question,
                         eval_py_choice(mc, shown[modality]), (*shown_images, image) if modality == IMAGE else (),
                         mc.answer, mc.options, max_new_tokens(CLASSIFICATION, modality, family))
                    for mc in asked]
    return out


def _cloze_items(set_name: str, rows: list[_Row], images: list[ImageRef], shots: list[Identity],
                 family: str) -> list[Item]:
    use = set_name in FEW_SHOT_SETS[CLOZE]
    shown = {m: [c for s in shots for c in s.cloze if c.modality == m] if use else [] for m in (IMAGE, TEXT)}
    shown_images = tuple(s.image for s in shots for c in s.cloze if c.modality == IMAGE) if use else ()
    skip = {s.uid: {(i, c.modality) for i, c in enumerate(s.cloze)} for s in shots}
    out = []
    for row, image in zip(rows, images, strict=True):
        for i, c in enumerate(row.cloze):
            if (i, c.modality) in skip.get(row.uid, ()):
                continue
            own = (*shown_images, image) if c.modality == IMAGE else ()
            out.append(Item(set_name, CLOZE, row.uid, c.modality, c.question, eval_py_cloze(c, shown[c.modality]),
                            own, c.answer, max_new_tokens=max_new_tokens(CLOZE, c.modality, family)))
    return out


def _generation_items(set_name: str, rows: list[_Row], images: list[ImageRef], family: str) -> list[Item]:
    return [Item(set_name, GENERATION, row.uid, qa.modality, qa.question, eval_py_generation(qa.question, qa.modality),
                 (image,) if qa.modality == IMAGE else (), qa.answer,
                 max_new_tokens=max_new_tokens(GENERATION, qa.modality, family))
            for row, image in zip(rows, images, strict=True) for qa in row.generation]


def eval_py_items(bench: Benchmark, *, forget_ratio: int, family: str,
                  seed: int) -> tuple[dict[str, list[Item]], dict[str, list[str]]]:
    """Every generate call of eval.py's ``main`` per set (short names), in eval.py's order within a set, and the
    few-shot IDs drawn per "set/task"."""
    if family not in FAMILIES:
        raise ValueError(f"MLLMU-Bench eval.py handles LLaVA and Idefics2 only, not {family!r}: use "
                         "config.protocol='corrected' for other models")
    rng = random.Random(seed)
    sets = _rows(bench, forget_ratio)
    out: dict[str, list[Item]] = {name: [] for name in sets}
    draws: dict[str, list[str]] = {}
    for set_name, task in CALLS:
        ids, rows = sets[set_name]
        if not rows:
            continue
        shots: list[Identity] = []
        if task != GENERATION:
            k = few_shot_count(task, family)
            if len(ids) < k:  # eval.py's random.sample raises here; a tiny demo split should still evaluate
                log.warning("eval.py draws %d few-shot identities from the %s set, which has %d: drawing %d",
                            k, set_name, len(ids), len(ids))
            drawn = rng.sample(ids, min(k, len(ids)))
            draws[f"{set_name}/{task}"] = drawn
            shots = [i for i in bench.identities if i.uid in drawn]
        images = [rng.choice(r.images) if set_name == "test" else r.images[0] for r in rows]
        if task == CLASSIFICATION:
            out[set_name] += _choice_items(set_name, rows, images, shots, family)
        elif task == CLOZE:
            out[set_name] += _cloze_items(set_name, rows, images, shots, family)
        else:
            out[set_name] += _generation_items(set_name, rows, images, family)
    return out, draws
