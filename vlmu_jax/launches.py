"""The process's programs go onto the devices from one host thread at a time.

Why: the first time a program with a cuDNN graph runs, cuDNN-frontend prepares the graph (`deserialize`) and ends
with a warm-up: it begins a CUDA graph capture on the stream it is given, XLA's compute stream, runs the graph into
the capture and ends it. Work that another host thread puts on that stream meanwhile is captured instead of run,
and work that waits on an event recorded outside the capture (a program waiting for its inputs' transfer) breaks
it: "operation failed due to a previous error during capture" when the capture ends. Idefics2-8b's eval with image
splitting stopped so in its first scoring call on an H100 (bench/RESULTS.md, session 33) while other threads
launched programs: each image's features in the eval's batch threads, and the layout casts of the next model,
loaded ahead. Those launches, and those of the programs that may warm up a cuDNN graph (the model's forward and
backward in every stage), take one lock. A launch returns once the program is queued, before it runs, so the lock
is held for microseconds, except where the call compiles first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.RLock()  # re-entrant: a launch may trace a function that launches


class _OneAtATime:
    """A jitted function whose calls hold the process's launch lock; its other attributes (`lower`, `trace`, ...)
    are the function's own."""

    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def one_at_a_time(fn: Callable[..., Any]) -> _OneAtATime:
    """`fn` (a jitted function) launched while no other thread launches through this module."""
    return _OneAtATime(fn)
