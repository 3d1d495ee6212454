"""One padded length per training stream (`vlmu_jax.data.stream_length`): when it applies, what it costs, and
that the loss on real tokens does not see the extra padding."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tiny_models import PAD, tiny_batch, tiny_config
from vlmu_jax.data import stream_length
from vlmu_jax.data.batching import IGNORE, Encoded, ExampleSource
from vlmu_jax.models.registry import init_model
from vlmu_jax.stages import logps_fn

BUCKETS = (64, 128)


def _source(lengths: list[int], buckets: tuple[int, ...] = BUCKETS) -> ExampleSource:
    rows = [Encoded(np.arange(1, n + 1, dtype=np.int32), np.full(n, 7, np.int32), None) for n in lengths]
    return ExampleSource(rows, global_batch_size=2, pad_token_id=0, buckets=buckets, shuffle=False,
                         image_fn=lambda ref: {"pixel_values": np.zeros((3, 2, 2), np.float32)},
                         process_index=0, process_count=1)


def test_plan_counts_padding_and_lengths() -> None:
    plan = stream_length.plan(_source([10, 20, 30, 40, 100, 50]))  # batches padded to 64, 64, 128
    assert plan.lengths == (64, 128)
    assert plan.positions == 2 * (64 + 64 + 128) and plan.extra == 2 * (64 + 64)
    assert plan.single(0.5) == 128  # 256 extra of 512 positions
    assert plan.single(0.49) is None and plan.single(0.0) is None
    assert "1 compile(s) saved" in plan.summary("finetuned", 0.5)
    assert "kept" in plan.summary("finetuned", 0.0)
    assert stream_length.plan(_source([10, 20])).single(1.0) is None  # one bucket already


@pytest.mark.parametrize("max_padding", [0.0, 1.0])
def test_stream_lengths_with_the_option_on_and_off(max_padding: float) -> None:
    per_bucket = _source([10, 20, 30, 40, 100, 50])
    single = stream_length.plan(per_bucket).single(max_padding)
    source = per_bucket if single is None else _source([10, 20, 30, 40, 100, 50], buckets=(single,))
    batches = [source.get(i) for i in range(len(source))]
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert lengths == ([64, 64, 128] if max_padding == 0 else [128, 128, 128])
    for batch, rows in zip(batches, ([10, 20], [30, 40], [100, 50]), strict=True):
        assert batch["attention_mask"].sum(axis=1).tolist() == rows
        pad = batch["attention_mask"] == 0
        assert (batch["labels"][pad] == IGNORE).all() and (batch["labels"][~pad] == 7).all()


def test_extra_padding_leaves_the_loss_on_real_tokens_unchanged() -> None:
    model = init_model(tiny_config("llama").to_dict(), seed=0)
    short = tiny_batch([6, 3, 5, 2])  # padded to its longest row
    short["labels"] = np.where(short["attention_mask"] > 0, short["input_ids"], IGNORE)
    extra = 24
    padded = {**short, **{k: np.pad(short[k], ((0, 0), (0, extra)), constant_values=v)
                          for k, v in (("input_ids", PAD), ("attention_mask", 0), ("labels", IGNORE))}}

    def nll(batch: dict) -> tuple[float, np.ndarray]:
        logps, mask = logps_fn(model, batch)
        logps, mask = np.asarray(logps), np.asarray(mask)
        return float(-(logps * mask).sum() / mask.sum()), np.where(mask, logps, 0.0)

    (loss, per_token), (loss_padded, per_token_padded) = nll(short), nll(padded)
    assert loss_padded == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(per_token_padded[:, : per_token.shape[1]], per_token, rtol=1e-5, atol=1e-6)
    assert not per_token_padded[:, per_token.shape[1]:].any()
