"""Tokenise (question, answer, image) examples with a template, mask labels, pad to static buckets, shard by
host.

Label mask (CONTRACT.md): -100 on prompt, image and padding positions. The prompt/answer boundary is found
from character offsets of ONE joint tokenisation of `prompt + answer`, so input_ids are exactly what the seeds
feed the model; a token that carries any answer character is an answer token. `fiubench_original_mask=True`
instead reproduces FIUBench's `preprocess_v1` arithmetic (mask BOS + len(tok(instruction + answer_tag)) - 2
tokens), and `train_on_prompt=True` reproduces MLLMU's finetune collate (only padding masked; image tokens
stay masked here because transformers 5 expands them and they are not predictable text).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from vlmu_jax.data.records import IMAGE, Identity, ImageRef
from vlmu_jax.data.templates import Template

IGNORE = -100
# The text-length ladder: a row's text (its image placeholder counted as one token, as max_length counts it)
# falls in one of these or in its source's longest text; image rows are shifted by the image's expansion.
TEXT_LADDER = (64, 128, 256, 512)
# Bucket lengths are multiples of this: even lengths keep cuDNN's fused attention (its backward rejects odd
# ones) and 64 keeps the matmul tiles full.
BUCKET_MULTIPLE = 64


class BatchSource(Protocol):
    """CONTRACT.md: `len(src)` batches per epoch; `src.get(i)` the host-local slice of global batch i."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Example:
    """One (question, answer) pair, with its identity's image or None for a text-only row.

    ``context_images``: images the prompt shows before the row's own (few-shot examples), in prompt order; the
    question text then holds one image token per image.
    """

    question: str
    answer: str
    image: ImageRef | None = None
    uid: str = ""
    context_images: tuple[ImageRef, ...] = ()

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return _images(self.image, self.context_images)


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # int32 [L], image placeholders already expanded
    labels: np.ndarray  # int32 [L]
    image: ImageRef | None
    image_tokens: int = 0  # positions the image placeholders expanded to, all images together (0: text only)
    context_images: tuple[ImageRef, ...] = ()

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return _images(self.image, self.context_images)

    @property
    def text_length(self) -> int:
        """Length with each image counted as one token: what ``max_length`` bounds."""
        return len(self.input_ids) - self.image_tokens + len(self.images)


def _images(image: ImageRef | None, context: tuple[ImageRef, ...]) -> tuple[ImageRef, ...]:
    """A row's images in prompt order: the context (few-shot) images, then its own."""
    return context if image is None else (*context, image)


@dataclass(frozen=True)
class TextConfig:
    """How examples become token ids; image_token_id / num_image_tokens come from the model config."""

    tokenizer: Any
    template: Template
    image_token_id: int
    num_image_tokens: int
    append_eos: bool = False
    train_on_prompt: bool = False
    fiubench_original_mask: bool = False
    max_length: int | None = None
    # The ids that replace the prompt's one image token; empty = image_token_id x num_image_tokens. Set from
    # the image processor when an image expands to more than one run (Idefics2 with image splitting).
    image_tokens: tuple[int, ...] = ()
    # How many image tokens a given image becomes, when that depends on the image (Qwen2-VL's native resolution);
    # None = the fixed expansion above.
    image_token_count: Callable[[ImageRef], int] | None = None



def checkpoint_text_config(tokenizer: Any, template: Template, model_config: Any, processor: Any,
                           **options: Any) -> TextConfig:
    """A checkpoint's TextConfig: its image token and count come from the model config; an image processor that
    expands one image into several runs of image tokens (Idefics2 with image splitting) says how through
    ``image_token_ids``, otherwise the image token becomes ``num_image_tokens`` copies of itself."""
    mc = model_config
    expand = getattr(processor, "image_token_ids", None)
    image_tokens = () if expand is None else tuple(expand(mc.image_token_id, mc.num_image_tokens, tokenizer))
    count = getattr(processor, "image_token_count", None)
    per_image = None if count is None else functools.lru_cache(4096)(lambda ref: count(ref.load()))
    return TextConfig(tokenizer=tokenizer, template=template, image_token_id=mc.image_token_id,
                      num_image_tokens=mc.num_image_tokens, image_tokens=image_tokens,
                      image_token_count=per_image, **options)

