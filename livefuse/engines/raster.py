"""Piecewise-affine warping through a triangle mesh, vectorised.

Instead of warping 852 triangles one by one, each output pixel learns which triangle
covers it (an id buffer filled far-to-near, so a nearer triangle hides a farther one
the way a z-buffer would) and every pixel is then mapped with its triangle's affine in
one array expression, followed by a single `cv2.remap`.
"""

from __future__ import annotations

import cv2
import numpy as np

_SUBPIXEL_BITS = 4
_SUBPIXEL = 1 << _SUBPIXEL_BITS


def signed_areas(xy: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Twice the signed area of each triangle; the sign says which way it winds."""
    p0, p1, p2 = xy[triangles[:, 0]], xy[triangles[:, 1]], xy[triangles[:, 2]]
    e1, e2 = p1 - p0, p2 - p0
    return e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]


def rasterize_ids(
    xy: np.ndarray,
    triangles: np.ndarray,
    draw_order: np.ndarray,
    shape: tuple[int, int],
) -> np.ndarray:
    """Fill each triangle with its index, in `draw_order` (later ones cover earlier ones).

    Returns an int32 map of `shape` holding -1 where no triangle lies.
    """
    ids = np.full(shape, -1, dtype=np.int32)
    fixed = np.round(xy * _SUBPIXEL).astype(np.int32)
    corners = fixed[triangles]  # (T, 3, 2)
    for index in draw_order:
        cv2.fillConvexPoly(
            ids, corners[index], int(index), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS
        )
    return ids


def triangle_affines(dst_xy: np.ndarray, src_xy: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Per triangle, the 2x3 affine taking a point in its dst triangle to its src triangle.

    Degenerate dst triangles (zero area) get an all-zero affine; they cover no pixel.
    """
    d0, d1, d2 = dst_xy[triangles[:, 0]], dst_xy[triangles[:, 1]], dst_xy[triangles[:, 2]]
    s0, s1, s2 = src_xy[triangles[:, 0]], src_xy[triangles[:, 1]], src_xy[triangles[:, 2]]
    # Solve [s1-s0, s2-s0] = M [d1-d0, d2-d0] for the 2x2 linear part M of each triangle.
    dst_edges = np.stack([d1 - d0, d2 - d0], axis=2)  # (T, 2, 2), columns are edges
    src_edges = np.stack([s1 - s0, s2 - s0], axis=2)
    det = dst_edges[:, 0, 0] * dst_edges[:, 1, 1] - dst_edges[:, 0, 1] * dst_edges[:, 1, 0]
    valid = np.abs(det) > 1e-9
    safe_det = np.where(valid, det, 1.0)
    inverse = np.empty_like(dst_edges)
    inverse[:, 0, 0] = dst_edges[:, 1, 1] / safe_det
    inverse[:, 0, 1] = -dst_edges[:, 0, 1] / safe_det
    inverse[:, 1, 0] = -dst_edges[:, 1, 0] / safe_det
    inverse[:, 1, 1] = dst_edges[:, 0, 0] / safe_det
    linear = src_edges @ inverse
    translation = s0 - np.einsum("tij,tj->ti", linear, d0)
    affines = np.concatenate([linear, translation[:, :, None]], axis=2)
    affines[~valid] = 0.0
    return affines.astype(np.float32)


def source_coordinates(
    ids: np.ndarray, affines: np.ndarray, origin: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel of an id map, the source coordinates its triangle maps it to.

    `origin` is the frame position of the id map's top-left pixel (maps are usually
    made over a face's bounding box, not the whole frame). Uncovered pixels map to -1,
    outside any source image, so `cv2.remap` leaves them at the border value.
    """
    height, width = ids.shape
    covered = ids >= 0
    coefficients = affines.reshape(-1, 6)[np.where(covered, ids, 0)]  # (H, W, 6)
    xs = np.arange(width, dtype=np.float32) + np.float32(origin[0])
    ys = np.arange(height, dtype=np.float32)[:, None] + np.float32(origin[1])
    map_x = coefficients[..., 0] * xs + coefficients[..., 1] * ys + coefficients[..., 2]
    map_y = coefficients[..., 3] * xs + coefficients[..., 4] * ys + coefficients[..., 5]
    map_x[~covered] = -1
    map_y[~covered] = -1
    return map_x, map_y
