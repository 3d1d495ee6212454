"""Per-model eval logs -> `eval_log_aggregated.json` and one CSV row per model, in FIUBench's key names."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

FORGET_LOG, RETAIN_LOG = "eval_forget_log.json", "eval_retain_log.json"


def write_model_logs(out_dir: Path, forget_log: dict[str, Any], retain_log: dict[str, Any]) -> None:
    """The two per-split logs and their union, as FIUBench's eval writes them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FORGET_LOG).write_text(json.dumps(forget_log, indent=1))
    (out_dir / RETAIN_LOG).write_text(json.dumps(retain_log, indent=1))
    aggregated = {FORGET_LOG: forget_log, RETAIN_LOG: retain_log}
    (out_dir / "eval_log_aggregated.json").write_text(json.dumps(aggregated, indent=1))


def read_model_logs(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "eval_log_aggregated.json").read_text())


def write_table(rows: list[dict[str, Any]], csv_path: Path) -> None:
    """One row per model with every column any row has (missing cells empty), plus a JSON twin."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    csv_path.with_suffix(".json").write_text(json.dumps(rows, indent=2))
