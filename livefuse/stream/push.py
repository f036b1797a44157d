"""Pushing a stream's swapped video and its audio on to an RTMP(S) ingest.

A `PushOutput` reads a `Channel` (the processed frames and the audio fan-out) and writes
FLV over RTMP with PyAV: H.264 (libx264, a keyframe every `keyframe_interval_s`, the
bitrate set per output) and AAC. The encoding and the network run on a thread of its own
behind a small bounded hand-off, so a slow or vanished ingest drops the push's frames
(counted), never the session's: the session and its viewers do not wait for it.

A/V sync: every video frame and audio frame carries its `media_time` (stream/audio.py);
the push stamps both on that one clock from the moment it connects, so the swapped video,
which reaches the push later than its audio by the time it spent in the engine, is muxed
beside the audio it was captured with (FFmpeg's interleaving holds the audio back until
the video catches up). Audio that goes missing (a publisher without any, or between two
publishers of a named stream) is filled with silence, and the last picture is repeated
while no new frame comes, so the ingest sees one continuous stream.

When the ingest goes away the push reconnects with backoff (1 s doubling to 30 s), and
starts a fresh FLV stream from the next frame, with a keyframe.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import multiprocessing
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import av
import numpy as np

from livefuse.stream.audio import AUDIO_RATE
from livefuse.stream.channel import Channel
from livefuse.stream.codecs import H264_PRESET
from livefuse.stream.feeds import PUSH_SCHEMES, Backoff, check_url, error_text, redact
from livefuse.stream.tracks import OutputFrame

log = logging.getLogger(__name__)

PushState = Literal["connecting", "live", "retrying", "closed"]
_MS = fractions.Fraction(1, 1000)
_AUDIO_TB = fractions.Fraction(1, AUDIO_RATE)
_AAC_FRAME = 1024
_HANDOFF_LIMIT = 90
"""Items (video frames and 20 ms audio frames) the writer may fall behind by before the
oldest are dropped: about a second of a 30 fps stream with its audio."""
_REPEAT_EVERY_S = 0.2
"""While no new frame comes (the publisher paused or left), the last one goes out again
this often: the ingest keeps a live stream, the viewers a frozen picture."""
_AUDIO_SLACK_S = 0.1
"""Audio arriving later than its place by more than this gets silence in between;
earlier by more than twice this is dropped (it would play before its picture). Wide
enough that a WebRTC publisher's arrival jitter does not insert silence."""
_SILENCE_AFTER_S = 0.5
"""With no audio for this long behind the video, silence is written up to the video."""
_SLOTS = 4
"""Shared frame slots between a push and its child: a frame waits in one until the child
has copied it out; with all four taken the child is behind and a frame is dropped."""
_STUCK_AFTER_S = 10.0
"""A child that reports nothing for this long is stuck (in a write that holds its lock):
it is killed and a new one connects."""
_OPEN_TIMEOUT_S = 10.0
_IO_TIMEOUT_S = 5.0
"""A network write blocked this long fails, and the push reconnects."""


@dataclass(frozen=True)
class PushStats:
    id: str
    url: str
    """Redacted: no credentials, the stream key shortened."""
    state: PushState
    frames_sent: int
    """Video frames encoded and written, repeats included."""
    repeats: int
    dropped: int
    """Frames and audio chunks the writer fell too far behind to send."""
    audio_seconds: float
    """Audio written, silence fill included."""
    silence_seconds: float
    bytes_sent: int
    bitrate_kbps: float
    """Over the last couple of seconds."""
    reconnects: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "state": self.state,
            "frames_sent": self.frames_sent,
            "repeated_frames": self.repeats,
            "dropped": self.dropped,
            "audio_seconds": round(self.audio_seconds, 2),
            "silence_seconds": round(self.silence_seconds, 2),
            "bytes_sent": self.bytes_sent,
            "bitrate_kbps": round(self.bitrate_kbps, 1),
            "reconnects": self.reconnects,
            "last_error": self.last_error,
        }


