"""The real-time face pipeline: one object per stream, frames in, swapped frames out.

A frame moves through two stages (DESIGN.md, "The frame path"):

- `track`: to an array, detect or track the faces, fit and smooth their landmarks;
- `swap`: warp the source onto each chosen face, mask, colour-match, feathered blend.

A scheduler (stream/scheduler.py) runs the stages on their own workers so stage `track`
of frame N+1 overlaps stage `swap` of frame N; `process` runs both inline for callers
that want one frame at a time. Between stages a frame travels as a `FrameJob`, owned by
one stage at a time. A stage that raises does not lose the frame: `passthrough` sends it
on unswapped and the error is counted under the stage's name.

Settings that a user changes while streaming (source, quality, on/off, faces) are plain
attributes read once per frame, so a change applies from the next frame on without a
pause or a renegotiation.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import cv2
import numpy as np

from livefuse.engines.identity import IdentityFace
from livefuse.engines.pipeline import FacePipeline, FaceSelection, require_bgr8
from livefuse.engines.swapper import SourceFace
from livefuse.engines.types import FaceMesh
from livefuse.stream.quality import QualityController, QualityLevel, QualityMode
from livefuse.stream.smoothing import OneEuroParams
from livefuse.stream.swap_process import SwapProcess
from livefuse.stream.tracker_process import TrackerProcess
from livefuse.stream.tracking import FaceTracker


class ArrayConvertible(Protocol):
    """A decoded video frame that can hand over its pixels (e.g. `av.VideoFrame`)."""

    def to_ndarray(self, **kwargs: Any) -> np.ndarray: ...


FrameInput = np.ndarray | ArrayConvertible


@dataclass(frozen=True)
class FrameStats:
    index: int
    latency_ms: float
    """From `submit` (or the start of `process`) to the swapped frame being ready."""
    stages_ms: dict[str, float]
    faces: int
    """Faces tracked in the frame."""
    swapped: int
    """Faces replaced by the source."""
    quality: str
    """The level in force for this frame."""
    error: str | None = None
    """The stage that failed, if the frame was sent through unswapped."""


@dataclass(frozen=True)
class TrackedFace:
    """One face as this frame saw it (frame pixel coordinates of the input)."""

    track_id: int
    points: np.ndarray
    """The smoothed 468x3 landmarks the swap drew on."""
    raw_points: np.ndarray
    """The landmark model's own fit, before smoothing."""
    presence: float
    swapped: bool = False

    @property
    def mesh(self) -> FaceMesh:
        return FaceMesh(points=self.points, presence=self.presence)


@dataclass(frozen=True)
class ProcessedFrame:
    image: np.ndarray
    """BGR uint8; the input's size times the level's output scale."""
    stats: FrameStats
    tag: object = None
    """Whatever the caller attached at submit (e.g. the input frame's pts and time base)."""
    faces: tuple[TrackedFace, ...] = ()


@dataclass
class FrameJob:
    """A frame between stages; mutable, but only ever held by one stage at a time."""

    frame: FrameInput
    index: int
    timestamp: float
    """Media time in seconds (drives the landmark smoothing)."""
    submitted: float
    """time.perf_counter() when the frame entered the pipeline."""
    tag: object = None
    image: np.ndarray | None = None
    level: QualityLevel | None = None
    faces: list[TrackedFace] = field(default_factory=list)
    """A snapshot of the tracks as stage `track` left them: the tracker moves on to the
    next frame while this one is still being swapped."""
    swapped_ids: set[int] = field(default_factory=set)
    stages_ms: dict[str, float] = field(default_factory=dict)


Stage = tuple[str, Callable[[FrameJob], FrameJob]]


