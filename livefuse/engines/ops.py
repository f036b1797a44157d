"""Pixel operations on the CPU: the OpenCV/NumPy implementation of every warp, filter,
colour conversion, rasteriser and blend the engines do.

Frames, crops, masks and maps travel as this module's arrays (`xp`, NumPy here); a
backend names the module its pixel work goes through (`Backend.ops`), and the cuda
backend's twin implements the same functions (`ops_protocol.Ops`) over CuPy arrays.
Geometry (points, 2x3 matrices, boxes, kernels) stays NumPy on the host everywhere; code
that needs a pixel-derived value on the host says so with `to_host`, and hands host
arrays to pixel code with `from_host`.

Each docstring states the conventions a twin must reproduce: sizes are (width, height)
as OpenCV takes them, shapes (height, width[, channels]); a single-channel image stays
2-D; interpolation is bilinear with pixel centres at integer coordinates unless said
otherwise; OpenCV quantises warp coordinates to 1/32 px and 8-bit bilinear weights to
fixed point, so a twin may differ from it by one level on uint8 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

xp = np
"""The array namespace pixel code works in."""

Array = np.ndarray
"""This module's array type."""

Border = Literal["constant", "replicate"]
_BORDERS = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}
_INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}
# Triangle and polygon corners are drawn at 1/16 px.
_SUBPIXEL_BITS = 4
_SUBPIXEL = 1 << _SUBPIXEL_BITS


# Host transfers ---------------------------------------------------------------------


def to_host(a: Array) -> np.ndarray:
    """`a` as a NumPy array on the host (here: the same array, no copy)."""
    return np.asarray(a)


def from_host(a: np.ndarray) -> Array:
    """A host NumPy array as this module's array (here: the same array, no copy)."""
    return np.asarray(a)


# Geometry (host) --------------------------------------------------------------------


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine matrix, float64 2x3 on the host (a singular one gives
    zeros, as OpenCV does)."""
    return np.asarray(cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64)))


def nms_boxes(
    boxes_xywh: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float
) -> list[int]:
    """Greedy non-maximum suppression on the host (OpenCV's `dnn.NMSBoxes`): the indices
    of boxes (x, y, width, height) scoring above `score_threshold`, best first, each
    dropped when its overlap (intersection over union, no +1 on sizes) with a kept one
    exceeds `iou_threshold`."""
    keep = cv2.dnn.NMSBoxes(
        np.asarray(boxes_xywh, dtype=np.float64).tolist(),
        np.asarray(scores, dtype=np.float64).tolist(),
        score_threshold,
        iou_threshold,
    )
    return [int(i) for i in np.asarray(keep, dtype=int).reshape(-1)]


# Warps ------------------------------------------------------------------------------


def warp_affine(
    image: Array,
    matrix: np.ndarray,
    size: tuple[int, int],
    *,
    border: Border = "constant",
    border_value: float = 0.0,
    inverse_map: bool = False,
) -> Array:
    """`image` warped by the 2x3 `matrix` (frame to output; output to frame with
    `inverse_map`) onto a `size` (width, height) canvas, bilinear. Outside the image:
    `border_value` in every channel ("constant") or the nearest edge pixel ("replicate").
    Same dtype and channels as `image`."""
    flags = cv2.INTER_LINEAR | (cv2.WARP_INVERSE_MAP if inverse_map else 0)
    return np.asarray(
        cv2.warpAffine(
            image,
            np.asarray(matrix, dtype=np.float64),
            size,
            flags=flags,
            borderMode=_BORDERS[border],
            borderValue=(border_value,) * 4,
        )
    )


def remap(
    image: Array,
    map_x: Array,
    map_y: Array,
    *,
    border: Border = "replicate",
    border_value: float = 0.0,
) -> Array:
    """out[y, x] = image sampled bilinearly at (map_x[y, x], map_y[y, x]); float32 maps
    of the output's (height, width). Outside the image as in `warp_affine`. Same dtype
    and channels as `image`. (OpenCV 5.0 misreads a few pixels of the last row when
    every coordinate of the map lies outside the image: no pixel the engines use.)"""
    return np.asarray(
        cv2.remap(
            image,
            map_x,
            map_y,
            cv2.INTER_LINEAR,
            borderMode=_BORDERS[border],
            borderValue=(border_value,) * 4,
        )
    )


def resize(
    image: Array, size: tuple[int, int], *, interpolation: Literal["linear", "area"]
) -> Array:
    """`image` resized to `size` (width, height). "linear": bilinear with pixel centres
    aligned (source x = (x + 0.5) * in / out - 0.5, edges replicated); "area": the mean
    of the source pixels each output pixel covers, weighted by the part covered (bilinear
    when enlarging). Same dtype and channels."""
    return np.asarray(cv2.resize(image, size, interpolation=_INTERPOLATIONS[interpolation]))


def flip_horizontal(image: Array) -> Array:
    """`image` mirrored left to right: out[:, x] = image[:, width - 1 - x]."""
    return np.asarray(cv2.flip(image, 1))


# Filters ----------------------------------------------------------------------------


def gaussian_blur(image: Array, sigma: float, *, ksize: int = 0) -> Array:
    """Separable Gaussian blur, the same `sigma` on both axes, borders reflected without
    repeating the edge (...dcb|abcd|cba...). A `ksize` of 0 takes OpenCV's size for
    `sigma`: round(8 * sigma + 1) for float images, round(6 * sigma + 1) for uint8, made
    odd; a `sigma` of 0 takes OpenCV's for `ksize`: 0.3 * ((ksize - 1) / 2 - 1) + 0.8.
    The kernel sums to one. Same dtype and channels."""
    return np.asarray(cv2.GaussianBlur(image, (ksize, ksize), sigma))


def ellipse_kernel(diameter: int) -> np.ndarray:
    """A `diameter` x `diameter` uint8 0/1 elliptical structuring element (host), as
    OpenCV draws it."""
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter)))


def erode(image: Array, kernel: np.ndarray) -> Array:
    """Minimum over the kernel's nonzero footprint, anchored at (size // 2) on each axis;
    pixels beyond the image do not take part. Same dtype."""
    return np.asarray(cv2.erode(image, kernel))


def dilate(image: Array, kernel: np.ndarray) -> Array:
    """Maximum over the kernel's nonzero footprint, anchored at (size // 2) on each axis;
    pixels beyond the image do not take part. Same dtype."""
    return np.asarray(cv2.dilate(image, kernel))


def close(image: Array, kernel: np.ndarray) -> Array:
    """Morphological closing: `erode(dilate(image, kernel), kernel)`."""
    return np.asarray(cv2.morphologyEx(image, cv2.MORPH_CLOSE, kernel))


def distance_transform(mask: Array, *, mask_size: Literal[3, 5]) -> Array:
    """float32 per pixel: the distance to the nearest zero pixel of the uint8 `mask`, by
    OpenCV's chamfer approximation of the Euclidean distance (3x3 mask: steps 0.955 and
    1.3693; 5x5: 1, 1.4 and 2.1969). Pixels beyond the image are not zeros; with no zero
    pixel at all every distance is float32's largest value."""
    return np.asarray(cv2.distanceTransform(mask, cv2.DIST_L2, mask_size))


