"""The frame engine: one per process, shared by every stream (DESIGN.md, "The frame path").

Every session (a WHIP publisher, an ingest, a bench stream, an offline video) opens an
`EngineSession` on the one `FrameEngine` and submits its frames there. The engine's
workers serve all sessions together:

- stage A (`track` thread): each frame to an array, then the faces of every session's
  frame followed at once: the trackers' requests are gathered and each model runs one
  batched forward pass over all of them (the landmark model over every face of every
  frame; the detector over the frames due for detection, which for live sessions runs on
  the `detect` thread instead, so no frame waits for it), round after round until every
  tracker is done;
- stage B: every chosen face of every frame swapped and blended. The `swap` thread
  starts a batch's swaps (on the CPU, mostly by sending them to the swap processes of
  stream/swap_pool.py); the `finish` thread waits for them and hands each frame back to
  its own session.

Stage A of batch k+1 overlaps stage B of batch k (double buffering), and the swap
processes may start batch k+1 while batch k is being finished. Each session has a
single latest-frame slot: a frame submitted while the previous one still waits replaces
it (counted as dropped), so queues never grow. Stage A takes at most one frame per
session per batch, in turn (round-robin from where the last batch stopped), so a session
with a frame waiting is served within one batch cycle, gathering up to `batch_limit`
frames and waiting at most `batch_deadline_s` for more once the first is in. Each frame
is handed back to its own session in order; a frame that fails anywhere goes out
unswapped with its error counted, and a session that fails or closes never stalls the
others (a batched forward pass that raises is retried frame by frame, so only the
frame that caused it passes through).

Quality: the sessions on `auto` share one controller, fed with their frames (each one's
latency from submit to output, and the frames dropped before it), so under overload they
step down together and climb back together; its windows are in time, so it judges 5
streams as it judges one. A session pinned to a level keeps it (and does not feed it:
its own slow frames are what its pin asked for, though the load it puts on the engine
shows in everyone's latency).
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from livefuse.engines import ops
from livefuse.engines.identity import IdentityFace
from livefuse.engines.pipeline import FacePipeline, FaceSelection, require_bgr8
from livefuse.engines.swapper import SourceFace
from livefuse.engines.types import Detection
from livefuse.stream.frames import (
    FrameInput,
    FrameJob,
    FrameStats,
    ProcessedFrame,
    TrackedFace,
    chosen_faces,
    ms_since,
    scaled,
)
from livefuse.stream.health import StageHealth
from livefuse.stream.quality import (
    LEVELS_BY_NAME,
    QUALITY_MODES,
    QualityController,
    QualityLevel,
    QualityMode,
)
from livefuse.stream.smoothing import OneEuroParams
from livefuse.stream.swap_pool import PoolSwaps, SwapPool, SwapUnit, swap_units
from livefuse.stream.tracking import (
    DetectRequest,
    FaceTracker,
    FitRequest,
    TrackerAnswer,
    TrackerRequest,
    TrackerSteps,
)

log = logging.getLogger(__name__)

OutputCallback = Callable[[ProcessedFrame], None]
R = TypeVar("R")
A = TypeVar("A")

# Frames in one batch at most: enough for every stream a CPU serves, small enough that a
# batch's slowest frame does not hold the others back for long.
DEFAULT_BATCH_LIMIT = 16
# How long stage A waits for more sessions' frames once one is in, when it is idle: short
# against a frame's budget (33 ms), so an idle engine adds no latency to speak of.
DEFAULT_BATCH_DEADLINE_S = 0.002
# An engine with no frame for this long starts the shared `auto` level afresh.
_IDLE_RESTART_S = 5.0
# Batches whose swaps may be under way at once (see FrameEngine._swapping).
_SWAPS_IN_FLIGHT = 2
# How long `process` waits for its frame to come back before giving up.
_PROCESS_TIMEOUT_S = 30.0
# A frame that is not swapped (no source yet, or swapping off) still has its faces
# tracked, so they are counted and a source set later swaps from its first frame; its
# landmarks are refitted no more often than every this many frames (as `minimal` does).
_UNSWAPPED_LANDMARK_INTERVAL = 3
# What a labelled session's frames carry (`EngineSession.label`).
DISCLOSURE_TEXT = "AI-generated"


class EngineClosed(RuntimeError):
    """The engine (or the session) was closed; no more frames are taken."""


@dataclass(eq=False)
class _Reply:
    """Where `EngineSession.process` waits for its one frame."""

    done: threading.Event = field(default_factory=threading.Event)
    output: ProcessedFrame | None = None


class EngineSession:
    """One stream's place in the engine: its latest-frame slot, its face tracks, its
    settings and counters. Made by `FrameEngine.open_session`; `close()` leaves.

    The settings a user changes while streaming (`source`, `quality`, `enabled`,
    `face_selection`, `label`) are plain attributes read once per frame, so a change
    applies from the next frame on without a pause.
    """

    def __init__(
        self,
        *,
        engine: FrameEngine,
        session_id: str,
        on_output: OutputCallback | None,
        tracker: FaceTracker,
        quality: QualityMode,
        face_selection: FaceSelection,
    ) -> None:
        self.id = session_id
        self.engine = engine
        self.tracker = tracker
        self.source: SourceFace | None = None
        self.enabled = True
        self.face_selection: FaceSelection = face_selection
        self.label = False
        """Burn `DISCLOSURE_TEXT` into every frame that goes out, swapped or not: for
        relays that must disclose synthetic media."""
        self._quality: QualityMode = "auto"
        self.quality = quality
        self.errors: Counter[str] = Counter()
        self.passthrough: str | None = None
        """Why the last frame went out unswapped (`stage: error`); None once one goes
        through without failing. In the session's stats, so a user sees why."""
        self.submitted = 0
        self.dropped = 0
        """Frames replaced in the slot before the engine took them."""
        self.frames_out = 0
        self.closed = False
        self._on_output = on_output
        self._next_index = 0
        self._dropped_since_output = 0
        # Guarded by the engine's condition: the frame waiting for stage A.
        self._waiting: FrameJob | None = None
        # The counters are read by other threads (the service's stats endpoint).
        self._counts = threading.Lock()

    # -- settings a user may change while streaming -------------------------------------

    @property
    def quality(self) -> QualityMode:
        return self._quality

    @quality.setter
    def quality(self, mode: QualityMode) -> None:
        if mode not in QUALITY_MODES:
            raise ValueError(f"quality must be one of {', '.join(QUALITY_MODES)}, not {mode!r}")
        self._quality = mode

    @property
    def level(self) -> QualityLevel:
        """The level the next frame is processed at: the engine's shared `auto` level,
        or the one this session is pinned to."""
        if self._quality == "auto":
            return self.engine.governor.level
        return LEVELS_BY_NAME[self._quality]

    # -- frames in ----------------------------------------------------------------------

    def submit(
        self, frame: FrameInput, *, timestamp: float, tag: object = None, block: bool = False
    ) -> None:
        """Hand a frame in. A frame of this session still waiting is dropped (latest wins).

        `block=True` first waits until the engine has taken the waiting frame, so none is
        dropped: how the bench and offline files feed frames as fast as they are taken.
        `timestamp` is media time in seconds (it drives the landmark smoothing).
        """
        self._enqueue(self._new_job(frame, timestamp=timestamp, tag=tag), block=block)

    def process(
        self, frame: FrameInput, *, timestamp: float, tag: object = None
    ) -> ProcessedFrame | None:
        """One frame through the engine and back, waiting for it (warm-ups, tests, a
        caller that wants frames one at a time). None when nothing comes back: the
        frame's pixels could not be read, or a newer frame took its place. Waits behind
        a frame already submitted; EngineClosed if the session or the engine closes
        meanwhile."""
        job = self._new_job(frame, timestamp=timestamp, tag=tag)
        job.reply = reply = _Reply()
        self.engine._awaiting(reply, add=True)
        try:
            self._enqueue(job, block=True)
            if not reply.done.wait(_PROCESS_TIMEOUT_S):
                raise TimeoutError(f"the engine did not return frame {job.index} in time")
        finally:
            self.engine._awaiting(reply, add=False)
        if reply.output is None and (self.closed or self.engine.closed):
            raise EngineClosed(f"session {self.id} closed before its frame came back")
        return reply.output

    def _new_job(self, frame: FrameInput, *, timestamp: float, tag: object) -> FrameJob:
        with self._counts:
            index = self._next_index
            self._next_index += 1
        return FrameJob(
            frame=frame,
            index=index,
            timestamp=timestamp,
            submitted=time.perf_counter(),
            tag=tag,
            session=self,
        )

    def _enqueue(self, job: FrameJob, *, block: bool) -> None:
        replaced = self.engine._put(self, job, block=block)
        with self._counts:
            self.submitted += 1
            if replaced is not None:
                self.dropped += 1
                self._dropped_since_output += 1
        if replaced is not None and replaced.reply is not None:
            replaced.reply.done.set()  # nothing comes back for it

    def reset(self) -> None:
        """Forget the counts (after a warm-up). The tracks are kept: they are what a
        stream that has been running for a while has."""
        with self._counts:
            self.errors.clear()
            self.frames_out = 0
            self.submitted = 0
            self.dropped = 0
            self._dropped_since_output = 0

    def close(self) -> None:
        """Leave the engine: the waiting frame is discarded and frames in flight are not
        handed back. Safe to call twice."""
        if not self.closed:
            self.closed = True
            self.engine._remove(self)

    # -- frames out (on the engine's workers) -------------------------------------------

    def _take_dropped(self) -> int:
        with self._counts:
            dropped, self._dropped_since_output = self._dropped_since_output, 0
            return dropped

    def _finish(self, job: FrameJob) -> ProcessedFrame:
        """The output frame and its stats."""
        assert job.image is not None and job.level is not None
        image = scaled(job.image, job.level.output_scale)
        if job.label:
            image = _labelled(image, job)
        stats = FrameStats(
            index=job.index,
            latency_ms=ms_since(job.submitted),
            stages_ms=job.stages_ms,
            faces=len(job.faces),
            swapped=len(job.swapped_ids),
            quality=job.level.name,
            batch=job.batch_size,
        )
        with self._counts:
            self.frames_out += 1
            self.passthrough = None
        faces = tuple(face.marked(job.swapped_ids) for face in job.faces)
        return ProcessedFrame(image=image, stats=stats, tag=job.tag, faces=faces)

    def _passthrough(
        self, job: FrameJob, stage: str, error: BaseException
    ) -> ProcessedFrame | None:
        """The frame as it came in, after `stage` raised `error`: never a black frame.

        None when not even the frame's pixels could be read: there is nothing to send,
        and the consumer repeats its last frame.
        """
        with self._counts:
            self.errors[stage] += 1
            self.passthrough = f"{stage}: {type(error).__name__}: {error}"[:300]
        image = job.image
        if image is None and isinstance(job.frame, np.ndarray) and job.frame.dtype == np.uint8:
            image = job.frame
        if image is None:
            return None
        if job.label:
            image = _labelled(image, job)
        with self._counts:
            self.frames_out += 1
        level = job.level or self.level
        stats = FrameStats(
            index=job.index,
            latency_ms=ms_since(job.submitted),
            stages_ms=job.stages_ms,
            faces=len(job.faces),
            swapped=0,
            quality=level.name,
            error=f"{stage}: {type(error).__name__}: {error}",
            batch=job.batch_size,
        )
        return ProcessedFrame(image=image, stats=stats, tag=job.tag)

    def _emit(self, job: FrameJob, output: ProcessedFrame | None) -> None:
        if job.reply is not None:
            job.reply.output = output
            job.reply.done.set()
            return
        if output is None or self.closed or self._on_output is None:
            return
        try:
            self._on_output(output)
        except Exception:  # a consumer's bug must not stop the engine; say it loudly
            log.exception("session %s: the output callback failed on frame %d", self.id, job.index)


