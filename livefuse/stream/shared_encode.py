"""One H.264 encode per session, shared by every sender that negotiated H.264.

Left to itself, aiortc runs an encoder per `RTCRtpSender`: a publisher watching its own
video and three WHEP viewers would cost four libx264 encodes of the same frame. Here a
session's `SharedH264Encoder` encodes each new output frame once, on a thread of its own,
and hands the `av.Packet` to an `EncodedVideoTrack` per sender; aiortc's sender packs
pre-encoded packets itself (a `recv()` that returns a packet goes to `encoder.pack`).

- Every sender must decode what it gets: a track starts at a keyframe (its first `recv()`
  asks for one), and a track that falls behind drops its backlog and waits for the next
  keyframe, asking for one, rather than skip a frame a later one refers to.
- Keyframes are shared too: a PLI/FIR from any receiver, or a sender joining, makes the
  next frame a keyframe, at most one a `MIN_KEYFRAME_SPACING_S`; besides, one comes every
  `KEYFRAME_INTERVAL_S` so that loss recovers even without a request.
- When no new frame comes within `REPEAT_AFTER_S`, the last one is encoded again, through
  the same encoder, so every sender stays in step (a re-sent packet would break the
  reference chain) and the receivers' picture and clocks keep moving.
- The bitrate follows the lowest REMB estimate among the senders, inside
  `codecs.H264_BITRATES`; libx264 takes a new bitrate without a new keyframe.

aiortc reports PLI/FIR and REMB only to the encoder it runs itself; `EncodedVideoTrack.
listen_to` hears them for one sender instance (see there). Peers without H.264 (VP8 only)
keep `ProcessedVideoTrack` and aiortc's own encoder.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import av
from aiortc import MediaStreamTrack, RTCRtpSender
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    AnyRtcpPacket,
    RtcpPsfbPacket,
    unpack_remb_fci,
)

from livefuse.stream.codecs import H264_BITRATES, H264_PRESET
from livefuse.stream.tracks import VIDEO_TIME_BASE, OutputClock, OutputFrame, OutputSlot

log = logging.getLogger(__name__)

KEYFRAME_INTERVAL_S = 2.0
"""A keyframe at least this often, asked for or not: a viewer that lost a packet without
saying so (or whose PLI was not heard) recovers within this."""
MIN_KEYFRAME_SPACING_S = 1.0
"""At most one forced keyframe per this many seconds per session. A keyframe costs several
times a P-frame in bits, and every sender of the session gets it: one receiver on a lossy
link, asking with each PLI, would otherwise turn everyone's stream into keyframes. A
request within the window is kept and served when it ends, so no requester waits longer."""
REPEAT_AFTER_S = 0.1
"""Encode the last frame again when no new one came within this (keep-alive)."""
SENDER_QUEUE_FRAMES = 8
"""Encoded frames a sender may fall behind (about 0.27 s at 30 fps) before it drops them
and waits for the next keyframe."""
BITRATE_STEP = 0.1
"""Move the encoder's bitrate only when the target moves by more than this fraction."""

_FRAME_RATE = 30  # nominal: x264 times its rate control by the pts, on the 90 kHz clock


@dataclass(frozen=True)
class EncoderStats:
    frames: int
    """Encodes of new output frames."""
    repeats: int
    """Encodes of the last frame again (keep-alive)."""
    keyframes: int
    forced_keyframes: int
    """Keyframes asked for by a receiver or a joining sender."""
    keyframe_requests: int
    errors: int
    cpu_s: float
    """CPU time of the encodes (the encoder thread's own)."""
    bitrate: int

    def as_dict(self) -> dict[str, float]:
        return {
            "frames": self.frames,
            "repeats": self.repeats,
            "keyframes": self.keyframes,
            "forced_keyframes": self.forced_keyframes,
            "keyframe_requests": self.keyframe_requests,
            "errors": self.errors,
            "cpu_s": round(self.cpu_s, 3),
            "bitrate": self.bitrate,
        }


