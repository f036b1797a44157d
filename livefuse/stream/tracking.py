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
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from livefuse.engines.landmarks import FaceMeshLandmarker, FaceRegion
from livefuse.engines.pipeline import MIN_FACE_SIZE, FaceDetector
from livefuse.engines.types import Detection, FaceMesh
from livefuse.stream.smoothing import OneEuroFilter, OneEuroParams

# A detection belongs to a track when their boxes overlap at least this much (IoU).
# CenterFace's box runs from hairline to chin and the mesh's does not, so the bar is low.
_MATCH_IOU = 0.3
# New faces started per frame (each costs two landmark fits); detections are best first.
_NEW_TRACKS_PER_FRAME = 2
# Frames during which a detection the landmark model rejected is not tried again.
_REJECT_FRAMES = 30
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
    last_fit: int = 0
    """The tracker's frame number of the track's latest landmark fit."""
    fit_interval: int = 1
    """The refit interval in force at that fit: the track was promised its next fit
    within it, and a change of interval since does not make it due sooner."""

    @property
    def mesh(self) -> FaceMesh:
        return FaceMesh(points=self.smoothed, presence=self.raw.presence)

    @property
    def size(self) -> float:
        return self.raw.size


@dataclass(frozen=True)
class DetectRequest:
    """The tracker needs the faces in `image`, detected at `max_side`."""

    image: np.ndarray
    max_side: int
    background: bool = False
    """Answered with a `Future` of the detections rather than the detections: the tracker
    goes on following its tracks and takes up the faces found from a later frame on."""


@dataclass(frozen=True)
class FitRequest:
    """The tracker needs a landmark fit of each region of `image`, in order."""

    image: np.ndarray
    regions: Sequence[FaceRegion]


