"""The one training loop: finetune and every unlearning method are an objective plus named BatchSources.

Functional core: the model is split once into (graphdef, trainable, rng, frozen) states and one jitted
pure step maps (trainable, opt_state, rng, batches) to their successors with the first three donated,
so only the trainable state and its optimizer moments are ever updated or copied. The reference model
for KL/NPO/DPO is the same graphdef merged with the LoRA parameters zeroed (no copy); trainable
non-LoRA parameters (full finetune, tuned projector) are kept as a frozen copy of their initial values
only when the objective needs a reference. A run may instead name a separate reference model of the same
graph (MLLMU-Bench's NPO oracle), whose weights then sit beside the model's. Reference log-probs that an
objective reads alone (NPO, DPO) may instead be made once per row before the first step (reference_pass). Data
position is a pure function of the step, so a resume restores (params, opt_state, rng, step) and replays the
identical trajectory.
On GPU a LoRA stage of a decoder of stacked layers runs the same step layer by layer instead (`prepare_step`,
unlearn/layerwise.py), over the same params, optimizer state and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vlmu_jax.checkpoints.orbax_io import Checkpointer
from vlmu_jax.data.prefetch import prefetched
from vlmu_jax.launches import one_at_a_time
from vlmu_jax.logs import progress, say
from vlmu_jax.models.sharding import global_batch
from vlmu_jax.unlearn import layerwise, reference_pass
from vlmu_jax.unlearn.objectives import Objective, StreamLogps, get_objective, token_mean_nll
from vlmu_jax.unlearn.optim import make_optimizer
from vlmu_jax.unlearn.run_log import RunLog
from vlmu_jax.unlearn.saliency import fisher_diagonal, saliency_mask

Batch = dict[str, Any]
LogpsFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array]]
KlFn = Callable[[nnx.Module, nnx.Module, Batch], tuple[jax.Array, jax.Array]]
VocabFn = Callable[[nnx.Module, nnx.Module | None, Batch, Callable], jax.Array]
HiddenFn = Callable[[nnx.Module, Batch, int], tuple[jax.Array, jax.Array]]


class BatchSource(Protocol):
    """CONTRACT.md: `len` = batches per epoch, `get(i)` = this host's rows of global batch i."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class TrainConfig:
    """Fields the trainer reads; objective hyper-parameters live here too (objectives getattr them)."""

    objective: str = "finetune"
    lr: float = 1e-5
    num_epochs: int = 1
    num_steps: int = 0  # micro-steps; 0 = num_epochs passes over the phase cycle
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-8
    lr_schedule: str = "cosine"
    save_every: int = 0  # micro-steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    progress: bool = True
    beta: float = 0.1
    retain_weight: float = 1.0
    simnpo_gamma: float = 0.0
    npo_batch_mean: bool = False
    forget_weight: float = 1.0
    wga_beta: float = 1.0
    satimp_beta1: float = 5.0
    satimp_beta2: float = 1.0
    undial_beta: float = 10.0
    ceu_ignore_first: int = 1
    rmu_steering: float = 2.0
    hidden_layer: int = 7
    saliency_threshold: float = 1.0
    layerwise: str = "auto"  # the step layer by layer: auto | always | never (use_layerwise)
    reference_logps: str = "auto"  # the reference's log-probs once per row: auto | once | per_step (reference_pass)

    @classmethod
    def from_config(cls, cfg: Any) -> TrainConfig:
        """Pick the known fields out of a ConfigDict / dict, ignoring the rest of the run config."""
        get = cfg.get if isinstance(cfg, Mapping) or hasattr(cfg, "get") else lambda k, d: getattr(cfg, k, d)
        return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)})


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    opt_state: Any


def plan_step(step: int, phase_lengths: Sequence[int]) -> tuple[int, int]:
    """Micro-step -> (phase, global batch index of that phase's sources); phases run back to back."""
    cycle, offset = divmod(step, sum(phase_lengths))
    for phase, n in enumerate(phase_lengths):
        if offset < n:
            return phase, cycle * n + offset
        offset -= n
    raise AssertionError("unreachable")


