"""Canonical, typed records for both benchmarks.

Readers turn each on-disk layout into these; everything downstream (batching, eval tasks) only sees them, so
a benchmark's file format never leaks past its reader.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlmu_jax.errors import InputError

IMAGE = "image"  # the question is asked together with the identity's image (MLLMU "Image_Textual")
TEXT = "text"  # text-only question (MLLMU "Pure_Text")


class DataError(InputError, ValueError):
    """A data file does not match its benchmark's layout: `file`, `record` and `field` say where, `what` what."""


@dataclass(frozen=True)
class ImageRef:
    """An image either on disk (FIUBench) or embedded as encoded bytes (MLLMU parquet)."""

    path: str | None = None
    data: bytes | None = None
    origin: str | None = field(default=None, compare=False)  # file and row of embedded bytes, for error messages

    def load(self) -> Image.Image:
        """Decode to RGB, as every seed does before its image processor.

        Images are decoded only when a batch needs them, so a truncated or unreadable file is reported here,
        naming the file (or the parquet row of embedded bytes)."""
        if self.data is None and self.path is None:
            raise DataError("image reference has neither a path nor bytes", file=self.origin)
        try:
            image = Image.open(io.BytesIO(self.data) if self.data is not None else self.path)
            return image.convert("RGB")
        except OSError as err:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
            where = self.path if self.data is None else self.origin
            raise DataError(f"cannot decode the image ({err})", file=where) from err

    def read_bytes(self) -> bytes:
        """Encoded bytes (for writing parquet); reads the file when the reference is a path."""
        if self.data is not None:
            return self.data
        return Path(self.path).read_bytes()


@dataclass(frozen=True)
class QA:
    """One question-answer pair with the variants the metrics need (Truth Ratio, APE, EM)."""

    question: str
    answer: str
    paraphrased_questions: tuple[str, ...] = ()
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    modality: str = IMAGE
    category: str | None = None


@dataclass(frozen=True)
class MultipleChoice:
    """MLLMU Classification_Task item: options keyed 'A'..'D' and the correct letter."""

    question: str
    options: tuple[tuple[str, str], ...]
    answer: str
    modality: str = IMAGE

    @property
    def option_dict(self) -> dict[str, str]:
        return dict(self.options)


@dataclass(frozen=True)
class Cloze:
    """MLLMU Mask_Task item: a sentence with a blank written '__' and the word(s) that fill it."""

    question: str
    answer: str
    modality: str = IMAGE


@dataclass(frozen=True)
class Identity:
    """A (fictitious or real) person: one image, QA pairs, and the benchmark's task variants."""

    uid: str
    image: ImageRef
    qa: tuple[QA, ...]
    generation: tuple[QA, ...] = ()  # MLLMU Generation_Task (evaluation questions, both modalities)
    choices: tuple[MultipleChoice, ...] = ()
    cloze: tuple[Cloze, ...] = ()
    name: str | None = None
    caption: str | None = None
    splits: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class TestVariant:
    """MLLMU Test_Set row: the same identity asked with paraphrased questions about transformed images."""

    uid: str
    images: tuple[ImageRef, ...]
    generation: tuple[QA, ...] = ()
    choices: tuple[MultipleChoice, ...] = ()
    cloze: tuple[Cloze, ...] = ()


@dataclass(frozen=True)
class Benchmark:
    """A whole benchmark: identities in file order, named splits of uids, and refusal answers for IdK."""

    name: str
    identities: tuple[Identity, ...]
    splits: dict[str, tuple[str, ...]]
    idk: tuple[str, ...] = ()
    test: tuple[TestVariant, ...] = ()
    celebrities: tuple[Identity, ...] = ()
    skipped: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[Identity]:
        """Identities of a split, in file order."""
        if name not in self.splits:
            raise DataError(f"not in the {self.name} data (known splits: {sorted(self.splits)})",
                            record=f"split {name!r}")
        ids = set(self.splits[name])
        return [ident for ident in self.identities if ident.uid in ids]


def with_split_membership(
    identities: list[Identity], splits: dict[str, tuple[str, ...]]
) -> tuple[Identity, ...]:
    """Attach to every identity the names of the splits it belongs to."""
    member: dict[str, set[str]] = {}
    for name, uids in splits.items():
        for uid in uids:
            member.setdefault(uid, set()).add(name)
    return tuple(
        Identity(**{**ident.__dict__, "splits": frozenset(member.get(ident.uid, ()))}) for ident in identities
    )


def check_split_ids(splits: dict[str, tuple[str, ...]], known: set[str], source: str) -> None:
    """A split naming an id that is not in the data is an error (the seeds would silently train on less)."""
    for name, uids in splits.items():
        unknown = [u for u in uids if u not in known]
        if unknown:
            raise DataError(f"names unknown id(s) {unknown[:5]}", file=source, record=f"split {name!r}")
