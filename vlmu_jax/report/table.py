"""The results table a person reads at the end of a run: headline metrics down, models across.

Metrics go down the side because there are more of them than models and their names are long (MLLMU-Bench's
``Forget Set Results / classification / ...``); models go across in evaluation order. Numbers keep four
significant digits (forget quality spans decades, so fixed decimals would print 0.0000); results.csv has them in
full.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FIUBENCH_HEADLINE = ("Forget Quality", "Model Utility", "Prob. Forget", "Prob. Retain", "ROUGE Forget",
                     "ROUGE Retain", "Truth Ratio Forget", "Truth Ratio Retain", "Exact Match", "APE", "GPT Retain",
                     "MME Perception", "MME Cognition", "POPE F1")
_MLLMU_HEADLINE_PARTS = ("/ classification /", "/ generation / Average ROUGE-L", "MME ", "POPE F1")


def headline_columns(rows: Sequence[Mapping], benchmark: str) -> list[str]:
    """The columns worth a glance, among those the rows have: FIUBench's summary metrics, MLLMU-Bench's
    classification accuracies and generation ROUGE-L per set (plus MME / POPE when they ran)."""
    present = list(dict.fromkeys(k for row in rows for k in row))
    if benchmark == "fiubench":
        return [c for c in FIUBENCH_HEADLINE if c in present]
    return [c for c in present if any(part in c for part in _MLLMU_HEADLINE_PARTS)]


def format_value(value: object) -> str:
    """A cell: four significant digits for floats, "-" for missing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Mapping], columns: Sequence[str], *, label_key: str = "Model") -> str:
    """Plain-text table (one line per metric, one column per row of `rows`), right-aligned numbers."""
    header = ["", *(str(row.get(label_key, i)) for i, row in enumerate(rows))]
    body = [[column, *(format_value(row.get(column)) for row in rows)] for column in columns]
    widths = [max(len(line[j]) for line in [header, *body]) for j in range(len(header))]
    lines = [header, *body]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(line[1:], widths[1:], strict=True))])
        .rstrip() for line in lines)
