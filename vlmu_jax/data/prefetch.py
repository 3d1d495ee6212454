"""Host batches made ahead in background threads, so the device does not wait for the host between steps.

Why: the training and eval loops made each batch (each row's picture read, resized and normalised, the tokens
padded) between two device calls, with the device idle: ~5 ms per 336 px picture on one core of this project's
CPU, 16 pictures per eval batch, against ~0.25 s of model compute per batch at 7B. Making the next batches while
the device runs the current one hides that time; PIL and numpy release the GIL for the heavy parts, so a few
threads also spread it over the host's cores. At 7B the eval stage's time outside compute and compiles went from
39 s to 25 s (bench/RESULTS.md, session 4; loading had also moved its casts onto the device since).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

DEPTH = 4  # batches made ahead: enough for a few threads to work at once; a few MB of host memory each


def prefetched(make: Callable[[int], T], indices: Iterable[int], depth: int = DEPTH) -> Iterator[T]:
    """`make(i)` for each i of `indices`, in order, with up to `depth` of the next ones made ahead in threads.

    `make` must be safe to call from several threads at once and must not depend on call order (a batch source's
    `get` is a function of the index). An exception raised while making item i is raised when item i is taken,
    not before; closing the iterator early waits only for the items already being made.
    """
    workers = max(1, min(depth, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers, thread_name_prefix="batch") as pool:
        ahead: deque[Future] = deque()
        try:
            for i in indices:
                ahead.append(pool.submit(make, i))
                if len(ahead) > depth:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()
