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
