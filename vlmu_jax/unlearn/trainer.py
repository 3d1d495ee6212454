"""The one training loop: finetune and every unlearning method are an objective plus named BatchSources.

Functional core: the model is split once into (graphdef, trainable, rng, frozen) states and one jitted
pure step maps (trainable, opt_state, rng, batches) to their successors with the first three donated,
so only the trainable state and its optimizer moments are ever updated or copied. The reference model
for KL/NPO/DPO is the same graphdef merged with the LoRA parameters zeroed (no copy); trainable
non-LoRA parameters (full finetune, tuned projector) are kept as a frozen copy of their initial values
only when the objective needs a reference. A run may instead name a separate reference model of the same
graph (MLLMU-Bench's NPO oracle), whose weights then sit beside the model's. Data position is a pure
function of the step, so a resume restores (params, opt_state, rng, step) and replays the identical trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from vlmu_jax.checkpoints.orbax_io import Checkpointer
from vlmu_jax.models.sharding import global_batch
from vlmu_jax.unlearn.objectives import Objective, StreamLogps, get_objective
from vlmu_jax.unlearn.optim import make_optimizer

Batch = dict[str, Any]
LogpsFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array]]
KlFn = Callable[[nnx.Module, nnx.Module, Batch], tuple[jax.Array, jax.Array]]


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
    missing = {s for p in phases for s in p} - set(sources)
    if missing:
        raise ValueError(f"objective needs data streams {sorted(missing)}; got {sorted(sources)}")
    return phases


def _stream_logps(name, obj, model, ref_model, batch, logps_fn, kl_fn) -> StreamLogps:
    logps, mask = logps_fn(model, batch)
    ref = kl = kl_mask = None
    if name in obj.ref_streams:
        ref = jax.lax.stop_gradient(logps_fn(ref_model, batch)[0])
    if name in obj.kl_streams:
        if kl_fn is None:
            raise ValueError(f"objective {obj.fn.__name__!r} needs full-vocab KL: pass kl_fn to train()")
        kl, kl_mask = kl_fn(model, ref_model, batch)
    return StreamLogps(logps, ref, mask, kl, kl_mask)


def make_step(graphdef, graphdef_eval, obj: Objective, cfg: TrainConfig, tx, logps_fn, kl_fn) -> Callable:
    """The pure train step (jitted by the caller). The reference model is `graphdef_eval` with zero LoRA,
    `ref_other` (the reference's values of the trainable non-LoRA params: empty for LoRA runs or when no reference
    is needed) and `ref_rest` (its frozen params: the model's own, or a separate reference model's)."""
    needs_ref = bool(obj.ref_streams or obj.kl_streams)

    def step(params, opt_state, rng, rest, ref_other, ref_rest, batches):
        ref_model = None
        if needs_ref:
            lora, _ = nnx.split_state(params, nnx.LoRAParam, ...)
            ref_params = nnx.merge_state(jax.tree.map(jnp.zeros_like, lora), ref_other)
            ref_model = nnx.merge(graphdef_eval, jax.lax.stop_gradient(ref_params), rng, ref_rest)

        def loss_of(p):
            # Fresh Variables at this trace level: dropout may advance the RNG counters inside grad.
            model = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rng), rest)
            streams = {
                n: _stream_logps(n, obj, model, ref_model, b, logps_fn, kl_fn) for n, b in batches.items()
            }
            loss, aux = obj.fn(streams, cfg)
            return loss, (aux, nnx.state(model, nnx.RngState))

        (loss, (aux, new_rng)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        aux = {**aux, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, new_rng, loss, aux

    return step


def _truncate_log(path: Path, start: int) -> None:
    """A resumed run rewrites the steps after its checkpoint, so drop their stale lines first."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < start]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(
    model: nnx.Module,
    cfg: TrainConfig,
    *,
    sources: Mapping[str, BatchSource],
    logps_fn: LogpsFn,
    workdir: str | Path,
    trainable: Any = nnx.Param,
    kl_fn: KlFn | None = None,
    mesh: Mesh | None = None,
    reference: nnx.Module | None = None,
) -> TrainResult:
    """Train `model` in place on `cfg.objective`, resuming from `workdir/checkpoints` if present.

    trainable: NNX filter of what trains (e.g. `nnx.LoRAParam`, or `lora.trainable_filter(...)`).
    logps_fn: traceable `(model, batch) -> (logps [B,T-1], mask [B,T-1])`.
    kl_fn: traceable `(model, ref_model, batch) -> (kl [B,T-1], kl_mask)`, full-vocab KL(ref || model),
      required by objectives with `kl_streams` (kl, kl_min).
    reference: a separate reference model with the same graph (LoRA included, its adapters are zeroed); default:
      `model` itself with LoRA zeroed and its trainable non-LoRA params at their initial values.
    Writes `workdir/metrics.jsonl` (one line per micro-step). Raises FloatingPointError on a
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

    model.eval()
    graphdef_eval = nnx.graphdef(model)
    model.train()
    graphdef, params, rng, rest = nnx.split(model, trainable, nnx.RngState, ...)
    needs_ref = bool(obj.ref_streams or obj.kl_streams)
    ref_params, ref_rest = (params, rest) if reference is None else nnx.split(reference, trainable, nnx.RngState,
                                                                              ...)[1::2]
    ref_other = nnx.split_state(ref_params, nnx.LoRAParam, ...)[1] if needs_ref else nnx.State({})
    ref_other = jax.tree.map(jnp.copy, ref_other)
    opt_state = jax.jit(tx.init)(params)
    step_fn = jax.jit(
        make_step(graphdef, graphdef_eval, obj, cfg, tx, logps_fn, kl_fn), donate_argnums=(0, 1, 2)
    )

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
    is_main = jax.process_index() == 0
    log_path = workdir / "metrics.jsonl"
    if is_main:
        _truncate_log(log_path, start)

    losses: list[float] = []
    bar = tqdm(total=total, initial=start, disable=not (is_main and cfg.progress), desc=cfg.objective)
    with open(log_path, "a") if is_main else open("/dev/null", "w") as log:
        for step in range(start, total):
            t0 = time.perf_counter()
            phase, index = plan_step(step, phase_lengths)
            host = {name: sources[name].get(index) for name in phases[phase]}
            batches = {name: global_batch(b, mesh) for name, b in host.items()}
            params, opt_state, rng, loss, aux = step_fn(params, opt_state, rng, rest, ref_other, ref_rest, batches)
            loss = float(loss)
            if not math.isfinite(loss):
                ckpt.close()
                raise FloatingPointError(
                    f"non-finite loss {loss} at step {step}; last good checkpoint: step {ckpt.latest_step()}"
                )
            tokens = sum(int(b["attention_mask"].sum()) for b in host.values()) * jax.process_count()
            record = {
                "step": step,
                "loss": loss,
                "lr": float(schedule(step // cfg.grad_accum)),
                "tokens_per_s": tokens / (time.perf_counter() - t0),
                **{k: float(v) for k, v in aux.items()},
            }
            if step == start and start:
                record["resumed_from"] = start
            log.write(json.dumps(record) + "\n")
            log.flush()
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=int(record["tokens_per_s"]))
            bar.update(1)
            ckpt.save(step + 1, (params, opt_state, rng), force=step + 1 == total)
    bar.close()
    ckpt.close()
    nnx.update(model, params, rng)
    return TrainResult(step=total, losses=losses, opt_state=opt_state)