def fill_holes(mask: Array) -> Array:
    """uint8 0/1: the nonzero pixels of `mask` and every pixel they enclose (a zero pixel
    not joined to the image border through zero pixels, 4-connected, is a hole)."""
    binary = (mask != 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(binary)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled


def inpaint(image: Array, mask: Array, radius: float) -> Array:
    """`image` (uint8) with the pixels where `mask` is nonzero filled in from their
    surroundings (Telea's fast marching, `radius` px); the other pixels are unchanged.
    Runs once per source, never per frame: a twin may do it on the host."""
    return np.asarray(cv2.inpaint(image, mask, radius, cv2.INPAINT_TELEA))


# Colour -----------------------------------------------------------------------------


def bgr_to_lab(image: Array) -> Array:
    """uint8 BGR (sRGB, D65) to OpenCV's 8-bit Lab: L * 255 / 100, a + 128, b + 128; any
    leading shape, last axis 3. A twin may differ by one level."""
    return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2LAB))


def lab_to_bgr(lab: Array) -> Array:
    """OpenCV's 8-bit Lab (see `bgr_to_lab`) back to uint8 BGR, saturated."""
    return np.asarray(cv2.cvtColor(lab, cv2.COLOR_LAB2BGR))


def masked_mean_std(image: Array, mask: Array) -> tuple[Array, Array]:
    """Per channel, the mean and the standard deviation (population: divided by the
    count) of `image`'s pixels where `mask` is nonzero: two float64 (channels,) arrays."""
    mean, std = cv2.meanStdDev(image, mask=(mask != 0).astype(np.uint8))
    return np.asarray(mean).reshape(-1), np.asarray(std).reshape(-1)


# Rasterising ------------------------------------------------------------------------


def triangle_ids(
    xy: np.ndarray, triangles: np.ndarray, order: np.ndarray, shape: tuple[int, int]
) -> Array:
    """An int32 map of `shape` (height, width): per pixel the index of the last triangle
    of `order` that covers it, -1 where none does. Triangle t has corners
    xy[triangles[t]] (pixel centres at integer coordinates), rounded to 1/16 px and
    filled as OpenCV's `fillConvexPoly` (8-connected edges) fills them: every pixel
    whose centre lies inside, and some along the edges (a thin triangle keeps its
    pixels)."""
    ids = np.full(shape, -1, dtype=np.int32)
    fixed = np.round(np.asarray(xy) * _SUBPIXEL).astype(np.int32)
    corners = fixed[np.asarray(triangles)[order]]  # (T, 3, 2), in drawing order
    # A face draws some 800 triangles of a few pixels each, so the loop's own overhead is
    # most of the cost: iterate over ready-made rows and plain ints, positional arguments.
    fill = cv2.fillConvexPoly
    for triangle, index in zip(corners, np.asarray(order).tolist(), strict=True):
        fill(ids, triangle, index, cv2.LINE_8, _SUBPIXEL_BITS)
    return ids


