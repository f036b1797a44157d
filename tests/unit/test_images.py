"""Untrusted image decoding: odd formats decode the way a viewer shows them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from livefuse.engines.images import decode_image

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 10_000_000}


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    bgr = decode_image(encoded(Image.fromarray(ramp), "PNG"), **LIMITS)
    assert bgr.dtype == np.uint8 and bgr.shape == (64, 64, 3)
    assert (bgr == 255).mean() < 0.01  # Pillow's own conversion would saturate most of it
    assert abs(int(bgr[32, 0, 0]) - (32 * 64 * 16) // 257) <= 1


def test_exif_orientation_is_applied():
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :10] = 255  # a white band on the left
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    bgr = decode_image(encoded(image, "JPEG", exif=exif), **LIMITS)
    assert bgr.shape == (40, 20, 3)
    assert bgr[:10].mean() > 200 and bgr[-10:].mean() < 50  # the band is now on top


def test_multi_picture_jpeg_from_a_camera_decodes_its_first_picture():
    first = Image.fromarray(np.full((16, 24, 3), 200, np.uint8))
    second = Image.fromarray(np.zeros((16, 24, 3), np.uint8))
    data = encoded(first, "MPO", save_all=True, append_images=[second])
    bgr = decode_image(data, **LIMITS)
    assert bgr.shape == (16, 24, 3) and bgr.mean() > 150
