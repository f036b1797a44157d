"""Decoding untrusted images: content sniffed, sizes limited before decoding, errors clear.

Pillow reads the header first, so an image's pixel count is checked before any memory is
spent on it (a decompression bomb is refused, not decoded), and it notices a truncated
file, which OpenCV's decoder would silently fill with grey.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we accept, as Pillow names them after sniffing the content (never the name).
# MPO is the multi-picture JPEG many cameras write; its first picture is the photo.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


class ImageError(ValueError):
    """An image that cannot be used; the message says why, in words."""


class ImageTooLargeError(ImageError):
    pass


class NotAnImageError(ImageError):
    pass


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> BGR uint8 array, or ImageError."""
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise NotAnImageError("image is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises past twice its own limit; we check ours first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise NotAnImageError(
                    f"unsupported image format {image.format}; use JPEG, PNG, WebP or BMP"
                )
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            if width < 1 or height < 1:
                raise ImageError(f"image has no pixels ({width}x{height})")
            image.load()
    except UnidentifiedImageError as error:
        raise NotAnImageError("not an image (the content is no JPEG, PNG, WebP or BMP)") from error
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(str(error)) from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageError):
            raise
        raise ImageError(f"image is corrupt or truncated: {error}") from error
    return _to_bgr8(ImageOps.exif_transpose(image))


def _to_bgr8(image: Image.Image) -> np.ndarray:
    """Any decoded picture as 8-bit BGR, upright as viewers show it (EXIF applied)."""
    if image.mode.startswith("I"):
        # 16- and 32-bit grey: Pillow's RGB conversion clips to 255 instead of scaling.
        grey = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(grey.max()), 1.0)
        grey8 = np.clip(grey * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def read_image(path: Path, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Read and decode an image file; a missing file is an ImageError too."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageError(f"cannot read {path}: {error.strerror}") from error
    if size > max_bytes:
        raise ImageTooLargeError(f"{path} is {size} bytes; the limit is {max_bytes}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f"cannot read {path}: {error.strerror}") from error
    try:
        return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageError as error:
        raise type(error)(f"{path}: {error}") from error
