"""The sweep plans one `vlmu_jax.main` run per (seed, split); collection is tested on real runs in test_pipeline."""

from __future__ import annotations

from pathlib import Path

from vlmu_jax.sweep import plan

REPO = Path(__file__).resolve().parent.parent


def test_plan_names_every_combination(tmp_path: Path) -> None:
    commands = plan("configs/demo.py:ci", tmp_path, ["gd", "npo"], ["0", "1"], ["forget5", "10"], ["--x"])
    assert len(commands) == 4
    assert {c[c.index("--workdir") + 1] for c in commands} == {
        str(tmp_path / f"seed{s}_{p}") for s in "01" for p in ("forget5", "10")}
    assert all("--config.unlearn.objective=gd,npo" in c and c[-1] == "--x" for c in commands)
    assert sum("--config.data.forget_ratio=10" in c for c in commands) == 2
