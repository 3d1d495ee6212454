"""One sequence length per training stream: every batch padded to the stream's longest bucket.

Each new batch length recompiles the jitted train step (6-20 s at LLaVA-1.5-7B shape), so a stream whose rows
span several buckets pays one compile per bucket, and the retain-only twin and every unlearning method pay them
again. Padding the shorter batches to the longest bucket compiles the step once per stream; the price is the
padding positions the shorter batches gain, bounded by `data.single_length_max_padding` as a fraction of the
stream's positions. Padding is invisible to the loss: labels and attention mask cover real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmu_jax.data.batching import ExampleSource


@dataclass(frozen=True)
class LengthPlan:
    """An epoch of a stream's batches padded bucket by bucket, against all padded to the longest."""

    lengths: tuple[int, ...]  # the distinct padded lengths, shortest first: one compile each
    positions: int  # sequence positions of the epoch's batches, each padded to its own bucket
    extra: int  # positions added by padding every batch to the longest bucket

    @property
    def extra_fraction(self) -> float:
        return self.extra / self.positions

    def single(self, max_padding: float) -> int | None:
        """The one length to pad to, or None when the stream keeps its buckets (one already, or too costly)."""
        if len(self.lengths) > 1 and self.extra_fraction <= max_padding:
            return self.lengths[-1]
        return None

    def summary(self, name: str, max_padding: float) -> str:
        """One log line: the padding added against the compiles saved, or why the buckets stay."""
        shown = ", ".join(map(str, self.lengths))
        if len(self.lengths) == 1:
            return f"{name}: one length {shown}"
        if self.single(max_padding) is not None:
            return (f"{name}: every batch padded to {self.lengths[-1]} (buckets {shown}): +{self.extra:,} padding "
                    f"positions per epoch (+{self.extra_fraction:.1%}), {len(self.lengths) - 1} compile(s) saved")
        return (f"{name}: buckets {shown} kept: one length would add {self.extra_fraction:.1%} padding "
                f"(data.single_length_max_padding={max_padding})")


def plan(source: ExampleSource) -> LengthPlan:
    """The first epoch's batch lengths of `source` (later epochs reshuffle the same rows: the same mix)."""
    lengths = [source.padded_length(i) for i in range(len(source))]
    longest, rows = max(lengths), source.global_batch_size
    return LengthPlan(tuple(sorted(set(lengths))), rows * sum(lengths), rows * sum(longest - n for n in lengths))
