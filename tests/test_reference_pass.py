"""NPO's and DPO's reference log-probs made once per row before the first step (unlearn/reference_pass.py).

The values must be the ones the step's own reference pass makes, at the right rows after each epoch's reshuffle and
at the right positions of each batch's layout, so that a run that makes them once trains as a run that makes them
in every step: the same losses and params, scanned and layer by layer, with the model's own LoRA-off reference and
with a separate reference model, and after a resume (on a mesh of two processes: tests/test_pipeline_runs.py).
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_layerwise import tiny_lora_llava
from tests.tiny_models import BOS, IMAGE_SIZE, IMAGE_TOKEN, NUM_IMAGE_TOKENS, PAD
from vlmu_jax.data.batching import IGNORE, Encoded, ExampleSource, label_slots
from vlmu_jax.models.sharding import global_batch
from vlmu_jax.stages import logps_fn
from vlmu_jax.unlearn import reference_pass
from vlmu_jax.unlearn.objectives import get_objective
from vlmu_jax.unlearn.trainer import TrainConfig, make_loss, reference_forward, train

ROWS, BATCH, EPOCHS = 6, 2, 2


def test_values_placed_at_the_scored_positions_by_hand() -> None:
    """Row 0 scores positions 1 and 3, row 1 position 0: each row's values fill its marked positions in order."""
    values = jnp.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = jnp.array([[False, True, False, True], [True, False, False, False]])
    np.testing.assert_array_equal(reference_pass.placed(values, mask), [[0, 1, 0, 2], [3, 0, 0, 0]])


class Blind:
    """A source that does not say which rows its batches hold."""

    def __len__(self) -> int:
        return 3


class Indexed(Blind):
    def global_indices(self, index: int) -> np.ndarray:
        return np.arange(2)

    host_indices = global_indices


def test_auto_makes_them_once_only_where_a_stream_reads_its_rows_again() -> None:
    """3 batches an epoch: read 3 times -> per step, 4 times -> once; only log-prob reference streams (not KL's,
    UNDIAL's full-vocabulary or RMU's hidden states); a source without row indices stays per step under auto and
    is an error under once."""
    sources = {"forget": Indexed(), "idk": Indexed(), "retain": Indexed()}
    pick = reference_pass.streams_to_cache
    assert pick("auto", get_objective("npo"), sources, {"forget": 3}) == ()
    assert pick("auto", get_objective("npo"), sources, {"forget": 4}) == ("forget",)
    assert pick("auto", get_objective("dpo"), sources, {"idk": 4, "forget": 4}) == ("idk", "forget")
    assert pick("per_step", get_objective("npo"), sources, {"forget": 9}) == ()
    for name in ("kl", "undial", "rmu", "ga"):
        assert pick("once", get_objective(name), sources, {}) == ()
    assert pick("auto", get_objective("npo"), {"forget": Blind()}, {"forget": 9}) == ()
    with pytest.raises(ValueError, match=r"streams \['forget'\] do not"):
        pick("once", get_objective("npo"), {"forget": Blind()}, {"forget": 9})
    with pytest.raises(ValueError, match="reference_logps='always'"):
        pick("always", get_objective("npo"), sources, {"forget": 9})


def rows(seed: int) -> list[Encoded]:
    """ROWS rows of the tiny LLaVA's shape: BOS, the image's tokens, 5-12 text tokens of which the last 2-5 are the
    answer (so rows differ in length and in their number of scored positions), each with its own image."""
    rng = np.random.RandomState(seed)
    out = []
    for k in range(ROWS):
        text = rng.randint(3, IMAGE_TOKEN, rng.randint(5, 13))
        ids = np.array([BOS, *[IMAGE_TOKEN] * NUM_IMAGE_TOKENS, *text], np.int32)
        labels = np.where(np.arange(len(ids)) >= len(ids) - rng.randint(2, 6), ids, IGNORE).astype(np.int32)
        out.append(Encoded(ids, labels, f"{seed}-{k}", NUM_IMAGE_TOKENS))
    return out


def image_fn(ref: str) -> dict[str, np.ndarray]:
    seed = sum(map(ord, ref))
    return {"pixel_values": np.random.RandomState(seed).randn(3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)}


def sources(*names: str, slots: bool = True) -> dict[str, ExampleSource]:
    """Shuffled streams (each epoch another order) of `rows`, with their label positions or without."""
    made = {name: rows(seed) for seed, name in enumerate(names, start=1)}
    every = [r.labels for rs in made.values() for r in rs]
    return {name: ExampleSource(rs, global_batch_size=BATCH, pad_token_id=PAD, image_fn=image_fn, seed=seed,
                                shuffle=True, label_slots=label_slots(every) if slots else None, process_index=0,
                                process_count=1)
            for seed, (name, rs) in enumerate(made.items(), start=7)}


