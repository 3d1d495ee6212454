"""One training run's per-step metrics, written twice: `metrics.jsonl` and TensorBoard event files beside it.

`metrics.jsonl` (one JSON object per micro-step) is what the report's loss curves and the tests read;
the event files (written with tensorboardX, as MaxText does: pure Python, no TensorFlow) are what a researcher
watches while a run trains: ``tensorboard --logdir WORKDIR/train`` shows every run of a workdir side by side
(loss, each stream's NLL, lr, grad norm, tokens/s). A resumed run first drops what the interrupted one logged
after its checkpoint, in both, so each step appears once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def _truncate_jsonl(path: Path, start: int) -> None:
    """A resumed run rewrites the steps after its checkpoint, so drop their stale lines first."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < start]
    path.write_text("".join(ln + "\n" for ln in keep))


class RunLog:
    """Appends one record per step to `folder/metrics.jsonl` and to TensorBoard scalars `train/<key>` in `folder`.

    `start`: the step the run (re)starts from; on a resume, records from `start` on are discarded (the JSONL lines
    here, the TensorBoard events through tensorboardX's `purge_step`). Process 0 only: other processes pass
    `enabled=False` and nothing is written.
    """

    def __init__(self, folder: Path, *, start: int = 0, enabled: bool = True):
        self._jsonl = self._events = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(folder / METRICS_FILE, start)
        self._jsonl = open(folder / METRICS_FILE, "a")  # noqa: SIM115 - closed in close()
        self._events = SummaryWriter(str(folder), purge_step=start or None, flush_secs=30)

    def write(self, record: Mapping[str, float]) -> None:
        """`record` has `step` and float metrics; every other number becomes a TensorBoard scalar too."""
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(dict(record)) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key not in ("step", "resumed_from"):
                self._events.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._events.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