class RealtimePipeline:
    def __init__(
        self,
        *,
        faces: FacePipeline,
        quality: QualityMode = "auto",
        face_selection: FaceSelection = "all",
        target_fps: float = 30.0,
        smoothing: OneEuroParams | None = None,
        track_in_child: bool = False,
        swap_in_child: bool = False,
    ) -> None:
        """`track_in_child=True` runs the tracking in a child process (stream/
        tracker_process.py), so that it and the swap each get a core; `swap_in_child=True`
        has a second child swap part of each frame's faces (stream/swap_process.py).
        Both are for pipelines driven by a scheduler; call `close()` when done."""
        self.face_pipeline = faces
        if (track_in_child or swap_in_child) and faces.models_dir is None:
            raise ValueError("child processes need a FacePipeline made by from_store")
        self.swap_helper: SwapProcess | None = None
        self.tracker: FaceTracker | TrackerProcess
        if track_in_child:
            assert faces.models_dir is not None
            self.tracker = TrackerProcess(
                models_dir=faces.models_dir, smoothing=smoothing, detector=faces.detector_choice
            )
        else:
            self.tracker = FaceTracker(
                detector=faces.face_detector, landmarker=faces.landmarker, smoothing=smoothing
            )
        if swap_in_child:
            assert faces.models_dir is not None
            self.swap_helper = SwapProcess(models_dir=faces.models_dir)
        self.controller = QualityController(mode=quality, target_fps=target_fps)
        self.face_selection: FaceSelection = face_selection
        self.source: SourceFace | None = None
        self.enabled = True
        self.errors: Counter[str] = Counter()
        self.frames_out = 0
        self._next_index = 0
        # The stats are read by other threads (the service's stats endpoint).
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget the quality history and the counts (after a warm-up). The tracks are
        kept: they are what a stream that has been running for a while has."""
        self.controller = QualityController(
            mode=self.controller.mode, target_fps=1000.0 / self.controller.budget_ms
        )
        with self._lock:
            self.errors.clear()
            self.frames_out = 0

    def close(self) -> None:
        """Stop the child processes, if there are any. Safe to call twice."""
        if isinstance(self.tracker, TrackerProcess):
            self.tracker.close()
        if self.swap_helper is not None:
            self.swap_helper.close()

    # -- settings a user may change while streaming -------------------------------------

    @property
    def quality(self) -> QualityMode:
        return self.controller.mode

    @quality.setter
    def quality(self, mode: QualityMode) -> None:
        self.controller.set_mode(mode)

    # -- the stages ---------------------------------------------------------------------

    @property
    def stages(self) -> list[Stage]:
        return [("track", self.track), ("swap", self.swap)]

    def new_job(
        self, frame: FrameInput, *, timestamp: float, tag: object = None, submitted: float = 0.0
    ) -> FrameJob:
        with self._lock:
            index = self._next_index
            self._next_index += 1
        return FrameJob(
            frame=frame,
            index=index,
            timestamp=timestamp,
            submitted=submitted or time.perf_counter(),
            tag=tag,
        )

    def track(self, job: FrameJob) -> FrameJob:
        started = time.perf_counter()
        image = job.frame if isinstance(job.frame, np.ndarray) else None
        if image is None:
            image = job.frame.to_ndarray(format="bgr24")  # type: ignore[union-attr]
        require_bgr8(image)
        job.image = image
        job.level = level = self.controller.level
        job.stages_ms["to_array"] = _ms_since(started)
        if not self.enabled or self.source is None:
            return job
        started = time.perf_counter()
        self.tracker.update(
            image,
            job.timestamp,
            detect_size=level.detect_size,
            detect_interval=level.detect_interval,
            landmark_interval=level.landmark_interval,
        )
        job.faces = [
            TrackedFace(
                track_id=track.id,
                points=track.smoothed,
                raw_points=track.raw.points,
                presence=track.raw.presence,
            )
            for track in self.tracker.tracks
        ]
        job.stages_ms["track"] = _ms_since(started)
        return job

    def swap(self, job: FrameJob) -> FrameJob:
        assert job.image is not None and job.level is not None, "swap runs after track"
        source = self.source
        chosen = self._chosen_faces(job.faces, job.level)
        if not self.enabled or source is None or not chosen:
            return job
        started = time.perf_counter()
        level = job.level
        shares = self._split_for_helper(chosen, source)
        if shares is None:
            # The input array may be shared with the caller (a decoded frame, a bench
            # clip): draw on a copy.
            output = job.image.copy()
            self._swap_faces(output, source, chosen, level)
        else:
            mine, theirs = shares
            assert self.swap_helper is not None
            shared = self.swap_helper.frame_buffer(job.image.shape)
            shared[...] = job.image
            self.swap_helper.begin(
                source,
                [face.mesh for face in theirs],
                shape=job.image.shape,
                scale=level.blend_scale,
                shape_transfer=level.shape_transfer,
            )
            try:
                self._swap_faces(shared, source, mine, level)
            finally:
                # Never touch the buffer again while the child may still be writing it.
                waited = time.perf_counter()
                self.swap_helper.finish()
                job.stages_ms["swap_wait"] = _ms_since(waited)
            output = shared.copy()
        job.image = output
        job.swapped_ids = {face.track_id for face in chosen}
        job.stages_ms["swap"] = _ms_since(started)
        return job

    def _swap_faces(
        self,
        frame: np.ndarray,
        source: SourceFace,
        faces: list[TrackedFace],
        level: QualityLevel,
    ) -> None:
        for face in faces:
            self.face_pipeline.swap_face_in_place(
                frame,
                source,
                face.mesh,
                scale=level.blend_scale,
                shape_transfer=level.shape_transfer,
                enhance=level.enhance,
            )

    def _split_for_helper(
        self, chosen: list[TrackedFace], source: SourceFace
    ) -> tuple[list[TrackedFace], list[TrackedFace]] | None:
        """This process's faces and the helper's, or None to swap them all here.

        Faces are split only for the mesh swapper alone (inswapper, the enhancer and the
        occlusion parser reach beyond the face's surroundings), and only as whole groups
        of faces whose regions do not touch, balanced by face area.
        """
        pipeline = self.face_pipeline
        if (
            self.swap_helper is None
            or len(chosen) < 2
            or isinstance(source, IdentityFace)
            or pipeline.enhancer is not None
            or pipeline.parser is not None
        ):
            return None
        groups = apart_groups(chosen)
        if len(groups) < 2:
            return None
        mine: list[TrackedFace] = []
        theirs: list[TrackedFace] = []
        load = [0.0, 0.0]
        for group in sorted(groups, key=lambda g: -sum(f.mesh.size**2 for f in g)):
            # The helper takes the first (largest) group: this process also copies the
            # frame in and out.
            side = 1 if load[1] <= load[0] else 0
            (mine if side == 0 else theirs).extend(group)
            load[side] += sum(f.mesh.size**2 for f in group)
        return mine, theirs

    def _chosen_faces(self, faces: list[TrackedFace], level: QualityLevel) -> list[TrackedFace]:
        by_size = sorted(faces, key=lambda face: -face.mesh.size)
        limit = 1 if self.face_selection == "largest" else level.max_faces
        return by_size[:limit] if limit is not None else by_size

    # -- leaving the pipeline -----------------------------------------------------------

    def finish(self, job: FrameJob, *, dropped: int = 0) -> ProcessedFrame:
        """The output frame and its stats; feeds the quality controller."""
        assert job.image is not None and job.level is not None
        image = _scaled(job.image, job.level.output_scale)
        latency = _ms_since(job.submitted)
        self.controller.record(latency, dropped=dropped)
        stats = FrameStats(
            index=job.index,
            latency_ms=latency,
            stages_ms=job.stages_ms,
            faces=len(job.faces),
            swapped=len(job.swapped_ids),
            quality=job.level.name,
        )
        with self._lock:
            self.frames_out += 1
        faces = tuple(replace(face, swapped=face.track_id in job.swapped_ids) for face in job.faces)
        return ProcessedFrame(image=image, stats=stats, tag=job.tag, faces=faces)

    def passthrough(self, job: FrameJob, stage: str, error: BaseException) -> ProcessedFrame | None:
        """The frame as it came in, after `stage` raised `error`: never a black frame.

        None when not even the frame's pixels could be read: there is nothing to send,
        and the consumer repeats its last frame.
        """
        with self._lock:
            self.errors[stage] += 1
        image = job.image
        if image is None and isinstance(job.frame, np.ndarray) and job.frame.dtype == np.uint8:
            image = job.frame
        if image is None:
            return None
        level = job.level or self.controller.level
        latency = _ms_since(job.submitted)
        self.controller.record(latency)
        with self._lock:
            self.frames_out += 1
        stats = FrameStats(
            index=job.index,
            latency_ms=latency,
            stages_ms=job.stages_ms,
            faces=len(job.faces),
            swapped=0,
            quality=level.name,
            error=f"{stage}: {type(error).__name__}: {error}",
        )
        return ProcessedFrame(image=image, stats=stats, tag=job.tag)

    def process(
        self, frame: FrameInput, *, timestamp: float, tag: object = None
    ) -> ProcessedFrame | None:
        """Both stages inline: one frame in, one out."""
        job = self.new_job(frame, timestamp=timestamp, tag=tag)
        for name, stage in self.stages:
            try:
                job = stage(job)
            except Exception as error:  # the frame goes on unswapped; counted by stage
                return self.passthrough(job, name, error)
        return self.finish(job)


# How far past its landmarks' box a mesh swap reads and writes, in face sizes: the reshape
# ring reaches 0.35 of the oval's radius beyond it, the blend box 0.08 of the size.
_SWAP_REACH = 0.25


def apart_groups(faces: list[TrackedFace]) -> list[list[TrackedFace]]:
    """Faces grouped so that no two groups' swap regions overlap (order kept in a group)."""
    boxes = []
    for face in faces:
        x1, y1, x2, y2 = face.mesh.box
        reach = face.mesh.size * _SWAP_REACH
        boxes.append((x1 - reach, y1 - reach, x2 + reach, y2 + reach))
    group_of = list(range(len(faces)))

    def root(index: int) -> int:
        while group_of[index] != index:
            index = group_of[index]
        return index

    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                group_of[root(j)] = root(i)
    groups: dict[int, list[TrackedFace]] = {}
    for index, face in enumerate(faces):
        groups.setdefault(root(index), []).append(face)
    return list(groups.values())


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _scaled(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    size = (max(2, round(width * scale) // 2 * 2), max(2, round(height * scale) // 2 * 2))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
