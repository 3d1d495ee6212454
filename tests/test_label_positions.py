"""The trainer's log-probs at the batches' label positions only (`batching.label_index`, `stages.logps_fn`).

Training sources hold each row's label positions, so the output head runs on those alone. The objectives must see
the same numbers as over every position masked to the labels: per-position log-probs, masks, and every loss with
its gradients, for streams joined into one pass or run apart, and for the full-vocabulary statistics too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.test_layerwise import Rows, run, tiny_lora_llava, train_run
from vlmu_jax.data.batching import IGNORE, Encoded, ExampleSource, label_index, label_slots
from vlmu_jax.stages import logps_fn, vocab_fn
from vlmu_jax.unlearn.objectives import get_objective
from vlmu_jax.unlearn.trainer import TrainConfig, make_loss


def test_label_index_by_hand() -> None:
    """Row 0 labels positions 3 and 4 (so positions 2 and 3 predict them); row 1 positions 1, 2 and 5; row 2 none."""
    labels = np.full((3, 6), IGNORE, np.int32)
    labels[0, 3:5] = 7
    labels[1, [1, 2, 5]] = 9
    labels[2, 0] = 4  # the first token is never predicted
    np.testing.assert_array_equal(label_index(labels, 4), [[2, 3, 0, 0], [0, 1, 4, 0], [0, 0, 0, 0]])
    assert label_index(labels, 64).shape == (3, 5)  # at most every position but the last
    with pytest.raises(ValueError, match="row 1 has 3 label positions, more than the 2 slots"):
        label_index(labels, 2)


def test_sources_round_slots_up_and_batches_carry_them() -> None:
    """A source's slots: its rows' most label positions rounded up to 64 (or more, given); its batches hold them
    only when asked."""
    def row(n_answer: int) -> Encoded:
        ids = np.arange(1, 101, dtype=np.int32)
        return Encoded(ids, np.where(np.arange(100) >= 100 - n_answer, ids, IGNORE).astype(np.int32), None)

    assert label_slots([row(3).labels, row(64).labels]) == 64
    assert label_slots([row(3).labels, row(65).labels]) == 128
    assert label_slots([row(0).labels]) == 64
    image_fn = lambda ref: {"pixel_values": np.zeros((3, 2, 2), np.float32)}  # noqa: E731
    kw = dict(global_batch_size=2, pad_token_id=0, image_fn=image_fn, buckets=(128,), shuffle=False,
              process_index=0, process_count=1)
    rows = [row(3), row(5)]
    batch = ExampleSource(rows, label_slots=label_slots(r.labels for r in rows), **kw).get(0)
    np.testing.assert_array_equal(batch["label_index"][0, :4], [96, 97, 98, 0])
    np.testing.assert_array_equal(batch["label_index"][1, :6], [94, 95, 96, 97, 98, 0])
    assert batch["label_index"].shape == (2, 64)
    assert ExampleSource(rows, label_slots=100, **kw).get(0)["label_index"].shape == (2, 100)  # a stage's most
    assert "label_index" not in ExampleSource([row(3), row(5)], **kw).get(0)


def with_index(batch: dict, slots: int) -> dict:
    return {**batch, "label_index": label_index(batch["labels"], slots)}


@pytest.fixture(scope="module")
def lora_llava() -> nnx.Module:
    return tiny_lora_llava()[0]


def test_logps_at_label_positions_are_the_full_ones(lora_llava) -> None:
    """Each row's log-probs at its label positions, in order, equal the full pass's there; the mask marks exactly
    the row's count of them."""
    model = lora_llava
    model.eval()
    batch = Rows(1).batches[0]
    full, full_mask = logps_fn(model, batch)
    got, mask = logps_fn(model, with_index(batch, 6))
    assert got.shape == mask.shape == (4, 6)
    for i in range(4):
        want = np.asarray(full[i])[np.asarray(full_mask[i])]
        assert int(mask[i].sum()) == len(want) == 4
        np.testing.assert_allclose(np.asarray(got[i])[: len(want)], want, rtol=1e-6, atol=1e-6)
        assert not np.asarray(mask[i])[len(want):].any()
    model.train()


@pytest.mark.parametrize("slots", [(7, 7), (4, 7)], ids=["one-count-joined", "two-counts-apart"])
@pytest.mark.parametrize("objective", ["gd", "npo", "undial", "ceu"])
def test_losses_and_gradients_equal_with_label_positions(lora_llava, objective, slots) -> None:
    """Every loss and its gradients, with the forget and retain streams' label positions in one slot count (GD's
    streams joined into one pass, as a stage's sources make them) or two (run apart), equal those over every
    position; UNDIAL's and CE-U's full-vocabulary statistics included."""
    model = lora_llava
    model.eval()
    graphdef, params, rngs, rest = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
    obj = get_objective(objective)
    cfg = TrainConfig(objective=objective)
    loss = make_loss(obj, cfg, logps_fn, None, vocab_fn)
    plain = {"forget": Rows(1).batches[0], "retain": Rows(5).batches[1]}
    indexed = {"forget": with_index(plain["forget"], slots[0]), "retain": with_index(plain["retain"], slots[1])}

    def value(p, batches):
        m = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rngs), rest)  # fresh RNG variables at this trace
        ref = (nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, p), jax.tree.map(lambda x: x, rngs), rest)
               if obj.ref_streams else None)
        return loss(m, ref, {n: b for n, b in batches.items() if n in {*obj.phases[0], *obj.optional}})[0]

    want, want_grad = jax.value_and_grad(value)(params, jax.tree.map(jnp.asarray, plain))
    got, got_grad = jax.value_and_grad(value)(params, jax.tree.map(jnp.asarray, indexed))
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    assert float(optax.tree.norm(want_grad)) > 0  # the loss reaches the adapters
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    model.train()


class IndexedRows(Rows):
    """`Rows` whose batches hold their label positions, as the pipeline's training sources make them."""

    def __init__(self, seed: int, lengths=(6, 9, 7, 8)):
        super().__init__(seed, lengths)
        self.batches = [with_index(b, 5) for b in self.batches]


def test_layerwise_and_scanned_steps_agree_on_label_positions(tmp_path) -> None:
    """NPO trained three steps on batches with label positions: the same losses and params as on the same batches
    without them, layer by layer and scanned (dropout on: the decoder draws the same masks either way)."""
    sources = {"forget": IndexedRows(1), "retain": IndexedRows(5)}
    plain_losses, plain_params, _ = run(tmp_path / "plain", "npo", "never")
    for mode in ("never", "always"):
        losses, params, _ = train_run(tiny_lora_llava, sources, tmp_path / mode, "npo", mode)
        np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(plain_params), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=2e-5)