def phase_streams(obj: Objective, sources: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Stream names per phase: the objective's own plus its optional streams that the run provides."""
    extra = tuple(s for s in obj.optional if s in sources)
    phases = [tuple(p) + extra for p in obj.phases]
    missing = ({s for p in phases for s in p} | set(obj.preserve_streams)) - set(sources)
    if missing:
        raise ValueError(f"objective needs data streams {sorted(missing)}; got {sorted(sources)}")
    return phases


def _need(fn: Callable | None, what: str, obj: Objective) -> Callable:
    if fn is None:
        raise ValueError(f"objective {obj.fn.__name__!r} needs {what}: pass it to train()")
    return fn


def _batch_key(batch: Mapping[str, Any]) -> tuple | None:
    """What two streams' batches must share to run as one: tree structure, shapes and dtypes (None when some
    leaf has no leading axis to join them on)."""
    leaves, treedef = jax.tree.flatten(batch)
    if any(jnp.ndim(x) == 0 for x in leaves):
        return None
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def joined_logps(model, batches: Mapping[str, Mapping[str, Any]], step_length, logps_fn,
                 join: Collection[str]) -> dict[str, tuple]:
    """Each stream's `logps_fn(model, batch)` (log-probs, mask) under `model` (the policy, or the reference); the
    streams named in `join` whose batches have one shape are joined along the batch axis into one pass and split
    after.

    Why: a forget and a retain batch of one bucket (GD, NPO, IDK and the like) then go through the decoder once,
    at twice the rows: every weight is read (and, in a scanned decoder on GPU, copied out of its stack) once per
    step instead of once per stream. Rows do not interact in the model, so each stream's values are its own;
    only the LoRA dropout draws differ from two separate passes. Only streams whose loss reads these log-probs
    may be joined: a stream left alone whose log-probs the loss never reads (a KL or hidden-state stream) is cut
    from the program by XLA, which a joined pass cannot be."""
    groups: dict[Any, list[str]] = {}
    for name, batch in batches.items():
        groups.setdefault((name in join and _batch_key(batch)) or name, []).append(name)
    out = {}
    for names in groups.values():
        joined = jax.tree.map(lambda *xs: jnp.concatenate(xs), *(batches[n] for n in names))
        logps, mask = logps_fn(model, {**joined, "step_length": step_length})
        rows = np.cumsum([len(batches[n]["input_ids"]) for n in names])[:-1]
        out.update(zip(names, zip(jnp.split(logps, rows), jnp.split(mask, rows), strict=True), strict=True))
    return out


def _stream_logps(name, obj, cfg, model, ref_model, batch, own, ref, kl_fn, vocab_fn, hidden_fn) -> StreamLogps:
    """Everything the objective asked for about one stream, given its policy log-probs and mask `own` and its
    reference log-probs `ref` (None without); what its loss leaves unused is cut by XLA."""
    logps, mask = own
    kl = kl_mask = vocab = hidden = ref_hidden = hidden_mask = None
    with_ref = name in obj.ref_streams
    if name in obj.kl_streams:
        kl, kl_mask = _need(kl_fn, "full-vocab KL (kl_fn)", obj)(model, ref_model, batch)
    if name in obj.vocab_streams:
        stat = functools.partial(obj.vocab_stat, cfg=cfg)
        vocab = _need(vocab_fn, "a full-vocab statistic (vocab_fn)", obj)(
            model, ref_model if with_ref else None, batch, stat)
    if name in obj.hidden_streams:
        hidden, hidden_mask = _need(hidden_fn, "hidden states (hidden_fn)", obj)(model, batch, cfg.hidden_layer)
        if with_ref:
            ref_hidden = jax.lax.stop_gradient(hidden_fn(ref_model, batch, cfg.hidden_layer)[0])
    return StreamLogps(logps, ref, mask, kl, kl_mask, vocab, hidden, ref_hidden, hidden_mask)


def make_loss(obj: Objective, cfg: TrainConfig, logps_fn, kl_fn, vocab_fn=None, hidden_fn=None) -> Callable:
    """The objective's loss as a traceable `(model, ref_model | None, batches) -> (loss, aux)`: the streams' policy
    (and reference) log-probs and whatever else the objective reads of them (KL, full-vocab statistics, hidden
    states)."""
    # Streams the objective reads only through their policy (and reference) log-probs: they may share one pass.
    logps_only = set(obj.optional).union(*obj.phases) - {*obj.kl_streams, *obj.vocab_streams, *obj.hidden_streams}
    ref_streams = set(obj.ref_streams)

    def loss(model, ref_model, batches):
        # Streams whose batches carry their reference log-probs (made once before the first step, reference_pass)
        made = {n: b[reference_pass.REF_VALUES] for n, b in batches.items() if reference_pass.REF_VALUES in b}
        batches = {n: {k: v for k, v in b.items() if k != reference_pass.REF_VALUES} for n, b in batches.items()}
        # `step_length`: the longest real row over all of the step's streams, the length FIUBench's collator pads
        # a step's forget and retain rows to (its KL term averages over that many positions, see stages.kl_fn).
        step_length = jnp.max(jnp.stack([jnp.max(jnp.sum(b["attention_mask"], axis=-1))
                                         for b in batches.values()]))
        own = joined_logps(model, batches, step_length, logps_fn, join=logps_only)
        refs = {n: reference_pass.placed(values, own[n][1]) for n, values in made.items()}
        refs |= {n: logps for n, (logps, _) in jax.lax.stop_gradient(joined_logps(
            ref_model, {n: b for n, b in batches.items() if n in ref_streams and n not in made}, step_length,
            logps_fn, join=logps_only)).items()}
        streams = {n: _stream_logps(n, obj, cfg, model, ref_model, {**b, "step_length": step_length}, own[n],
                                   refs.get(n), kl_fn, vocab_fn, hidden_fn)
                   for n, b in batches.items()}
        return obj.fn(streams, cfg)

    return loss


def make_merge(graphdef, graphdef_eval, obj: Objective) -> Callable:
    """Traceable `(params, rng, rest, ref_other, ref_rest) -> (model, ref_model | None)`. The reference model is
    `graphdef_eval` with zero LoRA, `ref_other` (the reference's values of the trainable non-LoRA params: empty for
    LoRA runs or when no reference is needed) and `ref_rest` (its frozen params: the model's own, or a separate
    reference model's)."""
    needs_ref = bool(obj.ref_streams or obj.kl_streams)

    def merge(params, rng, rest, ref_other, ref_rest):
        # Fresh Variables at this trace level: dropout may advance the RNG counters inside grad (the reference's
        # too: a model with LoRA dropout draws its key even in eval mode).
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rng), rest)
        if not needs_ref:
            return model, None
        ref_params = jax.lax.stop_gradient(reference_params(params, ref_other))
        return model, nnx.merge(graphdef_eval, ref_params, jax.tree.map(lambda x: x, rng), ref_rest)

    return merge


