"""report/index.html: one self-contained page to read a run's results.

One file with nothing outside it (no server, no network, no sibling files): it can be mailed, attached to a
review or opened years later. It holds the results table, every plot embedded as a PNG data URI, where each
model came from, the protocol, the resolved config and the environment (versions, commit, devices), so a number
in it can be traced to what produced it. `render_index` is a pure function of its inputs; `write_index` collects
them from the report folder and the workdir.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from vlmu_jax.report.table import format_value

# The report's figures, in page order, with what each shows.
PLOTS = {
    "tradeoff.png": "Forget quality (KS-test p-value against the retain-only reference, log scale) against model "
                    "utility; the reference is the black star.",
    "metrics.png": "Headline metrics per model.",
    "loss_curves.png": "Training loss per micro-step of every training run in this workdir.",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } .scroll { overflow-x: auto; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; } tr.headline td:first-child { font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.9em; color: #555; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def _table(rows: Sequence[Mapping], headline: Sequence[str], label_key: str) -> str:
    """Metrics down, models across (as on the terminal); headline metrics first, then every other column."""
    columns = [*headline, *(k for k in dict.fromkeys(k for r in rows for k in r) if k not in headline
                            and k != label_key)]
    head = "".join(f"<th>{html.escape(str(r.get(label_key, i)))}</th>" for i, r in enumerate(rows))
    headline_row = '<tr class="headline">'
    body = "".join(
        f'{headline_row if c in headline else "<tr>"}<td>{html.escape(c)}</td>'
        + "".join(f"<td>{html.escape(format_value(r.get(c)))}</td>" for r in rows) + "</tr>"
        for c in columns)
    return f'<div class="scroll"><table><tr><th>metric</th>{head}</tr>{body}</table></div>'


def _pairs(items: Mapping[str, object]) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<table>{body}</table>"


def _pre(obj: object) -> str:
    return f"<pre>{html.escape(json.dumps(obj, indent=2, sort_keys=True))}</pre>"


def protocol(config: Mapping) -> dict[str, object]:
    """What defines the comparison, from the resolved config: benchmark, protocol, splits, method and seed."""
    data, ev = config.get("data", {}), config.get("eval", {})
    out = {"benchmark": config.get("benchmark"), "protocol": config.get("protocol")}
    split = data.get("forget_split") if config.get("benchmark") == "fiubench" else f"forget_{data.get('forget_ratio')}"
    out.update({"forget split": split, "retain split (eval)": ev.get("retain_split"),
                "unlearning objective(s)": config.get("unlearn", {}).get("objective"), "seed": config.get("seed")})
    return out


def render_index(*, title: str, rows: Sequence[Mapping], headline: Sequence[str], plots: Mapping[str, bytes],
                 sources: Mapping[str, str], config: Mapping, environment: Mapping, label_key: str = "Model") -> str:
    """The page; `plots` maps a file name (a key of PLOTS, or any other) to its PNG bytes."""
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(PLOTS.get(name, name))}</figcaption></figure>"
        for name, png in plots.items())
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Written {html.escape(stamp)} by vlmu_jax {html.escape(str(environment.get("vlmu_jax", "")))} (commit
{html.escape(str(environment.get("git_commit")))}). Full-precision values: results.csv / results.json.</p>
<h2>Results</h2>
{_table(rows, headline, label_key)}
<h2>Plots</h2>
{figures or "<p>No plots.</p>"}
<h2>Models</h2>
{_pairs(sources)}
<h2>Protocol</h2>
{_pairs(protocol(config))}
<h2>Resolved config</h2>
{_pre(config)}
<h2>Environment</h2>
{_pre(environment)}
</body></html>
"""


def write_index(report_dir: Path, rows: Sequence[Mapping], *, headline: Sequence[str], sources: Mapping[str, str],
                config: Mapping, environment: Mapping) -> Path:
    """Writes report_dir/index.html with the plots of PLOTS found in report_dir."""
    plots = {name: (report_dir / name).read_bytes() for name in PLOTS if (report_dir / name).exists()}
    title = f"{config.get('name', 'run')}: {config.get('benchmark', '')} results"
    page = render_index(title=title, rows=rows, headline=headline, plots=plots, sources=sources, config=config,
                        environment=environment)
    path = report_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