class _Handoff:
    """Loop -> writer thread: a bounded deque that drops its oldest item when full."""

    def __init__(self, limit: int) -> None:
        self._items: deque[tuple[str, Any, float]] = deque()
        self._limit = limit
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, kind: str, item: Any, media_time: float) -> None:
        with self._cond:
            if len(self._items) >= self._limit:
                self._items.popleft()
                self.dropped += 1
            self._items.append((kind, item, media_time))
            self._cond.notify()

    def get(self, timeout: float) -> tuple[str, Any, float] | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _FlvWriter:
    """One connection's FLV: the container, its two encoders and their clocks."""

    def __init__(
        self, url: str, *, width: int, height: int, bitrate_kbps: int, origin: float
    ) -> None:
        # The timeouts interrupt a connect or a write that blocks (an ingest that went
        # away without closing the connection): the push then reconnects.
        self.container = av.open(url, "w", format="flv", timeout=(_OPEN_TIMEOUT_S, _IO_TIMEOUT_S))
        try:
            video = self.container.add_stream("libx264", rate=30)
            video.width, video.height = width, height
            video.pix_fmt = "yuv420p"
            video.time_base = _MS
            # The encoder's own clock too, or it rounds every timestamp to 1/30 s.
            video.codec_context.time_base = _MS
            video.bit_rate = bitrate_kbps * 1000
            video.options = {
                "preset": H264_PRESET,
                # One thread, as for the ingest's decoder: the engine needs the cores.
                "threads": "1",
                "tune": "zerolatency",
                # Keyframes are forced by time (below); none in between from scene cuts.
                "x264-params": "scenecut=0:keyint=infinite:repeat-headers=1",
                "forced-idr": "1",
                "maxrate": f"{bitrate_kbps}k",
                "bufsize": f"{bitrate_kbps * 2}k",
            }
            audio = self.container.add_stream("aac", rate=AUDIO_RATE)
            audio.layout = "stereo"
            audio.bit_rate = 128_000
        except BaseException:
            self.container.close()
            raise
        self.video, self.audio = video, audio
        self.size = (width, height)
        self.origin = origin
        """The media time that is 0 on this connection's clock."""
        self.last_video_ms = -1
        self.next_keyframe = origin
        self.audio_samples = 0
        self._to_aac = av.AudioResampler(
            format="fltp", layout="stereo", rate=AUDIO_RATE, frame_size=_AAC_FRAME
        )

    def write_video(self, frame: OutputFrame, media_time: float, keyframe_every_s: float) -> int:
        """Encode and mux one frame at `media_time`; the bytes written (0: skipped,
        its time not after the previous frame's)."""
        ms = round((media_time - self.origin) * 1000)
        if ms <= self.last_video_ms:
            return 0
        self.last_video_ms = ms
        video = av.VideoFrame.from_ndarray(frame.i420, format="yuv420p")
        video.pts = ms
        video.time_base = _MS
        if media_time >= self.next_keyframe:
            video.pict_type = av.video.frame.PictureType.I
            # On a fixed grid from the first frame: a late frame makes one keyframe late,
            # not every one after it.
            while self.next_keyframe <= media_time:
                self.next_keyframe += keyframe_every_s
        return self._mux(self.video.encode(video))

    def write_audio(self, frame: av.AudioFrame) -> int:
        frame.pts = None
        written = 0
        for chunk in self._to_aac.resample(frame):
            chunk.pts = self.audio_samples
            chunk.time_base = _AUDIO_TB
            self.audio_samples += chunk.samples
            written += self._mux(self.audio.encode(chunk))
        return written

    def write_silence(self, samples: int) -> int:
        silence = av.AudioFrame.from_ndarray(
            np.zeros((1, samples * 2), np.int16), format="s16", layout="stereo"
        )
        silence.sample_rate = AUDIO_RATE
        return self.write_audio(silence)

    def audio_time(self) -> float:
        """The media time the audio written so far reaches."""
        return self.origin + self.audio_samples / AUDIO_RATE

    def _mux(self, packets: list[av.Packet]) -> int:
        size = 0
        for packet in packets:
            size += packet.size
            self.container.mux(packet)
        return size

    def close(self) -> None:
        try:
            for stream in (self.video, self.audio):
                self._mux(stream.encode(None))
        except (av.error.FFmpegError, OSError, ValueError):
            pass  # the connection is gone: nothing more to flush
        finally:
            try:
                self.container.close()
            except (av.error.FFmpegError, OSError):
                pass