def reference_params(params: nnx.State, ref_other: nnx.State) -> nnx.State:
    """The reference's trainable params: the LoRA adapters zeroed (no adapter is the pre-unlearning model) and the
    trainable non-LoRA params at `ref_other`, their values before training."""
    lora, _ = nnx.split_state(params, nnx.LoRAParam, ...)
    return nnx.merge_state(jax.tree.map(jnp.zeros_like, lora), ref_other)


def apply_gradients(tx, params, opt_state, grads, grad_mask, masked: bool) -> tuple[Any, Any, jax.Array]:
    """One optimizer update: the saliency mask applied to the gradients when the step's streams ask for it; returns
    the new params and optimizer state and the (masked) gradients' norm."""
    if masked:
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, grad_mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


def make_step(merge: Callable, loss: Callable, obj: Objective, tx) -> Callable:
    """The pure train step (jitted by the caller): `merge` builds the policy and reference models (`make_merge`),
    `loss` their loss (`make_loss`); `grad_mask` the objective's saliency mask over the trainable params (empty
    when it has none)."""

    def step(params, opt_state, rng, rest, ref_other, ref_rest, grad_mask, batches):
        def loss_of(p):
            model, ref_model = merge(p, rng, rest, ref_other, ref_rest)
            value, aux = loss(model, ref_model, batches)
            return value, (aux, nnx.state(model, nnx.RngState))

        (value, (aux, new_rng)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        params, opt_state, norm = apply_gradients(tx, params, opt_state, grads, grad_mask,
                                                  any(n in obj.masked_streams for n in batches))
        return params, opt_state, new_rng, value, {**aux, "grad_norm": norm}

    return step


def use_layerwise(mode: str, model: nnx.Module, params: nnx.State) -> bool:
    """Whether the step runs layer by layer (unlearn/layerwise.py). mode: auto (on GPU, where the scan copies each
    layer's weights out of its stack, for a stacked decoder whose trainable layer params are all LoRA, where it was
    measured faster: `layerwise.lora_only`), always (an error where it cannot run), never."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"layerwise={mode!r}: choose auto, always or never")
    if mode == "never":
        return False
    reason = layerwise.applicable(model, params)
    if mode == "always" and reason is not None:
        raise ValueError(f"layerwise='always' cannot train this model layer by layer: {reason}")
    return reason is None and (mode == "always" or (jax.default_backend() == "gpu" and layerwise.lora_only(
        model, params)))


def on_mesh(tree: Any, mesh: Mesh | None) -> Any:
    """`tree` with every leaf not yet on `mesh` replicated over it.

    Why: jit leaves scalars unplaced (optimizer step counts, RNG counters), and the step returns them on the
    mesh; the second step then saw new input shardings and compiled the whole step again (6-20 s at 7B, seen
    on an H200). Placed up front, every step after the first finds the program the first one compiled."""
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, P())

    def place(x):
        on = isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if on else jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def _saliency(obj: Objective, cfg: TrainConfig, graphdef_eval, params, rng, rest, sources, logps_fn, mesh,
              show: bool):
    """The objective's weight-saliency mask at the starting parameters (see unlearn/saliency.py)."""

    def nll(p, context, batch):
        logps, mask = logps_fn(nnx.merge(graphdef_eval, p, *context), batch)
        return token_mean_nll(StreamLogps(logps, None, mask))

    def fisher(names: tuple[str, ...]):
        todo = [(n, i) for n in names for i in range(len(sources[n]))]
        made = prefetched(lambda k: sources[todo[k][0]].get(todo[k][1]), range(len(todo)))
        bar = progress(made, total=len(todo), desc=f"saliency ({', '.join(names)})", unit="batch", disable=not show)
        batches = (global_batch(host, mesh) for host in bar)
        return fisher_diagonal(nll, params, batches, context=(rng, rest))

    return saliency_mask(fisher(obj.masked_streams), fisher(obj.preserve_streams), cfg.saliency_threshold)


@dataclass
class PreparedStep:
    """A model split for training and its step: `step(params, opt_state, rng, *fixed, grad_mask, batches)`;
    `fixed` = (rest, ref_other, ref_rest). `frozen`: the models whose stacked frozen decoder weights the per-layer
    step holds per layer (empty for the scanned step); `restore()` puts them back."""

    step: Callable
    params: nnx.State
    rng: nnx.State
    fixed: tuple[nnx.State, nnx.State, nnx.State]
    frozen: list[layerwise.FrozenLayers]

    def restore(self) -> None:
        for layers in self.frozen:
            layers.restore()
        self.frozen = []


def _split_for_training(model: nnx.Module, trainable: Any) -> tuple[Any, Any, nnx.State, nnx.State, nnx.State]:
    """`model`'s graphdef in train mode and in eval mode (the reference's), and its (trainable params, RNG state,
    the rest); the model is left in train mode."""
    model.eval()
    graphdef_eval = nnx.graphdef(model)
    model.train()
    graphdef, params, rng, rest = nnx.split(model, trainable, nnx.RngState, ...)
    return graphdef, graphdef_eval, params, rng, rest


def prepare_step(model: nnx.Module, trainable: Any, obj: Objective, tx, loss: Callable, *, layerwise_mode: str,
                 reference: nnx.Module | None = None, keep_unused: bool = False) -> PreparedStep:
    """`model` split into (trainable params, RNG state, the rest) and the train step over them: the scanned step as
    one jitted program, or the per-layer step (`use_layerwise`). The reference is `model` with LoRA zeroed and its
    trainable non-LoRA params at their initial values, or `reference` (the same graph). keep_unused: every argument
    stays a parameter of the jitted program (the benchmarks' memory accounting)."""
    graphdef, graphdef_eval, params, rng, rest = _split_for_training(model, trainable)
    needs_ref = bool(obj.ref_streams or obj.kl_streams)
    ref_params, ref_rest = (params, rest) if reference is None else nnx.split(reference, trainable, nnx.RngState,
                                                                              ...)[1::2]
    ref_other = nnx.split_state(ref_params, nnx.LoRAParam, ...)[1] if needs_ref else nnx.State({})
    if reference is None:  # the model's own arrays are donated to the step: its reference keeps a copy
        ref_other = jax.tree.map(jnp.copy, ref_other)
    if not use_layerwise(layerwise_mode, model, params):
        step = one_at_a_time(jax.jit(make_step(make_merge(graphdef, graphdef_eval, obj), loss, obj, tx),
                                     donate_argnums=(0, 1, 2), keep_unused=keep_unused))
        return PreparedStep(step, params, rng, (rest, ref_other, ref_rest), [])
    frozen = [layerwise.FrozenLayers(model, trainable)]
    if reference is not None:
        frozen.append(layerwise.FrozenLayers(reference, trainable))
    # the decoder's stacked frozen weights are zero-size stand-ins now (the step holds them per layer), with
    # layerwise.JOIN_FROZEN_KERNELS their q/k/v and gate/up kernels joined: the graphs may have changed with them
    graphdef, graphdef_eval, _, _, rest = _split_for_training(model, trainable)
    ref_rest = rest if reference is None else nnx.split(reference, trainable, nnx.RngState, ...)[3]
    merge = make_merge(graphdef, graphdef_eval, obj)
    step = layerwise.LayerwiseStep(
        merge=merge, loss=loss, apply=functools.partial(apply_gradients, tx), reference_params=reference_params,
        masked_streams=obj.masked_streams,
        prefix=frozen[0].prefix, n_layers=frozen[0].n, stack_graphdefs=layerwise.stack_graphdefs(model),
        frozen=frozen[0].layers, ref_frozen=frozen[-1].layers, frozen_defs=frozen[0].treedefs)
    return PreparedStep(step, params, rng, (rest, ref_other, ref_rest), frozen)


def _run_steps(step_fn: Callable, state: tuple, fixed: tuple, *, cfg: TrainConfig, sources: Mapping[str, BatchSource],
               phases: list[tuple[str, ...]], phase_lengths: list[int], total: int, schedule: Callable,
               workdir: str | Path, mesh: Mesh | None) -> tuple[Any, Any, Any, list[float]]:
    """The training loop from the latest checkpoint in `workdir` (or step 0) to `total`: `state` = (params,
    opt_state, rng), `fixed` = the step's other arguments; returns the final state and this run's losses."""
    params, opt_state, rng = state
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(
        workdir / "checkpoints",
        save_every=cfg.save_every or total,
        keep=cfg.keep_checkpoints,
        async_save=cfg.async_checkpoints,
    )
    start = ckpt.latest_step() or 0
    if start:
        params, opt_state, rng = ckpt.restore(start, (params, opt_state, rng))
    params, opt_state, rng = on_mesh((params, opt_state, rng), mesh)
    is_main = jax.process_index() == 0
    losses: list[float] = []
    bar = progress(total=total, initial=start, desc=workdir.name, unit="step", disable=not (is_main and cfg.progress))
    with RunLog(workdir, start=start, enabled=is_main) as log, bar:
        def step_batches(step: int) -> tuple[dict[str, dict], int, int]:
            """The step's batches copied to the mesh, their real tokens (all hosts) and their length. Copied here,
            in the prefetch threads, because the loop waits for each step's loss: copied after it, a batch's
            transfer left the device idle (an idefics2 split image is 58 MB of float32 pixels, an Mllama image's
            tower states 98 MB). The host arrays are dropped here, once copied."""
            phase, index = plan_step(step, phase_lengths)
            host = {name: sources[name].get(index) for name in phases[phase]}
            tokens = sum(int(b["attention_mask"].sum()) for b in host.values()) * jax.process_count()
            seq_len = max(int(b["input_ids"].shape[1]) for b in host.values())
            return {name: global_batch(b, mesh) for name, b in host.items()}, tokens, seq_len

        t0 = time.perf_counter()
        for step, (batches, tokens, seq_len) in enumerate(prefetched(step_batches, range(start, total)), start=start):
            params, opt_state, rng, loss, aux = step_fn(params, opt_state, rng, *fixed, batches)
            # The whole step done before it is timed: the layer-by-layer step's loss is ready once its forward
            # is, while its backward and update still run. Timed at the loss, step_s left them out (the
            # update's wait fell between two steps' clocks: bench/RESULTS.md, session 32).
            jax.block_until_ready((params, opt_state))
            loss = float(loss)
            if not math.isfinite(loss):
                ckpt.close()
                raise FloatingPointError(
                    f"non-finite loss {loss} at step {step}; last good checkpoint: step {ckpt.latest_step()}"
                )
            # Since the last step's checkpoint call: waiting for this step's batch (made ahead while the device
            # ran the last one) + the step to completion (the first at each length compiles).
            elapsed = time.perf_counter() - t0
            record = {
                "step": step,
                "loss": loss,
                "lr": float(schedule(step // cfg.grad_accum)),
                "step_s": elapsed,
                "tokens": tokens,
                "seq_len": seq_len,  # a new one compiles
                "tokens_per_s": tokens / elapsed,
                **{k: float(v) for k, v in aux.items()},
            }
            if step == start and start:
                record["resumed_from"] = start
            log.write(record)
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=int(record["tokens_per_s"]),
                            refresh=False)  # redraws follow the bar's own interval (rare in a log file)
            bar.update(1)
            ckpt.save(step + 1, (params, opt_state, rng), force=step + 1 == total)
            t0 = time.perf_counter()
    ckpt.close()
    return params, opt_state, rng, losses


def reference_forward(model: nnx.Module, trainable: Any, logps_fn: LogpsFn,
                      reference: nnx.Module | None = None) -> reference_pass.Forward:
    """The step's reference model as one jitted forward, `batch -> logps_fn(reference, batch)`: `model` (or
    `reference`, the same graph) in eval mode with its LoRA adapters zeroed, as `make_merge` builds it. Taken
    before the first step, while the trainable non-LoRA params still hold their initial values (also on resume:
    the checkpoint is restored later)."""
    _, graphdef_eval, params, rng, rest = _split_for_training(model if reference is None else reference, trainable)

    @jax.jit
    def forward(params, rng, rest, batch):
        other = nnx.split_state(params, nnx.LoRAParam, ...)[1]
        return logps_fn(nnx.merge(graphdef_eval, reference_params(params, other), rng, rest), batch)

    run = one_at_a_time(forward)
    return lambda batch: run(params, rng, rest, batch)


def _reference_once(model, trainable, obj: Objective, cfg: TrainConfig, sources: Mapping[str, BatchSource],
                    phases: list[tuple[str, ...]], total: int, logps_fn: LogpsFn, mesh: Mesh | None,
                    reference: nnx.Module | None, name: str):
    """(sources, objective, reference) for the step: where `cfg.reference_logps` makes a stream's reference
    log-probs once (unlearn/reference_pass.py), that stream's source gives them with its batches and the objective
    no longer asks the step for them; the separate reference model is then dropped from the step if nothing else
    of it is read."""
    lengths = [len(sources[p[0]]) for p in phases]
    reads = {n: sum(n in phases[plan_step(s, lengths)[0]] for s in range(total)) for n in reference_pass.cacheable(obj)}
    names = reference_pass.streams_to_cache(cfg.reference_logps, obj, sources, reads)
    if not names:
        return sources, obj, reference
    forward = reference_forward(model, trainable, logps_fn, reference)
    show = jax.process_index() == 0 and cfg.progress
    start = time.perf_counter()
    sources = {**sources, **{n: reference_pass.WithReference(sources[n], reference_pass.collect(
        forward, sources[n], mesh, desc=f"{name}: reference log-probs ({n})", show=show)) for n in names}}
    say(f"{name}: the reference's log-probs of streams {list(names)} made once ({time.perf_counter() - start:.1f} s); "
        "the steps run no reference pass for them")
    obj = reference_pass.without_reference(obj, names)
    return sources, obj, reference if obj.ref_streams or obj.kl_streams else None


def train(
    model: nnx.Module,
    cfg: TrainConfig,
    *,
    sources: Mapping[str, BatchSource],
    logps_fn: LogpsFn,
    workdir: str | Path,
    trainable: Any = nnx.Param,
    kl_fn: KlFn | None = None,
    vocab_fn: VocabFn | None = None,
    hidden_fn: HiddenFn | None = None,
    mesh: Mesh | None = None,
    reference: nnx.Module | None = None,
) -> TrainResult:
    """Train `model` in place on `cfg.objective`, resuming from `workdir/checkpoints` if present.

    trainable: NNX filter of what trains (e.g. `nnx.LoRAParam`, or `lora.trainable_filter(...)`).
    logps_fn: traceable `(model, batch) -> (logps [B,N], mask [B,N])` at the positions it scores (every position
      but the last, or the batch's label positions: stages.logps_fn).
    kl_fn: traceable `(model, ref_model, batch) -> (kl [B,T-1], kl_mask)`, full-vocab KL(ref || model),
      required by objectives with `kl_streams` (kl, kl_min).
    reference: a separate reference model with the same graph (LoRA included, its adapters are zeroed); default:
      `model` itself with LoRA zeroed and its trainable non-LoRA params at their initial values.
    vocab_fn: traceable `(model, ref_model | None, batch, stat) -> [B,T-1]`, `stat(logp, logq, targets)` of
      the full next-token log-softmaxes at each position, for objectives with `vocab_streams` (undial, ceu).
    hidden_fn: traceable `(model, batch, layer) -> (hidden [B,T,D], mask [B,T])`, the output of decoder
      layer `layer` and labels != -100, for objectives with `hidden_streams` (rmu).
    Objectives with `masked_streams` (mmunlearner) first take one pass over their forget and preserve
    sources for the saliency mask, at the starting parameters (also on resume). NPO's and DPO's reference
    log-probs are made in one pass before the first step where `cfg.reference_logps` says so
    (unlearn/reference_pass.py; sources that name each batch's rows, as data/batching.ExampleSource does).
    Writes `workdir/metrics.jsonl` (one line per micro-step) and TensorBoard events beside it (`RunLog`); the
    progress bar is named after `workdir`. Raises FloatingPointError on a
    non-finite loss, after the last good checkpoint is committed.
    The model's trainable and RNG arrays are donated to the step (no second copy of the weights), so
    other references to them (e.g. an `nnx.clone`, which shares arrays) become invalid; the model itself
    is updated in place at the end.
    """
    obj = get_objective(cfg.objective)
    phases = phase_streams(obj, sources)
    phase_lengths = [len(sources[p[0]]) for p in phases]
    total = cfg.num_steps or cfg.num_epochs * sum(phase_lengths)
    tx, schedule = make_optimizer(
        lr=cfg.lr,
        total_steps=math.ceil(total / cfg.grad_accum),
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        grad_accum=cfg.grad_accum,
        schedule=cfg.lr_schedule,
        eps=cfg.adam_eps,
    )

    grad_mask = nnx.State({})
    if obj.masked_streams:  # at the starting params, before the step takes the model's arrays
        model.eval()
        graphdef_eval = nnx.graphdef(model)
        model.train()
        _, params, rng, rest = nnx.split(model, trainable, nnx.RngState, ...)
        grad_mask = _saliency(obj, cfg, graphdef_eval, params, rng, rest, sources, logps_fn, mesh,
                              show=jax.process_index() == 0 and cfg.progress)
    sources, obj, reference = _reference_once(model, trainable, obj, cfg, sources, phases, total, logps_fn, mesh,
                                              reference, Path(workdir).name)
    prepared = prepare_step(model, trainable, obj, tx, make_loss(obj, cfg, logps_fn, kl_fn, vocab_fn, hidden_fn),
                            layerwise_mode=cfg.layerwise, reference=reference)
    logging.info("%s: the train step runs %s", Path(workdir).name,
                 "layer by layer (layerwise)" if prepared.frozen else "as one program")
    params, rng = prepared.params, prepared.rng
    opt_state = jax.jit(tx.init)(params)
    try:
        params, opt_state, rng, losses = _run_steps(
            prepared.step, (params, opt_state, rng), (*prepared.fixed, grad_mask), cfg=cfg, sources=sources,
            phases=phases, phase_lengths=phase_lengths, total=total, schedule=schedule, workdir=workdir, mesh=mesh)
    finally:  # the model whole again (its stacked frozen decoder weights), also after an error
        prepared.restore()
    nnx.update(model, params, rng)
    return TrainResult(step=total, losses=losses, opt_state=opt_state)
