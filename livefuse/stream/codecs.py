"""Video encoder settings for live 720p30 on a small CPU.

aiortc's defaults suit a 640x480 demo: its H.264 encoder runs libx264's default `medium`
preset (more than a 720p frame's budget on one core of a small machine) and caps bitrates
at 3 Mbit/s (H.264) and 1.5 Mbit/s (VP8), which smears 720p faces. `install()` swaps in an
H.264 encoder on the `ultrafast` preset with `zerolatency` and raises the caps; the
receiver's bandwidth estimate (REMB) still steers the rate inside them. VP8 (libvpx) costs
more per frame than ultrafast x264 at the same bitrate, so H.264 goes first in every
answer (`prefer_h264`) and VP8 is what a peer without H.264 gets.

aiortc picks encoders through `aiortc.rtcrtpsender.get_encoder`, so that is the one hook
replaced; everything else (packetisation, keyframes on PLI/FIR) stays aiortc's.
"""

from __future__ import annotations

import fractions
from collections.abc import Iterator

import av
from aiortc import RTCRtpTransceiver, rtcrtpsender
from aiortc.codecs import get_encoder as aiortc_get_encoder
from aiortc.codecs import h264, vpx
from aiortc.codecs.base import Encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

H264_PRESET = "ultrafast"
H264_BITRATES = (800_000, 3_000_000, 8_000_000)  # min, start, max (bit/s)
VP8_BITRATES = (400_000, 2_000_000, 5_000_000)


class LiveH264Encoder(h264.H264Encoder):
    """aiortc's H.264 encoder with a preset that keeps up with 720p30 on one core."""

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        codec = self.codec
        if codec is not None and (
            frame.width != codec.width
            or frame.height != codec.height
            # like aiortc: rebuild only when the target moves by more than 10 %
            or abs(self.target_bitrate - (codec.bit_rate or 0)) / (codec.bit_rate or 1) > 0.1
        ):
            self.buffer_data = b""
            self.buffer_pts = None
            self.codec = None
        frame.pict_type = (
            av.video.frame.PictureType.I if force_keyframe else av.video.frame.PictureType.NONE
        )
        if self.codec is None:
            self.codec = codec = av.CodecContext.create("libx264", "w")
            codec.width = frame.width
            codec.height = frame.height
            codec.bit_rate = self.target_bitrate
            codec.pix_fmt = "yuv420p"
            codec.framerate = fractions.Fraction(h264.MAX_FRAME_RATE, 1)
            codec.time_base = fractions.Fraction(1, h264.MAX_FRAME_RATE)
            # Level 4.0 admits 1080p30 and the bitrates above; Baseline is what every
            # WebRTC peer decodes.
            codec.options = {"level": "40", "tune": "zerolatency", "preset": H264_PRESET}
            codec.profile = "Baseline"
        data = b"".join(bytes(packet) for packet in self.codec.encode(frame))
        if data:
            yield from self._split_bitstream(data)


def _get_encoder(codec: RTCRtpCodecParameters) -> Encoder:
    if codec.mimeType.lower() == "video/h264":
        return LiveH264Encoder()
    return aiortc_get_encoder(codec)


def install() -> None:
    """Use the live encoder settings for every aiortc sender in this process. Idempotent."""
    h264.MIN_BITRATE, h264.DEFAULT_BITRATE, h264.MAX_BITRATE = H264_BITRATES
    vpx.MIN_BITRATE, vpx.DEFAULT_BITRATE, vpx.MAX_BITRATE = VP8_BITRATES
    rtcrtpsender.get_encoder = _get_encoder


def prefer_h264(transceiver: RTCRtpTransceiver) -> None:
    """Put H.264 first among the codecs negotiated from a remote offer (call it between
    `setRemoteDescription` and `createAnswer`): the answer lists them in this order and
    both ends send with the first.

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


# Sent to the peer in our answer's fmtp lines, in kbit/s. aiortc's receive-side estimate
# (REMB) reads a busy event loop's late packet reads as congestion and can drive a
# browser's sender down to 30 kbit/s, at which 720p is a smear of blocks; a browser honours
# these floors for its own sender. The bench and the tests see the same through aiortc's
# sender, whose floor is `H264_BITRATES[0]`.
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
