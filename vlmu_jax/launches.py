"""The process's programs and copies go onto the devices from one host thread at a time.

Why: the first time a program with a cuDNN graph runs, cuDNN-frontend prepares the graph (`deserialize`) and ends
with a warm-up: it begins a CUDA graph capture on the stream it is given, XLA's compute stream, runs the graph into
the capture and ends it. Work that another host thread puts on that stream meanwhile is captured instead of run,
and work that waits on an event recorded outside the capture (a program waiting for its inputs' transfer) breaks
it: "operation failed due to a previous error during capture" when the capture ends. A host-to-device copy touches
that stream too: PjRt makes the copy's stream wait on the compute stream (an event recorded on it) before it
writes the new buffer. Idefics2-8b's eval with image splitting stopped so in its first scoring call on an H100
(bench/RESULTS.md, session 33) while other threads copied and launched: each image's pixels and features in the
eval's batch threads, and the next model, loaded ahead (its params copied and cast). Those launches and copies,
and the launches of the programs that may warm up a cuDNN graph (the model's forward and backward in every
stage), take one lock; with it that eval runs on cuDNN (session 34, calls 124 and 126). A launch or copy
returns once it is queued, before it runs, so the lock is held briefly, except where a call compiles first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.RLock()  # re-entrant: a launch may trace a function that launches


class _OneAtATime:
    """A function that launches or copies, whose calls hold the process's launch lock; its other attributes (a
    jitted function's `lower`, `trace`, ...) are the function's own."""

    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def one_at_a_time(fn: Callable[..., Any]) -> _OneAtATime:
    """`fn` (a jitted function, or one that copies to the devices) called while no other thread launches or copies
    through this module."""
    return _OneAtATime(fn)


def launching() -> threading.RLock:
    """The lock as a block (`with launching(): ...`), for launches and copies that are not one function's call."""
    return _LOCK
