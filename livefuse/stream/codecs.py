"""Video codec settings for live 720p30 on a small CPU.

aiortc's defaults suit a 640x480 demo: its H.264 encoder runs libx264's default `medium`
preset (more than a 720p frame's budget on one core of a small machine) and caps bitrates
at 3 Mbit/s (H.264) and 1.5 Mbit/s (VP8), which smears 720p faces.

- H.264 does not go through aiortc's encoder at all: a session encodes once, with
  `H264_PRESET` inside `H264_BITRATES`, for all its H.264 senders
  (`livefuse.stream.shared_encode`), which pack the packets.
- VP8 (libvpx) costs more per frame than ultrafast x264 at the same bitrate, so H.264 goes
  first in every answer (`prefer_h264`) and VP8 is what a peer without H.264 gets, from
  aiortc's own encoder, one per sender. `install()` raises that encoder's bitrate caps; the
  receiver's bandwidth estimate (REMB) still steers the rate inside them.
- A publisher's video receiver is watched (`watch_receiver`): aiortc asks a sender for a
  keyframe (PLI) after every frame it cannot decode and logs a warning for each, which a
  publisher that starts between keyframes (OBS's default keyframe interval) turns into
  some 60 PLIs a second and a log line per frame until its next keyframe. The watch
  sends one PLI a second per sender at most, logs the first decoding failure of a
  session once and counts the rest (`ReceiverWatch.as_dict`, in the session's stats).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable

from aiortc import MediaStreamTrack, RTCRtpReceiver, RTCRtpTransceiver
from aiortc.codecs import vpx
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

log = logging.getLogger(__name__)

H264_PRESET = "ultrafast"
H264_BITRATES = (800_000, 3_000_000, 8_000_000)  # min, start, max (bit/s)
VP8_BITRATES = (400_000, 2_000_000, 5_000_000)


def install() -> None:
    """Raise aiortc's VP8 bitrate caps for every VP8 sender in this process. Idempotent.

    aiortc reads them from module globals (`aiortc.codecs.vpx`) and offers no per-sender
    setting, so they are set there; this is the one patch of aiortc left, and only the
    VP8 fallback needs it.
    """
    vpx.MIN_BITRATE, vpx.DEFAULT_BITRATE, vpx.MAX_BITRATE = VP8_BITRATES


def prefer_h264(transceiver: RTCRtpTransceiver) -> bool:
    """Put H.264 first among the codecs negotiated from a remote offer (call it between
    `setRemoteDescription` and `createAnswer`): the answer lists them in this order and
    both ends send with the first. True when that is H.264 (the offer had it).

    `setCodecPreferences` cannot do this for an answerer: aiortc creates the transceiver
    inside `setRemoteDescription` and matches preferences by exact fmtp parameters, which
    a browser's H.264 offer never shares with aiortc's capability list.
    """
    negotiated: list[RTCRtpCodecParameters] = transceiver._codecs
    media = [c for c in negotiated if c.mimeType.lower() != "video/rtx"]
    ordered = sorted(media, key=lambda c: c.mimeType.lower() != "video/h264")
    by_apt = {c.parameters.get("apt"): c for c in negotiated if c.mimeType.lower() == "video/rtx"}
    result: list[RTCRtpCodecParameters] = []
    for codec in ordered:
        result.append(codec)
        if codec.payloadType in by_apt:
            result.append(by_apt[codec.payloadType])
    transceiver._codecs = result
    return bool(result) and result[0].mimeType.lower() == "video/h264"


# Sent to the peer in our answer's fmtp lines, in kbit/s. aiortc's receive-side estimate
# (REMB) reads a busy event loop's late packet reads as congestion and can drive a
# browser's sender down to 30 kbit/s, at which 720p is a smear of blocks; a browser honours
# these floors for its own sender. Toward aiortc peers (the bench, the tests) the shared
# H.264 encode follows REMB no lower than `H264_BITRATES[0]`.
BROWSER_BITRATE_KBPS = (1_500, 3_000, 8_000)  # min, start, max
_BITRATE_CODECS = ("h264", "vp8")


def with_bitrate_hints(sdp: str) -> str:
    """The answer with x-google-{min,start,max}-bitrate on its video H.264/VP8 formats."""
    low, start, high = BROWSER_BITRATE_KBPS
    hint = f"x-google-min-bitrate={low};x-google-start-bitrate={start};x-google-max-bitrate={high}"
    lines = sdp.split("\r\n")
    result: list[str] = []
    in_video = False
    hinted: set[str] = set()
    pending: list[str] = []  # payload types of this section still without an fmtp line

    def flush() -> None:
        result.extend(f"a=fmtp:{pt} {hint}" for pt in pending if pt not in hinted)
        pending.clear()

    for line in lines:
        if line.startswith("m="):
            if in_video:
                flush()
            in_video = line.startswith("m=video")
            hinted.clear()
        elif in_video and line.startswith("a=rtpmap:"):
            payload, _, codec = line[len("a=rtpmap:") :].partition(" ")
            if codec.split("/")[0].lower() in _BITRATE_CODECS:
                pending.append(payload)
        elif in_video and line.startswith("a=fmtp:"):
            payload, _, params = line[len("a=fmtp:") :].partition(" ")
            if payload in pending:
                line = f"a=fmtp:{payload} {params};{hint}" if params else f"a=fmtp:{payload} {hint}"
                hinted.add(payload)
        result.append(line)
    if in_video:
        # The section's last line may be the empty string after the final CRLF.
        tail = result.pop() if result and result[-1] == "" else None
        flush()
        if tail is not None:
            result.append(tail)
    return "\r\n".join(result)


# A receiver asks one sender for a keyframe (PLI) at most this often. A keyframe takes
# a round trip and several frames' worth of bits to arrive; asking again before then only
# makes an encoder that honours every PLI send keyframe after keyframe (and a congested
# link worse), and one that ignores them (OBS) does not care how often it is asked.
PLI_INTERVAL_S = 1.0
# aiortc's decoder thread logs this (logger `aiortc.rtcrtpreceiver`) on every frame it
# cannot decode.
_DECODE_FAILURE = "failed to decode"


class ReceiverWatch:
    """One video receiver's requests for keyframes and the frames it could not decode.

    Made by `watch_receiver`, which hands each of the receiver's PLIs through `_pli` and
    each of its decoding failures to `_decode_failed`. Counters are read by any thread.
    """

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        *,
        interval_s: float = PLI_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.receiver = receiver
        self.pli_requested = 0
        """Keyframes aiortc asked the sender for: after each undecodable frame or loss."""
        self.pli_sent = 0
        """Of those, the PLIs sent: one a second per sender at most."""
        self.undecodable_frames = 0
        self._interval_s = interval_s
        self._clock = clock
        self._last_sent: dict[int, float] = {}
        self._lock = threading.Lock()  # failures are counted on aiortc's decoder thread

    @property
    def name(self) -> str:
        """Whose video it is, for the log: what `name_track` called its track."""
        return _DECODE_FAILURES.name_of(self.receiver.track)

    def _pli(self, media_ssrc: int) -> bool:
        """Whether a PLI to `media_ssrc` may go now; counts it either way."""
        now = self._clock()
        with self._lock:
            self.pli_requested += 1
            last = self._last_sent.get(media_ssrc)
            if last is not None and now - last < self._interval_s:
                return False
            self._last_sent[media_ssrc] = now
            self.pli_sent += 1
            return True

    def _decode_failed(self, message: str) -> None:
        with self._lock:
            self.undecodable_frames += 1
            first = self.undecodable_frames == 1
        if first:
            log.warning(
                "event=undecodable_video session=%s detail=%r: nothing can be shown until "
                "the publisher's next keyframe (set its keyframe interval to 1 s); keyframes "
                "are asked for once a second and further failures are counted in the "
                "session's stats (video_in.undecodable_frames)",
                self.name,
                message,
            )

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "pli_requested": self.pli_requested,
                "pli_sent": self.pli_sent,
                "undecodable_frames": self.undecodable_frames,
            }


class _DecodeFailures(logging.Filter):
    """On aiortc's receiver logger: a watched receiver's decoding failure goes to its
    watch instead of the log. aiortc decodes each receiver's video on a thread of its own
    and logs from there, so the watch is the one whose receiver owns the logging thread;
    any other record passes as it is. Holds the watches weakly: a watch lives as long as
    its receiver (whose PLI method refers to it)."""

    def __init__(self) -> None:
        super().__init__()
        self._watches: weakref.WeakSet[ReceiverWatch] = weakref.WeakSet()
        # Names come from the session, which sees the track before the watch exists
        # (aiortc announces a remote track inside setRemoteDescription).
        self._names: weakref.WeakKeyDictionary[MediaStreamTrack, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def add(self, watch: ReceiverWatch) -> None:
        with self._lock:
            self._watches.add(watch)

    def watches(self) -> list[ReceiverWatch]:
        with self._lock:
            return list(self._watches)

    def set_name(self, track: MediaStreamTrack, name: str) -> None:
        with self._lock:
            self._names[track] = name

    def name_of(self, track: MediaStreamTrack) -> str:
        with self._lock:
            return self._names.get(track, "unnamed")

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or _DECODE_FAILURE not in record.msg:
            return True
        thread = threading.current_thread()
        for watch in self.watches():
            if _decoder_thread(watch.receiver) is thread:
                watch._decode_failed(record.getMessage())
                return False
        return True


_DECODE_FAILURES = _DecodeFailures()


def _decoder_thread(receiver: RTCRtpReceiver) -> threading.Thread | None:
    """The thread aiortc decodes `receiver`'s frames on (started by `receive`): read from
    the receiver's private attribute, as aiortc names it nowhere else."""
    thread = getattr(receiver, "_RTCRtpReceiver__decoder_thread", None)
    return thread if isinstance(thread, threading.Thread) else None


