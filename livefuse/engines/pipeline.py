"""The face pipeline on one image: find faces, fit their meshes, swap, blend.

The real-time path (stream/) calls the same pieces stage by stage; this class is the
per-image composition used by `livefuse swap` and as the reference the stream matches.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from livefuse.engines.blend import alpha_blend, face_mask, match_colour
from livefuse.engines.detector import CenterFaceDetector
from livefuse.engines.landmarks import FaceMeshLandmarker, FaceRegion
from livefuse.engines.runtime import OnnxRuntimeEngine
from livefuse.engines.store import ModelStore
from livefuse.engines.swapper import MeshSwapper, SourceFace
from livefuse.engines.topology import MeshTopology
from livefuse.engines.types import FaceMesh

FaceSelection = Literal["all", "largest"]
# Faces smaller than this (pixels) carry too little detail to fit a mesh reliably.
MIN_FACE_SIZE = 16
# Margin around the landmark box that the blend may touch, as a fraction of face size.
_BOX_MARGIN = 0.08
# The smallest face size (pixels) a reduced-resolution render may go down to.
_MIN_RENDER_SIZE = 64


class NoFaceError(ValueError):
    """The image has no face the pipeline can use."""


def require_bgr8(frame: np.ndarray) -> None:
    """The pipeline works on 8-bit, 3-channel BGR frames; say so plainly otherwise."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(
            f"expected an 8-bit BGR frame (H, W, 3) uint8, got {frame.dtype} {frame.shape}"
        )
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame has no pixels ({frame.shape[1]}x{frame.shape[0]})")


@dataclass
class StageTimer:
    """Accumulates wall time per named stage (milliseconds)."""

    totals_ms: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, stage: str, started: float, items: int = 1) -> None:
        self.totals_ms[stage] += (time.perf_counter() - started) * 1000
        self.counts[stage] += items

    def per_item_ms(self) -> dict[str, float]:
        return {k: self.totals_ms[k] / max(1, self.counts[k]) for k in self.totals_ms}


@dataclass(frozen=True)
class PreparedSource:
    face: SourceFace
    faces_in_image: int


