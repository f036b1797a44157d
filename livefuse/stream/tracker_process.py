"""The tracking stage in a child process, so that it really runs on a core of its own.

Much of the tracking and the swapping runs in Python with the GIL held (NumPy calls on
small arrays, the per-triangle rasteriser, the landmark model's pre- and post-processing),
so two stages in two threads of one process mostly take turns: on the 2-core machine the
5-face clip's swap stage went from 16 ms alone to 26 ms beside the tracking thread. In a
child process each stage keeps its own interpreter and its full speed.

`TrackerProcess` is a drop-in for `FaceTracker` (`update`, `tracks`, `reset`): the frame
goes over in shared memory, the tracks come back as plain arrays, and the tracker's state
(its tracks, ids and One Euro filters) lives in the child. If the child dies, `update`
raises (the scheduler passes that frame through unswapped, counted as a track error) and
the next call starts a fresh child (stream/child_process.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from livefuse.engines.pipeline import DetectorChoice
from livefuse.engines.types import FaceMesh
from livefuse.stream.child_process import ChildProcess, SharedFrames, serve
from livefuse.stream.smoothing import OneEuroParams
from livefuse.stream.tracking import TrackingCounts


@dataclass(frozen=True)
class RemoteTrack:
    """A track as the child left it after the last update (read-only snapshot)."""

    id: int
    raw: FaceMesh
    smoothed: np.ndarray


class TrackerProcess:
    def __init__(
        self,
        *,
        models_dir: Path,
        smoothing: OneEuroParams | None = None,
        detector: DetectorChoice = "centerface",
        threads: int = 1,
        detect_in_background: bool = True,
    ) -> None:
        self.models_dir = models_dir
        self.detector = detector
        self.smoothing = smoothing or OneEuroParams()
        self.tracks: list[RemoteTrack] = []
        self.child = ChildProcess(
            target=_child_main,
            args=(str(models_dir), self.smoothing, detector, threads, detect_in_background),
            name="tracker process",
            process_name="livefuse-tracker",
        )

    def update(
        self,
        frame_bgr: np.ndarray,
        timestamp: float,
        *,
        detect_size: int,
        detect_interval: int,
        landmark_interval: int = 1,
    ) -> TrackingCounts:
        if self.child.ensure_started():
            self.tracks = []
        shared, name = self.child.frame_buffer(frame_bgr.shape)
        shared[...] = frame_bgr
        del shared  # no view may outlive the buffer when it is replaced or closed
        tracks, counts = self.child.ask(
            (
                "update",
                name,
                frame_bgr.shape,
                timestamp,
                detect_size,
                detect_interval,
                landmark_interval,
            )
        )
        self.tracks = [
            RemoteTrack(id=track_id, raw=FaceMesh(points=raw, presence=presence), smoothed=smooth)
            for track_id, raw, presence, smooth in tracks
        ]
        return counts

    def reset(self) -> None:
        self.tracks = []
        if self.child.running:
            self.child.ensure_started()
            self.child.ask(("reset",))

    def close(self) -> None:
        """Stop the child and free the shared frame. Safe to call twice."""
        self.child.close()


def _child_main(
    conn: Connection,
    models_dir: str,
    smoothing: OneEuroParams,
    detector: DetectorChoice,
    threads: int,
    detect_in_background: bool,
) -> None:
    """The child: load the models once, then answer requests until told to stop."""
    # Imported here: spawn re-imports this module, and the parent need not pay twice.
    from livefuse.engines.pipeline import FacePipeline
    from livefuse.engines.store import ModelStore
    from livefuse.stream.tracking import FaceTracker

    try:
        faces = FacePipeline.from_store(
            ModelStore(Path(models_dir)), threads=threads, detector=detector
        )
    except Exception as error:
        serve(conn, _no_handler, ready_error=f"cannot load the models: {error}")
        return
    tracker = FaceTracker(
        detector=faces.face_detector,
        landmarker=faces.landmarker,
        smoothing=smoothing,
        detect_in_background=detect_in_background,
    )
    frames = SharedFrames()

    def handle(message: tuple[Any, ...]) -> Any:
        if message[0] == "reset":
            tracker.reset()
            return None
        _, name, shape, timestamp, detect_size, detect_interval, landmark_interval = message
        frame = frames.frame(name, shape)
        counts = tracker.update(
            frame,
            timestamp,
            detect_size=detect_size,
            detect_interval=detect_interval,
            landmark_interval=landmark_interval,
        )
        del frame
        tracks = [
            (track.id, track.raw.points, track.raw.presence, track.smoothed)
            for track in tracker.tracks
        ]
        return tracks, counts

    try:
        serve(conn, handle)
    finally:
        frames.close()


def _no_handler(message: tuple[Any, ...]) -> Any:
    raise RuntimeError("not started")
