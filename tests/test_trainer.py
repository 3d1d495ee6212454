"""End-to-end trainer behaviour on the toy LM: learn, then unlearn; LoRA-only updates; reference paths."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from tests.toy_lm import FixedSource, ToyLM, kl_fn, logps_fn, make_batch, sequences
from vlmu_jax.unlearn import trainer
from vlmu_jax.unlearn.trainer import TrainConfig, joined_logps, plan_step, train

FORGET, RETAIN = sequences(4, seed=1), sequences(8, seed=2)


def mean_prob(model: ToyLM, rows: np.ndarray) -> float:
    """Mean over rows of exp(-avg answer NLL) = the FIUBench Probability of the toy answers."""
    model.eval()
    logps, mask = logps_fn(model, make_batch(rows))
    model.train()
    return float(np.mean(np.exp((logps * mask).sum(-1) / mask.sum(-1))))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> ToyLM:
    model = ToyLM()
    rows = np.concatenate([FORGET, RETAIN])
    cfg = TrainConfig(objective="finetune", lr=3e-2, num_steps=150, max_grad_norm=1.0, progress=False)
    train(model, cfg, sources={"train": FixedSource(rows, 4)}, logps_fn=logps_fn,
          workdir=tmp_path_factory.mktemp("ft"))
    assert mean_prob(model, FORGET) > 0.9 and mean_prob(model, RETAIN) > 0.9
    return model


def unlearn(model: ToyLM, objective: str, tmp_path, **kw) -> ToyLM:
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(jax.numpy.copy, state))  # train donates the arrays it gets
    cfg = TrainConfig(objective=objective, lr=1e-2, num_steps=12, progress=False, **kw)
    sources = {"forget": FixedSource(FORGET, 4), "retain": FixedSource(RETAIN, 4)}
    train(model, cfg, sources=sources, logps_fn=logps_fn, kl_fn=kl_fn, workdir=tmp_path / objective)
    return model


def test_ga_and_gd_forget_gd_keeps_retain(finetuned: ToyLM, tmp_path) -> None:
    p_f, p_r = mean_prob(finetuned, FORGET), mean_prob(finetuned, RETAIN)
    ga, gd = unlearn(finetuned, "ga", tmp_path), unlearn(finetuned, "gd", tmp_path)
    assert mean_prob(ga, FORGET) < 0.5 * p_f and mean_prob(gd, FORGET) < 0.5 * p_f
    assert abs(mean_prob(gd, RETAIN) - p_r) < abs(mean_prob(ga, RETAIN) - p_r)


def test_lora_only_lora_changes_and_no_frozen_moments(tmp_path) -> None:
    model = ToyLM(lora_rank=4, dropout=0.1)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    snapshot = lambda f: [np.array(x) for x in jax.tree.leaves(nnx.state(model, f))]  # copies, not views
    before, lora_before = snapshot(frozen), snapshot(nnx.LoRAParam)
    cfg = TrainConfig(objective="ga", lr=1e-2, num_steps=3, weight_decay=0.1, progress=False)
    res = train(model, cfg, sources={"forget": FixedSource(FORGET, 2)}, logps_fn=logps_fn,
                trainable=nnx.LoRAParam, workdir=tmp_path)
    for a, b in zip(before, snapshot(frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(not np.allclose(a, b) for a, b in zip(lora_before, snapshot(nnx.LoRAParam), strict=True))
    # Every array in the optimizer state is a scalar counter or has a LoRA parameter's shape.
    lora_shapes = {x.shape for x in lora_before}
    big = [x.shape for x in jax.tree.leaves(res.opt_state) if x.ndim > 0]
    assert big and set(big) <= lora_shapes


def test_reference_is_lora_off(tmp_path) -> None:
    """With LoRA B = 0 at start, the policy equals the LoRA-off reference: NPO = (2/beta) ln 2, KL = 0."""
    sources = {"forget": FixedSource(FORGET, 2), "retain": FixedSource(RETAIN, 2)}
    for objective, key, expected in [("npo", "npo", 2 / 0.5 * math.log(2)), ("kl", "retain_kl", 0.0)]:
        cfg = TrainConfig(objective=objective, lr=1e-2, num_steps=2, beta=0.5, progress=False)
        train(ToyLM(lora_rank=4), cfg, sources=sources, logps_fn=logps_fn, kl_fn=kl_fn,
              trainable=nnx.LoRAParam, workdir=tmp_path / objective)
        log = (tmp_path / objective / "metrics.jsonl").read_text()
        first, second = [json.loads(ln) for ln in log.splitlines()]
        assert first[key] == pytest.approx(expected, abs=1e-6)
        assert second[key] != pytest.approx(expected, abs=1e-9)


def test_full_finetune_reference_is_frozen_copy(tmp_path) -> None:
    cfg = TrainConfig(objective="dpo", lr=1e-2, num_steps=2, beta=0.5, progress=False)
    sources = {"forget": FixedSource(FORGET, 2), "idk": FixedSource(RETAIN[:4], 2)}
    train(ToyLM(), cfg, sources=sources, logps_fn=logps_fn, workdir=tmp_path)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["margin"] == pytest.approx(0.0, abs=1e-6)


def test_plan_step_alternates_phases_and_missing_stream_errors(tmp_path) -> None:
    assert [plan_step(s, [2, 3]) for s in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (0, 2)]
    with pytest.raises(ValueError, match="retain"):
        train(ToyLM(), TrainConfig(objective="gd"), sources={"forget": FixedSource(FORGET, 2)},
              logps_fn=logps_fn, workdir=tmp_path)


class PoisonedSource(FixedSource):
    """Batches from index 2 on carry NaN pixels, which the logps_fn below lets into the loss."""

    def get(self, index: int) -> dict[str, np.ndarray]:
        batch = super().get(index)
        batch["images"] = {"pixel_values": batch["images"]["pixel_values"] + (np.nan if index >= 2 else 0.0)}
        return batch


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path) -> None:
    def nan_logps(model, batch):
        logps, mask = logps_fn(model, batch)
        return logps + 0.0 * batch["images"]["pixel_values"].sum(), mask

    cfg = TrainConfig(objective="finetune", lr=1e-2, num_steps=6, save_every=1, progress=False)
    with pytest.raises(FloatingPointError, match="at step 2; last good checkpoint: step 2"):
        train(ToyLM(), cfg, sources={"train": PoisonedSource(FORGET, 2)}, logps_fn=nan_logps,
              workdir=tmp_path)
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == 2


def test_mllmu_kl_min_alternates_forget_and_retain_phases(tmp_path) -> None:
    cfg = TrainConfig(objective="kl_min", lr=1e-2, num_epochs=1, progress=False)
    sources = {"forget": FixedSource(FORGET, 2), "retain": FixedSource(RETAIN, 4)}  # 2 + 2 steps per epoch
    train(ToyLM(lora_rank=2), cfg, sources=sources, logps_fn=logps_fn, kl_fn=kl_fn, trainable=nnx.LoRAParam,
          workdir=tmp_path)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [("forget_nll" in r, "retain_kl" in r) for r in rows] == [(True, False)] * 2 + [(False, True)] * 2
    assert rows[2]["retain_kl"] > 0.0  # the forget phase moved the policy away from the LoRA-off reference


def test_step_time_runs_until_the_step_is_done(tmp_path, monkeypatch) -> None:
    """step_s counts a step until its updated parameters exist, not until its loss does: the layer-by-layer step's
    loss is ready once its forward is, while its backward and update still run. On a clock that only the fake
    step moves: 1 s to its loss, 5 s more to its parameters."""
    clock = [0.0]
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock[0])

    class Updating:
        """A parameter the step's last program writes."""

        def block_until_ready(self) -> "Updating":
            clock[0] += 5.0
            return self

    def step_fn(params, opt_state, rng, batches):
        clock[0] += 1.0
        return Updating(), opt_state, rng, np.float32(0.5), {"grad_norm": np.float32(1.0)}

    cfg = TrainConfig(objective="ga", num_steps=2, progress=False, keep_checkpoints=0)
    trainer._run_steps(step_fn, (None, None, None), (), cfg=cfg, sources={"forget": FixedSource(FORGET, 2)},
                       phases=[("forget",)], phase_lengths=[2], total=2, schedule=lambda step: 0.0,
                       workdir=tmp_path, mesh=None)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_s"] for r in rows] == [6.0, 6.0]


