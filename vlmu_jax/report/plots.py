"""PNG figures of evaluation results: forget quality vs model utility, per-metric bars, training-loss curves.

matplotlib with the Agg backend (no display); fixed figure sizes and no tight bbox, so a figure of
``size=(w, h)`` inches at ``dpi`` is exactly ``w*dpi x h*dpi`` pixels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_fq_vs_mu(rows: Sequence[Mapping], path: str | Path, *, label_key: str = "Method",
                  size: tuple[float, float] = (6.0, 4.5), dpi: int = 100) -> Path:
    """Scatter of Model Utility (x) against Forget Quality (y, log scale: KS p-values span decades)."""
    fig, ax = plt.subplots(figsize=size)
    for row in rows:
        ax.scatter(row["Model Utility"], row["Forget Quality"])
        ax.annotate(str(row.get(label_key, "")), (row["Model Utility"], row["Forget Quality"]), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS p-value)")
    return _save(fig, path, dpi)


def plot_metric_bars(rows: Sequence[Mapping], metrics: Sequence[str], path: str | Path, *,
                     label_key: str = "Method", size: tuple[float, float] = (8.0, 4.5),
                     dpi: int = 100) -> Path:
    """Grouped bars: one group per metric, one bar per run (missing metrics drawn as 0)."""
    fig, ax = plt.subplots(figsize=size)
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [m + i * width for m in range(len(metrics))]
        ax.bar(xs, [float(row.get(m, 0.0)) for m in metrics], width, label=str(row.get(label_key, i)))
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], list(metrics), rotation=30, ha="right")
    ax.legend(fontsize=7)
    fig.subplots_adjust(bottom=0.25)
    return _save(fig, path, dpi)


def plot_loss_curves(logs: Mapping[str, str | Path], path: str | Path, *, key: str = "loss",
                     step_key: str = "step", size: tuple[float, float] = (6.0, 4.0), dpi: int = 100) -> Path:
    """Training curves from JSONL logs (one JSON object per line; lines without ``key`` are skipped)."""
    fig, ax = plt.subplots(figsize=size)
    for name, log_path in logs.items():
        records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
        records = [r for r in records if key in r]
        ax.plot([r.get(step_key, i) for i, r in enumerate(records)], [r[key] for r in records], label=name)
    ax.set_xlabel(step_key)
    ax.set_ylabel(key)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)
