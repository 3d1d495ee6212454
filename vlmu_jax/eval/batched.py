"""Runs the model over many encoded rows in a few static shapes: answer log-probs and generations.

This is the only place evaluation touches the device. Rows go through the same `ExampleSource` as
training (same buckets, same host sharding), so a whole split is scored in big jitted batches and a
task file only sees per-row numpy results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlmu_jax.data.batching import IGNORE, Encoded, ExampleSource
from vlmu_jax.data.prefetch import prefetched
from vlmu_jax.eval.frozen import compile_only, compiles_ahead
from vlmu_jax.eval.generate import generate
from vlmu_jax.eval.scoring import token_logprobs
from vlmu_jax.logs import progress
from vlmu_jax.models.sharding import global_batch


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


def _batches(source: ExampleSource, desc: str):
    """(batch, row indices) for every batch, each row index reported once (the last batch wraps)."""
    seen: set[int] = set()
    made = prefetched(source.get, range(len(source)))  # the next batches are made while the device runs this one
    bar = progress(made, total=len(source), desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0)
    for i, batch in enumerate(bar):
        idx = source.global_indices(i)
        fresh = np.array([j not in seen for j in idx])
        seen.update(int(j) for j in idx)
        yield batch, idx, fresh


def _gather(x: jax.Array) -> np.ndarray:
    """A global array as a full numpy array on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _score_source(rows: Sequence[Encoded], batch_size: int, pad_token_id: int, image_fn: Callable) -> ExampleSource:
    return ExampleSource(list(rows), global_batch_size=batch_size, pad_token_id=pad_token_id, image_fn=image_fn,
                         shuffle=False)


def _generate_source(rows: Sequence[Encoded], batch_size: int, pad_token_id: int,
                     image_fn: Callable) -> ExampleSource:
    return ExampleSource(list(rows), global_batch_size=batch_size, pad_token_id=pad_token_id, image_fn=image_fn,
                         shuffle=False, left_pad=True)


def _score_batch(model: nnx.Module, inputs: dict):
    return token_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"], with_stats=True)


def _generate_batch(model: nnx.Module, inputs: dict, *, eos_token_id, pad_token_id: int, max_new_tokens: int):
    return generate(model, inputs["input_ids"], inputs["attention_mask"], inputs["images"],
                    max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def score_rows(model: nnx.Module, rows: Sequence[Encoded], *, batch_size: int, pad_token_id: int,
               image_fn: Callable, mesh: Mesh | None = None,
               desc: str = "score") -> list[AnswerScores]:
    """Teacher-forced answer-token scores for every row, in row order."""
    source = _score_source(rows, batch_size, pad_token_id, image_fn)
    out: list[AnswerScores | None] = [None] * len(rows)
    for batch, idx, fresh in _batches(source, desc):
        inputs = global_batch(batch, mesh)
        logps, mu, var = (_gather(a) for a in _score_batch(model, inputs))
        answer = _gather(inputs["labels"])[:, 1:] != IGNORE
        for r in np.flatnonzero(fresh):
            m = answer[r]
            out[idx[r]] = AnswerScores(logps[r][m], mu[r][m], var[r][m])
    return out  # type: ignore[return-value]


def generate_rows(model: nnx.Module, rows: Sequence[Encoded], *, batch_size: int, pad_token_id: int,
                  eos_token_id: int | Sequence[int] | None, max_new_tokens: int, image_fn: Callable,
                  mesh: Mesh | None = None, desc: str = "generate") -> list[np.ndarray]:
    """Greedy continuations of left-padded prompts, cut at the first EOS, in row order."""
    source = _generate_source(rows, batch_size, pad_token_id, image_fn)
    eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
    out: list[np.ndarray | None] = [None] * len(rows)
    for batch, idx, fresh in _batches(source, desc):
        tokens = _gather(_generate_batch(model, global_batch(batch, mesh), eos_token_id=eos_token_id,
                                         pad_token_id=pad_token_id, max_new_tokens=max_new_tokens))
        for r in np.flatnonzero(fresh):
            seq = tokens[r].tolist()
            stop = next((k for k, t in enumerate(seq) if t in eos), len(seq))
            out[idx[r]] = np.asarray(seq[:stop], dtype=np.int32)
    return out  # type: ignore[return-value]


_COMPILE_THREADS = 8  # XLA compiles of a 7B program take a few GB of host memory each


def compile_ahead(model: nnx.Module, *, to_score: Sequence[Sequence[Encoded]] = (),
                  to_generate: Sequence[Sequence[Encoded]] = (), batch_size: int, pad_token_id: int,
                  eos_token_id: int | Sequence[int] | None, max_new_tokens: int, image_fn: Callable,
                  mesh: Mesh | None = None) -> None:
    """Compiles the programs that `score_rows(rows)` for each `to_score` entry and `generate_rows(rows)` for each
    `to_generate` entry (same other arguments) will run, one per distinct padded length, all at once: each in its
    own thread, where jit's tracing is Python but XLA's compile is not. Why: a cold eval stage at 7B compiled two
    scoring shapes (~11 s each) and generation (~25 s) one after another, 52 s of a 374 s stage (bench/RESULTS.md,
    session 6). Nothing runs on the devices, so it is safe with several processes. Only for a model frozen with
    compile_ahead on (eval/frozen.py; config eval.compile_ahead); otherwise it does nothing."""
    if not compiles_ahead(model):
        return
    run_generate = functools.partial(_generate_batch, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                     max_new_tokens=max_new_tokens)
    jobs, seen = [], set()
    for kind, groups, make, run in (("score", to_score, _score_source, _score_batch),
                                    ("generate", to_generate, _generate_source, run_generate)):
        for rows in filter(None, groups):
            source = make(rows, batch_size, pad_token_id, image_fn)
            for length, i in _first_of_each_length(source).items():
                if (kind, length) not in seen:
                    seen.add((kind, length))
                    jobs.append((source, i, run))

    def compile_one(job) -> None:
        source, i, run = job
        with compile_only():
            run(model, global_batch(source.get(i), mesh))

    with ThreadPoolExecutor(min(max(len(jobs), 1), _COMPILE_THREADS), thread_name_prefix="compile") as pool:
        list(pool.map(compile_one, jobs))


def _first_of_each_length(source: ExampleSource) -> dict[int, int]:
    """Padded length -> the first batch index padded to it (each length needs its own program)."""
    first: dict[int, int] = {}
    for i in range(len(source)):
        first.setdefault(source.padded_length(i), i)
    return first
