"""Runs the model over many encoded rows in a few static shapes: answer log-probs and generations.

This is the only place evaluation touches the device. Rows go through the same `ExampleSource` as
training (same buckets, same host sharding), so a whole split is scored in big jitted batches and a
task file only sees per-row numpy results.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlmu_jax.data.batching import IGNORE, Encoded, ExampleSource, bucket_length, row_buckets
from vlmu_jax.data.prefetch import prefetched
from vlmu_jax.eval.frozen import compile_only, compiles_ahead, shapes_only, stands_in
from vlmu_jax.eval.generate import decode_over_slices, generate
from vlmu_jax.eval.scoring import continuation_logprobs, token_logprobs
from vlmu_jax.logs import progress
from vlmu_jax.models.sharding import abstract_batch, batch_shards, global_batch, on_host


@dataclass(frozen=True)
class AnswerScores:
    """Per answer token t: log p(a_t | prompt, a_<t), and mean/variance of log p under the model at t."""

    logps: np.ndarray
    mu: np.ndarray
    var: np.ndarray

    @property
    def loss(self) -> float:
        """Length-normalised NLL: the `loss(a)` of BENCHMARKS.md."""
        return float(-self.logps.mean())


def _batches(source: ExampleSource | _SplitSource, desc: str):
    """(batch, row indices) for every batch, each row index reported once (the last batch wraps)."""
    seen: set[int] = set()
    made = prefetched(source.get, range(len(source)))  # the next batches are made while the device runs this one
    bar = progress(made, total=len(source), desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0)
    for i, batch in enumerate(bar):
        idx = source.global_indices(i)
        fresh = np.array([j not in seen for j in idx])
        seen.update(int(j) for j in idx)
        yield batch, idx, fresh


@dataclass(frozen=True)
class Pass:
    """One pass of the model over a source's batches (scores or generations of some rows): what `run_passes`
    dispatches and collects per batch, and `out`, the per-row results in row order once the pass has run. Its
    batches are made only when the pass runs."""

    batches: Iterable[Any]
    dispatch: Callable[[Any], Any]
    collect: Callable[[Any, Any], None]
    out: list


def run_passes(passes: Sequence[Pass]) -> None:
    """Every batch of the passes, pass after pass, as one overlapped stream of device calls: batch i + 1 (a pass's
    first included) is made and dispatched before batch i is collected. Two batches' buffers are alive at once.

    Why: jax runs a call asynchronously, so the devices compute the next batch while the host waits for this one's
    results, gathers and unpacks them and makes the next inputs. Collecting each batch before dispatching the next
    left the devices idle for all of that between every two calls (~4-5 s of host work per 7B model evaluated at
    FIUBench's splits, bench/NOTES.md session 10), and running the passes one at a time left them idle at every
    pass boundary (a split's scoring and its generation, one split and the next: ~9.6 s of the 146 s eval stage
    at FIUBench's splits outside the model loads and weight copies, session 14)."""
    pending = None
    for p in passes:
        for batch in p.batches:
            out = p.dispatch(batch)
            if pending is not None:
                pending[0].collect(pending[1], pending[2])
            pending = (p, batch, out)
    if pending is not None:
        pending[0].collect(pending[1], pending[2])


@dataclass(frozen=True)
class _Part:
    source: ExampleSource
    rows: np.ndarray  # the part's rows' indices in the whole pass's rows


class _SplitSource:
    """Several `ExampleSource`s over parts of a pass's rows, read one after another as one source: the batches of
    rows that the pass's batch size would put over its cap, at a smaller batch size per padded length and image
    count."""

    def __init__(self, parts: Sequence[_Part]):
        self.parts = list(parts)
        self._where = [(part, j) for part in self.parts for j in range(len(part.source))]

    def __len__(self) -> int:
        return len(self._where)

    def global_indices(self, index: int) -> np.ndarray:
        part, j = self._where[index]
        return part.rows[part.source.global_indices(j)]

    def host_indices(self, index: int) -> np.ndarray:
        part, j = self._where[index]
        return part.rows[part.source.host_indices(j)]

    def padded_length(self, index: int) -> int:
        part, j = self._where[index]
        return part.source.padded_length(j)

    def get(self, index: int) -> dict[str, Any]:
        part, j = self._where[index]
        return part.source.get(j)


@dataclass(frozen=True)
class BatchCap:
    """What one eval batch may hold at most (0: no cap); `rows_per_batch` gives batches that would hold more
    fewer rows.

    tokens (config eval.max_batch_tokens): padded prompt positions. Every row of a batch is padded to its longest,
    and its KV cache grows with rows x length: MLLMU-Bench's eval.py prompts carry few-shot images, at LLaVA-1.5's
    576 tokens per image some rows hold 13 images (8.6k tokens), and 16 of them ran out of an H200's memory
    (bench/RESULTS.md, session 18, call 62).
    image_bytes (config eval.max_batch_image_mb, in MB of 1e6 bytes): the rows' image inputs, each row's image slots
    (`_batch_images`: one per image, one blank for a row without) at the processor's padded size. They grow with
    rows x images x pixels, and so does the vision tower's work: Idefics2-8b with image splitting makes each image
    five 980 px crops (62 MB of inputs, 24,500 patches), and eval.py's few-shot rows show up to six images, so 32
    such rows are 12 GB of host arrays per batch (a tiny model's eval ran a 24 GB machine out of memory,
    bench/NOTES.md session 26)."""

    tokens: int = 0
    image_bytes: int = 0


def rows_per_batch(length: int, batch_size: int, cap: BatchCap, multiple: int = 1, row_image_bytes: int = 0) -> int:
    """Rows in an eval batch padded to `length` whose rows' image inputs take `row_image_bytes` each:
    `batch_size`, fewer where that many would hold more than `cap` allows, in steps of `multiple` (the
    data-parallel shards), at least one step."""
    rows = batch_size
    if cap.tokens:
        rows = min(rows, cap.tokens // length)
    if cap.image_bytes and row_image_bytes:
        rows = min(rows, cap.image_bytes // row_image_bytes)
    return batch_size if rows == batch_size else max(multiple, rows // multiple * multiple)


def _eval_source(rows: Sequence[Encoded], batch_size: int, pad_token_id: int, image_fn: Callable, *,
                 left_pad: bool, cap: BatchCap = BatchCap(),
                 mesh: Mesh | None = None) -> ExampleSource | _SplitSource:
    """The batches of a pass over `rows` in their order, `batch_size` rows each, except that rows of a padded
    length and image count whose batches would exceed `cap` go in batches of their own length and image count at
    `rows_per_batch` rows, after the others. Every part pads to the same ladder of lengths (the whole pass's)."""
    make = functools.partial(ExampleSource, pad_token_id=pad_token_id, image_fn=image_fn, shuffle=False,
                             left_pad=left_pad)
    buckets = row_buckets(rows)
    multiple = math.lcm(batch_shards(mesh), jax.process_count())  # the mesh's batch shards and the hosts feeding them
    with shapes_only():  # one image slot's inputs: their sizes, from a trace (no features program runs)
        slot_bytes = sum(a.nbytes for a in image_fn(None).values()) if cap.image_bytes else 0
    keys = [(bucket_length(len(r.input_ids), buckets), max(1, len(r.images))) for r in rows]
    sizes = {k: rows_per_batch(k[0], batch_size, cap, multiple, k[1] * slot_bytes) for k in set(keys)}
    small = sorted(k for k, size in sizes.items() if size < batch_size)
    if not small:
        return make(list(rows), global_batch_size=batch_size, buckets=buckets)
    of_key = {k: [] for k in small}
    rest = []
    for i, k in enumerate(keys):
        (of_key[k] if k in of_key else rest).append(i)
    groups = [(rest, batch_size), *((of_key[k], sizes[k]) for k in small)]
    return _SplitSource([_Part(make([rows[i] for i in idx], global_batch_size=size, buckets=buckets),
                               np.asarray(idx)) for idx, size in groups if idx])


def _score_source(rows: Sequence[Encoded], batch_size: int, pad_token_id: int, image_fn: Callable, **how: Any):
    return _eval_source(rows, batch_size, pad_token_id, image_fn, left_pad=False, **how)


def _generate_source(rows: Sequence[Encoded], batch_size: int, pad_token_id: int, image_fn: Callable, **how: Any):
    return _eval_source(rows, batch_size, pad_token_id, image_fn, left_pad=True, **how)


def _score_batch(model: nnx.Module, inputs: dict):
    return token_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"], with_stats=True)


def _generate_batch(model: nnx.Module, inputs: dict, *, eos_token_id, pad_token_id: int, max_new_tokens: int):
    return generate(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"],
                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@dataclass(frozen=True)
class PromptGroups:
    """Rows grouped by their prompt (images and every token before the first answer token): the prompts, one per
    group, and each group's row indices in row order. FIUBench scores a question's ground-truth, paraphrased and
    perturbed answers, MLLMU-Bench a question's options, each as a row that repeats the same prompt."""

    prompts: list[Encoded]
    members: list[list[int]]


def prompt_groups(rows: Sequence[Encoded]) -> PromptGroups | None:
    """The rows' prompt groups, or None when some row has no prompt to share (no answer token, or one at 0).
    Every template here puts a row's images in its prompt; the prompt keeps the row's images."""
    index: dict[tuple, int] = {}
    prompts: list[Encoded] = []
    members: list[list[int]] = []
    for i, row in enumerate(rows):
        answer = np.flatnonzero(row.labels != IGNORE)
        if answer.size == 0 or answer[0] == 0:
            return None
        start = int(answer[0])
        key = (row.images, row.input_ids[:start].tobytes())
        if key not in index:
            index[key] = len(prompts)
            prompts.append(dataclasses.replace(row, input_ids=row.input_ids[:start],
                                               labels=np.full(start, IGNORE, row.labels.dtype)))
            members.append([])
        members[index[key]].append(i)
    return PromptGroups(prompts, members)


def continuation_length(longest: int) -> int:
    """The length shared-prompt continuations of at most `longest` tokens are padded to: 16, 32, 64, ... (each
    length is a program to compile, so a ladder with few rungs; padding at most doubles the continuations)."""
    return max(16, 1 << (max(longest, 1) - 1).bit_length())


def continuation_shape(groups: PromptGroups, rows: Sequence[Encoded], batch_groups: np.ndarray) -> tuple[int, int]:
    """(K, C) of a global batch of groups: its most rows per group and its longest continuation's padded length."""
    k = max(len(groups.members[g]) for g in batch_groups)
    longest = max(len(rows[r].input_ids) - len(groups.prompts[g].input_ids)
                  for g in batch_groups for r in groups.members[g])
    return k, continuation_length(longest)


def _continuations(groups: PromptGroups, rows: Sequence[Encoded], batch_groups: np.ndarray,
                   host_groups: np.ndarray, pad_token_id: int) -> dict[str, np.ndarray]:
    """Continuation ids and mask [b, K, C] of this host's groups, shaped by the whole global batch (every host
    builds the same shape)."""
    k, c = continuation_shape(groups, rows, batch_groups)
    ids = np.full((len(host_groups), k, c), pad_token_id, np.int32)
    mask = np.zeros((len(host_groups), k, c), np.int32)
    for j, g in enumerate(host_groups):
        start = len(groups.prompts[g].input_ids)
        for v, r in enumerate(groups.members[g]):
            tail = rows[r].input_ids[start:]
            ids[j, v, : len(tail)], mask[j, v, : len(tail)] = tail, 1
    return {"continuation_ids": ids, "continuation_mask": mask}


def _shared_batch(model: nnx.Module, inputs: dict):
    return continuation_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"],
                                 inputs["continuation_ids"], inputs["continuation_mask"],
                                 sliced=decode_over_slices(model))


def _shared_inputs(source: ExampleSource | _SplitSource, groups: PromptGroups, rows: Sequence[Encoded],
                   pad_token_id: int, index: int, batch: dict | None = None) -> dict:
    """Prompt batch `index` of `source` (this host's rows; `batch` when already collated) with its groups'
    continuations."""
    batch_groups = source.global_indices(index)
    batch = source.get(index) if batch is None else batch
    return {**batch, **_continuations(groups, rows, batch_groups, source.host_indices(index), pad_token_id)}


def _shared_pass(model: nnx.Module, rows: Sequence[Encoded], groups: PromptGroups, *, batch_size: int,
                 pad_token_id: int, image_fn: Callable, mesh: Mesh | None, cap: BatchCap, desc: str) -> Pass:
    source = _generate_source(groups.prompts, batch_size, pad_token_id, image_fn, cap=cap, mesh=mesh)
    out: list[AnswerScores | None] = [None] * len(rows)

    def dispatch(item: tuple[int, tuple]) -> tuple:
        i, (batch, _, _) = item
        return _shared_batch(model, global_batch(_shared_inputs(source, groups, rows, pad_token_id, i, batch), mesh))

    def collect(item: tuple[int, tuple], arrays: tuple) -> None:
        _, (_, idx, fresh) = item
        logps, mu, var = (on_host(a) for a in arrays)
        for j in np.flatnonzero(fresh):
            start = len(groups.prompts[idx[j]].input_ids)
            for v, r in enumerate(groups.members[idx[j]]):
                m = rows[r].labels[start:] != IGNORE
                out[r] = AnswerScores(logps[j, v, : m.size][m], mu[j, v, : m.size][m], var[j, v, : m.size][m])

    return Pass(enumerate(_batches(source, desc)), dispatch, collect, out)


def _shared_groups(rows: Sequence[Encoded], shared_prompts: bool) -> PromptGroups | None:
    """The prompt groups to score `rows` by, when sharing is asked for and some prompt repeats."""
    groups = prompt_groups(rows) if shared_prompts else None
    return groups if groups is not None and len(groups.prompts) < len(rows) else None


def score_pass(model: nnx.Module, rows: Sequence[Encoded], *, batch_size: int, pad_token_id: int,
               image_fn: Callable, mesh: Mesh | None = None, cap: BatchCap = BatchCap(), shared_prompts: bool = False,
               desc: str = "score") -> Pass:
    """Teacher-forced answer-token scores (`AnswerScores`) for every row, in row order, as a pass. `shared_prompts`
    (config eval.shared_prompts): rows that repeat a prompt run it once and their answers as continuations over
    its KV cache (`continuation_logprobs`), in batches of `batch_size` prompts; the same values up to float
    rounding."""
    groups = _shared_groups(rows, shared_prompts)
    if groups is not None:
        return _shared_pass(model, rows, groups, batch_size=batch_size, pad_token_id=pad_token_id,
                            image_fn=image_fn, mesh=mesh, cap=cap, desc=desc)
    source = _score_source(rows, batch_size, pad_token_id, image_fn, cap=cap, mesh=mesh)
    out: list[AnswerScores | None] = [None] * len(rows)

    def dispatch(item: tuple) -> tuple:
        inputs = global_batch(item[0], mesh)
        return inputs["labels"], _score_batch(model, inputs)

    def collect(item: tuple, result: tuple) -> None:
        _, idx, fresh = item
        labels, arrays = result
        logps, mu, var = (on_host(a) for a in arrays)
        answer = on_host(labels)[:, 1:] != IGNORE
        for r in np.flatnonzero(fresh):
            m = answer[r]
            out[idx[r]] = AnswerScores(logps[r][m], mu[r][m], var[r][m])

    return Pass(_batches(source, desc), dispatch, collect, out)


def score_rows(model: nnx.Module, rows: Sequence[Encoded], **kwargs: Any) -> list[AnswerScores]:
    """`score_pass(model, rows, **kwargs)` run on its own: the scores of every row, in row order."""
    scores = score_pass(model, rows, **kwargs)
    run_passes([scores])
    return scores.out


def generate_pass(model: nnx.Module, rows: Sequence[Encoded], *, batch_size: int, pad_token_id: int,
                  eos_token_id: int | Sequence[int] | None, max_new_tokens: int, image_fn: Callable,
                  mesh: Mesh | None = None, cap: BatchCap = BatchCap(), desc: str = "generate") -> Pass:
    """Greedy continuations of left-padded prompts, cut at the first EOS, in row order, as a pass."""
    source = _generate_source(rows, batch_size, pad_token_id, image_fn, cap=cap, mesh=mesh)
    eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
    out: list[np.ndarray | None] = [None] * len(rows)

    def dispatch(item: tuple) -> jax.Array:
        return _generate_batch(model, global_batch(item[0], mesh), eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, max_new_tokens=max_new_tokens)

    def collect(item: tuple, new: jax.Array) -> None:
        _, idx, fresh = item
        tokens = on_host(new)
        for r in np.flatnonzero(fresh):
            seq = tokens[r].tolist()
            stop = next((k for k, t in enumerate(seq) if t in eos), len(seq))
            out[idx[r]] = np.asarray(seq[:stop], dtype=np.int32)

    return Pass(_batches(source, desc), dispatch, collect, out)


def generate_rows(model: nnx.Module, rows: Sequence[Encoded], **kwargs: Any) -> list[np.ndarray]:
    """`generate_pass(model, rows, **kwargs)` run on its own: every row's new tokens, in row order."""
    generated = generate_pass(model, rows, **kwargs)
    run_passes([generated])
    return generated.out


_COMPILE_THREADS = 8  # XLA compiles of a 7B program take a few GB of host memory each


def compile_ahead(model: nnx.Module, *, to_score: Sequence[Sequence[Encoded]] = (),
                  to_generate: Sequence[Sequence[Encoded]] = (), batch_size: int, pad_token_id: int,
                  eos_token_id: int | Sequence[int] | None, max_new_tokens: int, image_fn: Callable,
                  mesh: Mesh | None = None, cap: BatchCap = BatchCap(), shared_prompts: bool = False
                  ) -> Callable[[], None]:
    """Compiles the programs that `score_pass(rows)` for each `to_score` entry and `generate_pass(rows)` for each
    `to_generate` entry (same other arguments) will run, one per distinct padded length, all at once: each in its
    own thread, where jit's tracing is Python but XLA's compile is not. Returns once the scoring programs are
    compiled; generation's go on compiling, and the function returned waits for them (`after` gates a pass on
    it). So run the scoring passes first: the devices score while generation compiles. While scoring's compile,
    the first `to_score` entry's images are made through `image_fn` (`_images_while`). A program that another
    thread's compile-ahead is compiling (a stand-in's of the same structure, eval/frozen.stands_in) is waited for,
    not compiled again.

    Why: a cold eval stage at 7B compiled two scoring shapes (~11 s each) and generation (~25 s) one after
    another, 52 s of a 374 s stage (bench/RESULTS.md, session 6); compiled side by side, Llama-3.2-11B-Vision's
    still kept the devices idle for 19 s of a 155 s stage (session 33) while its splits' scoring took 11 s.
    Nothing runs on the devices, so it is safe with several processes. Only for a model frozen with compile_ahead
    on (eval/frozen.py; config eval.compile_ahead); otherwise it compiles nothing."""
    if not compiles_ahead(model):
        return _nothing
    run_generate = functools.partial(_generate_batch, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                     max_new_tokens=max_new_tokens)
    capped = dict(cap=cap, mesh=mesh)
    jobs: dict[tuple, tuple[Callable[[], dict], Callable]] = {}  # program -> (a batch of its shapes, the call)
    for rows in filter(None, to_score):
        groups = _shared_groups(rows, shared_prompts)
        if groups is None:
            source = _score_source(rows, batch_size, pad_token_id, image_fn, **capped)
            for length, i in _first_of_each_length(source).items():
                jobs.setdefault(("score", length), (functools.partial(source.get, i), _score_batch))
            continue
        source = _generate_source(groups.prompts, batch_size, pad_token_id, image_fn, **capped)
        for i in range(len(source)):
            program = ("shared", source.padded_length(i), continuation_shape(groups, rows, source.global_indices(i)))
            jobs.setdefault(program, (functools.partial(_shared_inputs, source, groups, rows, pad_token_id, i),
                                      _shared_batch))
    for rows in filter(None, to_generate):
        source = _generate_source(rows, batch_size, pad_token_id, image_fn, **capped)
        for length, i in _first_of_each_length(source).items():
            jobs.setdefault(("generate", length), (functools.partial(source.get, i), run_generate))

    def compile_one(run: Callable, batch: dict) -> None:
        with compile_only():
            run(model, batch)

    pool = ThreadPoolExecutor(min(max(len(jobs), 1), _COMPILE_THREADS), thread_name_prefix="compile")
    futures = {}
    # Each sample batch is made here, inside compile_only: where `image_fn` gives each image's features (a
    # program: image_embeddings.py), that program compiles beside the others and zeros of its outputs' shapes
    # stand for them, so nothing runs on the devices (Llama-3.2-11B-Vision's features program compiled for 4.7 s
    # in its first call, outside these threads, bench/RESULTS.md session 35) and the compile threads launch
    # nothing beside the scoring passes that start before they end. The block ends once that compile has.
    with compile_only():
        for program, (inputs, run) in jobs.items():  # scoring's submitted first
            futures[program] = pool.submit(compile_one, run, abstract_batch(inputs(), mesh))
    pool.shutdown(wait=False)
    scoring = [f for program, f in futures.items() if program[0] != "generate"]
    if not stands_in(model):  # a stand-in has no features to make
        _images_while(lambda: not all(f.done() for f in scoring), image_fn, next(filter(None, to_score), ()))
    for f in scoring:
        f.result()
    generating = [f for program, f in futures.items() if program[0] == "generate"]

    def ready() -> None:
        for f in generating:
            f.result()

    return ready


def _images_while(busy: Callable[[], bool], image_fn: Callable, rows: Sequence[Encoded]) -> None:
    """`image_fn` of each image of `rows` (the first scoring pass's), in order, while `busy()`. Why: where it gives
    each image's features, made on the devices and kept in its cache (image_embeddings.py), the devices make the
    first pass's features while its program compiles, instead of idling there and making them after:
    Llama-3.2-11B-Vision's scoring program compiled for 16.8 s of its cold eval while the devices waited, and
    its features took ~0.07 s an image (bench/RESULTS.md, session 35)."""
    for ref in dict.fromkeys(ref for row in rows for ref in row.images):
        if not busy():
            return
        image_fn(ref)


def _nothing() -> None:
    """What `compile_ahead` returns where it compiles nothing."""


def after(ready: Callable[[], None], p: Pass) -> Pass:
    """The pass with its first dispatch waiting for `ready()` (`compile_ahead`'s): its batches are made, and the
    passes before it run, while its programs compile."""
    def dispatch(item: Any) -> Any:
        ready()
        return p.dispatch(item)

    return dataclasses.replace(p, dispatch=dispatch)


def _first_of_each_length(source: ExampleSource | _SplitSource) -> dict[int, int]:
    """Padded length -> the first batch index padded to it (each length needs its own program)."""
    first: dict[int, int] = {}
    for i in range(len(source)):
        first.setdefault(source.padded_length(i), i)
    return first