@pytest.mark.parametrize("slots", [True, False])
def test_the_loss_reads_the_values_and_runs_no_reference(slots) -> None:
    """NPO's loss over batches carrying the values, with no reference model at all, equals its loss with the
    reference run inside it (and its gradients too), for batches with label positions and without."""
    model, trainable = tiny_lora_llava()
    src = sources("forget", slots=slots)["forget"]
    values = reference_pass.collect(reference_forward(model, trainable, logps_fn), src, None, desc="", show=False)
    assert sorted(values) == list(range(ROWS))
    batch = reference_pass.WithReference(src, values).get(1)
    obj, cfg = get_objective("npo"), TrainConfig(objective="npo")
    loss = make_loss(obj, cfg, logps_fn, None)
    model.eval()  # no dropout: the two losses see one policy
    graphdef, params, rest = nnx.split(model, trainable, ...)
    lora, other = nnx.split_state(params, nnx.LoRAParam, ...)
    lora_off = nnx.merge_state(jax.tree.map(jnp.zeros_like, lora), other)  # the reference: adapters zeroed

    def merged(p):  # fresh RNG variables at the trace's level
        return nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))

    def with_values(p):
        return loss(merged(p), None, {"forget": global_batch(batch, None)})[0]

    def inside(p):
        plain = {k: v for k, v in batch.items() if k != reference_pass.REF_VALUES}
        return loss(merged(p), merged(lora_off), {"forget": global_batch(plain, None)})[0]

    (a, ga), (b, gb) = jax.value_and_grad(with_values)(params), jax.value_and_grad(inside)(params)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert abs(float(a)) > 1e-3
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def run(tmp, objective: str, mode: str, how: str, *, reference: bool = False, names=("forget", "retain"),
        steps: int = EPOCHS * ROWS // BATCH, **kw):
    """`steps` (default: EPOCHS epochs) of `objective` on the tiny LoRA LLaVA over shuffled `sources`, the
    reference's log-probs made `how` (once / per_step), the step `mode` (layerwise never / always); with
    `reference`, a separate reference model (its own random LoRA, which the reference zeroes, and another
    projector). Returns the losses and the trained params."""
    model, trainable = tiny_lora_llava()
    ref_model = None
    if reference:
        ref_model, _ = tiny_lora_llava()
        proj = nnx.state(ref_model.multi_modal_projector)
        nnx.update(ref_model.multi_modal_projector, jax.tree.map(lambda x: x * 1.5, proj))
    cfg = TrainConfig(objective=objective, lr=5e-3, num_steps=steps, progress=False, layerwise=mode,
                      async_checkpoints=False, weight_decay=0.01, reference_logps=how, **kw)
    workdir = tmp / f"{objective}-{mode}-{how}-{reference}"
    res = train(model, cfg, sources=sources(*names), logps_fn=logps_fn, trainable=trainable, workdir=workdir,
                reference=ref_model)
    return res.losses, nnx.state(model, trainable), workdir


def assert_same_run(a, b, atol: float = 2e-5) -> None:
    (la, pa, _), (lb, pb, _) = a, b
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6)
    assert la[0] != pytest.approx(la[-1], rel=1e-4)  # the steps moved the model
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.mark.parametrize("mode", ["never", "always"])
def test_npo_with_values_made_once_trains_as_with_a_reference_pass_per_step(tmp_path, mode) -> None:
    """NPO with a retain term over two reshuffled epochs, LoRA dropout on and the projector training: the same
    losses and params whether the reference's log-probs are made once or in every step."""
    assert_same_run(run(tmp_path, "npo", mode, "once"), run(tmp_path, "npo", mode, "per_step"))


def test_dpo_and_a_separate_reference_model(tmp_path) -> None:
    """DPO reads two reference streams (the refusals and the forget answers); MLLMU-Bench's NPO compares against a
    separate model (its oracle), which the step then no longer holds."""
    names = ("idk", "forget", "retain")
    assert_same_run(run(tmp_path, "dpo", "never", "once", names=names),
                    run(tmp_path, "dpo", "never", "per_step", names=names))
    assert_same_run(run(tmp_path, "npo", "never", "once", reference=True, names=("forget",)),
                    run(tmp_path, "npo", "never", "per_step", reference=True, names=("forget",)))


def test_a_resumed_run_makes_them_from_the_reference_not_the_checkpoint(tmp_path) -> None:
    """A run restarted from its step-4 checkpoint makes the values again before restoring it, from the model it
    starts from (the reference), and continues as the uninterrupted run did."""
    whole, params, workdir = run(tmp_path, "npo", "never", "once", save_every=4, keep_checkpoints=9)
    again = tmp_path / "again"
    shutil.copytree(workdir / "checkpoints" / "4", again / "npo-never-once-False" / "checkpoints" / "4")
    rest, params_again, _ = run(again, "npo", "never", "once", save_every=4, keep_checkpoints=9)
    assert_same_run((whole[4:], params, None), (rest, params_again, None))
