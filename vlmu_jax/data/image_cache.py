"""Image inputs kept per image, shared by every batch source that one image processor (or, in evaluation, one
model's image embeddings: vlmu_jax/image_embeddings.py) feeds.

An image is shown by many rows: each FIUBench identity's picture by all of its questions (each scored as several
rows), and MLLMU-Bench eval.py's few-shot images by every few-shot row. Processing one costs 70-800 ms of host time
on a 2-core CPU (a 1120 px picture to CLIP's 336 px, to idefics2's five 980 px crops). Each batch source used to
hold its own least-recently-used 256 results: per source up to 16 GB of idefics2's split images (62 MB each), and
nothing shared between the sources of a split's passes. Here the bound is in bytes, over all of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np


def _nbytes(inputs: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in inputs.values())


class ImageCache:
    """`make(ref)` for an image reference (None: a text-only row's inputs; `make` is e.g. `row_images` of an image
    processor), each result kept until the least recently used ones must go to stay within `max_bytes` (0: keep
    none). Kept arrays are read-only: the same arrays go to every batch that shows the image (collating copies
    them). Safe to call from the prefetch and compile threads at once: a thread asking for an image that another
    is making waits for that one's result (evaluation's images are made by a device program).
    """

    def __init__(self, make: Callable[[Any], dict[str, np.ndarray]], max_bytes: int):
        self.make, self.max_bytes = make, max_bytes
        self._kept: OrderedDict[Any, dict[str, np.ndarray]] = OrderedDict()
        self._making: dict[Any, threading.Event] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        return self._bytes

    def __call__(self, ref: Any) -> dict[str, np.ndarray]:
        if self.max_bytes <= 0:
            return self.make(ref)
        while True:
            with self._lock:
                if ref in self._kept:
                    self._kept.move_to_end(ref)
                    return self._kept[ref]
                made = self._making.get(ref)
                if made is None:
                    made = self._making[ref] = threading.Event()
                    break
            made.wait()  # then it is kept, or too large to keep: this thread makes its own
        try:
            return self._keep(ref, self.make(ref))
        finally:
            with self._lock:
                del self._making[ref]
            made.set()

    def _keep(self, ref: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = _nbytes(inputs)
        if size > self.max_bytes:
            return inputs
        for a in inputs.values():
            a.flags.writeable = False
        with self._lock:
            self._kept[ref] = inputs
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._bytes -= _nbytes(self._kept.popitem(last=False)[1])
        return inputs