class EngineMetrics:
    """What the engine did, for /metrics and the bench: batches, frames, how busy each
    stage worker was. Written by the stage workers, read by anyone (under a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.batches = 0
        self.frames = 0
        self.largest_batch = 0
        self.busy_s: dict[str, float] = defaultdict(float)
        """Seconds each stage worker spent working (not waiting)."""
        self.errors: Counter[str] = Counter()

    def batch(self, stage: str, frames: int, busy_s: float) -> None:
        with self._lock:
            self.busy_s[stage] += busy_s
            if stage == "track":
                self.batches += 1
                self.frames += frames
                self.largest_batch = max(self.largest_batch, frames)

    def error(self, stage: str) -> None:
        with self._lock:
            self.errors[stage] += 1

    def busy_ratio(self) -> dict[str, float]:
        """Per worker, the share of the time since the engine started spent working."""
        with self._lock:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            return {stage: seconds / elapsed for stage, seconds in self.busy_s.items()}

    def snapshot(self) -> dict[str, object]:
        """Everything above, for the bench's JSON."""
        busy = self.busy_ratio()
        with self._lock:
            return {
                "batches": self.batches,
                "frames": self.frames,
                "mean_batch": round(self.frames / self.batches, 2) if self.batches else 0.0,
                "largest_batch": self.largest_batch,
                "busy": {stage: round(ratio, 3) for stage, ratio in busy.items()},
                "errors": dict(self.errors),
            }


