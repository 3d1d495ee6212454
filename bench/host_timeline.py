"""The per-layer train step's host timeline inside bench_jax_llava's step timing (bench/NOTES.md, session 23).

For each timed step: the host's time inside the step call, each program's dispatch (collect, the layers' forward,
backward and plain programs, replay, update: mean and max), and the Python time between them. A dispatch that
takes as long as the program runs on the device means the host waits on the device (the step is device-bound); a
short one with the device idle between programs means the host sets the pace. Run like bench_jax_llava.py, with
its environment, from the repo root: `PYTHONPATH=. WORK=steps LAYERWISE=always python bench/host_timeline.py`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import bench.bench_jax_llava as llava
from vlmu_jax.unlearn import layerwise

_step = layerwise.LayerwiseStep.__call__
_returns: list[float] = []


def _timed(obj: object, name: str, log: list) -> None:
    """`obj.name` replaced by a wrapper that logs (name, start, end) of each call (its `lower` is left alone)."""
    fn: Callable = getattr(obj, name)

    def call(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append((name, t0, time.perf_counter()))
        return out

    setattr(obj, name, call)


def timed_step(self: layerwise.LayerwiseStep, *args):
    """The step, its programs wrapped once they exist (after the first step compiled them ahead)."""
    log = getattr(self, "_host_log", None)
    if log is None and self._calls:
        log = self._host_log = []
        for program in self.programs.values():
            for name in ("forward", "backward", "plain"):
                _timed(program, name, log)
        for name in ("_collect", "_replay", "_update"):
            _timed(self, name, log)
    t0 = time.perf_counter()
    out = _step(self, *args)
    t1 = time.perf_counter()
    if log is not None:
        per = collections.defaultdict(list)
        for name, a, b in log:
            per[name].append(b - a)
        since = 1e3 * (t0 - _returns[-1]) if _returns else 0.0
        print(f"host step {1e3 * (t1 - t0):.1f} ms (since the last step's return {since:.1f} ms); "
              + ", ".join(f"{n} {len(v)}x {1e3 * sum(v) / len(v):.3f} ms (max {1e3 * max(v):.2f})"
                          for n, v in per.items())
              + f"; python between {1e3 * ((t1 - t0) - sum(b - a for _, a, b in log)):.1f} ms", flush=True)
        log.clear()
    _returns.append(t1)
    return out


if __name__ == "__main__":
    layerwise.LayerwiseStep.__call__ = timed_step
    llava.main()