def examples_from(
    identities: Sequence[Identity],
    *,
    field: str = "qa",
    modality: str | None = IMAGE,
    idk: Sequence[str] = (),
    seed: int = 0,
) -> list[Example]:
    """Flatten identities' QA items (`qa` or `generation`) into examples, in file order.

    With `idk`, each answer is replaced by a refusal drawn deterministically from `seed` (FIUBench's IdK
    stream). Text-only items (modality TEXT) carry no image.
    """
    rng = np.random.default_rng(seed)
    out = []
    for ident in identities:
        for qa in getattr(ident, field):
            if modality is not None and qa.modality != modality:
                continue
            answer = idk[int(rng.integers(len(idk)))] if idk else qa.answer
            out.append(Example(qa.question, answer, ident.image if qa.modality == IMAGE else None, ident.uid))
    return out


Tokens = Callable[[str], tuple[list[int], list[tuple[int, int]]]]  # text -> (ids, character offsets)


def _tokens(cfg: TextConfig, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = cfg.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _expand_images(ids: list[int], answer: list[bool], cfg: TextConfig, images: tuple[ImageRef, ...], where: str):
    """The k-th image token of the text becomes ``image_token_sequence(cfg, images[k])``; one token per image."""
    positions = [i for i, t in enumerate(ids) if t == cfg.image_token_id]
    if len(positions) != len(images):
        raise ValueError(
            f"{where}: expected {len(images)} image token(s) (id {cfg.image_token_id}), found {len(positions)}"
        )
    for p, image in reversed(list(zip(positions, images, strict=True))):
        seq = list(image_token_sequence(cfg, image))
        ids, answer = ids[:p] + seq + ids[p + 1 :], answer[:p] + [False] * len(seq) + answer[p + 1 :]
    return ids, answer


def image_token_sequence(cfg: TextConfig, image: ImageRef | None = None) -> tuple[int, ...]:
    """What one image token in the prompt expands to (the only place the expansion is defined); ``image`` is
    needed when the count depends on it (``image_token_count``)."""
    if cfg.image_token_count is not None:
        if image is None:
            raise ValueError("this model's image token count depends on the image: pass it")
        return (cfg.image_token_id,) * cfg.image_token_count(image)
    return cfg.image_tokens or (cfg.image_token_id,) * cfg.num_image_tokens


def _texts(example: Example, cfg: TextConfig) -> tuple[str, str, str | None]:
    """(prompt, full text, the instruction `fiubench_original_mask` tokenises apart or None) of one example."""
    prompt, text = cfg.template.full(example.question, example.answer, example.image is not None)
    if not cfg.fiubench_original_mask:
        return prompt, text, None
    return prompt, text, text.split(cfg.template.answer_prefix)[0].strip(" ") + cfg.template.answer_prefix


def text_ids(example: Example, cfg: TextConfig, tokens: Tokens | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of one example with the image still ONE placeholder token and BOS / EOS added (what the seeds'
    tokenizer call returns; their model expands the image), and which ids are answer tokens (see the module
    docstring for the mask). Not cut: `expand` applies `max_length`. `tokens`: the texts' tokens when made ahead
    (`encode_all`), else the tokenizer's."""
    tokens = tokens or functools.partial(_tokens, cfg)
    prompt, text, instruction = _texts(example, cfg)
    ids, offsets = tokens(text)
    if instruction is not None:
        n_masked = (
            1
            + len(tokens(instruction)[0])
            + int(cfg.template.prepend_bos)
            - 2
        )
        answer = [i + int(cfg.template.prepend_bos) >= n_masked for i in range(len(ids))]
    else:
        answer = [end > len(prompt) for _, end in offsets]
    if cfg.template.prepend_bos:
        ids, answer = [cfg.tokenizer.bos_token_id, *ids], [False, *answer]
    if cfg.append_eos:
        ids, answer = [*ids, cfg.tokenizer.eos_token_id], [*answer, True]
    return ids, answer


def expand(ids: Sequence[int], answer: Sequence[bool], example: Example, cfg: TextConfig) -> Encoded:
    """The model's row: the image placeholder expanded, labels = answer ids (every id with train_on_prompt), cut at
    `max_length`."""
    images = example.images
    ids, answer = _expand_images(list(ids), list(answer), cfg, images,
                                 f"example {example.uid!r} {example.question!r}")
    ids_np = np.asarray(ids, dtype=np.int32)
    keep = np.asarray(answer, dtype=bool) | cfg.train_on_prompt
    labels = np.where(keep & (ids_np != cfg.image_token_id), ids_np, IGNORE).astype(np.int32)
    # The seeds cut at max_length counting each image placeholder as ONE token (it is expanded inside the model
    # there), so the limit grows by the expansion here.
    n_image = sum(len(image_token_sequence(cfg, image)) for image in images)
    if cfg.max_length is not None:
        limit = cfg.max_length + n_image - len(images)
        ids_np, labels = ids_np[:limit], labels[:limit]
    return Encoded(ids_np, labels, example.image, n_image, example.context_images)


def encode(example: Example, cfg: TextConfig) -> Encoded:
    """Token ids and labels for one example (see the module docstring for the mask)."""
    return expand(*text_ids(example, cfg), example, cfg)


def text_ids_all(examples: Sequence[Example], cfg: TextConfig) -> list[tuple[list[int], list[bool]]]:
    """`text_ids` of each example, every distinct text tokenised in one call. Why: a call per text spent most of
    its time in the tokenizer's Python wrapper: FIUBench's eval rows at forget10 / retain15 (10,920 calls) took 1.7
    s of the 2.3 s of tokenising on this project's CPU, time the eval's first compile waits for; one call runs them
    in the tokenizer's own threads."""
    texts = list(dict.fromkeys(t for e in examples for t in _texts(e, cfg)[1:] if t is not None))
    if not texts:
        return []
    enc = cfg.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    made = {t: (list(ids), [tuple(o) for o in offsets])
            for t, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True)}
    return [text_ids(e, cfg, made.__getitem__) for e in examples]


def encode_all(examples: Sequence[Example], cfg: TextConfig) -> list[Encoded]:
    """`encode` of each example, its texts tokenised together (`text_ids_all`)."""
    return [expand(ids, answer, e, cfg) for e, (ids, answer) in zip(examples, text_ids_all(examples, cfg),
                                                                      strict=True)]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sequence_buckets(max_text: int, image_tokens: int = 0) -> tuple[int, ...]:
    """Static sequence lengths for rows of at most ``max_text`` text tokens (the image placeholder counted once)
    whose image expands to ``image_tokens`` positions (0: text only).

    A fixed power-of-two ladder alone wastes most of a batch at real shapes (LLaVA-1.5's 576 image tokens put a
    60-token question in a 1024 bucket) or cannot hold it at all; so the text ladder is cut at ``max_text`` and,
    for image rows, shifted by the expansion: LLaVA-1.5 at max_length 512 gets 640, 704, 832 and 1088 (and
    64 .. 512 for text-only rows).
    """
    text = sorted({b for b in TEXT_LADDER if b < max_text} | {max_text})
    shifted = [t + image_tokens - 1 for t in text] if image_tokens > 0 else []
    return tuple(sorted({_round_up(b, BUCKET_MULTIPLE) for b in (*text, *shifted)}))


def row_buckets(rows: Sequence[Encoded]) -> tuple[int, ...]:
    """The buckets of a set of rows: their longest text and largest image expansion (training rows are cut at
    ``max_length``, so this never exceeds ``sequence_buckets(max_length, image tokens)``; eval rows are not cut
    and still fit)."""
    return sequence_buckets(max(r.text_length for r in rows), max(r.image_tokens for r in rows))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that fits, so jit sees a handful of shapes."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {max(buckets)}; add a bucket")


