"""WGA, SatImp, UNDIAL, CE-U, RMU and MMUnlearner's saliency map against numbers worked out by hand."""

import json
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.toy_lm import FixedSource, ToyLM, hidden_fn, logps_fn, make_batch, sequences, vocab_fn
from vlmu_jax.eval.scoring import head_token_stat
from vlmu_jax.unlearn.objectives import StreamLogps, ceu_stat, get_objective, undial_stat
from vlmu_jax.unlearn.saliency import fisher_diagonal, saliency_mask
from vlmu_jax.unlearn.trainer import TrainConfig, train

# Answer tokens: row 0 has log-probs -1, -2 (third masked), row 1 has -3 only.
POL = jnp.array([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
MASK = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
VOCAB = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
S = StreamLogps(POL, None, MASK, vocab=VOCAB)
R = StreamLogps(jnp.array([[-0.5, 0.0]]), None, jnp.array([[1, 0]], bool))  # retain NLL 0.5
CFG = SimpleNamespace(forget_weight=1.0, retain_weight=1.0, wga_beta=2.0, satimp_beta1=2.0, satimp_beta2=1.0,
                      undial_beta=math.log(2.0), ceu_ignore_first=1, rmu_steering=2.0)
LOGPS = (-1.0, -2.0, -3.0)  # the three answer tokens
FORGET, RETAIN = sequences(4, seed=1), sequences(8, seed=2)


def run(name: str, streams: dict, cfg=CFG) -> tuple[float, dict]:
    loss, aux = get_objective(name).fn(streams, cfg)
    return float(loss), {k: float(v) for k, v in aux.items()}


def test_wga_weights_tokens_by_detached_probability() -> None:
    # forget term = mean over the 3 tokens of p^2 * log p; plus the retain NLL 0.5.
    forget = sum(math.exp(2 * lp) * lp for lp in LOGPS) / 3
    loss, aux = run("wga", {"forget": S, "retain": R})
    assert aux["wga"] == pytest.approx(forget, rel=1e-6) and loss == pytest.approx(forget + 0.5, rel=1e-6)
    # The weight is a constant: d loss / d log p_t = p_t^2 / 3 on answer tokens, 0 elsewhere.
    grad = jax.grad(lambda lp: get_objective("wga").fn({"forget": S._replace(policy=lp), "retain": R}, CFG)[0])(POL)
    expected = np.where(MASK, np.exp(2 * np.asarray(POL)) / 3, 0.0)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)


def test_satimp_weights_and_forget_weight() -> None:
    # weight p^2 (1 - p); open-unlearning's SatImp config scales the forget term by gamma = 0.1.
    forget = sum(math.exp(2 * lp) * (1 - math.exp(lp)) * lp for lp in LOGPS) / 3
    cfg = SimpleNamespace(**{**vars(CFG), "forget_weight": 0.1})
    loss, aux = run("satimp", {"forget": S, "retain": R}, cfg)
    assert aux["satimp"] == pytest.approx(forget, rel=1e-6) and loss == pytest.approx(0.1 * forget + 0.5, rel=1e-6)


def test_undial_target_lowers_the_answer_logit() -> None:
    # Reference (0.6, 0.3, 0.1), answer 0, beta = ln 2: target ∝ (0.3, 0.3, 0.1) = (3/7, 3/7, 1/7).
    logp, logq = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]])), jnp.log(jnp.array([[[0.6, 0.3, 0.1]]]))
    expected = -(3 / 7 * math.log(0.5) + 3 / 7 * math.log(0.3) + 1 / 7 * math.log(0.2))
    assert float(undial_stat(logp, logq, jnp.array([[0]]), CFG)[0, 0]) == pytest.approx(expected, rel=1e-6)
    # The objective averages the statistic over answer tokens: (0.1 + 0.2 + 0.4) / 3.
    assert run("undial", {"forget": S})[0] == pytest.approx(0.7 / 3, rel=1e-6)