class _X264:
    """The libx264 context; only ever touched on the encoder thread."""

    def __init__(self) -> None:
        self.codec: av.VideoCodecContext | None = None

    def encode(
        self, frame: OutputFrame, pts: int, *, keyframe: bool, bitrate: int
    ) -> tuple[list[av.Packet], float]:
        """The frame's packets and the CPU seconds the encode took."""
        started = time.thread_time()
        codec = self.codec
        if codec is not None and (frame.width, frame.height) != (codec.width, codec.height):
            codec = None
        if codec is None:
            codec = av.CodecContext.create("libx264", "w")
            codec.width = frame.width
            codec.height = frame.height
            codec.bit_rate = bitrate
            codec.pix_fmt = "yuv420p"
            codec.framerate = fractions.Fraction(_FRAME_RATE, 1)
            codec.time_base = VIDEO_TIME_BASE
            # Level 4.0 admits 1080p30 and the bitrates of H264_BITRATES; Baseline is what
            # every WebRTC peer decodes; ultrafast keeps 720p30 inside a small CPU's budget.
            codec.options = {"level": "40", "tune": "zerolatency", "preset": H264_PRESET}
            codec.profile = "Baseline"
            # One thread: at ultrafast a 720p frame takes a few ms on one core, x264's
            # slice threads cost more CPU in all than they save, and the sessions of a
            # server already run in parallel. It also makes `cpu_s` the whole encode.
            codec.thread_count = 1
        elif codec.bit_rate != bitrate:
            # FFmpeg's libx264 wrapper reconfigures the rate control in place: no new IDR.
            codec.bit_rate = bitrate
        video = av.VideoFrame.from_ndarray(frame.i420, format="yuv420p")
        video.pts = pts
        video.time_base = VIDEO_TIME_BASE
        video.pict_type = (
            av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        )
        self.codec = None  # until the encode succeeds: a failed one starts afresh (an IDR)
        packets = list(codec.encode(video))
        self.codec = codec
        for packet in packets:
            packet.time_base = VIDEO_TIME_BASE
        return packets, time.thread_time() - started

    def close(self) -> None:
        self.codec = None


