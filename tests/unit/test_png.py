"""``encode_png`` drives Pillow's zip encoder directly (Image.save's plugin machinery
cost more than compressing a 28x28 image): the bytes must be exactly Image.save's."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from latentserve.worker.runtime import images
from latentserve.worker.runtime.images import encode_png


def saved(image: np.ndarray) -> bytes:
    """Pillow's own PNG of a (C, H, W) image, as Image.save writes it."""
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_the_direct_encoder_is_in_use_here():
    assert images._direct_png_ok()  # else encode_png takes Image.save: slower, same bytes


@settings(max_examples=150, deadline=None)
@given(channels=st.sampled_from([1, 3]), h=st.integers(1, 70), w=st.integers(1, 70),
       levels=st.sampled_from([2, 3, 17, 256]), seed=st.integers(0, 2**32 - 1))
def test_bytes_are_image_saves(channels, h, w, levels, seed):
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, levels, (channels, h, w)) * (255 // max(levels - 1, 1))
             ).astype(np.uint8)
    assert encode_png(image) == saved(image)


def test_mnist_digits_and_strided_views(mnist_images):
    for image in mnist_images[:200]:
        assert encode_png(image) == saved(image)
    rgb = np.ascontiguousarray(np.repeat(mnist_images[:4], 3, axis=1))
    view = rgb[:, :, ::2, 1:]  # not contiguous
    for image in view:
        assert encode_png(image) == saved(np.ascontiguousarray(image))
    wide = np.tile(mnist_images[0], (1, 2, 700))  # a row over the encoder's 64 KiB block
    assert encode_png(wide) == saved(wide)
    noise = np.random.default_rng(1).integers(0, 256, (3, 200, 300), dtype=np.uint8)
    png = encode_png(noise)
    assert png.count(b"IDAT") > 1 and png == saved(noise)  # several IDAT chunks


def test_decodes_to_the_same_pixels(mnist_images):
    image = mnist_images[7]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image))))[None], image)


def test_refuses_what_it_cannot_write():
    from latentserve.errors import InvalidInput

    for bad in (np.zeros((2, 4, 4), np.uint8), np.zeros((1, 4, 4), np.float32),
                np.zeros((4, 4), np.uint8)):
        with pytest.raises(InvalidInput):
            encode_png(bad)