class _Writer:
    """The FLV connection's side, in the push's child process: connect, write what the
    hand-off brings (repeats and silence where nothing comes), reconnect with backoff."""

    def __init__(
        self,
        *,
        url: str,
        shown_url: str,
        handoff: _Handoff,
        stop: threading.Event,
        bitrate_kbps: int,
        keyframe_interval_s: float,
        reconnect_max_s: float,
    ) -> None:
        self.url = url
        self.shown_url = shown_url
        self._handoff = handoff
        self._stop = stop
        self._bitrate_kbps = bitrate_kbps
        self._keyframe_interval_s = keyframe_interval_s
        self._backoff = Backoff(max_s=reconnect_max_s)
        self.state: PushState = "connecting"
        self.frames_sent = 0
        self.repeats = 0
        self.bytes_sent = 0
        self.audio_seconds = 0.0
        self.silence_seconds = 0.0
        self.reconnects = 0
        self.last_error: str | None = None
        self._sent_log: deque[tuple[float, int]] = deque(maxlen=256)

    def counters(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = [size for at, size in list(self._sent_log) if now - at <= 2.0]
        return {
            "state": self.state,
            "frames_sent": self.frames_sent,
            "repeats": self.repeats,
            "bytes_sent": self.bytes_sent,
            "audio_seconds": self.audio_seconds,
            "silence_seconds": self.silence_seconds,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "bitrate_kbps": sum(recent) * 8 / 2.0 / 1000,
            "dropped": self._handoff.dropped,
        }

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._connect_and_write()
            except Exception as error:  # FFmpeg, the network, a frame it cannot take
                self.last_error = error_text(error, self.url)
                if self._stop.is_set():
                    break
                self.state = "retrying"
                self.reconnects += 1
                delay = self._backoff.next_delay()
                log.warning(
                    "event=push_retry url=%s in_s=%.0f error=%r",
                    self.shown_url,
                    delay,
                    self.last_error,
                )
                self._handoff.clear()
                self._stop.wait(delay)
        self.state = "closed"

    def _connect_and_write(self) -> None:
        self.state = "connecting" if self.reconnects == 0 else "retrying"
        first = self._first_video()
        if first is None:
            return
        frame, media_time = first
        writer = _FlvWriter(
            self.url,
            width=frame.width,
            height=frame.height,
            bitrate_kbps=self._bitrate_kbps,
            origin=media_time,
        )
        try:
            self.state = "live"
            live_since = time.monotonic()
            log.info("event=push_live url=%s", self.shown_url)
            self._write_video(writer, frame, media_time, repeat=False)
            last_frame, last_media, last_wall = frame, media_time, time.monotonic()
            while not self._stop.is_set():
                if time.monotonic() - live_since > 10:
                    self._backoff.ok()
                item = self._handoff.get(timeout=_REPEAT_EVERY_S)
                if item is not None and item[0] == "audio":
                    self._write_audio(writer, item[1], item[2])
                elif item is not None:
                    _, frame, media_time = item
                    if (frame.width, frame.height) != writer.size:
                        # FLV cannot change size mid-stream: a new stream at the new size.
                        log.info("event=push_resize url=%s", self.shown_url)
                        self._handoff.put("video", frame, media_time)
                        return
                    self._write_video(writer, frame, media_time, repeat=False)
                    last_frame, last_media, last_wall = frame, media_time, time.monotonic()
                now = time.monotonic()
                if now - last_wall >= _REPEAT_EVERY_S:
                    # No new frame for a while: the last picture again, its time moved on
                    # by the wall clock (fresh frames, which come later, follow it).
                    last_media += now - last_wall
                    last_wall = now
                    self._write_video(writer, last_frame, last_media, repeat=True)
        finally:
            writer.close()

    def _first_video(self) -> tuple[OutputFrame, float] | None:
        """Wait for a frame to start a connection with (audio before it is not kept)."""
        while not self._stop.is_set():
            item = self._handoff.get(timeout=0.5)
            if item is not None and item[0] == "video":
                return item[1], item[2]
        return None

    def _write_video(
        self, writer: _FlvWriter, frame: OutputFrame, media_time: float, *, repeat: bool
    ) -> None:
        # No audio at all for a while (none sent, or between publishers): silence up to
        # just behind the picture, so the muxer never waits on audio that is not coming.
        behind = media_time - writer.audio_time()
        if behind > _SILENCE_AFTER_S:
            samples = int((behind - _AUDIO_SLACK_S) * AUDIO_RATE)
            self._count(writer.write_silence(samples))
            self.silence_seconds += samples / AUDIO_RATE
            self.audio_seconds += samples / AUDIO_RATE
        written = writer.write_video(frame, media_time, self._keyframe_interval_s)
        if written or repeat:
            self.frames_sent += 1
            self.repeats += int(repeat)
        self._count(written)

    def _write_audio(self, writer: _FlvWriter, frame: av.AudioFrame, media_time: float) -> None:
        gap = media_time - writer.audio_time()
        if gap < -2 * _AUDIO_SLACK_S:
            return  # its place is already filled (with silence): it would play early
        if gap > _AUDIO_SLACK_S:
            samples = int(gap * AUDIO_RATE)
            self._count(writer.write_silence(samples))
            self.silence_seconds += samples / AUDIO_RATE
            self.audio_seconds += samples / AUDIO_RATE
        self._count(writer.write_audio(frame))
        self.audio_seconds += frame.samples / AUDIO_RATE

    def _count(self, size: int) -> None:
        if size:
            self.bytes_sent += size
            self._sent_log.append((time.monotonic(), size))


# -- the child process ----------------------------------------------------------------------


@dataclass(frozen=True)
class _ChildFrame:
    """What the writer needs of a frame (an `OutputFrame` without its stats)."""

    i420: np.ndarray
    width: int
    height: int


def _child_main(
    url: str,
    shown_url: str,
    conn: Connection,
    shm_name: str,
    width: int,
    height: int,
    options: dict[str, Any],
) -> None:
    """The push's child process: frames from the parent's shared slots and audio through
    `conn`; counters back every half second. Ends on "stop" or when the parent goes."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    shm = shared_memory.SharedMemory(name=shm_name)
    slots = shm.buf
    assert slots is not None
    frame_bytes = width * height * 3 // 2
    stop = threading.Event()
    handoff = _Handoff(_HANDOFF_LIMIT)
    writer = _Writer(url=url, shown_url=shown_url, handoff=handoff, stop=stop, **options)
    sending = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with sending:
            conn.send(message)

    def receive() -> None:
        try:
            while not stop.is_set():
                message = conn.recv()
                if message[0] == "video":
                    _, slot, media_time = message
                    start = slot * frame_bytes
                    # Copied out (bytes) before the slot is handed back for the next frame.
                    i420 = np.frombuffer(bytes(slots[start : start + frame_bytes]), np.uint8)
                    frame = _ChildFrame(i420.reshape(height * 3 // 2, width), width, height)
                    send(("free", slot))
                    handoff.put("video", frame, media_time)
                elif message[0] == "audio":
                    _, pcm, media_time = message
                    samples = np.frombuffer(pcm, np.int16).reshape(1, -1)
                    audio = av.AudioFrame.from_ndarray(samples, format="s16", layout="stereo")
                    audio.sample_rate = AUDIO_RATE
                    handoff.put("audio", audio, media_time)
                else:
                    break
        except (EOFError, OSError):
            pass  # the parent has gone
        stop.set()
        handoff.wake()

    def report() -> None:
        while not stop.wait(0.5):
            try:
                send(("stats", writer.counters()))
            except (OSError, ValueError):
                stop.set()

    threads = [
        threading.Thread(target=receive, name="push-receive", daemon=True),
        threading.Thread(target=report, name="push-report", daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        writer.run()
    finally:
        stop.set()
        try:
            send(("stats", writer.counters()))
        except (OSError, ValueError):
            pass
        slots.release()
        shm.close()


# -- the parent's side ---------------------------------------------------------------------


class PushOutput:
    """One RTMP(S) push of a channel. `start()` on the event loop; `close()` ends it.

    The connection lives in a child process (`_child_main`): PyAV holds Python's global
    lock while it connects and writes an output, so an ingest that accepts the TCP
    connection and then stalls would otherwise freeze every session of this process.
    Frames go to the child through shared memory slots (a 720p frame is 1.4 MB), audio
    and control through a pipe; a child that says nothing for `_STUCK_AFTER_S` is killed
    and started again.
    """

    def __init__(
        self,
        *,
        output_id: str,
        url: str,
        channel: Channel,
        loop: asyncio.AbstractEventLoop,
        bitrate_kbps: int = 3000,
        keyframe_interval_s: float = 2.0,
        reconnect_max_s: float = 30.0,
    ) -> None:
        check_url(url, schemes=PUSH_SCHEMES)
        self.id = output_id
        self.url = url
        self.shown_url = redact(url)
        self._channel = channel
        self._loop = loop
        self._options = {
            "bitrate_kbps": bitrate_kbps,
            "keyframe_interval_s": keyframe_interval_s,
            "reconnect_max_s": reconnect_max_s,
        }
        self._backoff = Backoff(max_s=reconnect_max_s)
        self._handoff = _Handoff(_HANDOFF_LIMIT)
        self._stop = threading.Event()
        self._pump = threading.Thread(
            target=self._run, name=f"livefuse-push-{output_id[:8]}", daemon=True
        )
        self._feed: asyncio.Task[None] | None = None
        self._stop_audio: Any = None
        self._child: BaseProcess | None = None
        self._counters: dict[str, Any] = {}
        self._restarts = 0
        self._no_slot = 0
        self._heard = 0.0
        self._stuck = False
        self.last_error: str | None = None

    def start(self) -> None:
        self._stop_audio = self._channel.audio.listen(self._on_audio)
        self._feed = self._loop.create_task(self._feed_video(), name=f"livefuse-push-{self.id[:8]}")
        self._pump.start()
        log.info("event=push_start output=%s url=%s", self.id, self.shown_url)

    def _on_audio(self, frame: av.AudioFrame, media_time: float) -> None:
        self._handoff.put("audio", frame, media_time)

    async def _feed_video(self) -> None:
        slot = self._channel.output
        version = slot.version
        while not slot.closed:
            if not await slot.wait_newer(version, within_s=None):
                break
            version = slot.version
            frame = slot.frame
            if frame is not None:
                media_time = frame.media_time if frame.media_time is not None else time.monotonic()
                self._handoff.put("video", frame, media_time)

    # -- the pump: hand-off -> child, supervised -------------------------------------------

    def _run(self) -> None:
        pending: tuple[str, Any, float] | None = None
        while not self._stop.is_set():
            if pending is None:
                pending = self._handoff.get(timeout=0.5)
                if pending is None or pending[0] != "video":
                    pending = None  # audio before the first picture is not kept
                    continue
            frame: OutputFrame = pending[1]
            try:
                pending = self._serve_child(frame.width, frame.height, first=pending)
            except Exception as error:  # the child died, hung or could not start
                self.last_error = error_text(error, self.url)
                pending = None
            self._end_child()
            if self._stop.is_set():
                break
            self._restarts += 1
            delay = self._backoff.next_delay()
            log.warning(
                "event=push_restart output=%s in_s=%.0f error=%r", self.id, delay, self.last_error
            )
            self._stop.wait(delay)

    def _serve_child(
        self, width: int, height: int, *, first: tuple[str, Any, float]
    ) -> tuple[str, Any, float] | None:
        """Run one child for frames of this size; returns a frame of another size (the
        next child's first) or None when stopped. Raises when the child fails."""
        frame_bytes = width * height * 3 // 2
        shm = shared_memory.SharedMemory(create=True, size=frame_bytes * _SLOTS)
        slots = shm.buf
        assert slots is not None
        parent_end, child_end = multiprocessing.get_context("spawn").Pipe()
        try:
            child = multiprocessing.get_context("spawn").Process(
                target=_child_main,
                args=(self.url, self.shown_url, child_end, shm.name, width, height, self._options),
                name=f"livefuse-push-{self.id[:8]}",
                daemon=True,
            )
            child.start()
            self._child = child
            child_end.close()
            free = set(range(_SLOTS))
            self._heard = time.monotonic()
            threading.Thread(
                target=self._watch, args=(child,), name=f"{self._pump.name}-watch", daemon=True
            ).start()
            item: tuple[str, Any, float] | None = first
            while not self._stop.is_set():
                while parent_end.poll():
                    message = parent_end.recv()
                    self._heard = time.monotonic()
                    if message[0] == "free":
                        free.add(message[1])
                    elif message[0] == "stats":
                        self._counters = message[1]
                        if self._counters.get("state") == "live":
                            self._backoff.ok()
                if not child.is_alive():
                    if self._stuck:
                        raise TimeoutError(
                            f"the push process was silent for {_STUCK_AFTER_S:.0f} s"
                        )
                    raise RuntimeError(f"the push process ended (exit code {child.exitcode})")
                if item is None:
                    item = self._handoff.get(timeout=0.1)
                    continue
                kind, payload, media_time = item
                item = None
                if kind == "audio":
                    pcm = payload.to_ndarray().astype(np.int16, copy=False).tobytes()
                    parent_end.send(("audio", pcm, media_time))
                    continue
                if (payload.width, payload.height) != (width, height):
                    return (kind, payload, media_time)  # FLV cannot change size: a new child
                if not free:
                    self._no_slot += 1  # the child is behind: this frame is dropped
                    continue
                index = free.pop()
                start = index * frame_bytes
                slots[start : start + frame_bytes] = payload.i420.reshape(-1).tobytes()
                parent_end.send(("video", index, media_time))
            return None
        finally:
            try:
                parent_end.send(("stop",))
            except (OSError, ValueError):
                pass
            parent_end.close()
            slots.release()
            shm.close()
            shm.unlink()

    def _watch(self, child: BaseProcess) -> None:
        """Kill the child when it has been silent too long (stuck in a write, holding its
        lock), or when asked to stop and it has not gone within a few seconds: either
        way a send blocked on its full pipe then fails, and the pump goes on."""
        self._stuck = False
        stop_seen: float | None = None
        while child.is_alive():
            now = time.monotonic()
            if self._stop.is_set() and stop_seen is None:
                stop_seen = now
            if now - self._heard > _STUCK_AFTER_S or (stop_seen and now - stop_seen > 3):
                self._stuck = not self._stop.is_set()
                child.kill()
                return
            time.sleep(0.25)

    def _end_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        child.join(3)
        if child.is_alive():
            child.kill()
            child.join(2)

    # -- state ----------------------------------------------------------------------------

    def stats(self) -> PushStats:
        counters = self._counters
        state: PushState = counters.get("state", "connecting")
        if self._stop.is_set():
            state = "closed"
        elif self._child is None and self._restarts:
            state = "retrying"
        return PushStats(
            id=self.id,
            url=self.shown_url,
            state=state,
            frames_sent=int(counters.get("frames_sent", 0)),
            repeats=int(counters.get("repeats", 0)),
            dropped=self._handoff.dropped + self._no_slot + int(counters.get("dropped", 0)),
            audio_seconds=float(counters.get("audio_seconds", 0.0)),
            silence_seconds=float(counters.get("silence_seconds", 0.0)),
            bytes_sent=int(counters.get("bytes_sent", 0)),
            bitrate_kbps=float(counters.get("bitrate_kbps", 0.0)),
            reconnects=int(counters.get("reconnects", 0)) + self._restarts,
            last_error=counters.get("last_error") or self.last_error,
        )

    async def close(self) -> None:
        """Stop pushing (the FLV is finished when the ingest is still there). Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._handoff.wake()
        if self._stop_audio is not None:
            self._stop_audio()
        if self._feed is not None:
            self._feed.cancel()
            await asyncio.gather(self._feed, return_exceptions=True)
        if self._pump.is_alive():
            await asyncio.to_thread(self._pump.join, 10)
        log.info("event=push_end output=%s frames=%d", self.id, self.stats().frames_sent)
