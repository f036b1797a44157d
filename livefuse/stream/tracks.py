"""aiortc media tracks around a session's pipeline.

- `OutputSlot`: the newest processed frame of a session, already in the encoder's pixel
  format (I420), converted once however many peers watch it. Readers wait on an event
  that is replaced at each publish, so any number of them see every new frame and none
  holds a queue.
- `OutputClock`: the timestamps of one output: they keep the input's spacing while frames
  flow and follow the wall clock across repeats, always increasing.
- `ProcessedVideoTrack`: what a video sender that encodes for itself (VP8) pulls. `recv()`
  hands out the next processed frame as soon as it is ready; when none comes within
  `repeat_after` it sends the last one again, so the picture freezes rather than going
  black or the encoder stalling. Senders that negotiated H.264 share one encode instead
  (`shared_encode`).
- `latest_frame`: one `recv()` from a remote track that also drains aiortc's unbounded
  receive queue, so the newest decoded frame wins.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from dataclasses import dataclass

import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from livefuse.stream.frames import FrameStats

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


@dataclass(frozen=True)
class OutputFrame:
    i420: np.ndarray
    """(height * 3 / 2, width) uint8 planes, as `av.VideoFrame.from_ndarray` takes
    them with `format="yuv420p"`."""
    width: int
    height: int
    pts: int | None
    """The input frame's timestamp on the 90 kHz video clock, when known."""
    stats: FrameStats
    media_time: float | None = None
    """When the input frame arrived (live) or is due (a paced feed), in seconds on the
    monotonic clock the stream's audio is stamped on too: what an RTMP push syncs on."""


def to_output_frame(
    image_bgr: np.ndarray, *, pts: int | None, stats: FrameStats, media_time: float | None = None
) -> OutputFrame:
    """A processed BGR frame in the encoder's format; odd sizes lose their last row/column."""
    height, width = image_bgr.shape[:2]
    even_h, even_w = height // 2 * 2, width // 2 * 2
    if (even_h, even_w) != (height, width):
        image_bgr = image_bgr[:even_h, :even_w]
    i420 = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2YUV_I420)
    return OutputFrame(
        i420=i420, width=even_w, height=even_h, pts=pts, stats=stats, media_time=media_time
    )


@dataclass(frozen=True)
class InputStamp:
    """What a session attaches to each frame it submits (the engine hands it back)."""

    pts: int | None
    time_base: fractions.Fraction | None
    media_time: float


def pts_90k(pts: int | None, time_base: fractions.Fraction | None) -> int | None:
    if pts is None or time_base is None:
        return None
    return int(pts * time_base * VIDEO_CLOCK)


class OutputSlot:
    """The newest output frame of one session, shared by all its senders."""

    def __init__(self) -> None:
        self.frame: OutputFrame | None = None
        self.version = 0
        self.closed = False
        self._published = asyncio.Event()

    def publish(self, frame: OutputFrame) -> None:
        """Called on the event loop."""
        if self.closed:
            return
        self.frame = frame
        self.version += 1
        published, self._published = self._published, asyncio.Event()
        published.set()

    def close(self) -> None:
        self.closed = True
        self._published.set()

    async def wait_newer(self, version: int, *, within_s: float | None) -> bool:
        """True once a frame newer than `version` is there; False if none came within
        `within_s` seconds (None: wait as long as it takes)."""
        while self.version <= version and not self.closed:
            published = self._published
            try:
                async with asyncio.timeout(within_s):
                    await published.wait()
            except TimeoutError:
                return False
        return self.version > version


class OutputClock:
    """Output timestamps on the 90 kHz clock: the input's, shifted to start at 0, while
    fresh frames carry them; wall-clock time since the last one for repeats (and frames
    without a timestamp); always increasing."""

    def __init__(self) -> None:
        self._last_pts = -1
        self._last_at = 0.0
        # output pts = input pts + offset; the offset grows when repeats push time on.
        self._offset: int | None = None

    def fresh(self, input_pts: int | None) -> int:
        if input_pts is None:
            return self.repeat()
        if self._offset is None:
            self._offset = -input_pts
        pts = input_pts + self._offset
        if pts <= self._last_pts:
            # A repeat pushed time past the input's: shift the input's timeline after it.
            self._offset += self._last_pts + 1 - pts
            pts = self._last_pts + 1
        return self._stamp(pts)

    def repeat(self) -> int:
        if self._last_pts < 0:
            return self._stamp(0)
        elapsed = max(time.monotonic() - self._last_at, 1e-3)
        return self._stamp(self._last_pts + max(1, int(elapsed * VIDEO_CLOCK)))

    def _stamp(self, pts: int) -> int:
        self._last_pts = pts
        self._last_at = time.monotonic()
        return pts


class ProcessedVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, slot: OutputSlot, *, repeat_after: float = 0.1) -> None:
        super().__init__()
        self._slot = slot
        self._repeat_after = repeat_after
        self._version = 0
        self._last: OutputFrame | None = None
        self._clock = OutputClock()
        self.frames_sent = 0
        self.repeats = 0

    async def recv(self) -> av.VideoFrame:
        while True:
            if self.readyState != "live" or self._slot.closed:
                raise MediaStreamError
            # Before the first frame there is nothing to repeat: wait for it.
            timeout = None if self._last is None else self._repeat_after
            fresh = await self._slot.wait_newer(self._version, within_s=timeout)
            if self._slot.closed:
                self.stop()
                raise MediaStreamError
            if fresh and self._slot.frame is not None:
                self._version = self._slot.version
                frame = self._slot.frame
                pts = self._clock.fresh(frame.pts)
                self._last = frame
            elif self._last is not None:
                frame = self._last
                pts = self._clock.repeat()
                self.repeats += 1
            else:
                continue
            self.frames_sent += 1
            video = av.VideoFrame.from_ndarray(frame.i420, format="yuv420p")
            video.pts = pts
            video.time_base = VIDEO_TIME_BASE
            return video


async def latest_frame(track: MediaStreamTrack) -> tuple[av.VideoFrame, int]:
    """The next frame from a remote track, skipping any that queued up behind it.

    aiortc's `RemoteStreamTrack` puts every decoded frame on an unbounded asyncio queue;
    when the loop falls behind, the newest frame is the one worth processing. Returns the
    frame and how many older ones were skipped. MediaStreamError once the track ends.
    """
    received = await track.recv()
    if not isinstance(received, av.VideoFrame):
        raise MediaStreamError("not a video track")
    frame: av.VideoFrame = received
    skipped = 0
    queue: asyncio.Queue[object] | None = getattr(track, "_queue", None)
    while queue is not None and not queue.empty():
        newer = queue.get_nowait()
        if newer is None:  # the end of the track, queued behind frames
            queue.put_nowait(None)
            break
        if isinstance(newer, av.VideoFrame):
            frame = newer
            skipped += 1
    return frame, skipped
