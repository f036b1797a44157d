"""Values that travel between the face models: frozen, typed, cheap to pass around."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Detection:
    """A face found by the detector, in frame pixel coordinates.

    `keypoints` is 5x2: eye on the image left, eye on the image right, nose tip,
    mouth corner on the image left, mouth corner on the image right.
    """

    box: np.ndarray  # (4,) x1, y1, x2, y2
    score: float
    keypoints: np.ndarray  # (5, 2)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])


@dataclass(frozen=True)
class FaceMesh:
    """FaceMesh's 468 points for one face, in frame pixel coordinates.

    `points` is 468x3: x, y in pixels and z in the same pixel scale (smaller is nearer
    the camera), so the mesh can be rotated and its triangles depth-sorted.
    `presence` is the landmark model's own confidence that a face is in its crop.
    """

    points: np.ndarray  # (468, 3) float32
    presence: float

    # Cached: the tracker compares boxes pairwise every frame, and a mesh's points are
    # never changed in place once it is made (a refit makes a new FaceMesh). Read-only,
    # so a caller that writes into it fails loudly instead of corrupting the cache.
    @cached_property
    def box(self) -> np.ndarray:
        xy = self.points[:, :2]
        box = np.concatenate([xy.min(axis=0), xy.max(axis=0)])
        box.setflags(write=False)
        return box

    @cached_property
    def size(self) -> float:
        """Face size in pixels: the larger side of the landmark bounding box."""
        x1, y1, x2, y2 = self.box
        return float(max(x2 - x1, y2 - y1))
