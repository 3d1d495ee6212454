"""Processed image inputs kept per image, shared by every batch source that one image processor feeds.

An image is shown by many rows: each FIUBench identity's picture by all of its questions (each scored as several
rows), and MLLMU-Bench eval.py's few-shot images by every few-shot row. Processing one costs 70-800 ms of host time
on a 2-core CPU (a 1120 px picture to CLIP's 336 px, to idefics2's five 980 px crops). Each batch source used to
hold its own least-recently-used 256 results: per source up to 16 GB of idefics2's split images (62 MB each), and
nothing shared between the sources of a split's passes. Here the bound is in bytes, over all of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from vlmu_jax.data.images import ImageProcessor, row_images


def _nbytes(inputs: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in inputs.values())


class ImageCache:
    """`row_images(processor, ref)` for an image reference (None: a text-only row's inputs), each result kept until
    the least recently used ones must go to stay within `max_bytes` (0: keep none). Kept arrays are read-only: the
    same arrays go to every batch that shows the image (collating copies them). Safe to call from the prefetch and
    compile threads at once (two threads may both process an image that neither has kept yet)."""

    def __init__(self, processor: ImageProcessor, max_bytes: int):
        self.processor, self.max_bytes = processor, max_bytes
        self._kept: OrderedDict[Any, dict[str, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        return self._bytes

    def __call__(self, ref: Any) -> dict[str, np.ndarray]:
        with self._lock:
            if ref in self._kept:
                self._kept.move_to_end(ref)
                return self._kept[ref]
        inputs = row_images(self.processor, ref)
        size = _nbytes(inputs)
        if size > self.max_bytes:
            return inputs
        for a in inputs.values():
            a.flags.writeable = False
        with self._lock:
            if ref not in self._kept:
                self._kept[ref] = inputs
                self._bytes += size
                while self._bytes > self.max_bytes:
                    self._bytes -= _nbytes(self._kept.popitem(last=False)[1])
        return inputs
