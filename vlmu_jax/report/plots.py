"""PNG figures of evaluation results: forget quality vs model utility, per-metric bars, training-loss curves.

Figures a paper can use: every one titled with labelled axes. matplotlib with the Agg backend (no display) and
constrained layout, which fits titles, labels, ticks and legends inside the figure instead of cutting them off,
while the size stays fixed (no tight bbox): a figure of ``size=(w, h)`` inches at ``dpi`` is exactly
``w*dpi x h*dpi`` pixels.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_MARKERS = "osD^vPXh<>p"


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_fq_vs_mu(rows: Sequence[Mapping], path: str | Path, *, label_key: str = "Method",
                  reference: str | None = None, title: str = "Forget quality vs model utility",
                  size: tuple[float, float] = (6.0, 4.5), dpi: int = 100) -> Path:
    """Model Utility (x) against Forget Quality (y, log scale: KS p-values span decades), one legend entry per
    row; the row labelled `reference` (the retain-only model, FQ = 1 by definition) is a black star with a dashed
    line at its height, the value an unlearned model aims for. Rows without Forget Quality are left out."""
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    for i, row in enumerate(r for r in rows if "Forget Quality" in r):
        label = str(row.get(label_key, i))
        x, y = row["Model Utility"], row["Forget Quality"]
        if label == reference:
            ax.scatter(x, y, marker="*", s=160, color="black", zorder=3, label=f"{label} (reference)")
            ax.axhline(y, color="black", linewidth=0.8, linestyle="--", zorder=1)
        else:
            ax.scatter(x, y, marker=_MARKERS[i % len(_MARKERS)], s=45, zorder=2, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS-test p-value)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path, dpi)


def plot_metric_bars(rows: Sequence[Mapping], metrics: Sequence[str], path: str | Path, *,
                     label_key: str = "Method", labels: Sequence[str] | None = None, horizontal: bool = False,
                     title: str = "Metrics per model", value_label: str = "value",
                     size: tuple[float, float] = (8.0, 4.5), dpi: int = 100) -> Path:
    """Grouped bars: one group per metric (named `labels` when given), one bar per run (missing metrics drawn as
    0). `horizontal` puts the groups down the side, where long names (MLLMU-Bench's sets) have room; vertical
    groups wrap their names. The legend sits outside the axes, so neither covers a bar nor is cut off."""
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        positions = [m + i * width for m in range(len(metrics))]
        draw = ax.barh if horizontal else ax.bar
        draw(positions, [float(row.get(m, 0.0)) for m in metrics], width, label=str(row.get(label_key, i)))
    ticks, names = [m + 0.4 - width / 2 for m in range(len(metrics))], list(labels or metrics)
    if horizontal:  # scores are never negative: the value axis starts at 0
        ax.set_yticks(ticks, names, fontsize=8)
        ax.invert_yaxis()  # first metric on top
        ax.set_xlabel(value_label)
        ax.set_xlim(left=0)
    else:
        ax.set_xticks(ticks, [textwrap.fill(n, 24) for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(value_label)
        ax.set_ylim(bottom=0)
    ax.set_title(title)
    fig.legend(fontsize=7, loc="outside right upper")
    return _save(fig, path, dpi)


def plot_loss_curves(logs: Mapping[str, str | Path], path: str | Path, *, key: str = "loss",
                     step_key: str = "step", title: str = "Training loss", size: tuple[float, float] = (6.0, 4.0),
                     dpi: int = 100) -> Path:
    """Training curves from JSONL logs (one JSON object per line; lines without ``key`` are skipped)."""
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    for name, log_path in logs.items():
        records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
        records = [r for r in records if key in r]
        ax.plot([r.get(step_key, i) for i, r in enumerate(records)], [r[key] for r in records], label=name)
    ax.set_xlabel(f"{step_key} (micro-batch)" if step_key == "step" else step_key)
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)