class SharedH264Encoder:
    """The session's one H.264 encode, fanned out to an `EncodedVideoTrack` per sender.

    Built and used on the event loop; the encodes run on one thread of its own, named
    `name`. `close()` ends the tracks and leaves no task or thread behind.
    """

    def __init__(self, slot: OutputSlot, *, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._slot = slot
        self._loop = loop
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._x264 = _X264()
        self._clock = OutputClock()
        self._tracks: list[EncodedVideoTrack] = []
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_keyframe = -float("inf")
        self._keyframe_asked = False
        self._estimates: dict[EncodedVideoTrack, int] = {}
        self._bitrate = H264_BITRATES[1]
        self._failing = False
        self.frames = 0
        self.repeats = 0
        self.keyframes = 0
        self.forced_keyframes = 0
        self.keyframe_requests = 0
        self.errors = 0
        self.cpu_s = 0.0

    def track(self) -> EncodedVideoTrack:
        """A track for one more H.264 sender; it joins the encode at its first `recv()`."""
        return EncodedVideoTrack(self)

    def stats(self) -> EncoderStats:
        return EncoderStats(
            frames=self.frames,
            repeats=self.repeats,
            keyframes=self.keyframes,
            forced_keyframes=self.forced_keyframes,
            keyframe_requests=self.keyframe_requests,
            errors=self.errors,
            cpu_s=self.cpu_s,
            bitrate=self._bitrate,
        )

    def request_keyframe(self) -> None:
        """Make a coming frame a keyframe (rate-limited, see `MIN_KEYFRAME_SPACING_S`)."""
        self.keyframe_requests += 1
        self._keyframe_asked = True

    async def close(self) -> None:
        """End every track, stop encoding and join the encoder thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for track in list(self._tracks):
            track.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # An encode in flight finishes first: not on the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._x264.close()

    # -- the tracks' side -----------------------------------------------------------------

    def _join(self, track: EncodedVideoTrack) -> None:
        if self._closed:
            track.stop()
            return
        self._tracks.append(track)
        self._listening.set()
        self.request_keyframe()
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name=f"{self._name}-encode")
            self._task.add_done_callback(self._run_done)

    def _run_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("encoder %s stopped", self._name, exc_info=task.exception())

    def _leave(self, track: EncodedVideoTrack) -> None:
        if track in self._tracks:
            self._tracks.remove(track)
        self._estimates.pop(track, None)
        if not self._tracks:
            self._listening.clear()

    def _estimate(self, track: EncodedVideoTrack, bitrate: int) -> None:
        if track in self._tracks:
            self._estimates[track] = bitrate

    # -- encoding -------------------------------------------------------------------------

    async def _run(self) -> None:
        version = 0
        last: OutputFrame | None = None
        while True:
            if not self._tracks:
                # Nobody listens: encode nothing, and meet the next joiner with the
                # newest frame, however old.
                await self._listening.wait()
                version, last = 0, None
            fresh = await self._slot.wait_newer(
                version, within_s=None if last is None else REPEAT_AFTER_S
            )
            if self._slot.closed:
                for track in list(self._tracks):
                    track.stop()
                return
            if not self._tracks:
                continue
            if fresh and self._slot.frame is not None:
                version = self._slot.version
                frame = self._slot.frame
                pts = self._clock.fresh(frame.pts)
            elif last is not None:
                frame, pts = last, self._clock.repeat()
            else:
                continue
            packets = await self._encode(frame, pts)
            if packets is None:
                continue
            last = frame  # the keep-alive repeats a frame that did encode
            if fresh:
                self.frames += 1
            else:
                self.repeats += 1
            for packet in packets:
                for track in list(self._tracks):
                    track._deliver(packet)

    async def _encode(self, frame: OutputFrame, pts: int) -> list[av.Packet] | None:
        now = time.monotonic()
        since = now - self._last_keyframe
        forced = self._keyframe_asked and since >= MIN_KEYFRAME_SPACING_S
        keyframe = forced or since >= KEYFRAME_INTERVAL_S
        bitrate = self._target_bitrate()
        try:
            packets, cpu_s = await self._loop.run_in_executor(
                self._executor,
                lambda: self._x264.encode(frame, pts, keyframe=keyframe, bitrate=bitrate),
            )
        except Exception as error:  # whatever fails in PyAV/x264: counted, the stream goes on
            # The viewers keep the last picture. The next encode follows the last good one,
            # or, when x264 itself failed, starts a new stream with an IDR (see _X264).
            # Logged once per run of failures, not per frame.
            self.errors += 1
            if not self._failing:
                log.error("event=encode_failed encoder=%s error=%r", self._name, error)
            self._failing = True
            return None
        if self._failing:
            log.info("event=encode_recovered encoder=%s errors=%d", self._name, self.errors)
            self._failing = False
        self.cpu_s += cpu_s
        if any(packet.is_keyframe for packet in packets):
            # Whatever made it one (asked, periodic, a new encoder), it serves every request
            # so far: the tracks get it after this.
            self.keyframes += 1
            self.forced_keyframes += forced
            self._last_keyframe = now
            self._keyframe_asked = False
        return packets

    def _target_bitrate(self) -> int:
        low, start, high = H264_BITRATES
        wanted = min(self._estimates.values(), default=start)
        wanted = max(low, min(high, wanted))
        if abs(wanted - self._bitrate) > BITRATE_STEP * self._bitrate:
            self._bitrate = wanted
        return self._bitrate


class EncodedVideoTrack(MediaStreamTrack):
    """One H.264 sender's share of the session's encode: `recv()` returns `av.Packet`s."""

    kind = "video"

    def __init__(self, encoder: SharedH264Encoder) -> None:
        super().__init__()
        self._encoder = encoder
        self._queue: deque[av.Packet] = deque()
        self._arrived = asyncio.Event()
        self._joined = False
        self._wants_keyframe = True
        self.frames_sent = 0
        self.dropped = 0
        """Frames not sent: skipped while waiting for a keyframe, or dropped behind."""

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if not self._joined:
            # Join when the sender starts pulling, not at negotiation: nothing piles up
            # while the connection is set up, and the first packet is the keyframe asked
            # for now.
            self._joined = True
            self._encoder._join(self)
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._arrived.clear()
            await self._arrived.wait()
        self.frames_sent += 1
        return self._queue.popleft()

    def stop(self) -> None:
        super().stop()
        self._encoder._leave(self)
        self._arrived.set()

    def _deliver(self, packet: av.Packet) -> None:
        if packet.is_keyframe:
            # A fresh start: whatever is still queued is older than it, and not needed.
            self.dropped += len(self._queue)
            self._queue.clear()
            self._wants_keyframe = False
        elif self._wants_keyframe:
            self.dropped += 1
            return
        elif len(self._queue) >= SENDER_QUEUE_FRAMES:
            # Behind: sending on after a gap would show a broken picture until the next
            # keyframe; drop the backlog and wait for one.
            self.dropped += len(self._queue) + 1
            self._queue.clear()
            self._wants_keyframe = True
            self._encoder.request_keyframe()
            return
        self._queue.append(packet)
        self._arrived.set()

    def listen_to(self, sender: RTCRtpSender) -> None:
        """Hear `sender`'s receiver: PLI/FIR ask the shared encoder for a keyframe, REMB
        caps the shared bitrate.

        aiortc gives both only to the encoder it runs itself: PLI/FIR set a flag read when
        it encodes a raw frame, REMB sets that encoder's `target_bitrate`; a sender of
        pre-encoded packets drops them. So this one sender instance's RTCP handler is
        wrapped: the wrapper looks at each packet, then aiortc handles it as before.
        aiortc's module and classes are left as they are.
        """
        handle = sender._handle_rtcp_packet

        async def handle_rtcp_packet(packet: AnyRtcpPacket) -> None:
            if isinstance(packet, RtcpPsfbPacket):
                self._heard(packet, sender._ssrc)
            await handle(packet)

        sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]

    def _heard(self, packet: RtcpPsfbPacket, ssrc: int) -> None:
        if packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            self._encoder.request_keyframe()
        elif packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:  # an application packet that is not REMB
                return
            if ssrc in ssrcs:
                self._encoder._estimate(self, bitrate)
