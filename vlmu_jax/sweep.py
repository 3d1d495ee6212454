"""Sweep: one `vlmu_jax.main` run per (seed, forget split), all methods in each, collected into one table.

    python -m vlmu_jax.sweep --config configs/demo.py --workdir /tmp/sweep \
        --objectives gd,ga,npo --seeds 0,1 --forget_splits forget5,forget10 [-- --config.k=v ...]

Each combination gets its own workdir (`seed<S>_<split>`), so its retain-only reference model matches its
forget split; finished runs are skipped by the pipeline itself. The collected `sweep.csv`/`sweep.json` hold
every model row of every run with `Seed` and `Split` columns, and `sweep_tradeoff.png` plots forget quality
against model utility for all unlearned models (what `results_collect.py` gathers in FIUBench).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from absl import app, flags

from vlmu_jax.report.aggregate import write_csv, write_json
from vlmu_jax.report.plots import plot_fq_vs_mu

_CONFIG = flags.DEFINE_string("config", None, "Config file (configs/X.py); methods come from --objectives.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root folder: one sub-folder per run plus the sweep table.")
_OBJECTIVES = flags.DEFINE_list("objectives", ["gd", "ga"], "Unlearning methods, all trained in every run.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
_SPLITS = flags.DEFINE_list("forget_splits", ["forget10"], "FIUBench forget splits (or MLLMU ratios: 5,10,15).")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only collect the runs already in --workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def run_dir(root: Path, seed: str, split: str) -> Path:
    return root / f"seed{seed}_{split}"


def plan(config: str, root: Path, objectives: list[str], seeds: list[str], splits: list[str],
         extra: list[str]) -> list[list[str]]:
    """The `vlmu_jax.main` command line of every run of the sweep."""
    commands = []
    for seed in seeds:
        for split in splits:
            split_flag = (f"--config.data.forget_ratio={split}" if split.isdigit()
                          else f"--config.data.forget_split={split}")
            commands.append([sys.executable, "-m", "vlmu_jax.main", "--config", config,
                             "--workdir", str(run_dir(root, seed, split)), f"--config.seed={seed}", split_flag,
                             f"--config.unlearn.objective={','.join(objectives)}", *extra])
    return commands


def collect(root: Path, seeds: list[str], splits: list[str]) -> list[dict]:
    """Every model row of every finished run, tagged with its seed and split."""
    rows = []
    for seed in seeds:
        for split in splits:
            results = run_dir(root, seed, split) / "report" / "results.json"
            if not results.exists():
                raise FileNotFoundError(f"{results} is missing: that run has not finished its report stage")
            rows += [{"Seed": seed, "Split": split, **row} for row in json.loads(results.read_text())["rows"]]
    return rows


def write(root: Path, rows: list[dict]) -> None:
    write_csv(rows, root / "sweep.csv")
    write_json({"rows": rows}, root / "sweep.json")
    unlearned = [{**r, "Method": f"{r['Model'].removeprefix('unlearned_')} s{r['Seed']} {r['Split']}"}
                 for r in rows if r["Model"].startswith("unlearned_") and "Forget Quality" in r]
    if unlearned:
        plot_fq_vs_mu(unlearned, root / "sweep_tradeoff.png")


def main(argv: list[str]) -> None:
    root = Path(_WORKDIR.value)
    if not _COLLECT_ONLY.value:
        for command in plan(_CONFIG.value, root, _OBJECTIVES.value, _SEEDS.value, _SPLITS.value, argv[1:]):
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
    rows = collect(root, _SEEDS.value, _SPLITS.value)
    write(root, rows)
    print(f"{len(rows)} rows -> {root / 'sweep.csv'}")


if __name__ == "__main__":
    app.run(main)
