"""One live stream: a publisher's video and audio in, one processing, its channel out.

A `StreamSession` owns everything per publisher and nothing else: its session on the
process's one frame engine (which holds its face tracks and settings), the tasks that read
the publisher's tracks into it, and, unless the stream has a name, its `Channel` (the
output slot every sender pulls from, the one shared H.264 encode, the audio fan-out).
A named stream's channel is lent to each of its publishers in turn (stream/channel.py).
It is built with its dependencies (the `FrameEngine`, the loop, callbacks) and torn down
by `close()`, which leaves no task or thread behind. The web layer decides when a session
starts and ends; here is only what happens to the frames.

Publishers are aiortc tracks (`attach_video`, `attach_audio`) or an FFmpeg ingest, which
feeds decoded frames from its own thread (`feed_video`, `feed_audio`). Every frame is
stamped with its `media_time` on arrival (or when due, for a paced feed): the audio and
the swapped video leave on that one clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from livefuse.engines.pipeline import FaceSelection
from livefuse.stream import codecs
from livefuse.stream.channel import Channel
from livefuse.stream.engine import EngineClosed, FrameEngine
from livefuse.stream.frames import FrameInput, FrameStats, ProcessedFrame
from livefuse.stream.quality import QualityMode
from livefuse.stream.shared_encode import EncodedVideoTrack
from livefuse.stream.tracks import (
    InputStamp,
    OutputSlot,
    ProcessedVideoTrack,
    latest_frame,
    pts_90k,
    to_output_frame,
)

log = logging.getLogger(__name__)

# Frames kept for the latency percentiles and the fps windows.
_STATS_WINDOW = 300
_FPS_WINDOW_S = 2.0


@dataclass(frozen=True)
class SessionStats:
    fps_in: float
    fps_out: float
    frames_in: int
    frames_out: int
    dropped: int
    """Frames never processed: replaced while waiting (engine) or skipped in aiortc's queue."""
    latency_ms: dict[str, float]
    """p50/p95/p99 of the engine's latency over the last frames."""
    quality: str
    """The level in force."""
    quality_mode: str
    faces: int
    swapped: int
    errors: dict[str, int]
    repeats: int
    """Frames re-sent because no new one was ready (the shared H.264 encode's, plus each
    VP8 output's)."""
    encode: dict[str, float] = field(default_factory=dict)
    video_in: dict[str, int] = field(default_factory=dict)
    """The publisher's video as received (`codecs.ReceiverWatch`: keyframes asked for,
    PLIs sent, frames that could not be decoded); empty for a feed that is no aiortc
    track."""
    """The shared H.264 encode (`EncoderStats`); empty while no H.264 sender has joined."""
    passthrough: str | None = None
    """Why the last frame went out unswapped (`stage: error`), or None when it did not
    fail (`EngineSession.passthrough`)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "fps_in": round(self.fps_in, 2),
            "fps_out": round(self.fps_out, 2),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "dropped_frames": self.dropped,
            "latency_ms": {k: round(v, 2) for k, v in self.latency_ms.items()},
            "quality": self.quality,
            "quality_mode": self.quality_mode,
            "faces": self.faces,
            "swapped": self.swapped,
            "errors": self.errors,
            "repeated_frames": self.repeats,
            "encode": self.encode,
            "video_in": self.video_in,
            "passthrough": self.passthrough,
        }


def _rate(times: deque[float], now: float) -> float:
    recent = [t for t in times if now - t <= _FPS_WINDOW_S]
    if len(recent) < 2:
        return 0.0
    span = max(now - recent[0], 1e-6)
    return (len(recent) - 1) / span if now - recent[-1] < _FPS_WINDOW_S else 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class StreamSession:
    def __init__(
        self,
        *,
        session_id: str,
        engine: FrameEngine,
        loop: asyncio.AbstractEventLoop,
        idle_timeout_s: float,
        quality: QualityMode = "auto",
        face_selection: FaceSelection = "all",
        label: bool = False,
        on_frame: Callable[[FrameStats], None] | None = None,
        on_idle: Callable[[StreamSession], None] | None = None,
        channel: Channel | None = None,
    ) -> None:
        self.id = session_id
        self.channel = channel or Channel(loop=loop, name=session_id)
        """Where the processed frames and the audio go: a named stream's (lent, not
        closed here) or this session's own."""
        self._owns_channel = channel is None
        self.created = time.time()
        self.frames_in = 0
        self.skipped = 0
        self.last_input = time.monotonic()
        self._loop = loop
        self._idle_timeout_s = idle_timeout_s
        self._on_frame = on_frame
        self._on_idle = on_idle
        self._in_times: deque[float] = deque(maxlen=_STATS_WINDOW)
        self._out_times: deque[float] = deque(maxlen=_STATS_WINDOW)
        self._latencies: deque[float] = deque(maxlen=_STATS_WINDOW)
        self._last_stats: FrameStats | None = None
        self._has_audio = False
        self._video_track: MediaStreamTrack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.engine_session = engine.open_session(
            on_output=self._from_worker,
            quality=quality,
            face_selection=face_selection,
            session_id=session_id,
        )
        """This stream's place in the engine: its source, quality, on/off, faces and
        disclosure label are the settings a user changes while streaming."""
        self.engine_session.label = label
        self._start(self._watch_idle(), "idle")

    # -- inputs -------------------------------------------------------------------------

    @property
    def output(self) -> OutputSlot:
        return self.channel.output

    def attach_video(self, track: MediaStreamTrack) -> None:
        self._video_track = track
        codecs.name_track(track, self.id)
        self._start(self._read_video(track), "video-in")

    def attach_audio(self, track: MediaStreamTrack) -> None:
        # aiortc queues every decoded frame of a remote track until someone reads it:
        # this reader keeps it moving (and the memory flat) whether anyone listens or not.
        self._has_audio = True
        self._start(self._read_audio(track), "audio-in")

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, av.AudioFrame):
                self.channel.audio.push(frame, media_time=time.monotonic())

    @property
    def has_audio(self) -> bool:
        return self._has_audio

    async def _read_video(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame, skipped = await latest_frame(track)
            except MediaStreamError:
                return
            if not isinstance(frame, av.VideoFrame):
                continue
            now = time.monotonic()
            self._count_input(now, skipped)
            timestamp = float(frame.time) if frame.time is not None else now
            try:
                self.engine_session.submit(
                    frame,
                    timestamp=timestamp,
                    tag=InputStamp(pts=frame.pts, time_base=frame.time_base, media_time=now),
                )
            except EngineClosed:  # the session (or the service) is ending
                return

    def _count_input(self, now: float, skipped: int = 0) -> None:
        self.last_input = now
        self.frames_in += 1 + skipped
        self.skipped += skipped
        self._in_times.append(now)

    def feed_video(self, frame: FrameInput, *, media_time: float, stamp: InputStamp) -> None:
        """A decoded frame from an ingest's thread (thread-safe; latest frame wins).
        EngineClosed once the session has ended."""
        if self._closed:
            raise EngineClosed(f"session {self.id} has ended")
        try:
            self._loop.call_soon_threadsafe(self._count_input, media_time)
        except RuntimeError as error:  # the loop is closed: the session is going away
            raise EngineClosed(f"session {self.id} has ended") from error
        self.engine_session.submit(frame, timestamp=media_time, tag=stamp)

    def feed_audio(self, frame: av.AudioFrame, *, media_time: float) -> None:
        """A decoded audio frame from an ingest's thread (thread-safe)."""
        self._has_audio = True
        try:
            self._loop.call_soon_threadsafe(self._push_audio, frame, media_time)
        except RuntimeError:  # the loop is closed: the session is going away
            pass

    def _push_audio(self, frame: av.AudioFrame, media_time: float) -> None:
        if not self._closed:
            self.channel.audio.push(frame, media_time=media_time)

    async def _watch_idle(self) -> None:
        # A publisher that vanishes without a goodbye (network gone, OBS killed) leaves
        # its peer connection up until ICE consent fails; stop waiting long before that.
        while True:
            await asyncio.sleep(min(1.0, self._idle_timeout_s / 4))
            if time.monotonic() - self.last_input > self._idle_timeout_s:
                log.info(
                    "event=publisher_silent session=%s seconds=%.1f", self.id, self._idle_timeout_s
                )
                if self._on_idle is not None:
                    self._on_idle(self)
                # Ending the session cancels this task; until then (or if the session
                # was not registered yet), keep watching.
                self.last_input = time.monotonic()

    # -- outputs ------------------------------------------------------------------------

    def _from_worker(self, processed: ProcessedFrame) -> None:
        """On an engine thread: convert once for every sender, then hop to the loop."""
        stamp = processed.tag if isinstance(processed.tag, InputStamp) else None
        frame = to_output_frame(
            processed.image,
            pts=pts_90k(stamp.pts, stamp.time_base) if stamp else None,
            stats=processed.stats,
            media_time=stamp.media_time if stamp else None,
        )
        try:
            self._loop.call_soon_threadsafe(self._publish, frame)
        except RuntimeError:  # the loop is closed: the session is going away
            pass

    def _publish(self, frame: Any) -> None:
        if self._closed:
            return
        self._out_times.append(time.monotonic())
        self._latencies.append(frame.stats.latency_ms)
        self._last_stats = frame.stats
        self.channel.publish(frame)
        if self._on_frame is not None:
            self._on_frame(frame.stats)

    def video_output(self, *, h264: bool = False) -> EncodedVideoTrack | ProcessedVideoTrack:
        """A new track of the processed video for one more sender (see `Channel`)."""
        return self.channel.video_output(h264=h264)

    def audio_output(self) -> MediaStreamTrack | None:
        """The publisher's audio, untouched, for one more sender (None: it sends none)."""
        if not self._has_audio:
            return None
        return self.channel.audio_output()

    # -- state --------------------------------------------------------------------------

    def stats(self) -> SessionStats:
        now = time.monotonic()
        last = self._last_stats
        latencies = list(self._latencies)
        encode = self.channel.encoder_stats()
        watch = codecs.receiver_watch(self._video_track) if self._video_track else None
        errors = dict(self.engine_session.errors)
        if encode is not None and encode.errors:
            errors["encode"] = encode.errors
        return SessionStats(
            fps_in=_rate(self._in_times, now),
            fps_out=_rate(self._out_times, now),
            frames_in=self.frames_in,
            frames_out=self.engine_session.frames_out,
            dropped=self.engine_session.dropped + self.skipped,
            latency_ms={
                q: _percentile(latencies, n) for q, n in (("p50", 50), ("p95", 95), ("p99", 99))
            },
            quality=self.engine_session.level.name,
            quality_mode=self.engine_session.quality,
            faces=last.faces if last else 0,
            swapped=last.swapped if last else 0,
            errors=errors,
            repeats=self.channel.repeats,
            encode=encode.as_dict() if encode else {},
            video_in=watch.as_dict() if watch else {},
            passthrough=self.engine_session.passthrough,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def _start(self, coroutine: Any, what: str) -> None:
        task = self._loop.create_task(coroutine, name=f"livefuse-session-{self.id[:8]}-{what}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session %s: task %s failed", self.id, task.get_name(), exc_info=task.exception()
            )

    async def close(self) -> None:
        """End the stream: stop reading, leave the engine, end every output. Idempotent."""
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        self._tasks.clear()
        if self._owns_channel:
            await self.channel.close()
        # Its frames still in the engine are not handed back; the engine serves the others.
        self.engine_session.close()