class FacePipeline:
    @classmethod
    def from_store(cls, store: ModelStore, *, threads: int, **options: object) -> FacePipeline:
        """The embedded default models from the cache; ModelError if one is missing."""
        detector = CenterFaceDetector(OnnxRuntimeEngine(store.path("centerface"), threads=threads))
        landmarker = FaceMeshLandmarker(
            OnnxRuntimeEngine(store.path("face_landmark"), threads=threads)
        )
        swapper = MeshSwapper(MeshTopology.load(store.path("facemesh_topology")))
        pipeline = cls(detector=detector, landmarker=landmarker, swapper=swapper, **options)  # type: ignore[arg-type]
        pipeline.models_dir = store.models_dir
        return pipeline

    def __init__(
        self,
        *,
        detector: CenterFaceDetector,
        landmarker: FaceMeshLandmarker,
        swapper: MeshSwapper,
        detection_size: int = 640,
        shape_strength: float = 0.9,
        timer: StageTimer | None = None,
    ) -> None:
        self.detector = detector
        self.landmarker = landmarker
        self.swapper = swapper
        self.detection_size = detection_size
        self.shape_strength = shape_strength
        self.timer = timer or StageTimer()
        self.models_dir: Path | None = None
        """Where the models came from (`from_store`): a child process loads the same."""

    def find_faces(self, image_bgr: np.ndarray) -> list[FaceMesh]:
        """Meshes of the faces in a still image, largest first.

        The detector's box only roughly frames a face the way FaceMesh expects, so the
        mesh is fitted twice: once from the detection, once from its own first estimate
        (what tracking does frame to frame in a video).
        """
        require_bgr8(image_bgr)
        started = time.perf_counter()
        detections = self.detector.detect(image_bgr, max_side=self.detection_size)
        detections = [d for d in detections if max(d.width, d.height) >= MIN_FACE_SIZE]
        self.timer.add("detect", started)
        if not detections:
            return []
        started = time.perf_counter()
        regions = [FaceRegion.from_detection(d) for d in detections]
        meshes = self.landmarker.landmarks(image_bgr, regions)
        meshes = self.landmarker.landmarks(
            image_bgr, [FaceRegion.from_points(m.points) for m in meshes]
        )
        self.timer.add("landmarks", started, len(meshes))
        kept = [
            m
            for m in meshes
            if m.presence >= self.landmarker.presence_threshold
            and np.isfinite(m.points).all()
            and m.size >= MIN_FACE_SIZE
        ]
        return sorted(kept, key=lambda m: -m.size)

    def prepare_source(self, image_bgr: np.ndarray) -> PreparedSource:
        meshes = self.find_faces(image_bgr)
        if not meshes:
            raise NoFaceError("no face found in the source image")
        started = time.perf_counter()
        face = self.swapper.prepare_source(image_bgr, meshes[0])
        self.timer.add("prepare_source", started)
        return PreparedSource(face=face, faces_in_image=len(meshes))

    def swap_faces(
        self,
        frame_bgr: np.ndarray,
        source: SourceFace,
        meshes: list[FaceMesh],
        *,
        faces: FaceSelection = "all",
    ) -> np.ndarray:
        """A copy of the frame with the given faces replaced by the source."""
        require_bgr8(frame_bgr)
        output = frame_bgr.copy()
        chosen = meshes if faces == "all" else sorted(meshes, key=lambda m: -m.size)[:1]
        for mesh in chosen:
            self.swap_face_in_place(output, source, mesh)
        return output

    def swap_face_in_place(
        self,
        frame_bgr: np.ndarray,
        source: SourceFace,
        mesh: FaceMesh,
        *,
        scale: float = 1.0,
        shape_transfer: bool = True,
    ) -> None:
        """Replace one face in the frame.

        The real-time path's cheaper levels trade detail for time: `scale` < 1 renders,
        masks and colour-matches the face at that fraction of its size and blends the
        upscaled result; `shape_transfer=False` keeps the target's face shape (no reshape
        of the target's pixels, the costliest step after the landmarks).
        """
        if not np.isfinite(mesh.points).all():
            return  # a broken fit: leave the face as it is
        started = time.perf_counter()
        strength = self.shape_strength if shape_transfer else 0.0
        points = self.swapper.transfer_shape(source, mesh.points, strength)
        box = face_box(FaceMesh(points=points, presence=mesh.presence), frame_bgr.shape[:2])
        if box is None:
            return
        x1, y1, x2, y2 = box
        raster = None
        if points is not mesh.points:  # transfer_shape hands back the same array when off
            raster = self.swapper.reshape_target(frame_bgr, mesh.points, points)
        region = frame_bgr[y1:y2, x1:x2]
        width, height = x2 - x1, y2 - y1
        # Below this face size a reduced render loses the eyes; render at full size then.
        scale = min(1.0, max(scale, _MIN_RENDER_SIZE / max(mesh.size, 1.0)))
        small = (max(2, round(width * scale)), max(2, round(height * scale)))
        if small != (width, height):
            factors = np.array([small[0] / width, small[1] / height, scale], dtype=np.float32)
            local = (points - (x1, y1, 0)) * factors
            rendered, coverage = self.swapper.warp(source, local, (0, 0, *small))
            target = cv2.resize(region, small, interpolation=cv2.INTER_AREA)
            face_size = mesh.size * scale
            mask_points, mask_box = local, (0, 0, *small)
        else:
            rendered, coverage = self.swapper.warp(source, points, box, raster=raster)
            target, face_size = region, mesh.size
            mask_points, mask_box = points, box
        self.timer.add("swap", started)
        started = time.perf_counter()
        alpha = face_mask(mask_points, self.swapper.topology, coverage, mask_box, face_size)
        rendered = match_colour(rendered, target, alpha, face_size)
        if small != (width, height):
            rendered = cv2.resize(rendered, (width, height), interpolation=cv2.INTER_LINEAR)
            alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_LINEAR)
        alpha_blend(region, rendered, alpha)
        self.timer.add("blend", started)


def face_box(mesh: FaceMesh, frame_shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The mesh's pixel box plus a margin, clipped to the frame; None if off-frame."""
    height, width = frame_shape
    margin = mesh.size * _BOX_MARGIN
    x1, y1, x2, y2 = mesh.box
    bx1, by1 = max(0, int(np.floor(x1 - margin))), max(0, int(np.floor(y1 - margin)))
    bx2, by2 = min(width, int(np.ceil(x2 + margin))), min(height, int(np.ceil(y2 + margin)))
    if bx2 - bx1 < 2 or by2 - by1 < 2:
        return None
    return bx1, by1, bx2, by2
