"""The optax chain both originals use: clip(global norm) -> AdamW (decoupled decay), warmup + cosine.

The optimizer is initialised over the trainable state only (the trainer splits it off the model), so no
moments exist for frozen weights. Gradient accumulation is `optax.MultiSteps`: gradients are averaged
over `grad_accum` micro-steps (as accelerate's `accumulate` does with loss / k) and the schedule counts
optimizer steps, not micro-steps.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def lr_schedule(lr: float, total_steps: int, warmup_ratio: float, kind: str = "cosine") -> optax.Schedule:
    """HF `get_scheduler` shapes over optimizer steps: warmup of round(ratio*total) steps, then decay."""
    total_steps = max(int(total_steps), 1)
    warmup = round(warmup_ratio * total_steps)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=0.0)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, total_steps - warmup)],
            [warmup],
        )
    if kind == "constant":
        warm = optax.linear_schedule(0.0, lr, warmup)
        return optax.join_schedules([warm, optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"unknown lr schedule {kind!r}")


def decay_mask(params: Any) -> Any:
    """FIUBench's `get_grouped_params`: weight decay on every trainable tensor except those named *bias*."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "bias" not in jax.tree_util.keystr(path), params)


def make_optimizer(
    *,
    lr: float,
    total_steps: int,
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    grad_accum: int = 1,
    schedule: str = "cosine",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule); `total_steps` counts optimizer steps (micro-steps / grad_accum).

    Defaults are torch.optim.AdamW's, which both originals use.
    """
    sched = lr_schedule(lr, total_steps, warmup_ratio, schedule)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx, sched
