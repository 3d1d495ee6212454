"""Unlearning and finetuning objectives as pure functions of per-token log-probs.

Every loss sees only `StreamLogps` per stream name, never the model, so the same function serves any
architecture and is unit-testable on hand-written numbers. `loss_fn(streams, cfg) -> (scalar, aux)`.

Definitions pinned from the originals:
- NLL = token mean over the whole batch (HF `outputs.loss`, which both originals use), not a mean of
  per-sequence means.
- FIUBench (gray311/VLM_Unlearned `forget.py::main`): `grad_ascent` = -NLL(forget); `idk` = NLL of the
  forget-questions-with-refusal batch CONCATENATED with the retain batch (one token mean over both);
  `KL` = -NLL(forget) + kl_div(log_softmax(current), log_softmax(oracle), log_target, batchmean) on retain
  inputs flattened to [B*T, V], i.e. KL(oracle || current) averaged over positions.
- MLLMU-Bench (franciscoliu/MLLMU-Bench `baselines/*.py::main`): GA_Difference and KL_Min alternate a
  forget (ascent) phase and a retain phase with separate optimizer steps; KL_Min's retain loss is
  NLL(retain) + kl_div(log_softmax(current), softmax(vanilla), batchmean) on [B, T, V] logits, i.e. the KL
  summed over positions and divided by B; NPO uses the batch-token-mean loss (batch-level NPO).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class StreamLogps(NamedTuple):
    """Per-token quantities of one data stream, float32 (masks bool or 0/1): `policy`, `ref`, `mask` and `vocab`
    [B, N] at the positions the trainer's `logps_fn` scores, in order (every position but the last, or the batch's
    label positions), `kl` and `kl_mask` [B, T-1].

    `kl` is the full-vocabulary KL(ref || policy) at each position, which cannot be rebuilt from
    target-token log-probs; the trainer's `kl_fn` supplies it (chunked over the vocabulary for real
    models) only for streams an objective lists in `kl_streams`. `kl_mask` marks the positions it
    averages over (the originals use every position of the retain inputs; we use the real tokens).
    `vocab` is the objective's own full-vocabulary per-token quantity (its `vocab_stat`, UNDIAL /
    CE-U), for streams in `vocab_streams`. `hidden` / `ref_hidden` [B, T, D] are the output of decoder layer
    `hidden_layer` under the policy / the reference, with `hidden_mask` [B, T] = labels != -100 (unshifted),
    for streams in `hidden_streams` (RMU).
    """

    policy: Array
    ref: Array | None
    mask: Array
    kl: Array | None = None
    kl_mask: Array | None = None
    vocab: Array | None = None
    hidden: Array | None = None
    ref_hidden: Array | None = None
    hidden_mask: Array | None = None


Streams = Mapping[str, StreamLogps]
LossFn = Callable[[Streams, Any], tuple[Array, dict[str, Array]]]


def _param(cfg: Any, name: str, default: float) -> float:
    """Objective hyper-parameters are optional config fields, so an objective needs no schema change."""
    return getattr(cfg, name, default) if cfg is not None else default


def _sum_logp(s: StreamLogps, logps: Array) -> Array:
    """Per-sequence sum of target log-probs = log pi(y|x) over answer tokens, [B]."""
    return jnp.sum(jnp.where(s.mask, logps, 0.0), axis=-1)


def _count(s: StreamLogps) -> Array:
    return jnp.sum(s.mask.astype(jnp.float32), axis=-1)


def token_mean_nll(*streams: StreamLogps) -> Array:
    """HF-style loss: total NLL over all answer tokens of the (concatenated) streams / their count."""
    total = sum(-jnp.sum(_sum_logp(s, s.policy)) for s in streams)
    count = sum(jnp.sum(_count(s)) for s in streams)
    return total / jnp.maximum(count, 1.0)


def seq_mean_nll(s: StreamLogps, logps: Array) -> Array:
    """Per-sequence average NLL over answer tokens, [B] (the BENCHMARKS.md `loss(a)`)."""
    return -_sum_logp(s, logps) / jnp.maximum(_count(s), 1.0)


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of x over the positions `mask` marks (bool or 0/1) in the whole batch; 0 when it marks none."""
    m = mask.astype(bool)
    return jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)


def kl_token_mean(s: StreamLogps) -> Array:
    """FIUBench reduction: KL(oracle || current) averaged over positions (kl_div batchmean on [B*T, V])."""
    return masked_mean(s.kl, s.kl_mask)


def kl_sum_per_seq(s: StreamLogps) -> Array:
    """MLLMU-Bench reduction: kl_div batchmean on [B, T, V] = KL summed over positions, divided by B."""
    return jnp.sum(s.kl * s.kl_mask.astype(jnp.float32)) / s.kl.shape[0]