def test_ceu_target_is_own_distribution_without_the_answer() -> None:
    # p = (0.5, 0.3, 0.2), answer 0: q = (0, 0.6, 0.4); the loss is CE(p, q), its logit gradient p - q.
    def loss_of(z: jax.Array) -> jax.Array:
        return ceu_stat(jax.nn.log_softmax(z), None, jnp.array([[0]]), CFG)[0, 0]

    z = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
    assert float(loss_of(z)) == pytest.approx(-(0.6 * math.log(0.3) + 0.4 * math.log(0.2)), rel=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(loss_of)(z))[0, 0], [0.5, -0.3, -0.2], atol=1e-6)
    # Each sequence's first answer token is left out: only row 0's second token (0.2) remains.
    assert run("ceu", {"forget": S})[0] == pytest.approx(0.2, rel=1e-6)
    cfg = SimpleNamespace(**{**vars(CFG), "ceu_ignore_first": 0})
    assert run("ceu", {"forget": S}, cfg)[0] == pytest.approx(0.7 / 3, rel=1e-6)


def test_vocab_stats_run_chunked_like_direct_softmax() -> None:
    """head_token_stat (ragged last chunk) equals the statistic of the direct [B, T, V] softmax."""
    k = jax.random.split(jax.random.key(0), 5)
    h, r = jax.random.normal(k[0], (2, 5, 8)), jax.random.normal(k[1], (2, 5, 8))
    w, wr = jax.random.normal(k[2], (11, 8)), jax.random.normal(k[3], (11, 8))
    t = jax.random.randint(k[4], (2, 5), 0, 11)
    logp, logq = jax.nn.log_softmax(h @ w.T), jax.nn.log_softmax(r @ wr.T)
    stat = lambda lp, lq, tt: undial_stat(lp, lq, tt, CFG)  # noqa: E731
    np.testing.assert_allclose(np.asarray(head_token_stat(stat, h, w, t, r, wr, chunk_size=2)),
                               np.asarray(undial_stat(logp, logq, t, CFG)), rtol=1e-5)