def fill_polygon(
    mask: Array, polygon: np.ndarray, value: int, *, antialiased: bool = False
) -> None:
    """Fill the polygon (N x 2 xy, corners rounded to 1/16 px) with `value` in the uint8
    `mask`, in place; anti-aliased edges blend `value` with what lies beneath by
    coverage."""
    corners = np.round(np.asarray(polygon) * _SUBPIXEL).astype(np.int32)
    line = cv2.LINE_AA if antialiased else cv2.LINE_8
    cv2.fillPoly(mask, [corners], value, line, shift=_SUBPIXEL_BITS)


def fill_convex_hull(mask: Array, points: np.ndarray, value: int) -> None:
    """Fill the convex hull of `points` (N x 2 xy, rounded to whole pixels) with `value`
    in `mask`, in place: every pixel inside it and on its edges."""
    hull = cv2.convexHull(np.round(np.asarray(points)).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, value)


# Blending and model inputs ------------------------------------------------------------


def alpha_blend(region: Array, rendered: Array, alpha: Array) -> None:
    """region <- rendered * alpha + region * (1 - alpha), in place, uint8 (H, W, C) with a
    float32 (H, W) alpha in 0..1; within one level of the exact sum rounded (OpenCV's
    `blendLinear`: alpha 0 keeps the region's pixel, alpha 1 takes the rendered one).
    `region` may be a view into a larger frame.

    OpenCV does this in one pass over uint8 pixels: a tenth of the time of the same sum
    in float32 NumPy, which on a 250 px face was the swap's largest step."""
    alpha = np.ascontiguousarray(alpha, dtype=np.float32)
    np.copyto(region, cv2.blendLinear(rendered, np.ascontiguousarray(region), alpha, 1 - alpha))


def blob_from_bgr(
    image: Array,
    out: Array,
    *,
    scale: float = 1.0,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    rgb: bool = True,
) -> None:
    """A model's input from a uint8 BGR image, into the float32 (3, H, W) `out` (a view
    is fine): channels first, RGB when `rgb`, each value ((pixel * scale) - mean) / std
    in float32, one rounding per step, the steps that change nothing skipped; `mean`
    and `std` per output channel or one for all."""
    channels = image[:, :, ::-1] if rgb else image
    out[...] = channels.transpose(2, 0, 1)
    if scale != 1.0:
        out *= np.float32(scale)
    mean_values = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    if mean_values.any():
        out -= mean_values
    std_values = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    if (std_values != 1).any():
        out /= std_values


# Overlays -----------------------------------------------------------------------------

# The label's text is this share of the frame's height (22 px at 720p), never under
# `_LABEL_MIN_TEXT_PX`, so it reads on a phone yet covers little of the picture.
_LABEL_TEXT_SHARE = 0.03
_LABEL_MIN_TEXT_PX = 9
# What the box leaves of the picture beneath it: the text stands out on any background
# and the picture still shows through.
_LABEL_BOX_KEEP = 0.35
_LABEL_FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_label(image: Array, text: str) -> None:
    """Burn `text` into the top-right corner of the uint8 BGR `image`, in place: white
    text on a box that darkens the picture beneath it to `_LABEL_BOX_KEEP` of itself.
    The text is 3% of the image's height tall (at least 9 px; smaller only where the
    image is too narrow for it), the box pads it by 40% of that, and the box stands off
    the top and right edges by as much. Only the box's pixels change."""
    height, width = image.shape[:2]
    text_px = max(_LABEL_MIN_TEXT_PX, round(height * _LABEL_TEXT_SHARE))
    (unit_width, unit_height), _ = cv2.getTextSize(text, _LABEL_FONT, 1.0, _stroke(text_px))
    scale = text_px / unit_height
    pad = max(2, round(text_px * 0.4))
    room = width - 3 * pad  # the box's two paddings and its margin from the edge
    if unit_width * scale > room:
        scale = max(room, 1) / unit_width
        text_px = max(1, round(unit_height * scale))
    thickness = _stroke(text_px)
    (text_width, text_height), baseline = cv2.getTextSize(text, _LABEL_FONT, scale, thickness)
    box_width = min(width, text_width + 2 * pad)
    box_height = min(height, text_height + baseline + 2 * pad)
    right = max(box_width, width - pad)
    top = min(pad, height - box_height)
    box = image[top : top + box_height, right - box_width : right]
    drawn = (box * _LABEL_BOX_KEEP).astype(np.uint8)
    cv2.putText(
        drawn,
        text,
        (pad, pad + text_height),
        _LABEL_FONT,
        scale,
        (255, 255, 255),
        thickness,
        cv2.LINE_AA,
    )
    box[...] = drawn


def _stroke(text_px: int) -> int:
    """The label's stroke width for text this tall: bold enough to read when small."""
    return max(1, round(text_px / 12))