TrackerRequest = DetectRequest | FitRequest
TrackerAnswer = list[Detection] | list[FaceMesh] | Future[list[Detection]]
TrackerSteps = Generator[TrackerRequest, TrackerAnswer, "TrackingCounts"]


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
        detect_in_background: bool = False,
    ) -> None:
        """`detect_in_background=True` asks for detections in the background: the
        detector (the costliest model per call) then never delays a frame, and new faces
        are picked up a frame or two later."""
        self.detector = detector
        self.detect_in_background = detect_in_background
        self._pending: Future[list[Detection]] | None = None
        self._backlog: list[Detection] = []
        self._rejected: list[tuple[np.ndarray, int]] = []
        self.landmarker = landmarker
        self.smoothing = smoothing or OneEuroParams()
        self.tracks: list[Track] = []
        self._ids = itertools.count(1)
        self._frames_since_detection = 0
        self._frame = 0
        self._fit_share = 0.0
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
        """Follow the faces into this frame, running the models here (one stream alone;
        the frame engine drives `steps` of many trackers together instead)."""
        steps = self.steps(
            frame_bgr,
            timestamp,
            detect_size=detect_size,
            detect_interval=detect_interval,
            landmark_interval=landmark_interval,
        )
        answer: TrackerAnswer | None = None
        while True:
            try:
                request = steps.send(answer) if answer is not None else next(steps)
            except StopIteration as done:
                counts: TrackingCounts = done.value
                return counts
            if isinstance(request, DetectRequest):
                answer = self.detector.detect(request.image, max_side=request.max_side)
                if request.background:
                    ready: Future[list[Detection]] = Future()
                    ready.set_result(answer)
                    answer = ready
            else:
                answer = self.landmarker.landmarks(request.image, request.regions)

    def steps(
        self,
        frame_bgr: np.ndarray,
        timestamp: float,
        *,
        detect_size: int,
        detect_interval: int,
        landmark_interval: int = 1,
    ) -> TrackerSteps:
        """`update` as a generator: it yields what it needs the models for (a
        `DetectRequest`, answered with the detections; a `FitRequest`, answered with one
        mesh per region) and returns the counts. Whoever drives it may answer the
        requests of many trackers with one batched forward pass each.

        Each track's landmarks are refitted every `landmark_interval` frames and reused
        as they are in between; the tracks take turns, so each frame refits 1/interval of
        the faces (5 faces every 3 frames: 2, 2, 1) instead of every face at once on one
        frame in N, which would make that frame late. The detector runs when
        `detect_interval` frames have passed, when there is no track, or when a track was
        lost on the previous frame.
        """
        self._frame += 1
        self._frames_since_detection += 1
        if self._pending is not None and self._pending.done():
            pending, self._pending = self._pending, None
            try:
                self._backlog = _big_enough(pending.result())
            except Exception:
                # A detection that failed in the background fails this frame's tracking
                # (it goes out unswapped and is counted); the next frame asks again.
                self._want_detection = True
                raise
        detect = (
            self._want_detection
            or not self.tracks
            or self._frames_since_detection >= detect_interval
        )
        if detect and self._pending is None:
            found = yield DetectRequest(frame_bgr, detect_size, self.detect_in_background)
            if isinstance(found, Future):
                self._pending = found
            else:
                self._backlog = _big_enough(found)
            self._frames_since_detection = 0
            self._want_detection = False
        # Faces are started a few per frame: a crowd coming into view at once would
        # otherwise cost two landmark fits each on one frame, and make it late. The rest
        # wait (re-checked against the tracks) until a newer detection replaces them.
        self._rejected = [
            (box, frame) for box, frame in self._rejected if self._frame - frame < _REJECT_FRAMES
        ]
        unmatched = [
            d
            for d in self._unmatched(self._backlog)
            if all(box_iou(d.box, box) < _MERGE_IOU for box, _ in self._rejected)
        ]
        self._backlog = unmatched[_NEW_TRACKS_PER_FRAME:]
        unmatched = unmatched[:_NEW_TRACKS_PER_FRAME]
        # Existing tracks follow their last mesh; new faces start from the detection and
        # get a second fit from their own first estimate, since the detector's box frames
        # a face less tightly than a mesh does.
        interval = max(1, landmark_interval)
        refitted = self._due_for_refit(interval)
        tracked_regions = [FaceRegion.from_points(t.raw.points) for t in refitted]
        new_regions = [FaceRegion.from_detection(d) for d in unmatched]
        regions = tracked_regions + new_regions
        meshes = _meshes((yield FitRequest(frame_bgr, regions))) if regions else []
        tracked_meshes, first_fits = meshes[: len(tracked_regions)], meshes[len(tracked_regions) :]
        new_meshes = (
            _meshes(
                (
                    yield FitRequest(
                        frame_bgr, [FaceRegion.from_points(m.points) for m in first_fits]
                    )
                )
            )
            if first_fits
            else []
        )
        kept = [t for t in self.tracks if all(t is not r for r in refitted)]
        lost = 0
        for track, mesh in zip(refitted, tracked_meshes, strict=True):
            if self._usable(mesh):
                track.last_fit = self._frame
                track.fit_interval = interval
                track.raw = mesh
                track.smoothed = track.filter(mesh.points, timestamp, mesh.size)
                kept.append(track)
            else:
                lost += 1
        new_tracks = []
        for detection, mesh in zip(unmatched, new_meshes, strict=True):
            if self._usable(mesh):
                new_tracks.append(self._new_track(mesh, timestamp, interval))
            else:
                # Something the detector takes for a face and the landmark model does not
                # (a face cut by the frame's edge, a poster): not retried for a while.
                self._rejected.append((detection.box, self._frame))
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

    def _due_for_refit(self, interval: int) -> list[Track]:
        """The tracks whose landmarks this frame refits: the longest-waiting ones, as many
        as keep every frame's share even (the fraction carried over between frames), and
        any that would otherwise wait past the interval. Taking turns by id alone leaves
        the shares uneven (ids 1, 3, 4, 6, 7 every 3 frames: 2, 3 and 0 fits), and the
        frame with the most fits is the late one."""
        if interval == 1:
            return list(self.tracks)
        self._fit_share += len(self.tracks) / interval
        count = int(self._fit_share)
        self._fit_share -= count
        waiting = sorted(self.tracks, key=lambda t: (t.last_fit, t.id))
        # Due by the longer of the two intervals: when the interval shortens (the quality
        # level climbs), every track fitted under the old one would otherwise fall due on
        # the same frame and make it late.
        overdue = [t for t in waiting if self._frame - t.last_fit >= max(interval, t.fit_interval)]
        return waiting[: max(count, len(overdue))]

    def _usable(self, mesh: FaceMesh) -> bool:
        return (
            mesh.presence >= self.landmarker.presence_threshold
            and bool(np.isfinite(mesh.points).all())
            and mesh.size >= MIN_FACE_SIZE
        )

    def _unmatched(self, detections: list[Detection]) -> list[Detection]:
        """Detections that no current track already follows.

        A detection is a tracked face when its box overlaps the track's mesh box enough,
        or when its nose keypoint lies inside that box: the detector's box and the mesh's
        differ in extent (most on small or turned faces), and every unmatched detection
        costs two landmark fits before the merge finds it was a face already tracked.
        """
        boxes = [t.raw.box for t in self.tracks]

        def follows(detection: Detection, box: np.ndarray) -> bool:
            nose_x, nose_y = detection.keypoints[2]
            inside = box[0] <= nose_x <= box[2] and box[1] <= nose_y <= box[3]
            return inside or box_iou(detection.box, box) >= _MATCH_IOU

        return [d for d in detections if not any(follows(d, b) for b in boxes)]

    def _new_track(self, mesh: FaceMesh, timestamp: float, interval: int) -> Track:
        smoothing = OneEuroFilter(self.smoothing)
        return Track(
            id=next(self._ids),
            raw=mesh,
            smoothed=smoothing(mesh.points, timestamp, mesh.size),
            filter=smoothing,
            last_fit=self._frame,
            fit_interval=interval,
        )

    @staticmethod
    def _merged(tracks: list[Track]) -> list[Track]:
        """Drop the younger of two tracks that now follow the same face."""
        kept: list[Track] = []
        for track in sorted(tracks, key=lambda t: t.id):
            if all(box_iou(track.raw.box, k.raw.box) < _MERGE_IOU for k in kept):
                kept.append(track)
        return kept


def _meshes(answer: TrackerAnswer) -> list[FaceMesh]:
    """A fit request's answer, checked: the generator's send type covers every kind."""
    if isinstance(answer, Future) or not all(isinstance(mesh, FaceMesh) for mesh in answer):
        raise TypeError("a fit request must be answered with meshes")
    return [mesh for mesh in answer if isinstance(mesh, FaceMesh)]


def _big_enough(found: Sequence[object]) -> list[Detection]:
    """The detections of faces big enough to track."""
    return [
        d for d in found if isinstance(d, Detection) and max(d.width, d.height) >= MIN_FACE_SIZE
    ]
