"""Pulling a broadcast feed into a session: RTMP(S), RTSP, HLS or a file over HTTP(S).

An `Ingest` demuxes and decodes the feed with PyAV (FFmpeg) on a thread of its own and
feeds the session: video frames to its engine slot (the newest wins, as for a WebRTC
publisher), audio frames to its channel's fan-out.

Clock: the feed's timestamps are mapped onto the monotonic clock at its first frame, and
frames are handed on when they are due, so a file or an HLS segment that arrives in a
burst plays at its own pace and audio and video stay together. A feed that falls behind
(a network stall) is re-anchored to now rather than rushed.

A live feed (RTMP, RTSP, SRT, an HLS playlist) that drops, or cannot be reached, is
reconnected with backoff (1 s doubling to 30 s) while the session stays up; a file that
ends ends the ingest (`state == "ended"`, `on_end` called).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import av

from livefuse.stream.engine import EngineClosed
from livefuse.stream.feeds import (
    INGEST_SCHEMES,
    Backoff,
    check_url,
    error_text,
    is_live,
    redact,
)
from livefuse.stream.session import StreamSession
from livefuse.stream.tracks import InputStamp

log = logging.getLogger(__name__)

IngestState = Literal["connecting", "live", "retrying", "ended", "closed"]
_OPEN_TIMEOUT_S = 10.0
_READ_TIMEOUT_S = 5.0
"""A feed silent this long counts as dropped (and is reconnected, when live)."""
_FILE_ATTEMPTS = 3
"""Tries at a file (not a live feed) before its session is ended."""
_BEHIND_S = 0.5
"""A frame due this long ago re-anchors the clock: the feed stalled and came back."""


_PROTOCOLS = {
    "rtmp": "rtmp,tcp",
    "rtmps": "rtmps,tcp,tls",
    "rtsp": "rtsp,tcp,udp,rtp",
    "rtsps": "rtsps,tcp,tls,udp,rtp",
    "http": "http,https,tcp,tls,crypto",
    "https": "http,https,tcp,tls,crypto",
    "srt": "srt,udp",
}


def _input_options(scheme: str) -> dict[str, str]:
    # Start fast and hold no more than FFmpeg needs: probing a live feed for the default
    # 5 s would add 5 s to everyone's delay.
    options = {"fflags": "nobuffer", "analyzeduration": "1000000", "probesize": "1000000"}
    # Only the protocols the scheme needs: an HLS playlist may name any URL, and must
    # not make FFmpeg read a local file or speak another protocol for whoever wrote it.
    options["protocol_whitelist"] = _PROTOCOLS[scheme]
    if scheme in ("rtsp", "rtsps"):
        options["rtsp_transport"] = "tcp"  # no UDP port games behind NAT or in a pod
    if scheme in ("rtmp", "rtmps"):
        options["rtmp_live"] = "live"
    return options


@dataclass(frozen=True)
class IngestStats:
    url: str
    """Redacted: no credentials, the stream key shortened."""
    state: IngestState
    live: bool
    frames: int
    audio_frames: int
    width: int
    height: int
    reconnects: int
    undecodable: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state,
            "live": self.live,
            "frames": self.frames,
            "audio_frames": self.audio_frames,
            "width": self.width,
            "height": self.height,
            "reconnects": self.reconnects,
            "undecodable_packets": self.undecodable,
            "last_error": self.last_error,
        }


class Ingest:
    """One feed into one session. `start()`; `close()` (blocking: call it off the loop
    or through `asyncio.to_thread`)."""

    def __init__(
        self,
        *,
        url: str,
        session: StreamSession,
        reconnect_max_s: float = 30.0,
        on_end: Callable[[Ingest], object] | None = None,
    ) -> None:
        self.scheme = check_url(url, schemes=INGEST_SCHEMES)
        self.url = url
        self.shown_url = redact(url)
        self.live = is_live(url)
        self._session = session
        self._backoff = Backoff(max_s=reconnect_max_s)
        self._on_end = on_end
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"livefuse-ingest-{session.id[:8]}", daemon=True
        )
        self.state: IngestState = "connecting"
        self.frames = 0
        self.audio_frames = 0
        self.size = (0, 0)
        self.reconnects = 0
        self.undecodable = 0
        """Packets skipped because they could not be decoded."""
        self.last_error: str | None = None
        # The feed's clock on ours: media_time = anchor + (frame time - feed_origin).
        self._anchor = 0.0
        self._feed_origin: float | None = None

    def start(self) -> None:
        self._thread.start()
        log.info("event=ingest_start session=%s url=%s", self._session.id, self.shown_url)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                ended = self._read_once()
            except EngineClosed:
                break
            except Exception as error:  # FFmpeg, the network, a feed it cannot take
                self.last_error = error_text(error, self.url)
                ended = False
                failures += 1
            if self._stop.is_set():
                break
            if not self.live and failures >= _FILE_ATTEMPTS:
                # A file that cannot be read is not coming back: the session ends.
                self.state = "ended"
                log.warning(
                    "event=ingest_failed session=%s url=%s error=%r",
                    self._session.id,
                    self.shown_url,
                    self.last_error,
                )
                if self._on_end is not None:
                    self._on_end(self)
                return
            if ended and not self.live:
                self.state = "ended"
                log.info("event=ingest_ended session=%s frames=%d", self._session.id, self.frames)
                if self._on_end is not None:
                    self._on_end(self)
                return
            self.state = "retrying"
            self.reconnects += 1
            delay = self._backoff.next_delay()
            log.warning(
                "event=ingest_retry session=%s url=%s in_s=%.0f error=%r",
                self._session.id,
                self.shown_url,
                delay,
                self.last_error or "the feed ended",
            )
            self._stop.wait(delay)
        self.state = "closed"

    def _read_once(self) -> bool:
        """Read the feed until it ends (True) or stop is asked (False)."""
        self.state = "connecting" if self.reconnects == 0 else "retrying"
        container = av.open(
            self.url,
            options=_input_options(self.scheme),
            timeout=(_OPEN_TIMEOUT_S, _READ_TIMEOUT_S),
        )
        try:
            if not container.streams.video:
                raise ValueError("the feed has no video stream")
            video = container.streams.video[0]
            audio = container.streams.audio[0] if container.streams.audio else None
            streams = [video, audio] if audio is not None else [video]
            # One decoding thread: a 720p frame takes a few ms, and FFmpeg's frame threads
            # would compete with the engine's workers for the cores in bursts.
            video.thread_count = 1
            self._feed_origin = None
            self.state = "live"
            log.info(
                "event=ingest_live session=%s url=%s video=%s %dx%d audio=%s",
                self._session.id,
                self.shown_url,
                video.codec_context.name,
                video.codec_context.width,
                video.codec_context.height,
                audio.codec_context.name if audio is not None else "none",
            )
            for packet in container.demux(*streams):
                if self._stop.is_set():
                    return False
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError as error:
                    # A damaged packet, or a start before the first keyframe: skip it,
                    # as a player would; the next keyframe puts the picture right.
                    self._undecodable(error)
                    continue
                for frame in frames:
                    self._hand_on(frame)
            return True
        finally:
            container.close()

    def _undecodable(self, error: Exception) -> None:
        self.undecodable += 1
        if self.undecodable == 1:
            log.info(
                "event=ingest_undecodable session=%s error=%r (counted from here on)",
                self._session.id,
                str(error),
            )

    def _hand_on(self, frame: Any) -> None:
        if frame.time is None:
            media_time = time.monotonic()
        else:
            media_time = self._due(float(frame.time))
        if isinstance(frame, av.VideoFrame):
            self.frames += 1
            self.size = (frame.width, frame.height)
            if self.frames > 30:
                self._backoff.ok()  # it works again: the next drop retries fast
            self._session.feed_video(
                frame,
                media_time=media_time,
                stamp=InputStamp(pts=frame.pts, time_base=frame.time_base, media_time=media_time),
            )
        elif isinstance(frame, av.AudioFrame):
            self.audio_frames += 1
            self._session.feed_audio(frame, media_time=media_time)

    def _due(self, feed_time: float) -> float:
        """The frame's media time; waits until then when the feed runs ahead of it."""
        now = time.monotonic()
        if self._feed_origin is None:
            self._anchor, self._feed_origin = now, feed_time
        due = self._anchor + (feed_time - self._feed_origin)
        if due < now - _BEHIND_S or due > now + 5.0:
            # Stalled and resumed, or a jump in the feed's timestamps: re-anchor to now.
            self._anchor, self._feed_origin = now, feed_time
            return now
        if due > now:
            self._stop.wait(due - now)
        return due

    def stats(self) -> IngestStats:
        return IngestStats(
            url=self.shown_url,
            state=self.state,
            live=self.live,
            frames=self.frames,
            audio_frames=self.audio_frames,
            width=self.size[0],
            height=self.size[1],
            reconnects=self.reconnects,
            undecodable=self.undecodable,
            last_error=self.last_error,
        )

    def close(self) -> None:
        """Stop reading; returns once the thread is gone (at most a read timeout)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(_READ_TIMEOUT_S + 2)
        if self.state != "ended":
            self.state = "closed"
