"""MediaPipe FaceMesh: 468 points per face from a roll-corrected square crop.

The model was trained on upright faces filling a 192 px square with a margin, so each
face is cut out by an affine warp that removes its roll (the eye line is made
horizontal) and scales it to the crop. The model family is three pure steps around a
batched forward pass: `crop_faces` (pre-process), the engine's `run`, `decode_meshes`
(post-process); `landmarks_batch` runs the faces of several frames in one pass.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from livefuse.engines import ops as cpu_ops
from livefuse.engines.ops_protocol import Ops
from livefuse.engines.runtime import Engine
from livefuse.engines.types import Detection, FaceMesh

CROP_SIZE = 192
# MediaPipe's own margin around a face: the crop side is 1.5x the face box.
_ROI_SCALE = 1.5
# Eye corners on the image left / image right (the subject's right / left eye).
_EYE_LEFT_CORNER, _EYE_RIGHT_CORNER = 33, 263


@dataclass(frozen=True)
class FaceRegion:
    """A rotated square in the frame: where to crop a face for the landmark model."""

    centre: tuple[float, float]
    side: float
    angle: float  # radians, the face's roll; the crop rotates by -angle to undo it

    @classmethod
    def from_detection(cls, detection: Detection) -> FaceRegion:
        left_eye, right_eye = detection.keypoints[0], detection.keypoints[1]
        angle = math.atan2(right_eye[1] - left_eye[1], right_eye[0] - left_eye[0])
        x1, y1, x2, y2 = detection.box
        # CenterFace's box reaches from the hairline to the chin, taller than the box
        # MediaPipe's detector draws; its width matches MediaPipe's better.
        side = max(x2 - x1, (y2 - y1) * 0.85) * _ROI_SCALE
        centre = ((x1 + x2) / 2, (y1 + y2) / 2)
        return cls(centre=(float(centre[0]), float(centre[1])), side=float(side), angle=angle)

    @classmethod
    def from_points(cls, points: np.ndarray) -> FaceRegion:
        """The region MediaPipe tracks with: the previous landmarks' box, roll-corrected."""
        left, right = points[_EYE_LEFT_CORNER, :2], points[_EYE_RIGHT_CORNER, :2]
        angle = math.atan2(right[1] - left[1], right[0] - left[0])
        # Measure the extent in the face's own upright frame so roll does not inflate it.
        cos_a, sin_a = math.cos(-angle), math.sin(-angle)
        rotation = np.array([[cos_a, -sin_a], [sin_a, cos_a]], dtype=np.float32)
        upright = points[:, :2] @ rotation.T
        lo, hi = upright.min(axis=0), upright.max(axis=0)
        centre_upright = (lo + hi) / 2
        centre = centre_upright @ rotation  # back to the frame (rotation is orthonormal)
        side = float(max(hi - lo)) * _ROI_SCALE
        return cls(centre=(float(centre[0]), float(centre[1])), side=side, angle=angle)

    def crop_to_frame(self) -> np.ndarray:
        """2x3 affine taking crop pixel coordinates to frame pixel coordinates."""
        scale = self.side / CROP_SIZE
        cos_a, sin_a = math.cos(self.angle) * scale, math.sin(self.angle) * scale
        half = CROP_SIZE / 2
        cx, cy = self.centre
        return np.array(
            [
                [cos_a, -sin_a, cx - cos_a * half + sin_a * half],
                [sin_a, cos_a, cy - sin_a * half - cos_a * half],
            ],
            dtype=np.float64,
        )


def crop_faces(
    frame_bgr: np.ndarray, regions: Sequence[FaceRegion], out: np.ndarray, *, ops: Ops = cpu_ops
) -> None:
    """Pre-process: each region's roll-corrected crop, RGB in [0, 1], channels first, into
    `out[i]` (N, 3, CROP_SIZE, CROP_SIZE) float32."""
    for i, region in enumerate(regions):
        crop = ops.warp_affine(
            frame_bgr, region.crop_to_frame(), (CROP_SIZE, CROP_SIZE), inverse_map=True
        )
        ops.blob_from_bgr(crop, out[i], scale=1 / 255)


def decode_meshes(
    raw_points: np.ndarray, raw_presence: np.ndarray, regions: Sequence[FaceRegion]
) -> list[FaceMesh]:
    """Post-process: the forward pass's points (in crop pixels) back in frame pixels, and
    its presence logit as a probability; one mesh per region, in order."""
    count = len(regions)
    points_in_crop = raw_points.reshape(count, -1, 3)[:, :468]
    presence = 1 / (1 + np.exp(-raw_presence.reshape(count)))
    meshes = []
    for i, region in enumerate(regions):
        affine = region.crop_to_frame()
        xy = points_in_crop[i, :, :2] @ affine[:, :2].T + affine[:, 2]
        z = points_in_crop[i, :, 2:3] * (region.side / CROP_SIZE)
        points = np.concatenate([xy, z], axis=1).astype(np.float32)
        meshes.append(FaceMesh(points=points, presence=float(presence[i])))
    return meshes


class FaceMeshLandmarker:
    def __init__(
        self, engine: Engine, *, presence_threshold: float = 0.5, ops: Ops = cpu_ops
    ) -> None:
        self._engine = engine
        self.ops = ops
        self._input_name = engine.inputs[0].name
        self.presence_threshold = presence_threshold
        # One input batch per thread, grown to the largest batch seen and reused: the
        # frame engine's worker and the source preparation may fit faces at the same time.
        self._buffers = threading.local()

    def landmarks(self, frame_bgr: np.ndarray, regions: Sequence[FaceRegion]) -> list[FaceMesh]:
        """One mesh per region, in the same order; check `presence` to drop lost faces."""
        return self.landmarks_batch([(frame_bgr, regions)])[0]

    def landmarks_batch(
        self, requests: Sequence[tuple[np.ndarray, Sequence[FaceRegion]]]
    ) -> list[list[FaceMesh]]:
        """The regions of several frames (one session's frame each, say) in one forward
        pass: for each (frame, regions) request, its meshes in order."""
        total = sum(len(regions) for _, regions in requests)
        if total == 0:
            return [[] for _ in requests]
        batch = self._input_batch(total)
        start = 0
        for frame_bgr, regions in requests:
            crop_faces(frame_bgr, regions, batch[start : start + len(regions)], ops=self.ops)
            start += len(regions)
        raw_points, raw_presence = self._engine.run({self._input_name: batch})
        raw_points = raw_points.reshape(total, -1)
        raw_presence = raw_presence.reshape(total)
        results = []
        start = 0
        for _, regions in requests:
            stop = start + len(regions)
            results.append(decode_meshes(raw_points[start:stop], raw_presence[start:stop], regions))
            start = stop
        return results

    def _input_batch(self, count: int) -> np.ndarray:
        """A (count, 3, CROP_SIZE, CROP_SIZE) view of this thread's input buffer."""
        buffer: np.ndarray | None = getattr(self._buffers, "batch", None)
        if buffer is None or len(buffer) < count:
            buffer = np.empty((count, 3, CROP_SIZE, CROP_SIZE), dtype=np.float32)
            self._buffers.batch = buffer
        return buffer[:count]