def test_rmu_activation_losses() -> None:
    # Forget: zero activations vs c * u with |u| = 1: mean over D of (c u_d)^2 = c^2 / D = 4 / 4.
    zeros = jnp.zeros((1, 2, 4))
    forget = StreamLogps(POL[:1, :2], None, MASK[:1, :2], hidden=zeros, hidden_mask=jnp.array([[1, 0]], bool))
    # Retain: row 0 tokens (1, 1), (0, 0) -> squared means 1, 0 over 2 tokens = 0.5; row 1 (2, 0) -> 2 over 1
    # token (the second is masked); mean over rows 1.25.
    h = jnp.array([[[1.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [9.0, 9.0]]])
    retain = StreamLogps(POL[:, :2], None, MASK[:, :2], hidden=h, ref_hidden=jnp.zeros_like(h),
                         hidden_mask=jnp.array([[1, 1], [1, 0]], bool))
    loss, aux = run("rmu", {"forget": forget, "retain": retain})
    assert aux["rmu_forget"] == pytest.approx(1.0, rel=1e-6) and aux["rmu_retain"] == pytest.approx(1.25)
    assert loss == pytest.approx(2.25, rel=1e-6)


def test_saliency_mask_and_fisher() -> None:
    # Fisher of loss = sum(p * batch) is the mean of batch^2: batches (1, 2), (3, 0) -> (5, 2).
    batches = [jnp.array([1.0, 2.0]), jnp.array([3.0, 0.0])]
    fisher = fisher_diagonal(lambda p, _, b: jnp.sum(p["w"] * b), {"w": jnp.zeros(2)}, batches)
    np.testing.assert_allclose(np.asarray(fisher["w"]), [5.0, 2.0])
    # Ratio forget / preserve >= gamma; 0 / 0 counts as 1 (the authors' 1e-15 guard).
    forget, preserve = {"w": jnp.array([4.0, 1.0, 0.0])}, {"w": jnp.array([2.0, 2.0, 0.0])}
    assert saliency_mask(forget, preserve, 1.0)["w"].tolist() == [True, False, True]
    assert saliency_mask(forget, preserve, 2.0)["w"].tolist() == [True, False, False]


# ----------------------------------------------------------------------------- through the trainer (toy LM)
def _train_toy(tmp_path, objective: str, sources: dict, steps: int, **kw) -> tuple[ToyLM, list[dict]]:
    model = ToyLM(lora_rank=4) if kw.pop("lora", True) else ToyLM()
    cfg = TrainConfig(objective=objective, lr=1e-2, num_steps=steps, progress=False, **kw)
    train(model, cfg, sources=sources, logps_fn=logps_fn, vocab_fn=vocab_fn, hidden_fn=hidden_fn,
          trainable=nnx.LoRAParam if model.lora_a.shape[1] else nnx.Param, workdir=tmp_path / objective)
    log = (tmp_path / objective / "metrics.jsonl").read_text().splitlines()
    return model, [json.loads(ln) for ln in log]


def _forget_logp(model: ToyLM) -> float:
    logps, mask = logps_fn(model, make_batch(FORGET))
    return float((logps * mask).sum() / mask.sum())


def test_trainer_feeds_hidden_and_vocab_streams(tmp_path) -> None:
    """RMU's retain term starts at 0 (LoRA B = 0: policy = LoRA-off reference); UNDIAL and CE-U lower the
    forget answers' log-probs."""
    sources = {"forget": FixedSource(FORGET, 2), "retain": FixedSource(RETAIN, 2)}
    _, rmu = _train_toy(tmp_path, "rmu", sources, 3)
    assert rmu[0]["rmu_retain"] == pytest.approx(0.0, abs=1e-9) and rmu[0]["rmu_forget"] > 0.0
    assert rmu[1]["rmu_retain"] > 0.0
    start = _forget_logp(ToyLM(lora_rank=4))
    for name in ("undial", "ceu"):
        model, _ = _train_toy(tmp_path, name, sources, 4)
        assert _forget_logp(model) < start, name


def test_mmunlearner_saliency_gates_only_forget_steps(tmp_path) -> None:
    """Two forget (ascent) steps with a mask that admits nothing leave every weight as it was;
    the retain phase that follows is never masked."""
    sources = {"forget": FixedSource(FORGET, 2), "retain": FixedSource(RETAIN, 2),
               "forget_text": FixedSource(FORGET, 2)}
    start = [np.asarray(x) for x in jax.tree.leaves(nnx.state(ToyLM(), nnx.Param))]

    def changed(steps: int, threshold: float) -> bool:
        model, _ = _train_toy(tmp_path / f"{steps}_{threshold}", "mmunlearner", sources, steps, lora=False,
                              saliency_threshold=threshold)
        return any(not np.array_equal(a, b) for a, b in zip(start, jax.tree.leaves(nnx.state(model, nnx.Param)),
                                                            strict=True))

    assert not changed(2, math.inf) and changed(3, math.inf)
    with pytest.raises(ValueError, match="forget_text"):
        _train_toy(tmp_path, "mmunlearner", {k: sources[k] for k in ("forget", "retain")}, 1)


def test_every_preset_variant_builds_with_a_registered_objective() -> None:
    from vlmu_jax import presets
    from vlmu_jax.unlearn.objectives import OBJECTIVES

    for build, methods in ((presets.fiubench, presets.FIUBENCH_METHODS), (presets.mllmu, presets.MLLMU_METHODS)):
        for method in methods:
            c = build(method, template="llava-1.5", model_path="")
            assert c.unlearn.objective == method and method in OBJECTIVES
    c = presets.fiubench("satimp", template="llava-1.5", model_path="")
    assert (c.unlearn.forget_weight, c.unlearn.satimp_beta1, c.unlearn.lora_rank) == (0.1, 5.0, 128)
    assert presets.mllmu("mmunlearner", template="llava-1.5", model_path="").unlearn.lora_rank == 0