def finetune(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """Plain NLL on the `train` stream (finetune stage and the retain-only reference model)."""
    nll = token_mean_nll(streams["train"])
    return nll, {"nll": nll}


def ga(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """FIUBench grad_ascent / MLLMU GA: maximise the forget NLL."""
    forget = token_mean_nll(streams["forget"])
    return -forget, {"forget_nll": forget}


def gd(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """GradDiff (TOFU grad_diff): ascent on forget plus descent on retain in one summed loss."""
    forget = token_mean_nll(streams["forget"])
    retain = token_mean_nll(streams["retain"])
    return -forget + _param(cfg, "retain_weight", 1.0) * retain, {"forget_nll": forget, "retain_nll": retain}


def kl(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """FIUBench KL: -NLL(forget) + KL(oracle || current) on retain positions (no retain NLL term)."""
    forget = token_mean_nll(streams["forget"])
    kl_retain = kl_token_mean(streams["retain"])
    return -forget + kl_retain, {"forget_nll": forget, "retain_kl": kl_retain}


def idk(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """FIUBench idk: refusal answers as targets, one token mean over the idk and retain batches together."""
    loss = token_mean_nll(streams["idk"], streams["retain"])
    return loss, {"idk_nll": token_mean_nll(streams["idk"]), "retain_nll": token_mean_nll(streams["retain"])}


def _with_retain(loss: Array, aux: dict[str, Array], streams: Streams, cfg: Any) -> tuple[Array, dict]:
    """Preference-style losses get an optional retain NLL term when the run supplies a retain stream."""
    if "retain" not in streams:
        return loss, aux
    retain = token_mean_nll(streams["retain"])
    return loss + _param(cfg, "retain_weight", 1.0) * retain, {**aux, "retain_nll": retain}


def npo(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """NPO: -(2/beta) mean log sigmoid(-beta log(pi/pi_ref)).

    Intended (NPO paper) definition is per sequence with log pi = summed answer log-prob; with
    `npo_batch_mean=True` it is MLLMU-Bench's variant: one ratio from the batch-token-mean losses.
    """
    s, beta = streams["forget"], _param(cfg, "beta", 0.1)
    if _param(cfg, "npo_batch_mean", False):
        ref = StreamLogps(s.ref, None, s.mask)
        neg_log_ratio = token_mean_nll(s) - token_mean_nll(ref)
    else:
        neg_log_ratio = _sum_logp(s, s.ref) - _sum_logp(s, s.policy)
    loss = -jnp.mean(jax.nn.log_sigmoid(beta * neg_log_ratio)) * 2.0 / beta
    return _with_retain(loss, {"npo": loss, "forget_nll": token_mean_nll(s)}, streams, cfg)


def dpo(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """DPO with the refusal (`idk`) as chosen and the forget answer as rejected (TOFU scaling 2/beta)."""
    win, lose, beta = streams["idk"], streams["forget"], _param(cfg, "beta", 0.1)
    margin = (_sum_logp(win, win.policy) - _sum_logp(win, win.ref)) - (
        _sum_logp(lose, lose.policy) - _sum_logp(lose, lose.ref)
    )
    loss = -jnp.mean(jax.nn.log_sigmoid(beta * margin)) * 2.0 / beta
    aux = {"dpo": loss, "margin": jnp.mean(margin), "forget_nll": token_mean_nll(lose)}
    return _with_retain(loss, aux, streams, cfg)


def simnpo(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """SimNPO (reference-free): -(2/beta) mean log sigmoid(beta * avgNLL(y) - gamma), length-normalised."""
    s, beta = streams["forget"], _param(cfg, "beta", 0.1)
    margin = beta * seq_mean_nll(s, s.policy) - _param(cfg, "simnpo_gamma", 0.0)
    loss = -jnp.mean(jax.nn.log_sigmoid(margin)) * 2.0 / beta
    return _with_retain(loss, {"simnpo": loss, "forget_nll": token_mean_nll(s)}, streams, cfg)


def ga_difference(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """MLLMU GA_Difference: the forget phase ascends, the retain phase descends (separate steps)."""
    loss, aux = jnp.zeros((), jnp.float32), {}
    if "forget" in streams:
        aux["forget_nll"] = token_mean_nll(streams["forget"])
        loss = loss - aux["forget_nll"]
    if "retain" in streams:
        aux["retain_nll"] = token_mean_nll(streams["retain"])
        loss = loss + aux["retain_nll"]
    return loss, aux


def kl_min(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """MLLMU KL_Min: GA_Difference plus, in the retain phase, KL to the vanilla model (summed over positions / B)."""
    loss, aux = ga_difference(streams, cfg)
    if "retain" in streams:
        aux["retain_kl"] = kl_sum_per_seq(streams["retain"])
        loss = loss + aux["retain_kl"]
    return loss, aux


def _weighted_logp_mean(s: StreamLogps, weight: Array) -> Array:
    """Token mean over the batch of sg(weight) * log p: minimising it is gradient ascent on the forget NLL
    with each token's step scaled by its (detached) weight."""
    return masked_mean(jax.lax.stop_gradient(weight) * s.policy, s.mask)


def _forget_plus_retain(forget: Array, name: str, streams: Streams, cfg: Any) -> tuple[Array, dict]:
    """open-unlearning's GradDiff-family sum: gamma * forget term + alpha * retain NLL (`forget_weight`,
    `retain_weight`)."""
    loss = _param(cfg, "forget_weight", 1.0) * forget
    return _with_retain(loss, {name: forget, "forget_nll": token_mean_nll(streams["forget"])}, streams, cfg)


def wga(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """WGA (Wang et al., ICLR 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go
    Beyond"): gradient ascent with each token weighted by sg(p(y_t))^beta, so tokens the model has already
    forgotten stop pushing (plain GA keeps ascending on them and collapses the model)."""
    s = streams["forget"]
    return _forget_plus_retain(_weighted_logp_mean(s, jnp.exp(s.policy) ** _param(cfg, "wga_beta", 1.0)),
                               "wga", streams, cfg)


def satimp(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """SatImp (Yang et al., ICML 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning"):
    token weights sg(p^beta1 (1-p)^beta2) combine saturation (p^beta1, as WGA: stop on forgotten tokens) with
    importance ((1-p)^beta2: favour tokens that are not near-certain, which carry the specific knowledge)."""
    s = streams["forget"]
    p = jnp.exp(s.policy)
    weight = p ** _param(cfg, "satimp_beta1", 5.0) * (1.0 - p) ** _param(cfg, "satimp_beta2", 1.0)
    return _forget_plus_retain(_weighted_logp_mean(s, weight), "satimp", streams, cfg)


def undial_stat(logp: Array, logq: Array, targets: Array, cfg: Any) -> Array:
    """UNDIAL per position: CE(p_theta, softmax(z_ref - beta * onehot(y))), from [B, c, V] log-softmaxes
    (softmax is shift-invariant, so the reference's log-probs stand in for its logits)."""
    onehot = jnp.arange(logp.shape[-1]) == targets[..., None]
    target = jax.nn.softmax(logq - _param(cfg, "undial_beta", 10.0) * onehot, axis=-1)
    return -jnp.sum(target * logp, axis=-1)


def undial(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """UNDIAL (Dong et al., NAACL 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning
    in Large Language Models"): distil the frozen model's next-token distribution with the answer token's logit
    lowered by beta. The target is fixed, so the loss is bounded and cannot diverge like gradient ascent.

    Mean over answer tokens (`vocab_stat` = `undial_stat`); open-unlearning averages over every position,
    prompt and padding included.
    """
    s = streams["forget"]
    loss = masked_mean(s.vocab, s.mask)
    return loss, {"undial": loss}


def ceu_stat(logp: Array, logq: Array | None, targets: Array, cfg: Any) -> Array:
    """CE-U per position: CE(p_theta, q) with q = softmax of the detached logits with the target's set to
    -inf, i.e. the model's own distribution renormalised over every token but the answer."""
    onehot = jnp.arange(logp.shape[-1]) == targets[..., None]
    q = jax.nn.softmax(jnp.where(onehot, -jnp.inf, jax.lax.stop_gradient(logp)), axis=-1)
    return -jnp.sum(jnp.where(onehot, 0.0, q * logp), axis=-1)


def ceu(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """CE-U (Yang et al., 2025, "CE-U: Cross Entropy Unlearning", arXiv:2503.01224): cross entropy to the
    model's own distribution without the answer token. Its logit gradient p - q vanishes as p(y) -> 0, unlike
    gradient ascent's, so it needs no retain term to stay stable.

    Mean over answer tokens after each sequence's first `ceu_ignore_first` (the paper's footnote: the first
    answer token is often predictable from the question alone).
    """
    s = streams["forget"]
    mask = s.mask & (jnp.cumsum(s.mask, axis=-1) > _param(cfg, "ceu_ignore_first", 1))
    loss = masked_mean(s.vocab, mask)
    return loss, {"ceu": loss}


def _activation_mse(h: Array, target: Array, mask: Array) -> Array:
    """RMU's activation loss: squared error averaged over the hidden dimension, then over each sequence's
    masked positions, then over sequences (open-unlearning `compute_activation_loss`)."""
    sq = jnp.mean((h.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.mean(jnp.sum(sq * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0))


def rmu(streams: Streams, cfg: Any) -> tuple[Array, dict[str, Array]]:
    """RMU (Li et al., ICML 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning"):
    push layer-L activations on forget answers toward c * u (u a fixed random unit vector: noise the later
    layers cannot decode), keep them equal to the frozen model's on retain answers.

    u is drawn uniform in [0, 1)^D then normalised, as WMDP's and open-unlearning's code do, from a fixed key.
    """
    f, r = streams["forget"], streams["retain"]
    u = jax.random.uniform(jax.random.key(0), (f.hidden.shape[-1],))
    forget = _activation_mse(f.hidden, _param(cfg, "rmu_steering", 2.0) * u / jnp.linalg.norm(u), f.hidden_mask)
    retain = _activation_mse(r.hidden, r.ref_hidden, r.hidden_mask)
    loss = _param(cfg, "forget_weight", 1.0) * forget + _param(cfg, "retain_weight", 1.0) * retain
    return loss, {"rmu_forget": forget, "rmu_retain": retain}


@dataclass(frozen=True)
class Objective:
    """A loss plus what the trainer must feed it.

    phases: stream groups run in turn, each for len(source of its first stream) steps per cycle (one
      phase for every method except MLLMU's alternating GA_Difference / KL_Min).
    optional: streams added to every phase when the run provides a source for them.
    ref_streams / kl_streams: streams that need reference log-probs / full-vocab KL to the reference; a
      stream in ref_streams also gets its `vocab_stat` and hidden states computed with the reference.
    vocab_streams / vocab_stat: streams that need `vocab_stat(logp, logq | None, targets, cfg)` at each
      position, a reduction of [B, c, V] log-softmaxes of the policy (and reference) run chunked by the trainer.
    hidden_streams: streams that need the decoder-layer outputs of `cfg.hidden_layer` (RMU).
    masked_streams / preserve_streams: MMUnlearner's weight saliency: a step whose batches include a masked
      stream updates only the parameter entries whose Fisher importance on the masked streams' data is at
      least `saliency_threshold` times that on the preserve streams' data (see unlearn/saliency.py).
    """

    fn: LossFn
    phases: tuple[tuple[str, ...], ...]
    optional: tuple[str, ...] = ()
    ref_streams: tuple[str, ...] = ()
    kl_streams: tuple[str, ...] = ()
    vocab_streams: tuple[str, ...] = ()
    vocab_stat: Callable[[Array, Array | None, Array, Any], Array] | None = None
    hidden_streams: tuple[str, ...] = ()
    masked_streams: tuple[str, ...] = ()
    preserve_streams: tuple[str, ...] = ()


OBJECTIVES: dict[str, Objective] = {
    "finetune": Objective(finetune, (("train",),)),
    "ga": Objective(ga, (("forget",),)),
    "gd": Objective(gd, (("forget", "retain"),)),
    "kl": Objective(kl, (("forget", "retain"),), kl_streams=("retain",)),
    "idk": Objective(idk, (("idk", "retain"),)),
    "npo": Objective(npo, (("forget",),), optional=("retain",), ref_streams=("forget",)),
    "dpo": Objective(dpo, (("idk", "forget"),), optional=("retain",), ref_streams=("idk", "forget")),
    "simnpo": Objective(simnpo, (("forget",),), optional=("retain",)),
    "ga_difference": Objective(ga_difference, (("forget",), ("retain",))),
    "kl_min": Objective(kl_min, (("forget",), ("retain",)), kl_streams=("retain",)),
    "wga": Objective(wga, (("forget", "retain"),)),
    "satimp": Objective(satimp, (("forget", "retain"),)),
    "undial": Objective(undial, (("forget",),), ref_streams=("forget",), vocab_streams=("forget",),
                        vocab_stat=undial_stat),
    "ceu": Objective(ceu, (("forget",),), vocab_streams=("forget",), vocab_stat=ceu_stat),
    "rmu": Objective(rmu, (("forget", "retain"),), ref_streams=("retain",), hidden_streams=("forget", "retain")),
    # MMUnlearner (Huo et al., ACL Findings 2025, arXiv:2502.11051): MLLMU's alternating GA / retain-NLL phases
    # with the ascent restricted to the parameters salient for the forget images but not for the retain images
    # or the forget identities' text-only QA (`forget_text`), so their textual knowledge survives.
    "mmunlearner": Objective(ga_difference, (("forget",), ("retain",)), masked_streams=("forget",),
                             preserve_streams=("retain", "forget_text")),
}


def get_objective(name: str) -> Objective:
    """Look an objective up by its config name, listing the known names on a typo."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
