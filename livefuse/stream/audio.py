"""A stream's audio, passed through untouched in content, fanned out to every listener.

The publisher's audio (an aiortc track, or the frames an FFmpeg ingest decodes) goes in
once; each WHEP viewer gets a `FanoutAudioTrack` and each RTMP push a listener callback.
Everything that goes out is in one format, 48 kHz stereo s16 (what aiortc's Opus
encoder takes), converted once on the way in, whatever the publisher sent.

A named stream's audio outlives its publishers (DESIGN.md, named streams): when one
publisher leaves and another arrives with a different clock and format, the fan-out
converts the newcomer the same way and each track keeps its own timestamps increasing,
stepping forward over the silence between them, so a viewer's decoder never sees time go
backwards.

Each frame carries its `media_time` (seconds on the monotonic clock that the session's
video frames are stamped on too): the RTMP push muxes audio and swapped video on it, which
keeps them in sync however long the video spent in the engine.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections.abc import Callable

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)

AUDIO_RATE = 48_000
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)
_TRACK_QUEUE = 50
"""Frames (about a second at 20 ms each) a viewer's track may fall behind before its
oldest are dropped: a stalled sender never grows a backlog."""
_GAP_S = 0.1
"""A pause in the audio longer than this moves a track's timestamps on by the pause."""

AudioListener = Callable[[av.AudioFrame, float], None]
"""Called on the event loop with each frame (48 kHz stereo s16) and its media time."""


class AudioFanout:
    """One stream's audio in, any number of tracks and listeners out. Used on the loop."""

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._input_format: tuple[str, str, int] | None = None
        self._tracks: set[FanoutAudioTrack] = set()
        self._listeners: list[AudioListener] = []
        self.frames_in = 0
        self.closed = False

    @property
    def has_audio(self) -> bool:
        """Whether any audio has come in yet (a viewer's offer gets an audio track then)."""
        return self.frames_in > 0

    def push(self, frame: av.AudioFrame, *, media_time: float) -> None:
        """One frame of the publisher's audio, in whatever format it came."""
        if self.closed:
            return
        for converted in self._convert(frame):
            self.frames_in += 1
            for track in list(self._tracks):
                track.deliver(converted)
            for listener in list(self._listeners):
                listener(converted, media_time)
            # Later converted frames of the same input follow the first without a gap.
            media_time += converted.samples / AUDIO_RATE

    def _convert(self, frame: av.AudioFrame) -> list[av.AudioFrame]:
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._resampler is None or shape != self._input_format:
            # A new publisher (or a feed that changed format): a resampler of its own.
            self._resampler = av.AudioResampler(format="s16", layout="stereo", rate=AUDIO_RATE)
            self._input_format = shape
        # The resampler follows the input's pts; ours are set per track on the way out.
        frame.pts = None
        try:
            return list(self._resampler.resample(frame))
        except (ValueError, av.error.FFmpegError) as error:
            log.warning("event=audio_frame_unreadable error=%r", str(error))
            self._resampler = None
            return []

    def track(self) -> FanoutAudioTrack:
        """A new track of this audio for one more sender."""
        track = FanoutAudioTrack(self)
        self._tracks.add(track)
        return track

    def listen(self, listener: AudioListener) -> Callable[[], None]:
        """Call `listener` with every frame from now on; returns how to stop."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    def _leave(self, track: FanoutAudioTrack) -> None:
        self._tracks.discard(track)

    def close(self) -> None:
        self.closed = True
        for track in list(self._tracks):
            track.stop()
        self._tracks.clear()
        self._listeners.clear()


class FanoutAudioTrack(MediaStreamTrack):
    """One sender's view of a stream's audio, with timestamps of its own that only
    increase (across publisher restarts, and over pauses by the pause's length)."""

    kind = "audio"

    def __init__(self, fanout: AudioFanout) -> None:
        super().__init__()
        self._fanout = fanout
        self._queue: asyncio.Queue[av.AudioFrame] = asyncio.Queue(maxsize=_TRACK_QUEUE)
        self._next_pts = 0
        self._last_at: float | None = None
        self.dropped = 0

    def deliver(self, frame: av.AudioFrame) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(frame)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._last_at is not None:
            pause = now - self._last_at - frame.samples / AUDIO_RATE
            if pause > _GAP_S:
                self._next_pts += int(pause * AUDIO_RATE)
        self._last_at = now
        out = av.AudioFrame.from_ndarray(frame.to_ndarray(), format="s16", layout="stereo")
        out.sample_rate = AUDIO_RATE
        out.pts = self._next_pts
        out.time_base = AUDIO_TIME_BASE
        self._next_pts += frame.samples
        return out

    def stop(self) -> None:
        super().stop()
        self._fanout._leave(self)
        # Wake a recv() waiting on an empty queue so the sender sees the end.
        if self._queue.empty():
            self._queue.put_nowait(av.AudioFrame(format="s16", layout="stereo", samples=1))
