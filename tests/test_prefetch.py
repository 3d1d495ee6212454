"""Batches made ahead (data/prefetch.py): same items in the same order as made in line, made in background
threads while the consumer holds earlier ones, errors raised at the item that failed, early close not stuck."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vlmu_jax.data.batching import Encoded, ExampleSource
from vlmu_jax.data.images import ClipProcessor, llava_spec
from vlmu_jax.data.prefetch import prefetched


def test_items_in_order_made_ahead_in_threads():
    made_by: dict[int, str] = {}
    second_made = threading.Event()

    def make(i: int) -> int:
        made_by[i] = threading.current_thread().name
        if i == 1:
            second_made.set()
        return i * i

    out = []
    for item in prefetched(make, range(10), depth=3):
        if item == 0:  # item 1 is made while the consumer still holds item 0, without asking for it
            assert second_made.wait(timeout=60)
        out.append(item)
    assert out == [i * i for i in range(10)]
    assert all(name.startswith("batch") for name in made_by.values())


def test_error_raised_at_its_item_and_early_close():
    def make(i: int) -> int:
        if i == 3:
            raise ValueError("bad row 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad row 3"):
        for item in prefetched(make, range(8), depth=2):
            got.append(item)
    assert got == [0, 1, 2]
    it = prefetched(lambda i: i, range(1000), depth=2)
    assert next(it) == 0
    it.close()  # returns: only the items already being made are waited for


def test_example_source_batches_equal_made_in_line():
    """A shuffled source's batches (pictures padded to square and resized by LLaVA's processor) made ahead equal
    the same batches made one by one, over two epochs."""
    process = ClipProcessor(llava_spec(28, pad_to_square=True))
    rng = np.random.RandomState(0)
    pictures = [rng.randint(0, 256, (40 + 3 * i, 30 + 2 * i, 3), np.uint8) for i in range(5)]

    def image_fn(ref):
        from PIL import Image

        return process(Image.fromarray(pictures[ref]))

    rows = [Encoded(input_ids=np.arange(3 + i % 4, dtype=np.int32) + 5, labels=np.arange(3 + i % 4, dtype=np.int32),
                    image=i % 5) for i in range(11)]
    source = ExampleSource(rows, global_batch_size=4, pad_token_id=0, image_fn=image_fn, shuffle=True, seed=3)
    want = [source.get(i) for i in range(2 * len(source))]
    got = list(prefetched(source.get, range(2 * len(source))))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], dict):
                for name in w[k]:
                    np.testing.assert_array_equal(g[k][name], w[k][name])
            else:
                np.testing.assert_array_equal(g[k], w[k])