def label_slots(labels: Iterable[np.ndarray]) -> int:
    """How many predicted-label positions a batch of rows with these `labels` (one array per row) needs
    (`label_index`): the rows' most, rounded up to BUCKET_MULTIPLE (full matmul tiles in the output head). One
    number per training stage (stages._source), so its batches keep one shape per length bucket and its streams'
    batches of one bucket run as one pass."""
    most = max((int(np.count_nonzero(row[1:] != IGNORE)) for row in labels), default=0)
    return max(BUCKET_MULTIPLE, -(-most // BUCKET_MULTIPLE) * BUCKET_MULTIPLE)


def label_index(labels: np.ndarray, slots: int) -> np.ndarray:
    """int32 [B, min(slots, T - 1)]: each row's positions t whose next token is a label (labels[t + 1] != IGNORE),
    in order, then zeros; a row's count of them is its count of labels after the first position.

    Why: an objective reads log p(x_{t+1} | x_<=t) at these positions only, so the output head (a [T, D] x [D, V]
    gemm and a log-softmax over the vocabulary per row, forward and backward) runs on them alone
    (`stages.logps_fn`): at LLaVA-1.5's shape 64 answer tokens of a 704-token row."""
    predicted = labels[:, 1:] != IGNORE
    index = np.zeros((len(labels), min(slots, predicted.shape[1])), np.int32)
    for i, row in enumerate(predicted):
        at = np.flatnonzero(row)
        if len(at) > index.shape[1]:
            raise ValueError(f"row {i} has {len(at)} label positions, more than the {index.shape[1]} slots given")
        index[i, : len(at)] = at
    return index


def collate(
    rows: Sequence[Encoded],
    *,
    pad_token_id: int,
    image_fn: Callable[[ImageRef | None], dict[str, np.ndarray]],
    buckets: Sequence[int] | None = None,
    left_pad: bool = False,
    slots: int | None = None,
) -> dict[str, Any]:
    """Pad rows to one bucket length; right padding for training/scoring, left padding for generation.

    `image_fn(ref)` gives a row's image inputs (`image_fn(None)` a text-only row's); they are stacked per
    key under `batch["images"]`. `buckets` None: `row_buckets(rows)`. `slots`: also `batch["label_index"]`
    (`label_index`) with that many slots.
    """
    t = bucket_length(max(len(r.input_ids) for r in rows), buckets or row_buckets(rows))
    batch: dict[str, Any] = {
        "input_ids": np.full((len(rows), t), pad_token_id, np.int32),
        "attention_mask": np.zeros((len(rows), t), np.int32),
        "labels": np.full((len(rows), t), IGNORE, np.int32),
    }
    batch["images"] = _batch_images(rows, image_fn)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        span = slice(t - n, t) if left_pad else slice(0, n)
        batch["input_ids"][i, span] = row.input_ids
        batch["attention_mask"][i, span] = 1
        batch["labels"][i, span] = row.labels
    if slots is not None:
        batch["label_index"] = label_index(batch["labels"], slots)
    return batch


def _batch_images(rows: Sequence[Encoded], image_fn: Callable[[ImageRef | None], dict[str, np.ndarray]]) -> dict:
    """Image inputs stacked per key. A row with one image (or none) gives ``image_fn(ref)``; when some row shows
    several, every row gets the batch's largest count, text-only slots filled with ``image_fn(None)``, joined
    along the processor's image axis: a new one for one-image processors (LLaVA: [B, N, 3, H, W]), the existing
    one for processors that already give a stack per image (Idefics2: [B, N * n, 3, H, W]) and for images made
    into features or tower states (vlmu_jax/image_embeddings.py: [B, N * tokens, D])."""
    if all(not row.context_images for row in rows):
        images = [image_fn(row.image) for row in rows]
        return {k: np.stack([im[k] for im in images]) for k in images[0]}
    n = max(len(row.images) for row in rows)
    blank = image_fn(None)
    per_row = []
    for row in rows:
        parts = [image_fn(ref) for ref in row.images] + [blank] * (n - len(row.images))
        join = np.stack if "pixel_values" in parts[0] and parts[0]["pixel_values"].ndim == 3 else np.concatenate
        per_row.append({k: join([p[k] for p in parts]) for k in parts[0]})
    return {k: np.stack([im[k] for im in per_row]) for k in per_row[0]}


def generation_rows(examples: Sequence[Example], cfg: TextConfig) -> list[Encoded]:
    """Prompts only (everything up to the answer tag), for left-padded generation batches."""
    return encode_all([Example(ex.question, "", ex.image, ex.uid, ex.context_images) for ex in examples],
                      _prompt_only(cfg))


def _prompt_only(cfg: TextConfig) -> TextConfig:
    template = cfg.template.__class__(**{**cfg.template.__dict__, "answer_suffix": ""})
    # A generation prompt is never cut: the end of it (options, instruction, answer tag) is what matters.
    return TextConfig(cfg.tokenizer, template, cfg.image_token_id, cfg.num_image_tokens,
                      image_tokens=cfg.image_tokens, image_token_count=cfg.image_token_count)


def host_slice(global_size: int, process_index: int, process_count: int) -> slice:
    """Rows of the global batch that this host feeds (contiguous, so device order matches process order)."""
    if global_size % process_count:
        raise ValueError(f"global batch {global_size} not divisible by {process_count} processes")
    local = global_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


class ExampleSource:
    """`BatchSource` over encoded rows: epoch-wise permutation from (seed, epoch), global batch -> host
    slice.

    The last batch of an epoch wraps around to the epoch's first rows so every batch has the same shape
    and every example is seen once per epoch. `shuffle=False` keeps file order (scoring/eval). `buckets`
    None derives them from all the rows (`row_buckets`), so every batch of the source picks from one ladder.
    `label_slots`: batches also hold their label positions (`label_index`) in that many slots, for the trainer's
    objectives (at least `label_slots` of the rows' labels).
    """

    def __init__(
        self,
        rows: Sequence[Encoded],
        *,
        global_batch_size: int,
        pad_token_id: int,
        image_fn: Callable[[ImageRef | None], dict[str, np.ndarray]],
        buckets: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        left_pad: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
        label_slots: int | None = None,
    ):
        if not rows:
            raise ValueError("no examples")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        self.rows, self.global_batch_size, self.seed, self.shuffle = (
            list(rows),
            global_batch_size,
            seed,
            shuffle,
        )
        self.host = host_slice(global_batch_size, process_index, process_count)
        self.buckets = tuple(buckets) if buckets else row_buckets(rows)
        self._collate = functools.partial(
            collate,
            pad_token_id=pad_token_id,
            image_fn=image_fn,
            buckets=self.buckets,
            left_pad=left_pad,
            slots=label_slots,
        )

    def with_image_fn(self, image_fn: Callable[[ImageRef | None], dict[str, np.ndarray]]) -> ExampleSource:
        """The same source (rows, order, buckets) with its rows' image inputs from `image_fn`."""
        source = copy.copy(self)
        source._collate = functools.partial(self._collate, image_fn=image_fn)
        return source

    def __len__(self) -> int:
        return -(-len(self.rows) // self.global_batch_size)

    def global_indices(self, index: int) -> np.ndarray:
        """Row indices of global batch `index` (all hosts)."""
        epoch, step = divmod(index, len(self))
        n = len(self.rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size) % n]

    def padded_length(self, index: int) -> int:
        """The length global batch `index` is padded to (without collating it)."""
        return bucket_length(max(len(self.rows[i].input_ids) for i in self.global_indices(index)), self.buckets)

    def host_indices(self, index: int) -> np.ndarray:
        """Row indices of global batch `index` that this host feeds."""
        return self.global_indices(index)[self.host]

    def get(self, index: int) -> dict[str, Any]:
        return self._collate([self.rows[i] for i in self.host_indices(index)])
