"""Image preprocessing parity with transformers' (PIL-backend) processors."""

import numpy as np
import pytest
from PIL import Image

from vlmu_jax.data.images import ImageSpec, llava_spec, preprocess


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((50, 80), (97, 41), (64, 64))
    ]


@pytest.mark.parametrize("pad", [False, True])
def test_parity_with_transformers(pad):
    from transformers.models.clip import CLIPImageProcessorPil
    from transformers.models.llava import LlavaImageProcessorPil

    size = 36
    kwargs = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    ref = LlavaImageProcessorPil(do_pad=True, **kwargs) if pad else CLIPImageProcessorPil(**kwargs)
    spec = ImageSpec.from_hf(ref.to_dict())
    assert spec == llava_spec(size, pad_to_square=pad)
    for image in _images():
        expected = np.asarray(ref(image, return_tensors="np")["pixel_values"][0])
        got = preprocess(image, spec)
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, size, size)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_image_cache_processes_each_image_once_within_its_bytes() -> None:
    """An image shown by many rows is processed once while it is kept; past the byte bound the least recently used
    go first; kept arrays are read-only (every batch showing the image gets them); a text-only row's inputs too."""
    import functools
    import io

    from vlmu_jax.data.image_cache import ImageCache
    from vlmu_jax.data.images import ClipProcessor, row_images
    from vlmu_jax.data.records import ImageRef

    calls = []

    class Counting(ClipProcessor):
        def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
            calls.append(image.getpixel((0, 0)))
            return super().__call__(image)

    def ref(value: int) -> ImageRef:
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), (value, 0, 0)).save(buf, "PNG")
        return ImageRef(data=buf.getvalue())

    processor = Counting(llava_spec(16))
    one = 3 * 16 * 16 * 4  # one image's float32 pixels
    cache = ImageCache(functools.partial(row_images, processor), max_bytes=2 * one)
    a, b, c = ref(10), ref(20), ref(30)
    first = cache(a)
    assert cache(ref(10)) is first and len(calls) == 1  # an equal reference (same bytes) is the same image
    np.testing.assert_array_equal(first["pixel_values"], processor(a.load())["pixel_values"])
    calls.clear()
    with pytest.raises(ValueError):
        first["pixel_values"][0, 0, 0] = 0
    cache(b), cache(a), cache(c)  # a used after b: b is the least recently used when c arrives
    assert calls == [(20, 0, 0), (30, 0, 0)] and cache.kept_bytes == 2 * one
    cache(a), cache(c)
    assert len(calls) == 2
    cache(b)
    assert calls[-1] == (20, 0, 0) and cache.kept_bytes == 2 * one
    assert cache(None)["pixel_values"].shape == (3, 16, 16) and not cache(None)["pixel_values"].any()
    nothing = ImageCache(functools.partial(row_images, processor), max_bytes=0)
    nothing(a), nothing(a)
    assert calls[-2:] == [(10, 0, 0), (10, 0, 0)] and nothing.kept_bytes == 0
