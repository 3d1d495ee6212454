"""PNG figures a researcher would rather look at than read: trade-off, per-metric bars, loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    """Forget Quality (log scale, higher = closer to the retain-only model) against Model Utility."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for row in rows:
        if "Forget Quality" in row:
            ax.scatter(row["Model Utility"], max(row["Forget Quality"], 1e-30), s=40)
            ax.annotate(row["Model"], (row["Model Utility"], max(row["Forget Quality"], 1e-30)), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS-test p-value)")
    ax.set_title("Unlearning trade-off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def metric_bars(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    """One group of bars per metric, one bar per model."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics)), 4), dpi=100)
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [m + i * width for m in range(len(metrics))]
        ax.bar(xs, [row.get(m, 0.0) for m in metrics], width, label=row["Model"])
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], metrics, rotation=30, ha="right",
                  fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def loss_curves(logs: dict[str, Path], path: Path) -> None:
    """Training loss per step of each training stage's metrics.jsonl."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, log in logs.items():
        if log.exists():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line]
            ax.plot([r["step"] for r in lines], [r["loss"] for r in lines], label=name)
    ax.set_xlabel("micro-step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
