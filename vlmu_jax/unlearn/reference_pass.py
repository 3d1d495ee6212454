"""The reference model's log-probs of each training row, made in one pass before the first step, for the
objectives that read the reference only through them (NPO, DPO).

Why: the reference is frozen and runs without dropout, so its log-probs of a row are a fixed function of the row.
Made inside every step, as the originals make them, a run of E epochs computes each row's E times: at
LLaVA-1.5-7B's shape the reference forward is ~80 ms of a 0.44 s NPO step (bench/NOTES.md, session 37), and
FIUBench unlearns for 5 epochs. Made once, each row's values ride in its batches (`REF_VALUES`) and the step runs
no reference model. The numbers are the same to float rounding: a row's log-probs do not depend on the other rows
of its batch (only a longer padding may change the order of a sum), and the policy's dropout draws are its own
(the reference's are drawn from a copy of the RNG state and dropped).

Config: `<stage>.reference_logps` (`MODES`). `auto` makes them once where it saves reference passes, i.e. where
a stream's steps read its rows more than once (more than one epoch of its batches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlmu_jax.data.prefetch import prefetched
from vlmu_jax.logs import progress
from vlmu_jax.models.sharding import global_batch, on_host
from vlmu_jax.unlearn.objectives import Objective

# A batch key: each row's reference log-probs at the positions the trainer's `logps_fn` scores, in their order,
# zero past the row's count; [rows, slots] for batches with label positions, else [rows, length - 1].
REF_VALUES = "ref_values"
MODES = ("auto", "once", "per_step")

# Reference log-probs a batch's forward gives: (log-probs [B, N], mask [B, N]), the trainer's `logps_fn` under the
# reference model.
Forward = Callable[[dict[str, Any]], tuple[jax.Array, jax.Array]]


def cacheable(obj: Objective) -> tuple[str, ...]:
    """The objective's reference streams that read the reference through their log-probs alone: the others (a KL,
    a full-vocabulary statistic, hidden states) need the reference model inside the step."""
    inside = {*obj.kl_streams, *obj.vocab_streams, *obj.hidden_streams}
    return tuple(n for n in obj.ref_streams if n not in inside)


def _indexed(source: Any) -> bool:
    """Whether a batch source says which rows each batch holds (data/batching.ExampleSource does)."""
    return hasattr(source, "global_indices") and hasattr(source, "host_indices")


def streams_to_cache(mode: str, obj: Objective, sources: Mapping[str, Any], reads: Mapping[str, int]) -> tuple[str,
                                                                                                           ...]:
    """The streams whose reference log-probs are made once: none for `per_step`; for `once` every `cacheable`
    stream; for `auto` those whose steps read their rows more than once (`reads[name]`, the steps that take a
    batch of the stream, above its batches per epoch). A source that does not say which rows its batches hold
    keeps the per-step reference under `auto` and is an error under `once`."""
    if mode not in MODES:
        raise ValueError(f"reference_logps={mode!r}: choose one of {MODES}")
    names = cacheable(obj) if mode != "per_step" else ()
    if mode == "once":
        blind = [n for n in names if not _indexed(sources[n])]
        if blind:
            raise ValueError(f"reference_logps='once' needs sources that name each batch's rows (global_indices, "
                             f"host_indices); streams {blind} do not")
        return names
    return tuple(n for n in names if _indexed(sources[n]) and reads[n] > len(sources[n]))


def collect(forward: Forward, source: Any, mesh, *, desc: str, show: bool) -> dict[int, np.ndarray]:
    """Each row of `source` (by its index) -> its reference log-probs at the scored positions, from one pass over
    the source's first epoch (every row is in it; a row the last batch repeats comes out the same). The next
    batch is dispatched before this one's values are fetched."""
    values: dict[int, np.ndarray] = {}

    def fetch(index: int, out: tuple[jax.Array, jax.Array]) -> None:
        logps, mask = (on_host(x) for x in out)
        for row, lp, m in zip(source.global_indices(index), logps, mask.astype(bool), strict=True):
            values[int(row)] = lp[m].astype(np.float32)

    made = prefetched(lambda i: global_batch(source.get(i), mesh), range(len(source)))
    pending = None
    for index, batch in enumerate(progress(made, total=len(source), desc=desc, unit="batch", disable=not show)):
        out = forward(batch)
        if pending is not None:
            fetch(*pending)
        pending = (index, out)
    if pending is not None:
        fetch(*pending)
    return values


@dataclasses.dataclass(frozen=True)
class WithReference:
    """A batch source whose batches also hold their rows' reference log-probs (`REF_VALUES`), from `values` (row
    index -> values, `collect`). Its rows and lengths are `source`'s."""

    source: Any
    values: Mapping[int, np.ndarray]

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str) -> Any:  # global_indices, host_indices, padded_length, rows: the source's
        if name == "source":  # not set yet (a copy being made): no recursion through this method
            raise AttributeError(name)
        return getattr(self.source, name)

    def get(self, index: int) -> dict[str, Any]:
        batch = self.source.get(index)
        width = batch["label_index"].shape[1] if "label_index" in batch else batch["input_ids"].shape[1] - 1
        return {**batch, REF_VALUES: packed([self.values[int(r)] for r in self.source.host_indices(index)], width)}


def packed(values: Sequence[np.ndarray], width: int) -> np.ndarray:
    """Rows' values (each its scored positions' in order) as a batch's `REF_VALUES`: [rows, width], zero after
    each row's own."""
    out = np.zeros((len(values), width), np.float32)
    for k, v in enumerate(values):
        out[k, : len(v)] = v
    return out


def placed(values: jax.Array, mask: jax.Array) -> jax.Array:
    """A batch's `REF_VALUES` [B, K] (each row's values in order) put at the positions `mask` [B, N] marks (the
    policy's scored positions), zero elsewhere: the layout of the reference log-probs the step would make."""
    order = jnp.clip(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0, values.shape[1] - 1)
    return jnp.where(mask, jnp.take_along_axis(values, order, axis=1), 0.0)


def without_reference(obj: Objective, names: tuple[str, ...]) -> Objective:
    """`obj` with `names` no longer needing the reference model in the step (their batches carry its values)."""
    return dataclasses.replace(obj, ref_streams=tuple(n for n in obj.ref_streams if n not in names))
