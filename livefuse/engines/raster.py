"""Piecewise-affine warping through a triangle mesh, vectorised.

Instead of warping 852 triangles one by one, each output pixel learns which triangle
covers it (an id buffer filled far-to-near, so a nearer triangle hides a farther one
the way a z-buffer would) and every pixel is then mapped with its triangle's affine in
one array expression, followed by a single `remap`.

Mesh points and triangles are host geometry; the id map and the coordinate maps are
pixel arrays of the `ops` module given.
"""

from __future__ import annotations

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.ops_protocol import Ops


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
    *,
    ops: Ops = cpu_ops,
) -> np.ndarray:
    """Fill each triangle with its index, in `draw_order` (later ones cover earlier ones).

    Returns an int32 map of `shape` holding -1 where no triangle lies (`ops.triangle_ids`).
    """
    return ops.triangle_ids(xy, triangles, draw_order, shape)


def source_coordinates(
    ids: np.ndarray,
    dst_xy: np.ndarray,
    src_xy: np.ndarray,
    triangles: np.ndarray,
    *,
    ops: Ops = cpu_ops,
) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel of an id map drawn from `dst_xy`, where its triangle takes it in `src_xy`.

    Each pixel's barycentric coordinates in its triangle are clamped to the triangle
    first: the rasteriser also paints pixels just outside thin triangles, and an
    unclamped affine would send those far away. Uncovered pixels map to -1, outside any
    source image, so `remap` leaves them at the border value.
    """
    d0 = dst_xy[triangles[:, 0]]
    edges = np.stack([dst_xy[triangles[:, 1]] - d0, dst_xy[triangles[:, 2]] - d0], axis=2)
    det = edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]
    # Degenerate triangles (no area) send their pixels to their first corner.
    safe_det = np.where(np.abs(det) > 1e-9, det, np.inf)
    to_barycentric = np.stack(
        [
            edges[:, 1, 1] / safe_det,
            -edges[:, 0, 1] / safe_det,
            -edges[:, 1, 0] / safe_det,
            edges[:, 0, 0] / safe_det,
        ],
        axis=1,
    )
    s0 = src_xy[triangles[:, 0]]
    per_triangle = np.concatenate(
        [d0, to_barycentric, s0, src_xy[triangles[:, 1]] - s0, src_xy[triangles[:, 2]] - s0],
        axis=1,
    ).astype(np.float32)  # (T, 12)

    xp = ops.xp
    height, width = ids.shape
    covered = ids >= 0
    t = ops.from_host(per_triangle)[xp.where(covered, ids, 0)]  # (H, W, 12)
    dx = xp.arange(width, dtype=np.float32) - t[..., 0]
    dy = xp.arange(height, dtype=np.float32)[:, None] - t[..., 1]
    b1 = xp.maximum(t[..., 2] * dx + t[..., 3] * dy, 0)
    b2 = xp.maximum(t[..., 4] * dx + t[..., 5] * dy, 0)
    outside = b1 + b2 > 1  # beyond the edge opposite the first corner
    total = xp.where(outside, b1 + b2, 1)
    b1, b2 = b1 / total, b2 / total
    map_x = t[..., 6] + b1 * t[..., 8] + b2 * t[..., 10]
    map_y = t[..., 7] + b1 * t[..., 9] + b2 * t[..., 11]
    map_x[~covered] = -1
    map_y[~covered] = -1
    return map_x, map_y
