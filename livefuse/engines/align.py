"""Five-point face alignment: the similarity that puts a face's eyes, nose and mouth
corners on ArcFace's template, and the crops it cuts.

The template is ArcFace's 112 px one; inswapper's 128 px crop uses the same template
shifted 8 px right, centring it in the larger crop (InsightFace's
`face_align.estimate_norm`), so both models see a face in the layout they were trained on.
"""

from __future__ import annotations

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.topology import MeshTopology

ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # eye on the image left
        [73.5318, 51.5014],  # eye on the image right
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # mouth corner on the image left
        [70.7299, 92.2041],  # mouth corner on the image right
    ],
    dtype=np.float32,
)
"""Where ArcFace's 112x112 crops put the five keypoints."""

FFHQ_TEMPLATE = np.array(
    [
        [0.37691676, 0.46864664],
        [0.62285697, 0.46912813],
        [0.50123859, 0.61331904],
        [0.39308822, 0.72541100],
        [0.61150205, 0.72490465],
    ],
    dtype=np.float32,
)
"""The five keypoints in FFHQ's alignment, as fractions of the crop side: the layout
the face restorers (GFPGAN, CodeFormer) and the BiSeNet parser were trained on."""

# FaceMesh points for the nose tip and the mouth corners (image left, image right).
_MESH_NOSE_TIP, _MESH_MOUTH_CORNERS = 1, (61, 291)


def template(size: int) -> np.ndarray:
    """The five-point template for a `size` px crop (a multiple of 112 or of 128)."""
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        shift = 8.0 * ratio
    else:
        raise ValueError(f"crop size {size} is not a multiple of 112 or 128")
    points = ARCFACE_TEMPLATE * np.float32(ratio)
    points[:, 0] += np.float32(shift)
    return points


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 rotation-scale-translation that best maps `source` points onto `target`
    points (least squares; Umeyama's estimate, which has this closed form in 2D)."""
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    sc, dc = src - src_mean, dst - dst_mean
    norm = float((sc**2).sum())
    if norm <= 1e-12:
        raise ValueError("keypoints are all at one place: no alignment exists")
    a = float((sc * dc).sum()) / norm
    b = float((sc[:, 0] * dc[:, 1] - sc[:, 1] * dc[:, 0]).sum()) / norm
    linear = np.array([[a, -b], [b, a]])
    translation = dst_mean - linear @ src_mean
    return np.hstack([linear, translation[:, None]])


def alignment(keypoints: np.ndarray, size: int, *, ffhq: bool = False) -> np.ndarray:
    """The 2x3 matrix taking frame pixels to a `size` px aligned crop (ArcFace's
    template, or FFHQ's with `ffhq`)."""
    points = FFHQ_TEMPLATE * np.float32(size) if ffhq else template(size)
    return similarity(np.asarray(keypoints, dtype=np.float64).reshape(5, 2), points)


def align_crop(
    image: np.ndarray,
    keypoints: np.ndarray,
    size: int,
    *,
    ffhq: bool = False,
    ops: Ops = cpu_ops,
) -> tuple[np.ndarray, np.ndarray]:
    """The aligned `size` x `size` crop of the face at `keypoints` and its 2x3 matrix.

    Outside the image the crop is black, as in the reference (ArcFace and inswapper were
    trained that way).
    """
    matrix = alignment(keypoints, size, ffhq=ffhq)
    crop = ops.warp_affine(image, matrix, (size, size), border="constant", border_value=0.0)
    return crop, matrix


def mesh_keypoints(points: np.ndarray, topology: MeshTopology) -> np.ndarray:
    """The five alignment keypoints of a FaceMesh fit (5x2, frame pixels).

    The eyes are the centres of FaceMesh's eye openings, the nose its tip and the mouth
    its corners: the places SCRFD's keypoints mark, so a face tracked by its mesh aligns
    as it would from a detection.
    """
    xy = np.asarray(points, dtype=np.float32)[:, :2]
    left_eye, right_eye = (xy[loop].mean(axis=0) for loop in topology.eye_loops)
    return np.stack(
        [
            left_eye,
            right_eye,
            xy[_MESH_NOSE_TIP],
            xy[_MESH_MOUTH_CORNERS[0]],
            xy[_MESH_MOUTH_CORNERS[1]],
        ]
    ).astype(np.float32)
