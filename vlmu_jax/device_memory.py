"""How much of each GPU's memory XLA's allocator may take (config `device_memory_fraction`).

Why: JAX's pool is 75 % of the card unless told otherwise. On an 80 GB H100 that is ~61 GB, and FIUBench's DPO
step at LLaVA-1.5-7B's shape (three streams of 4 rows x 704 tokens, the preset's remat policy) needs ~68 GB: it
ran out of memory with 20 GB of the card unused, and ran at a pool of 90 % (bench/RESULTS.md, session 38).
"""

from __future__ import annotations

import os

ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"  # read by JAX when its GPU backend starts


def configure(fraction: float) -> None:
    """XLA's GPU pool set to `fraction` of each card, unless the environment already sets it (the user's value
    wins). Must run before the backend starts (the first device query); it changes nothing on CPU or TPU."""
    if not 0 < fraction <= 1:
        raise ValueError(f"device_memory_fraction must be in (0, 1], got {fraction}")
    os.environ.setdefault(ENV, f"{fraction:g}")