class _BatchHandoff:
    """Stage A's finished batch, waiting for stage B: at most one."""

    def __init__(self) -> None:
        self._batch: list[FrameJob] | None = None
        self._closed = False
        self._changed = threading.Condition()

    def put(self, batch: list[FrameJob]) -> None:
        with self._changed:
            while self._batch is not None and not self._closed:
                self._changed.wait()
            self._batch = batch
            self._changed.notify_all()

    def wait_empty(self) -> None:
        with self._changed:
            while self._batch is not None and not self._closed:
                self._changed.wait()

    def take(self) -> list[FrameJob] | None:
        """The next batch; None once closed."""
        with self._changed:
            while self._batch is None and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            batch, self._batch = self._batch, None
            self._changed.notify_all()
            return batch

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class FrameEngine:
    """The one frame engine of a process; see the module docstring."""

    def __init__(
        self,
        *,
        faces: FacePipeline,
        target_fps: float = 30.0,
        batch_limit: int = DEFAULT_BATCH_LIMIT,
        batch_deadline_s: float = DEFAULT_BATCH_DEADLINE_S,
        swap_processes: int = 0,
        name: str = "livefuse-engine",
    ) -> None:
        """`swap_processes` child processes take part of each batch's swaps (the CPU
        scheduler, stream/swap_pool.py): on the CPU, threads of one process mostly wait
        for each other's GIL. They need a FacePipeline made by `from_store`."""
        if batch_limit < 1:
            raise ValueError("batch_limit must be at least 1")
        self.faces = faces
        self.batch_limit = batch_limit
        self.batch_deadline_s = batch_deadline_s
        self.governor = QualityController(mode="auto", target_fps=target_fps)
        """The level every `auto` session runs at, fed by their frames."""
        self.metrics = EngineMetrics()
        self.health = StageHealth()
        """Stages failing on every frame, across sessions (stream/health.py)."""
        self.swap_pool: SwapPool | None = None
        if swap_processes > 0:
            if faces.models_dir is None:
                raise ValueError("swap processes need a FacePipeline made by from_store")
            self.swap_pool = SwapPool(models_dir=faces.models_dir, processes=swap_processes)
        self._sessions: list[EngineSession] = []
        self._changed = threading.Condition()
        self._next_turn = 0
        self._handoff = _BatchHandoff()
        self._replies: set[_Reply] = set()
        self._detections: queue.Queue[tuple[DetectRequest, Future[list[Detection]]] | None] = (
            queue.Queue()
        )
        # Batches whose swaps have started and are not yet handed back: at most
        # `_SWAPS_IN_FLIGHT`, so the swap processes have the next batch at hand while
        # one is finished, and no more, so frames never queue behind several batches
        # (newer frames replace them in their slots instead).
        self._swapping: queue.Queue[_SwapsInFlight | None] = queue.Queue()
        self._swap_room = threading.Semaphore(_SWAPS_IN_FLIGHT)
        self._closed = False
        self._ids = itertools.count(1)
        self._workers = [
            threading.Thread(target=self._run_track, name=f"{name}-track", daemon=True),
            threading.Thread(target=self._run_swap, name=f"{name}-swap", daemon=True),
            threading.Thread(target=self._run_finish, name=f"{name}-finish", daemon=True),
            threading.Thread(target=self._run_detect, name=f"{name}-detect", daemon=True),
        ]
        for worker in self._workers:
            worker.start()

    def wait_ready(self) -> None:
        """Wait until the swap processes (if any) have loaded their models."""
        if self.swap_pool is not None:
            self.swap_pool.wait_ready()

    # -- sessions -----------------------------------------------------------------------

    def open_session(
        self,
        *,
        on_output: OutputCallback | None = None,
        quality: QualityMode = "auto",
        face_selection: FaceSelection = "all",
        smoothing: OneEuroParams | None = None,
        session_id: str | None = None,
        detect_in_background: bool = True,
    ) -> EngineSession:
        """A new stream on this engine. `on_output` is called on an engine worker with
        each processed frame, in order; keep it short (hand the frame on).

        `detect_in_background` (live streams): the face detector, the costliest model per
        call, runs on the engine's detection worker and never delays a frame; new faces
        are taken up a frame or two later. Off (files), each frame waits for its
        detections, so the result does not depend on timing."""
        if self._closed:
            raise EngineClosed("the frame engine is closed")
        tracker = FaceTracker(
            detector=self.faces.face_detector,
            landmarker=self.faces.landmarker,
            smoothing=smoothing,
            detect_in_background=detect_in_background,
        )
        session = EngineSession(
            engine=self,
            session_id=session_id or f"session-{next(self._ids)}",
            on_output=on_output,
            tracker=tracker,
            quality=quality,
            face_selection=face_selection,
        )
        with self._changed:
            self._sessions.append(session)
        return session

    @property
    def sessions(self) -> list[EngineSession]:
        with self._changed:
            return list(self._sessions)

    def _remove(self, session: EngineSession) -> None:
        with self._changed:
            if session in self._sessions:
                position = self._sessions.index(session)
                self._sessions.remove(session)
                if position < self._next_turn:
                    self._next_turn -= 1
            job, session._waiting = session._waiting, None
            self._changed.notify_all()
        if job is not None and job.reply is not None:
            job.reply.done.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the workers and the swap processes; frames in flight are discarded and
        whoever waits in `process` is woken. Safe to call twice."""
        with self._changed:
            self._closed = True
            sessions, self._sessions = self._sessions, []
            replies, self._replies = self._replies, set()
            self._changed.notify_all()
        for session in sessions:
            session.closed = True
        for reply in replies:
            reply.done.set()
        self._handoff.close()
        self._detections.put(None)
        if self.swap_pool is not None:
            # First, so a worker waiting for a swap process's answer hears it end.
            self.swap_pool.stop()
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout=5)
        if self.swap_pool is not None:
            self.swap_pool.close()

    def _awaiting(self, reply: _Reply, *, add: bool) -> None:
        """Keep track of the `process` callers waiting, for `close` to wake them."""
        with self._changed:
            if add and not self._closed:
                self._replies.add(reply)
            else:
                self._replies.discard(reply)

    # -- the latest-frame slots ---------------------------------------------------------

    def _put(self, session: EngineSession, job: FrameJob, *, block: bool) -> FrameJob | None:
        """Place `job` in its session's slot; the job it replaced, if any."""
        with self._changed:
            if block:
                while session._waiting is not None and not (self._closed or session.closed):
                    self._changed.wait()
            if self._closed or session.closed:
                raise EngineClosed(f"session {session.id} is closed")
            replaced, session._waiting = session._waiting, job
            self._changed.notify_all()
            return replaced

    def _gather(self) -> list[FrameJob] | None:
        """The next batch: at most one waiting frame per session, sessions in turn, up to
        the batch limit; waits for the first frame, then briefly for more. None once the
        engine is closed."""
        with self._changed:
            while not self._closed and not any(s._waiting for s in self._sessions):
                self._changed.wait()
            if self._closed:
                return None
            deadline = time.perf_counter() + self.batch_deadline_s
            while True:
                waiting = sum(1 for s in self._sessions if s._waiting is not None)
                left = deadline - time.perf_counter()
                if waiting >= min(self.batch_limit, len(self._sessions)) or left <= 0:
                    break
                self._changed.wait(left)
                if self._closed:
                    return None
            count = len(self._sessions)
            batch: list[FrameJob] = []
            for step in range(count):
                position = (self._next_turn + step) % count
                session = self._sessions[position]
                job = session._waiting
                if job is None:
                    continue
                session._waiting = None
                batch.append(job)
                if len(batch) == self.batch_limit:
                    # The next batch starts with the session after the last one served.
                    self._next_turn = (position + 1) % count
                    break
            self._changed.notify_all()  # submitters blocked on a full slot
            return batch

    # -- stage A: to arrays, detection and landmarks, batched ---------------------------

    def restart_quality(self) -> None:
        """The shared `auto` level back to where a new stream starts (after a warm-up,
        whose first slow frames say nothing of the streams to come)."""
        self.governor.restart()

    def _run_track(self) -> None:
        last_batch = time.perf_counter()
        while True:
            # Double buffering: take new frames only once stage B has the last batch, so
            # a frame never waits tracked behind a whole batch (newer ones replace it).
            self._handoff.wait_empty()
            batch = self._gather()
            if batch is None:
                return
            started = time.perf_counter()
            if started - last_batch > _IDLE_RESTART_S:
                # The load the level was set for is long gone: start afresh, as a new
                # stream on an idle engine should.
                self.restart_quality()
            last_batch = started
            try:
                self._track_batch(batch)
            except Exception as error:  # a bug here must not stop every stream
                log.exception("the engine's tracking stage failed on a batch")
                for job in batch:
                    if job.failure is None:
                        job.failure = ("track", error)
            tracked = time.perf_counter()
            self.metrics.batch("track", len(batch), tracked - started)
            for job in batch:
                job.tracked = tracked
            self._handoff.put(batch)

    def _track_batch(self, batch: list[FrameJob]) -> None:
        taken = time.perf_counter()
        for job in batch:
            job.batch_size = len(batch)
            job.stages_ms["queued"] = (taken - job.submitted) * 1000.0
            started = time.perf_counter()
            # Before anything can fail: a frame that passes through is labelled too.
            job.label = job.session.label
            try:
                job.image = _to_array(job.frame)
            except Exception as error:  # unreadable pixels: counted, the frame is dropped
                job.failure = ("to_array", error)
                continue
            session = job.session
            # The settings a user may change meanwhile, read once: this frame goes through
            # with them whatever happens to the session's attributes on the way.
            job.level = session.level
            job.source, job.enabled = session.source, session.enabled
            job.face_selection = session.face_selection
            job.stages_ms["to_array"] = ms_since(started)
        tracked = [job for job in batch if job.failure is None]
        if not tracked:
            return
        started = time.perf_counter()
        for job, reason in self._track_all(tracked).items():
            job.failure = ("track", reason)
        elapsed = ms_since(started)
        for job in tracked:
            job.stages_ms["track"] = elapsed
            if job.failure is None:
                job.faces = [
                    TrackedFace(
                        track_id=track.id,
                        points=track.smoothed,
                        raw_points=track.raw.points,
                        presence=track.raw.presence,
                    )
                    for track in job.session.tracker.tracks
                ]

    def _track_all(self, jobs: list[FrameJob]) -> dict[FrameJob, BaseException]:
        """Drive every job's tracker through its steps, answering each round's requests
        with one forward pass per model. The jobs whose tracking failed, with why."""
        failed: dict[FrameJob, BaseException] = {}
        steps: dict[FrameJob, TrackerSteps] = {}
        pending: dict[FrameJob, TrackerRequest] = {}
        for job in jobs:
            assert job.image is not None and job.level is not None
            level = job.level
            landmark_interval = level.landmark_interval
            if not job.enabled or job.source is None:
                # Only counted: cheaper landmarks will do.
                landmark_interval = max(landmark_interval, _UNSWAPPED_LANDMARK_INTERVAL)
            steps[job] = job.session.tracker.steps(
                job.image,
                job.timestamp,
                detect_size=level.detect_size,
                detect_interval=level.detect_interval,
                landmark_interval=landmark_interval,
            )
            _advance(job, steps[job], None, pending, failed)
        while pending:
            answers = self._answer(pending)
            requests, pending = pending, {}
            for job in requests:
                answer = answers[job]
                if isinstance(answer, BaseException):
                    steps[job].close()
                    failed[job] = answer
                else:
                    _advance(job, steps[job], answer, pending, failed)
        return failed

    def _answer(
        self, requests: dict[FrameJob, TrackerRequest]
    ) -> dict[FrameJob, TrackerAnswer | BaseException]:
        """One batched forward pass per model for this round's requests; a pass that
        raises is retried request by request, so only the one at fault fails."""
        answers: dict[FrameJob, TrackerAnswer | BaseException] = {}
        detections: dict[int, list[tuple[FrameJob, DetectRequest]]] = {}
        fits: list[tuple[FrameJob, FitRequest]] = []
        for job, request in requests.items():
            if isinstance(request, DetectRequest) and request.background:
                answers[job] = self._detect_later(request)
            elif isinstance(request, DetectRequest):
                detections.setdefault(request.max_side, []).append((job, request))
            else:
                fits.append((job, request))
        for max_side, group in detections.items():
            found = _batched(group, functools.partial(self._detect, max_side=max_side))
            answers.update(found)
        if fits:
            landmarker = self.faces.landmarker
            fitted = _batched(
                fits, lambda reqs: landmarker.landmarks_batch([(r.image, r.regions) for r in reqs])
            )
            answers.update(fitted)
        return answers

    def _detect_later(self, request: DetectRequest) -> Future[list[Detection]]:
        """The request queued for the detection worker; its future answers it."""
        pending: Future[list[Detection]] = Future()
        self._detections.put((request, pending))
        return pending

    def _run_detect(self) -> None:
        """The detection worker: background detections, those of one size together."""
        while True:
            first = self._detections.get()
            if first is None:
                return
            waiting = [first]
            while True:
                try:
                    queued = self._detections.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    self._detections.put(None)  # stop after this round
                    break
                waiting.append(queued)
            started = time.perf_counter()
            by_size: dict[int, list[tuple[DetectRequest, Future[list[Detection]]]]] = {}
            for request, pending in waiting:
                by_size.setdefault(request.max_side, []).append((request, pending))
            for max_side, group in by_size.items():
                try:
                    found = self._detect([request for request, _ in group], max_side)
                    answered = list(zip(group, found, strict=True))
                except Exception as error:  # each tracker fails one frame and asks again
                    for _, pending in group:
                        pending.set_exception(error)
                    continue
                for (_, pending), detections in answered:
                    pending.set_result(detections)
            self.metrics.batch("detect", len(waiting), time.perf_counter() - started)

    def _detect(self, requests: list[DetectRequest], max_side: int) -> list[list[Detection]]:
        images = [request.image for request in requests]
        return self.faces.face_detector.detect_batch(images, max_side=max_side)

    # -- stage B: swap and blend, then each frame back to its session --------------------

    def _run_swap(self) -> None:
        """Stage B's first half: each batch's swaps started (sent to the swap processes,
        or done here), then handed to the finishing thread; the next batch's swaps can
        start while the processes still work on this one's."""
        while True:
            self._swap_room.acquire()
            batch = self._handoff.take()
            if batch is None:
                self._swapping.put(None)
                return
            started = time.perf_counter()
            for job in batch:
                job.stages_ms["handoff"] = (started - job.tracked) * 1000.0
            try:
                pending = self._start_swaps(batch)
            except Exception as error:  # a bug here must not stop every stream
                log.exception("the engine's swap stage failed on a batch")
                pending = PoolSwaps([], {job: repr(error) for job in batch})
            self._swapping.put(_SwapsInFlight(batch, pending, started))

    def _run_finish(self) -> None:
        """Stage B's second half: wait for a batch's swaps, then hand each frame back to
        its session, in order, feeding the shared quality controller with the frames of
        the sessions on `auto`. A frame any of whose faces failed goes out as it came in."""
        while True:
            in_flight = self._swapping.get()
            if in_flight is None:
                return
            batch = in_flight.batch
            try:
                failed = in_flight.pending.wait()
            except Exception as error:  # a bug here must not stop every stream
                log.exception("the engine's finishing stage failed on a batch")
                failed = {job: repr(error) for job in batch}
            for job, why in failed.items():
                _fail_swap(job, why)
            elapsed = ms_since(in_flight.started)
            for job in batch:
                self._hand_back(job, swap_ms=elapsed)
            self._swap_room.release()
            self.metrics.batch("swap", len(batch), elapsed / 1000.0)

    def _hand_back(self, job: FrameJob, *, swap_ms: float) -> None:
        session = job.session
        output: ProcessedFrame | None
        if job.failure is None:
            job.stages_ms["swap"] = swap_ms
            output = session._finish(job)
            # Through every stage it went: reading the pixels, tracking, and the swap
            # only when it had faces swapped.
            self.health.succeeded("to_array")
            self.health.succeeded("track")
            if job.swapped_ids:
                self.health.succeeded("swap")
        else:
            stage, error = job.failure
            self.metrics.error(stage)
            self.health.failed(stage, f"{type(error).__name__}: {error}")
            output = session._passthrough(job, stage, error)
        dropped = session._take_dropped()
        # Before the frame is handed back: a caller of `process` who restarts the level
        # next must not be undone by its own warm-up frame.
        if session.quality == "auto" and output is not None:
            self.governor.record(output.stats.latency_ms, dropped=dropped)
        session._emit(job, output)

    def _start_swaps(self, batch: list[FrameJob]) -> PoolSwaps:
        """Start swapping the chosen faces of every frame of the batch, as units that
        touch disjoint pixels: the swap processes take what they can, this thread swaps
        the rest now. Each frame is drawn on a copy: the input may be the caller's array
        (a bench clip, a test frame), and a frame whose swap fails goes out untouched."""
        units: list[SwapUnit] = []
        for job in batch:
            if job.failure is not None or job.level is None or job.image is None:
                continue
            chosen = chosen_faces(job.faces, job.level, job.face_selection)
            if not job.enabled or job.source is None or not chosen:
                continue
            job.original = job.image
            job.image = job.image.copy()
            job.swapped_ids = {face.track_id for face in chosen}
            units.extend(swap_units(job, chosen))
        portable = [unit for unit in units if self._portable(unit)]
        here = [unit for unit in units if not self._portable(unit)]
        pending = PoolSwaps([], {})
        if self.swap_pool is not None and portable:
            pending, leftover = self.swap_pool.start(portable, _swap_options)
            here.extend(leftover)
        else:
            here.extend(portable)
        for unit in here:
            try:
                self._swap_unit(unit)
            except Exception as error:  # the frame goes out unswapped, once all is done
                pending.fail(unit.job, f"{type(error).__name__}: {error}")
        return pending

    def _portable(self, unit: SwapUnit) -> bool:
        """Whether a swap process can take the unit: the mesh swapper's faces alone."""
        faces = self.faces
        return (
            faces.enhancer is None
            and faces.parser is None
            and not isinstance(unit.job.source, IdentityFace)
        )

    def _swap_unit(self, unit: SwapUnit) -> None:
        job = unit.job
        source, level = job.source, job.level
        assert job.image is not None and source is not None and level is not None
        for face in unit.faces:
            self.faces.swap_face_in_place(
                job.image,
                source,
                face.mesh,
                scale=level.blend_scale,
                shape_transfer=level.shape_transfer,
                enhance=level.enhance,
            )


