"""Device traces of a bench script's workloads, for per-kernel time (bench/NOTES.md says what was found).

Runs the bench module's main() with its timer wrapped: after the warm-up calls, two more calls run under
jax.profiler.trace into $OUT/trace_<n>_<workload>. Read the traces with xprof (`bench/read_trace.py`).
Run from the repo root: `PYTHONPATH=. OUT=/tmp/prof python bench/profile_bench.py MODULE [ITS ARGS]`, e.g.
`bench.bench_jax_llava --small` or `bench.bench_jax_families --family mllama`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

import jax

import bench.bench_jax_llava as llava

_count = [0]
_time = llava.timeit


def traced_timeit(fn, n: int = 5, warm: int = 2) -> float:
    """The bench's median timing, then two calls under the profiler, named for the calling workload."""
    s = _time(fn, n=n, warm=warm)
    caller = inspect.stack()[1]
    what = caller.function if caller.function != "main" else f"line{caller.lineno}"
    _count[0] += 1
    path = os.path.join(os.environ.get("OUT", "/tmp/prof"), f"trace_{_count[0]:02d}_{what}")
    with jax.profiler.trace(path):
        for _ in range(2):
            jax.block_until_ready(fn())
    return s


if __name__ == "__main__":
    module = importlib.import_module(sys.argv[1])
    llava.timeit = module.timeit = traced_timeit  # the training-step timer lives in bench_jax_llava
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    module.main()
