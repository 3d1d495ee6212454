"""Each objective against numbers worked out by hand on fixed log-probs, plus the GA gradient direction."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmu_jax.unlearn.objectives import OBJECTIVES, StreamLogps, get_objective

# Two sequences: row 0 has answer tokens with log-probs -1, -2 (third masked); row 1 has -3 only.
POL = jnp.array([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
REF = jnp.array([[-0.5, -1.5, -9.0], [-2.0, -9.0, -9.0]])
MASK = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
KL = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
KL_MASK = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
S = StreamLogps(POL, REF, MASK, KL, KL_MASK)
# Retain-like stream: a single token with log-prob -0.5.
R = StreamLogps(jnp.array([[-0.5, 0.0]]), jnp.array([[-0.25, 0.0]]), jnp.array([[1, 0]], bool),
                jnp.array([[0.3, 0.7]]), jnp.array([[1, 1]], bool))
CFG = SimpleNamespace(beta=0.5, retain_weight=1.0, simnpo_gamma=0.2, npo_batch_mean=False)
NLL_S = 6.0 / 3  # token mean over the batch: (1 + 2 + 3) / 3


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def run(name: str, streams: dict, cfg=CFG) -> tuple[float, dict]:
    loss, aux = get_objective(name).fn(streams, cfg)
    return float(loss), {k: float(v) for k, v in aux.items()}


def test_nll_family() -> None:
    assert run("finetune", {"train": S})[0] == pytest.approx(NLL_S)
    assert run("ga", {"forget": S})[0] == pytest.approx(-NLL_S)
    loss, aux = run("gd", {"forget": S, "retain": R})
    assert loss == pytest.approx(-NLL_S + 0.5) and aux["retain_nll"] == pytest.approx(0.5)
    # idk concatenates: (1 + 2 + 3 + 0.5) / 4 tokens, not the mean of the two means.
    assert run("idk", {"idk": S, "retain": R})[0] == pytest.approx(6.5 / 4)


def test_kl_reductions() -> None:
    # FIUBench: mean over KL positions; the retain stream here has 2 positions: (0.3 + 0.7) / 2.
    loss, aux = run("kl", {"forget": S, "retain": R})
    assert aux["retain_kl"] == pytest.approx(0.5) and loss == pytest.approx(-NLL_S + 0.5)
    # MLLMU: sum over positions / batch rows: S has kl (0.1+0.2+0.3+0.4+0.5) / 2 rows.
    loss, aux = run("kl_min", {"retain": S})
    assert aux["retain_kl"] == pytest.approx(1.5 / 2) and loss == pytest.approx(NLL_S + 0.75)
    assert run("kl_min", {"forget": S})[0] == pytest.approx(-NLL_S)


def test_ga_difference_phases() -> None:
    assert run("ga_difference", {"forget": S})[0] == pytest.approx(-NLL_S)
    assert run("ga_difference", {"retain": R})[0] == pytest.approx(0.5)


def test_npo_per_sequence_and_batch_mean() -> None:
    # log(pi/pi_ref) per sequence: row 0 (-3) - (-2) = -1, row 1 (-3) - (-2) = -1.
    expected = -(2 / 0.5) * logsig(0.5 * 1.0)
    assert run("npo", {"forget": S})[0] == pytest.approx(expected, rel=1e-6)
    # Batch variant: token-mean NLLs 2.0 (policy) and 4/3 (ref): ratio 2/3.
    cfg = SimpleNamespace(**{**vars(CFG), "npo_batch_mean": True})
    assert run("npo", {"forget": S}, cfg)[0] == pytest.approx(-(2 / 0.5) * logsig(0.5 * 2 / 3), rel=1e-6)
    assert run("npo", {"forget": S, "retain": R})[0] == pytest.approx(expected + 0.5, rel=1e-6)


def test_dpo() -> None:
    # chosen = R: policy-ref = -0.25 ; rejected = S rows: -1 each -> margin 0.75 for both rows.
    win = StreamLogps(jnp.array([[-0.5, 0.0], [-0.5, 0.0]]), jnp.array([[-0.25, 0.0], [-0.25, 0.0]]),
                      jnp.array([[1, 0], [1, 0]], bool))
    loss, aux = run("dpo", {"idk": win, "forget": S})
    assert aux["margin"] == pytest.approx(0.75)
    assert loss == pytest.approx(-(2 / 0.5) * logsig(0.5 * 0.75), rel=1e-6)


def test_simnpo() -> None:
    # Per-sequence average NLLs: 1.5 and 3.0.
    expected = -(2 / 0.5) * np.mean([logsig(0.5 * 1.5 - 0.2), logsig(0.5 * 3.0 - 0.2)])
    assert run("simnpo", {"forget": S})[0] == pytest.approx(expected, rel=1e-6)


def test_ga_gradient_step_raises_forget_loss() -> None:
    """A gradient-descent step on the GA loss must increase the forget NLL (and lower it for finetune)."""

    def nll_after_step(name: str, stream: str) -> float:
        def loss_of(logits: jax.Array) -> jax.Array:
            logps = jax.nn.log_softmax(logits)[..., 0]
            return get_objective(name).fn({stream: StreamLogps(logps, None, MASK)}, CFG)[0]

        logits = jnp.zeros((2, 3, 4))
        new = logits - 0.1 * jax.grad(loss_of)(logits)
        return float(-(jax.nn.log_softmax(new)[..., 0] * MASK).sum() / MASK.sum())

    start = math.log(4.0)
    assert nll_after_step("ga", "forget") > start > nll_after_step("finetune", "train")


def test_registry() -> None:
    assert {"finetune", "ga", "gd", "kl", "idk", "npo", "dpo", "simnpo", "ga_difference", "kl_min"} <= set(
        OBJECTIVES
    )
    with pytest.raises(KeyError, match="known"):
        get_objective("nope")


def test_mllmu_npo_as_npo_py() -> None:
    """Protocol original: NPO.py's loss on batch-mean NLLs with no retain term, against the oracle model (the one
    reference_model_FT.py trains on the retain split: our retain_model); corrected keeps per-sequence NPO, the
    retain NLL and the starting model as reference."""
    from vlmu_jax import stages
    from vlmu_jax.protocol import Protocol
    from vlmu_jax.unlearn.trainer import TrainConfig, phase_streams

    sources = {"forget": "F", "retain": "R"}
    original = SimpleNamespace(protocol=Protocol("original", "mllmu", mllmu_baselines=True))
    run_args = stages._mllmu_npo(original, "npo", sources)
    assert run_args == {"sources": {"forget": "F"}, "reference": "retain_model"}
    assert phase_streams(get_objective("npo"), run_args["sources"]) == [("forget",)]
    cfg = stages.objective_config(original, TrainConfig(objective="npo", beta=0.5))
    # token-mean NLLs 2.0 (policy) and 4/3 (oracle), nothing else
    assert float(get_objective("npo").fn({"forget": S}, cfg)[0]) == pytest.approx(-(2 / 0.5) * logsig(0.5 * 2 / 3))
    assert stages._mllmu_npo(original, "ga", sources) == {"sources": sources}
    corrected = SimpleNamespace(protocol=Protocol("corrected", "mllmu"))
    assert stages._mllmu_npo(corrected, "npo", sources) == {"sources": sources}
    assert not stages.objective_config(corrected, TrainConfig(objective="npo")).npo_batch_mean
