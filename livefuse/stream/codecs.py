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
"""

from __future__ import annotations

from aiortc import RTCRtpTransceiver
from aiortc.codecs import vpx
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

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