class SwapFailed(RuntimeError):
    """A face's swap failed (in this process or a swap process); the text says why."""


@dataclass(frozen=True)
class _SwapsInFlight:
    batch: list[FrameJob]
    pending: PoolSwaps
    started: float


def _fail_swap(job: FrameJob, why: str) -> None:
    """The frame goes out as it came in; the first failure is the one reported. Called
    once every unit of the frame is done, so nothing draws on it after."""
    if job.failure is None:
        log.debug("session %s: swap failed on frame %d: %s", job.session.id, job.index, why)
        job.failure = ("swap", SwapFailed(why))
        if job.original is not None:
            job.image = job.original
        job.swapped_ids = set()


def _swap_options(unit: SwapUnit) -> tuple[float, bool]:
    """What a swap process needs of the unit's quality level."""
    level = unit.job.level
    assert level is not None
    return (level.blend_scale, level.shape_transfer)


def _labelled(image: np.ndarray, job: FrameJob) -> np.ndarray:
    """`image` with the disclosure label burnt in; drawn on a copy when the image is the
    caller's own array (a frame that was neither swapped nor scaled)."""
    if image is job.frame:
        image = image.copy()
    ops.draw_label(image, DISCLOSURE_TEXT)
    return image


def _to_array(frame: FrameInput) -> np.ndarray:
    if isinstance(frame, np.ndarray):
        image = frame
    else:
        image = frame.to_ndarray(format="bgr24")
    require_bgr8(image)
    return image


def _advance(
    job: FrameJob,
    steps: TrackerSteps,
    answer: TrackerAnswer | None,
    pending: dict[FrameJob, TrackerRequest],
    failed: dict[FrameJob, BaseException],
) -> None:
    """One step of a job's tracker: its next request into `pending`, or done, or failed."""
    try:
        pending[job] = next(steps) if answer is None else steps.send(answer)
    except StopIteration:
        pass
    except Exception as error:
        failed[job] = error


def _batched(
    items: list[tuple[FrameJob, R]], run: Callable[[list[R]], list[A]]
) -> list[tuple[FrameJob, A | BaseException]]:
    """`run` over all the requests at once; if it raises, over each alone, so a request
    that breaks the forward pass fails by itself and the others are answered."""
    jobs = [job for job, _ in items]
    try:
        return list(zip(jobs, run([request for _, request in items]), strict=True))
    except Exception as batch_error:
        if len(items) == 1:
            return [(jobs[0], batch_error)]
    results: list[tuple[FrameJob, A | BaseException]] = []
    for job, request in items:
        try:
            results.append((job, run([request])[0]))
        except Exception as error:
            results.append((job, error))
    return results
