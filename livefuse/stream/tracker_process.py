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
the next call starts a fresh child.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from livefuse.engines.pipeline import DetectorChoice
from livefuse.engines.types import FaceMesh
from livefuse.stream.smoothing import OneEuroParams
from livefuse.stream.tracking import TrackingCounts

log = logging.getLogger(__name__)

# Loading the two models in a fresh interpreter takes a second or two; allow for a busy machine.
_START_TIMEOUT_S = 60.0
# One frame's tracking takes milliseconds; this long means the child is stuck.
_UPDATE_TIMEOUT_S = 10.0


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
        self.detect_in_background = detect_in_background
        self.smoothing = smoothing or OneEuroParams()
        self.threads = threads
        self.tracks: list[RemoteTrack] = []
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._frame_memory: SharedMemory | None = None
        self._start()

    # -- the FaceTracker interface --------------------------------------------------------

    def update(
        self,
        frame_bgr: np.ndarray,
        timestamp: float,
        *,
        detect_size: int,
        detect_interval: int,
        landmark_interval: int = 1,
    ) -> TrackingCounts:
        if self._conn is None:
            self._start()
        assert self._conn is not None
        memory = self._memory_for(frame_bgr.nbytes)
        shared = np.ndarray(frame_bgr.shape, dtype=np.uint8, buffer=memory.buf)
        shared[...] = frame_bgr
        del shared  # no view may outlive the buffer when it is replaced or closed
        request = ("update", memory.name, frame_bgr.shape, timestamp, detect_size, detect_interval)
        reply = self._ask((*request, landmark_interval))
        tracks, counts = reply
        self.tracks = [
            RemoteTrack(id=track_id, raw=FaceMesh(points=raw, presence=presence), smoothed=smooth)
            for track_id, raw, presence, smooth in tracks
        ]
        return counts

    def reset(self) -> None:
        self.tracks = []
        if self._conn is not None:
            self._ask(("reset",))

    def close(self) -> None:
        """Stop the child and free the shared frame. Safe to call twice."""
        if self._conn is not None:
            try:
                self._conn.send(("close",))
            except (OSError, ValueError):
                pass
        self._stop_child()
        if self._frame_memory is not None:
            self._frame_memory.close()
            self._frame_memory.unlink()
            self._frame_memory = None

    # -- the child's lifecycle --------------------------------------------------------------

    def _start(self) -> None:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_child_main,
            args=(
                child_end,
                str(self.models_dir),
                self.smoothing,
                self.detector,
                self.threads,
                self.detect_in_background,
            ),
            name="livefuse-tracker",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._process, self._conn = process, parent_end
        self.tracks = []
        self._ask(("ping",), timeout=_START_TIMEOUT_S)

    def _ask(self, message: tuple[Any, ...], *, timeout: float = _UPDATE_TIMEOUT_S) -> Any:
        assert self._conn is not None
        try:
            self._conn.send(message)
            if not self._conn.poll(timeout):
                raise TimeoutError(f"the tracker process did not answer in {timeout:g} s")
            status, payload = self._conn.recv()
        except (OSError, EOFError, TimeoutError) as error:
            # The child is gone or stuck: drop it; the next update starts a new one.
            self._stop_child()
            raise RuntimeError(f"tracker process failed: {error or type(error).__name__}") from None
        if status == "error":
            raise RuntimeError(f"tracker process: {payload}")
        return payload

    def _stop_child(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()
        if process is not None:
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join(timeout=2)

    def _memory_for(self, size: int) -> SharedMemory:
        if self._frame_memory is None or self._frame_memory.size < size:
            if self._frame_memory is not None:
                self._frame_memory.close()
                self._frame_memory.unlink()
            self._frame_memory = SharedMemory(create=True, size=size)
        return self._frame_memory


def _child_main(
    conn: Connection,
    models_dir: str,
    smoothing: OneEuroParams,
    detector: DetectorChoice,
    threads: int,
    detect_in_background: bool,
) -> None:
    """The child: load the models once, then answer requests until told to stop."""
    # Imported here: the parent need not pay for them twice, and spawn re-imports anyway.
    from livefuse.engines.pipeline import FacePipeline
    from livefuse.engines.store import ModelStore
    from livefuse.stream.tracking import FaceTracker

    try:
        faces = FacePipeline.from_store(
            ModelStore(Path(models_dir)), threads=threads, detector=detector
        )
    except Exception as error:
        conn.send(("error", f"cannot load the models: {error}"))
        return
    tracker = FaceTracker(detector=faces.detector, landmarker=faces.landmarker, smoothing=smoothing)
    attached: dict[str, SharedMemory] = {}
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return  # the parent went away
            if message[0] == "close":
                return
            try:
                conn.send(("ok", _handle(message, tracker, attached)))
            except Exception as error:  # the parent counts it and passes the frame through
                conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        for memory in attached.values():
            memory.close()


def _handle(message: tuple[Any, ...], tracker: Any, attached: dict[str, SharedMemory]) -> Any:
    kind = message[0]
    if kind == "ping":
        return None
    if kind == "reset":
        tracker.reset()
        return None
    _, name, shape, timestamp, detect_size, detect_interval, landmark_interval = message
    if name not in attached:
        for old in attached.values():
            old.close()
        attached.clear()
        # A spawned child shares the parent's resource tracker, so attaching registers
        # nothing new; the parent unlinks the block.
        attached[name] = SharedMemory(name=name)
    frame = np.ndarray(shape, dtype=np.uint8, buffer=attached[name].buf)
    counts = tracker.update(
        frame,
        timestamp,
        detect_size=detect_size,
        detect_interval=detect_interval,
        landmark_interval=landmark_interval,
    )
    del frame
    tracks = [
        (track.id, track.raw.points, track.raw.presence, track.smoothed) for track in tracker.tracks
    ]
    return tracks, counts
