"""What travels through the frame engine (stream/engine.py): a frame between its stages
(`FrameJob`), the faces it tracked (`TrackedFace`), and what comes out (`ProcessedFrame`
with its `FrameStats`); and the small rules the stages share (which faces a level swaps,
the output scale).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from livefuse.engines.pipeline import FaceSelection
from livefuse.engines.swapper import SourceFace
from livefuse.engines.types import FaceMesh
from livefuse.stream.quality import QualityLevel

if TYPE_CHECKING:
    from livefuse.stream.engine import EngineSession, _Reply


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
    batch: int = 1
    """How many frames (of all sessions) the engine processed together with this one."""


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

    def marked(self, swapped_ids: set[int]) -> TrackedFace:
        """This face, saying whether the frame's swap replaced it."""
        return replace(self, swapped=self.track_id in swapped_ids)


@dataclass(frozen=True)
class ProcessedFrame:
    image: np.ndarray
    """BGR uint8; the input's size times the level's output scale."""
    stats: FrameStats
    tag: object = None
    """Whatever the caller attached at submit (e.g. the input frame's pts and time base)."""
    faces: tuple[TrackedFace, ...] = ()


@dataclass(eq=False)
class FrameJob:
    """A frame between stages; mutable, but only ever held by one stage at a time."""

    frame: FrameInput
    index: int
    timestamp: float
    """Media time in seconds (drives the landmark smoothing)."""
    submitted: float
    """time.perf_counter() when the frame entered the engine."""
    session: EngineSession
    tag: object = None
    source: SourceFace | None = None
    """The session's source when stage A took the frame: the frame is swapped with it
    even if the user changes the source meanwhile."""
    enabled: bool = True
    face_selection: FaceSelection = "all"
    label: bool = False
    """Whether the frame goes out with the disclosure label (the session's setting)."""
    image: np.ndarray | None = None
    """The frame's pixels (BGR), once stage A has them."""
    original: np.ndarray | None = None
    """The pixels before the swap drew on its copy (what a failed frame sends)."""
    level: QualityLevel | None = None
    faces: list[TrackedFace] = field(default_factory=list)
    """A snapshot of the tracks as stage `track` left them: the tracker moves on to the
    next frame while this one is still being swapped."""
    swapped_ids: set[int] = field(default_factory=set)
    stages_ms: dict[str, float] = field(default_factory=dict)
    failure: tuple[str, BaseException] | None = None
    """The stage that failed and why: the frame goes out unswapped."""
    batch_size: int = 1
    tracked: float = 0.0
    """time.perf_counter() when stage A was done with it."""
    reply: _Reply | None = None
    """Set by `EngineSession.process`, which waits for this one frame."""


def chosen_faces(
    faces: list[TrackedFace], level: QualityLevel, selection: FaceSelection
) -> list[TrackedFace]:
    """The faces a frame swaps: the largest one, or as many as the level allows, largest
    first."""
    by_size = sorted(faces, key=lambda face: -face.mesh.size)
    limit = 1 if selection == "largest" else level.max_faces
    return by_size[:limit] if limit is not None else by_size


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def scaled(image: np.ndarray, scale: float) -> np.ndarray:
    """The frame at `scale` of its size, with even sides (the encoder's 4:2:0 needs them)."""
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    size = (max(2, round(width * scale) // 2 * 2), max(2, round(height * scale) // 2 * 2))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