def watch_receiver(receiver: RTCRtpReceiver) -> ReceiverWatch:
    """Limit `receiver`'s PLIs to one a second per sender and count the frames it cannot
    decode, logging the first. Call it once the receiver exists (after
    `setRemoteDescription`), before media flows.

    aiortc creates its receivers itself, so a subclass cannot take their place, and it
    sends every PLI through the receiver's `_send_rtcp_pli(media_ssrc)`: that method of
    this one receiver instance is wrapped (as `EncodedVideoTrack.listen_to` wraps a
    sender's RTCP handler). Its decoding failures reach us through a filter on aiortc's
    logger, the standard way to take a library's log records over. aiortc's modules and
    classes are left as they are.
    """
    watch = ReceiverWatch(receiver)
    send = receiver._send_rtcp_pli

    async def send_rtcp_pli(media_ssrc: int) -> None:
        if watch._pli(media_ssrc):
            await send(media_ssrc)

    receiver._send_rtcp_pli = send_rtcp_pli  # type: ignore[method-assign]
    aiortc_log = logging.getLogger("aiortc.rtcrtpreceiver")
    if _DECODE_FAILURES not in aiortc_log.filters:
        aiortc_log.addFilter(_DECODE_FAILURES)
    _DECODE_FAILURES.add(watch)
    return watch


def name_track(track: MediaStreamTrack, name: str) -> None:
    """Call the remote `track` `name` (a session id) in the log lines of its watch."""
    _DECODE_FAILURES.set_name(track, name)


def receiver_watch(track: MediaStreamTrack) -> ReceiverWatch | None:
    """The watch of the receiver whose remote track `track` is, if it is watched (from
    the end of the offer's negotiation on)."""
    return next((w for w in _DECODE_FAILURES.watches() if w.receiver.track is track), None)
