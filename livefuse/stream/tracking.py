"""Face tracking from frame to frame: the detector finds faces, the landmarks follow them.

Running the detector on every 720p frame costs more than fitting the meshes, so each
face is followed from its previous landmarks (the crop for the next fit is the last
mesh's box, as MediaPipe's own tracker does) and the detector runs only every N frames,
when a track is lost, and on a reduced frame. A track keeps its id while the landmark
model still finds a face in its crop; detections that no track covers start new tracks,
and two tracks that converge on one face are merged (the older id survives).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from livefuse.engines.landmarks import FaceMeshLandmarker, FaceRegion
from livefuse.engines.pipeline import MIN_FACE_SIZE, FaceDetector
from livefuse.engines.types import Detection, FaceMesh
from livefuse.stream.smoothing import OneEuroFilter, OneEuroParams

# A detection belongs to a track when their boxes overlap at least this much (IoU).
# CenterFace's box runs from hairline to chin and the mesh's does not, so the bar is low.
_MATCH_IOU = 0.3
# Two tracks whose meshes overlap this much have converged on the same face.
_MERGE_IOU = 0.6


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = float(width * height)
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    """One face followed over time (mutable: the tracker owns and updates it)."""

    id: int
    raw: FaceMesh
    """The landmark model's latest fit, unsmoothed (used to place the next crop)."""
    smoothed: np.ndarray
    """The points after the One Euro filter: what the swap draws."""
    filter: OneEuroFilter = field(repr=False)
    age: int = 0
    """Frames since the track began."""

    @property
    def mesh(self) -> FaceMesh:
        return FaceMesh(points=self.smoothed, presence=self.raw.presence)

    @property
    def size(self) -> float:
        return self.raw.size


@dataclass(frozen=True)
class TrackingCounts:
    """What one update did, for stats and the bench."""

    detected: bool
    landmark_fits: int
    new_tracks: int
    lost_tracks: int


class FaceTracker:
    def __init__(
        self,
        *,
        detector: FaceDetector,
        landmarker: FaceMeshLandmarker,
        smoothing: OneEuroParams | None = None,
    ) -> None:
        self.detector = detector
        self.landmarker = landmarker
        self.smoothing = smoothing or OneEuroParams()
        self.tracks: list[Track] = []
        self._ids = itertools.count(1)
        self._frames_since_detection = 0
        self._frame = 0
        self._want_detection = True

    def reset(self) -> None:
        self.tracks = []
        self._want_detection = True

    def update(
        self,
        frame_bgr: np.ndarray,
        timestamp: float,
        *,
        detect_size: int,
        detect_interval: int,
        landmark_interval: int = 1,
    ) -> TrackingCounts:
        """Follow the faces into this frame.

        Each track's landmarks are refitted every `landmark_interval` frames and reused
        as they are in between; the tracks take turns (by id), so each frame refits about
        1/interval of the faces instead of every face at once on one frame in N, which
        would make that frame late. The detector runs when `detect_interval` frames have
        passed, when there is no track, or when a track was lost on the previous frame.
        """
        self._frame += 1
        self._frames_since_detection += 1
        detect = (
            self._want_detection
            or not self.tracks
            or self._frames_since_detection >= detect_interval
        )
        detections: list[Detection] = []
        if detect:
            detections = [
                d
                for d in self.detector.detect(frame_bgr, max_side=detect_size)
                if max(d.width, d.height) >= MIN_FACE_SIZE
            ]
            self._frames_since_detection = 0
            self._want_detection = False
        unmatched = self._unmatched(detections)
        # Existing tracks follow their last mesh; new faces start from the detection and
        # get a second fit from their own first estimate, since the detector's box frames
        # a face less tightly than a mesh does.
        interval = max(1, landmark_interval)
        refitted = [t for t in self.tracks if (self._frame + t.id) % interval == 0]
        tracked_regions = [FaceRegion.from_points(t.raw.points) for t in refitted]
        new_regions = [FaceRegion.from_detection(d) for d in unmatched]
        regions = tracked_regions + new_regions
        meshes = self.landmarker.landmarks(frame_bgr, regions) if regions else []
        tracked_meshes, first_fits = meshes[: len(tracked_regions)], meshes[len(tracked_regions) :]
        new_meshes = (
            self.landmarker.landmarks(
                frame_bgr, [FaceRegion.from_points(m.points) for m in first_fits]
            )
            if first_fits
            else []
        )
        kept = [t for t in self.tracks if all(t is not r for r in refitted)]
        lost = 0
        for track, mesh in zip(refitted, tracked_meshes, strict=True):
            if self._usable(mesh):
                track.raw = mesh
                track.smoothed = track.filter(mesh.points, timestamp, mesh.size)
                kept.append(track)
            else:
                lost += 1
        new_tracks = [self._new_track(m, timestamp) for m in new_meshes if self._usable(m)]
        self.tracks = self._merged(kept + new_tracks)
        for track in self.tracks:
            track.age += 1
        if lost:
            self._want_detection = True
        return TrackingCounts(
            detected=detect,
            landmark_fits=len(regions) + len(new_meshes),
            new_tracks=len(new_tracks),
            lost_tracks=lost,
        )

    def _usable(self, mesh: FaceMesh) -> bool:
        return (
            mesh.presence >= self.landmarker.presence_threshold
            and bool(np.isfinite(mesh.points).all())
            and mesh.size >= MIN_FACE_SIZE
        )

    def _unmatched(self, detections: list[Detection]) -> list[Detection]:
        """Detections that no current track already follows."""
        boxes = [t.raw.box for t in self.tracks]
        return [d for d in detections if all(box_iou(d.box, b) < _MATCH_IOU for b in boxes)]

    def _new_track(self, mesh: FaceMesh, timestamp: float) -> Track:
        smoothing = OneEuroFilter(self.smoothing)
        return Track(
            id=next(self._ids),
            raw=mesh,
            smoothed=smoothing(mesh.points, timestamp, mesh.size),
            filter=smoothing,
        )

    @staticmethod
    def _merged(tracks: list[Track]) -> list[Track]:
        """Drop the younger of two tracks that now follow the same face."""
        kept: list[Track] = []
        for track in sorted(tracks, key=lambda t: t.id):
            if all(box_iou(track.raw.box, k.raw.box) < _MERGE_IOU for k in kept):
                kept.append(track)
        return kept