def _event_scalars(folder) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the TensorBoard event files in `folder` (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in folder.glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])  # length, its crc, payload, its crc
            i += 12 + n + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_tensorboard_events_hold_every_logged_scalar(tmp_path) -> None:
    cfg = TrainConfig(objective="gd", lr=1e-2, num_steps=3, progress=False)
    train(ToyLM(), cfg, sources={"forget": FixedSource(FORGET, 2), "retain": FixedSource(RETAIN, 2)},
          logps_fn=logps_fn, workdir=tmp_path)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = _event_scalars(tmp_path)
    assert set(scalars) == {f"train/{k}" for k in ("loss", "lr", "grad_norm", "tokens_per_s", "forget_nll",
                                                    "retain_nll", "step_s", "tokens", "seq_len")}
    for key, by_step in scalars.items():
        assert by_step == pytest.approx({r["step"]: r[key.removeprefix("train/")] for r in rows}, rel=1e-6), key


def test_streams_of_one_shape_share_one_pass() -> None:
    """Same-shape streams named for joining run as one batch, each getting back exactly its own rows' values; a
    stream of another shape, or not named, runs alone."""
    model = ToyLM()
    model.eval()
    rows = {"forget": make_batch(FORGET[:2]), "retain": make_batch(RETAIN[:2]), "odd": make_batch(RETAIN[2:5])}
    calls = []

    def counted(m, batch):
        calls.append(batch["input_ids"].shape[0])
        return logps_fn(m, batch)

    got = joined_logps(model, rows, 5, counted, join=set(rows))
    assert sorted(calls) == [3, 4]  # forget + retain joined (2 + 2 rows), the 3-row stream alone
    for name, batch in rows.items():
        want_logps, want_mask = logps_fn(model, batch)
        np.testing.assert_allclose(np.asarray(got[name][0]), np.asarray(want_logps), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(got[name][1]), np.asarray(want_mask))
    calls.clear()
    joined_logps(model, rows, 5, counted, join={"forget", "odd"})
    assert sorted(calls) == [2, 2, 3]


@pytest.mark.parametrize("objective,second,passes", [("gd", "retain", [4]), ("kl", "retain", [2, 2]),
                                                    ("dpo", "idk", [4, 4]), ("npo", "retain", [4, 2])])
def test_step_joins_only_streams_read_through_their_logprobs(tmp_path, objective, second, passes) -> None:
    """GD reads both streams' log-probs: one pass of 2 + 2 rows. KL reads the retain stream only through its
    full-vocabulary KL, so the retain log-probs stay a pass of their own, which XLA cuts as unused. The reference
    joins the same way: DPO's two reference streams in one pass, NPO's one alone."""
    calls = []

    def counted(m, batch):
        calls.append(batch["input_ids"].shape[0])
        return logps_fn(m, batch)

    cfg = TrainConfig(objective=objective, lr=1e-2, num_steps=1, progress=False)
    sources = {"forget": FixedSource(FORGET, 2), second: FixedSource(RETAIN, 2)}
    train(ToyLM(lora_rank=4), cfg, sources=sources, logps_fn=counted, kl_fn=kl_fn, trainable=nnx.LoRAParam,
          workdir=tmp_path)
    assert calls[: len(passes)] == passes  # the step's trace (later calls: none, or other programs' traces)
