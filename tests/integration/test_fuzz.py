"""Property-based fuzzing of the HTTP surface (issue 18): mutated real offers, trickle
fragments, multipart and raw uploads, JSON bodies, and odd requests on every route of
the real app, with real aiortc peers around them. Not one answer may be a 5xx or fail
to come, and afterwards a real publisher still streams and a viewer still sees it.

Derandomized (a fixed seed, no example database), so CI runs the same cases every time;
4,400 of them. The server has room for every session a valid mutant opens (each
is ended as soon as it is answered), so a 503 here could only be a fault.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import logging
import string
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livefuse.settings import Settings
from tests.webrtc_peers import LiveServer, Peer, live_server, publish, watch

TOKEN = "fuzz-admin-token-31c7"
pytestmark = pytest.mark.slow

# Examples per family: 4,400 in all (about 40 s on 2 cores).
OFFERS_WHIP, OFFERS_WHEP, FRAGMENTS, UPLOADS, JSON_BODIES, REQUESTS = 900, 600, 700, 700, 700, 800


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# -- real offers to mutate -------------------------------------------------------------

# Captured from Chrome 126 (webcam and microphone, sendrecv) and from OBS 30's WHIP output
# (libdatachannel: one ICE and DTLS description for the whole session, sendonly), with
# their addresses moved to the documentation ranges.
CHROME_OFFER = """v=0
o=- 4215775240449105457 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS 5e6d5f4c-1c53-4f1f-9f9e-0c2a1f1d7b1a
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:3442447574 1 udp 2122260223 192.0.2.10 54400 typ host generation 0 network-id 1
a=candidate:2097048782 1 tcp 1518280447 192.0.2.10 9 typ host tcptype active generation 0
a=ice-ufrag:Vt5m
a=ice-pwd:1lDPNAAWFzNxwFyF1OvrJmo1
a=ice-options:trickle
a=fingerprint:sha-256 CHROME_FINGERPRINT
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=sendrecv
a=msid:5e6d5f4c-1c53-4f1f-9f9e-0c2a1f1d7b1a 7d0f2b4e-33aa-4f61-8f1e-7b5c2d8e9a10
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:1001 cname:q3Vv2Jj0Xh7kB9sL
a=ssrc:1001 msid:5e6d5f4c-1c53-4f1f-9f9e-0c2a1f1d7b1a 7d0f2b4e-33aa-4f61-8f1e-7b5c2d8e9a10
m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 104 105 106 107
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:Vt5m
a=ice-pwd:1lDPNAAWFzNxwFyF1OvrJmo1
a=ice-options:trickle
a=fingerprint:sha-256 CHROME_FINGERPRINT
a=setup:actpass
a=mid:1
a=extmap:14 urn:ietf:params:rtp-hdrext:toffset
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:13 urn:3gpp:video-orientation
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id
a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id
a=sendrecv
a=msid:5e6d5f4c-1c53-4f1f-9f9e-0c2a1f1d7b1a 1c1f5d0a-98e2-4b7e-a0c4-3f2e9b6d7c8e
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:96 VP8/90000
a=rtcp-fb:96 goog-remb
a=rtcp-fb:96 transport-cc
a=rtcp-fb:96 ccm fir
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
a=rtpmap:102 H264/90000
a=rtcp-fb:102 goog-remb
a=rtcp-fb:102 transport-cc
a=rtcp-fb:102 ccm fir
a=rtcp-fb:102 nack
a=rtcp-fb:102 nack pli
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f
a=rtpmap:103 rtx/90000
a=fmtp:103 apt=102
a=rtpmap:104 H264/90000
a=rtcp-fb:104 nack
a=rtcp-fb:104 nack pli
a=fmtp:104 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f
a=rtpmap:105 rtx/90000
a=fmtp:105 apt=104
a=rtpmap:106 red/90000
a=rtpmap:107 ulpfec/90000
a=ssrc-group:FID 2001 2002
a=ssrc:2001 cname:q3Vv2Jj0Xh7kB9sL
a=ssrc:2001 msid:5e6d5f4c-1c53-4f1f-9f9e-0c2a1f1d7b1a 1c1f5d0a-98e2-4b7e-a0c4-3f2e9b6d7c8e
a=ssrc:2002 cname:q3Vv2Jj0Xh7kB9sL
a=ssrc:2002 msid:5e6d5f4c-1c53-4f1f-9f9e-0c2a1f1d7b1a 1c1f5d0a-98e2-4b7e-a0c4-3f2e9b6d7c8e
""".replace(
    "CHROME_FINGERPRINT",
    "2B:6A:F1:73:5C:89:20:D4:3E:6B:9A:00:91:E7:6D:11:3C:0E:AA:52:8F:47:C1:9D:75:0B:E2:34:66:18"
    ":F9:C3",
)

OBS_OFFER = """v=0
o=rtc 3545278735 0 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=group:LS 0 1
a=msid-semantic:WMS *
a=setup:actpass
a=ice-ufrag:Nm7f
a=ice-pwd:2Zx3Tq4PZ5Kl2q6NfCkR7m
a=ice-options:ice2,trickle
a=fingerprint:sha-256 OBS_FINGERPRINT
m=audio 50021 UDP/TLS/RTP/SAVPF 111
c=IN IP4 192.0.2.20
a=mid:0
a=sendonly
a=ssrc:3040823049 cname:obs-3f9a
a=ssrc:3040823049 msid:obs obs-audio
a=msid:obs obs-audio
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=fmtp:111 minptime=10;maxaveragebitrate=96000;stereo=1;sprop-stereo=1;useinbandfec=1
a=candidate:1 1 UDP 2122317823 192.0.2.20 50021 typ host
a=candidate:2 1 UDP 1686109951 203.0.113.7 50021 typ srflx raddr 0.0.0.0 rport 0
a=end-of-candidates
m=video 50021 UDP/TLS/RTP/SAVPF 96
c=IN IP4 192.0.2.20
a=mid:1
a=sendonly
a=ssrc:3040823050 cname:obs-3f9a
a=ssrc:3040823050 msid:obs obs-video
a=msid:obs obs-video
a=rtcp-mux
a=rtpmap:96 H264/90000
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=fmtp:96 profile-level-id=42e01f;packetization-mode=1;level-asymmetry-allowed=1
""".replace(
    "OBS_FINGERPRINT",
    "7C:11:0A:9B:EE:41:3D:86:52:C0:1F:77:A8:29:D3:64:B5:0E:92:F1:3A:C7:68:2D:45:19:8E:B0:7F:E2"
    ":56:AD",
)


def crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


async def aiortc_offer(*, viewer: bool) -> str:
    """What the suite's own aiortc peers offer: a publisher (video sendrecv, microphone)
    or a viewer (recvonly video and audio)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if viewer:
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
    else:
        pc.addTransceiver(VideoStreamTrack(), direction="sendrecv")
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    offer = pc.localDescription.sdp
    await pc.close()
    return offer


# -- the grammar the mutants are drawn from ----------------------------------------------

# Addresses only from loopback and the documentation ranges: ICE sends checks to what
# an offer or a fragment names, and a test sends nothing to anyone else's network.
ADDRESSES = ["127.0.0.1", "192.0.2.1", "198.51.100.7", "203.0.113.250", "::1", "2001:db8::5"]
ODD_TOKENS = [
    "",
    " ",
    "0",
    "-1",
    "1",
    "65535",
    "65536",
    "4294967296",
    "99999999999999999999",
    "\x00",
    "\u00e9",
    "\u221e",
    "\U0001f600",
    "NaN",
    "::",
    "0.0.0.0",
    "256.1.1.1",
    "UDP",
    "udp",
    "tcp",
    "TCP",
    "host",
    "srflx",
    "relay",
    "prflx",
    "typ",
    "raddr",
    "rport",
    "H264",
    "VP8",
    "VP9",
    "AV1",
    "opus",
    "rtx",
    "red",
    "ulpfec",
    "apt=1",
    "apt=",
    "sha-256",
    "sha-1",
    "AA:BB",
    "actpass",
    "active",
    "passive",
    "holdconn",
    "BUNDLE",
    "LS",
    "sendrecv",
    "recvonly",
    "sendonly",
    "inactive",
    "UDP/TLS/RTP/SAVPF",
    "RTP/AVP",
    "application",
    "video",
    "audio",
    "x" * 300,
]
token = st.one_of(
    st.sampled_from(ODD_TOKENS),
    st.sampled_from(ADDRESSES),
    st.integers(-(2**33), 2**33).map(str),
    st.text(alphabet=string.ascii_letters + string.digits + "+/=-_.:;", max_size=12),
    st.text(max_size=6),
)
words = st.lists(token, min_size=0, max_size=8).map(" ".join)


def candidate_line(draw: st.DrawFn) -> str:
    fields = [
        draw(token),
        draw(st.sampled_from(["1", "2", "0", "-1", "x"]) | token),
        draw(st.sampled_from(["udp", "UDP", "tcp"]) | token),
        draw(st.integers(-1, 2**32).map(str) | token),
        draw(st.sampled_from(ADDRESSES) | token),
        draw(st.integers(-1, 70000).map(str) | token),
        "typ",
        draw(st.sampled_from(["host", "srflx", "relay", "prflx"]) | token),
    ]
    keep = draw(st.integers(0, len(fields)))
    extra = draw(st.sampled_from(["", " generation 0", " raddr 192.0.2.1 rport 9", " tcptype"]))
    return "a=candidate:" + " ".join(fields[:keep]) + extra


@st.composite
def sdp_line(draw: st.DrawFn) -> str:
    """One SDP line, valid in shape or not, of a kind an offer has."""
    kind = draw(st.integers(0, 19))
    pt = draw(st.integers(-5, 300).map(str) | token)
    if kind == 0:
        return candidate_line(draw)
    if kind == 1:
        return f"a=fmtp:{pt} {draw(words)}"
    if kind == 2:
        return f"a=rtpmap:{pt} {draw(token)}/{draw(token)}"
    if kind == 3:
        return f"a=mid:{draw(token)}"
    if kind == 4:
        return f"a=group:BUNDLE {draw(words)}"
    if kind == 5:
        media = draw(st.sampled_from(["video", "audio", "application"]) | token)
        return f"m={media} {draw(token)} {draw(token)} {draw(words)}"
    if kind == 6:
        return f"c=IN IP4 {draw(token)}"
    if kind == 7:
        return f"a=fingerprint:{draw(token)} {draw(token)}"
    if kind == 8:
        return f"a=setup:{draw(token)}"
    if kind == 9:
        return f"a=ice-ufrag:{draw(token)}"
    if kind == 10:
        return f"a=ice-pwd:{draw(token)}"
    if kind == 11:
        return f"a=ssrc:{draw(token)} {draw(words)}"
    if kind == 12:
        return f"a=ssrc-group:FID {draw(words)}"
    if kind == 13:
        return f"a=rtcp-fb:{pt} {draw(words)}"
    if kind == 14:
        return f"a=extmap:{draw(token)} {draw(token)}"
    if kind == 15:
        return "a=" + draw(st.sampled_from(["sendrecv", "recvonly", "sendonly", "inactive"]))
    if kind == 16:
        return f"a=rtcp:{draw(token)} IN IP4 {draw(token)}"
    if kind == 17:
        return draw(
            st.sampled_from(["a=end-of-candidates", "a=bundle-only", "a=rtcp-mux", "a=ice-lite"])
        )
    if kind == 18:
        return f"a={draw(token)}:{draw(words)}"
    return draw(st.text(max_size=40))


@st.composite
def mutated(draw: st.DrawFn, bases: list[str]) -> str:
    """A real SDP text with a few lines deleted, duplicated, swapped, replaced, inserted
    or edited token by token, maybe truncated, with CRLF or LF line ends."""
    lines = crlf(draw(st.sampled_from(bases))).split("\r\n")
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        operation = draw(st.integers(0, 6))
        if operation == 0:
            del lines[at]
        elif operation == 1:
            lines.insert(at, lines[at])
        elif operation == 2:
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
        elif operation == 3:
            lines[at] = draw(sdp_line())
        elif operation == 4:
            lines.insert(at, draw(sdp_line()))
        elif operation == 5:
            parts = lines[at].replace(":", " ").split(" ")
            parts[draw(st.integers(0, len(parts) - 1))] = draw(token)
            prefix, _, _ = lines[at].partition(":")
            lines[at] = prefix + ":" + " ".join(parts[1:]) if ":" in lines[at] else " ".join(parts)
        else:
            cut = draw(st.integers(0, len(lines[at])))
            lines[at] = lines[at][:cut]
    text = draw(st.sampled_from(["\r\n", "\n"])).join(lines)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@st.composite
def fragment(draw: st.DrawFn, ufrag: str, pwd: str) -> str:
    """A trickle-ICE fragment (RFC 8840): its ICE lines, a mid, candidates, maybe the
    end, mutated like an offer."""
    base = [
        f"a=ice-ufrag:{ufrag}",
        f"a=ice-pwd:{pwd}",
        "m=audio 9 UDP/TLS/RTP/SAVPF 0",
        f"a=mid:{draw(st.sampled_from(['0', '1', '7']))}",
        "a=candidate:1 1 udp 2130706431 192.0.2.1 9 typ host",
        "a=candidate:2 1 udp 1694498815 203.0.113.9 40000 typ srflx raddr 0.0.0.0 rport 0",
    ]
    if draw(st.booleans()):
        base.append("a=end-of-candidates")
    return draw(mutated(["\r\n".join(base)]))


# -- uploads -----------------------------------------------------------------------------


def encoded(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


@dataclass(frozen=True)
class Upload:
    content_type: str
    body: bytes


@st.composite
def upload(draw: st.DrawFn, images: list[bytes]) -> Upload:
    """A raw image upload or a multipart form, from real image bytes, mutated."""
    data = draw(st.sampled_from(images) | st.binary(max_size=64))
    edit = draw(st.integers(0, 4))
    if edit == 1 and data:
        data = data[: draw(st.integers(0, len(data)))]
    elif edit == 2 and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    elif edit == 3:
        data = data + draw(st.binary(max_size=32))
    if draw(st.booleans()):
        content_type = draw(
            st.sampled_from(
                ["image/png", "image/jpeg", "image/webp", "application/octet-stream", "text/plain"]
            )
            | token
        )
        return Upload(content_type, data)
    boundary = draw(st.sampled_from(["XyZ123", "----WebKitFormBoundary7MA4YWxkTrZu0gW"]) | token)
    declared = draw(st.sampled_from([boundary, "other", ""]))
    name = draw(st.sampled_from(["image", "file", ""]) | token)
    headers = [f'Content-Disposition: form-data; name="{name}"; filename="a.png"']
    if draw(st.booleans()):
        headers.append(f"Content-Type: {draw(token)}")
    if draw(st.integers(0, 5)) == 0:
        headers.append("X-Long: " + "a" * draw(st.integers(1, 9000)))
    fields = []
    for _ in range(draw(st.integers(0, 3))):
        fields.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{draw(token)}"\r\n\r\n'.encode()
            + draw(st.binary(max_size=40))
            + b"\r\n"
        )
    part = f"--{boundary}\r\n".encode() + "\r\n".join(headers).encode() + b"\r\n\r\n" + data
    closing = draw(st.sampled_from([f"\r\n--{boundary}--\r\n", "", f"\r\n--{boundary}\r\n"]))
    body = b"".join(fields) + part + closing.encode()
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    params = f"; boundary={declared}" if declared else ""
    if draw(st.integers(0, 5)) == 0:
        params = f'; boundary="{declared}"'
    return Upload("multipart/form-data" + params, body)


# -- JSON bodies -------------------------------------------------------------------------

KNOWN_FIELDS = ["source", "quality", "enabled", "faces", "label", "url", "name", "bitrate_kbps"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "auto",
            "high",
            "fast",
            "all",
            "largest",
            "nope",
            "rtmp://127.0.0.1:9/live/x",
            "rtsp://192.0.2.1/cam",
            "file:///etc/passwd",
            "http://[::1",
            "studio",
            "-",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KNOWN_FIELDS) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def json_body(draw: st.DrawFn) -> bytes:
    value = draw(
        st.dictionaries(st.sampled_from(KNOWN_FIELDS), json_values, max_size=4) | json_values
    )
    text = json.dumps(value, allow_nan=True).encode()
    edit = draw(st.integers(0, 7))
    if edit == 0:
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == 1:
        depth = draw(st.integers(500, 3000))
        text = b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    elif edit == 2:
        text = draw(st.binary(max_size=40))
    return text


# -- the client: plain HTTP, every byte as given ----------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """Requests from the test's thread over http.client (no client library reshapes
    what the fuzzer made), each answer tallied by status."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.tally: collections.Counter[int] = collections.Counter()
        self._connection: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = TOKEN,
    ) -> Reply:
        given = dict(headers or {})
        if token is not None:
            given.setdefault("Authorization", f"Bearer {token}")
        # Header values as UTF-8 bytes (http.client would take latin-1 only), without the
        # line breaks that would make them two headers.
        sent: dict[str, Any] = {
            name: value.replace("\r", "").replace("\n", "").encode("utf-8", "surrogateescape")
            for name, value in given.items()
        }
        for attempt in (1, 2):
            connection = self._connection or http.client.HTTPConnection(
                self.host, self.port, timeout=30
            )
            self._connection = connection
            try:
                connection.request(method, path, body=body, headers=sent)
                response = connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                # The server closed a kept-alive connection after an error answer.
                connection.close()
                self._connection = None
                if attempt == 2:
                    raise
                continue
            except BaseException:
                connection.close()
                self._connection = None
                raise
            reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
            if response.will_close:
                connection.close()
                self._connection = None
            self.tally[reply.status] += 1
            return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


def no_server_error(reply: Reply, what: str) -> None:
    assert reply.status < 500, f"{what}: {reply.status} {reply.body[:300]!r}"


# -- the test ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    configured = settings.model_copy(
        update={
            "token": TOKEN,
            "swap_processes": 0,
            # Room for every session a valid mutant opens, ended at once: a 503 here
            # would be a fault, not a limit.
            "max_sessions": 64,
            "max_viewers": 64,
            "max_pending_publishers_per_address": 64,
            "max_pending_viewers_per_address": 64,
            "max_concurrent_uploads": 4,
            "ice_connect_timeout_s": 2.0,
            "idle_timeout_s": 30.0,
            "max_sdp_bytes": 16 * 1024,
            "max_image_bytes": 512 * 1024,
        }
    )
    with live_server(configured) as live:
        yield live


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    from skimage import data

    astronaut = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    return cv2.resize(astronaut, (640, 360), interpolation=cv2.INTER_AREA)


def run(scenario: Callable[[aiohttp.ClientSession], Any]) -> Any:
    async def main() -> Any:
        async with aiohttp.ClientSession() as http:
            return await scenario(http)

    return asyncio.run(main())


class Keepers:
    """A live publisher and viewer the fuzzed requests aim at, on a loop of their own
    (the peers must keep running between examples)."""

    def __init__(self, base: str, frame: np.ndarray) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.base = base
        self.frame = frame
        self.publisher: Peer | None = None
        self.viewer: Peer | None = None
        self._http: aiohttp.ClientSession | None = None

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def start(self) -> None:
        async def begin() -> None:
            self._http = aiohttp.ClientSession()
            self.publisher = await publish(self._http, self.base, [self.frame], token=TOKEN)
            self.viewer = await watch(self._http, self.base, self.publisher.session_id, token=TOKEN)

        self.call(begin())

    def stop(self) -> None:
        async def end() -> None:
            for peer in (self.viewer, self.publisher):
                if peer is not None:
                    await peer.close()
            if self._http is not None:
                await self._http.close()

        self.call(end())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def end_extra_sessions(server: LiveServer, keep: set[str]) -> None:
    """Sessions a valid mutant opened and the fuzzer could not DELETE (none expected)."""
    for session_id in list(server.service.sessions):
        if session_id not in keep:
            server.call(lambda sid=session_id: server.service.end_session(sid, reason="fuzz"))


def clean_up(client: Client, reply: Reply) -> None:
    """A request the fuzzer made valid opened something: end it at once."""
    if reply.status == 201 and "location" in reply.headers:
        location = reply.headers["location"]
        if location.startswith("/"):
            client.request("DELETE", quote(location, safe="/"))
    elif reply.status == 201 and reply.body.startswith(b"{"):
        body = json.loads(reply.body)
        if isinstance(body, dict) and isinstance(body.get("id"), str) and "url" in body:
            client.request("DELETE", f"/api/v1/ingests/{quote(body['id'])}")


# The server's thread (aiortc, aioice) draws from `random` while Hypothesis generates an
# example, which Hypothesis takes for the strategy's doing and warns about.
# Large examples make Hypothesis warn that their repr is large.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
# The server's multipart reader warns of the malformed forms it is sent.
@pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader")
def test_fuzzed_requests_get_no_5xx_and_the_server_streams_on(
    server: LiveServer,
    frame: np.ndarray,
    astronaut_bgr: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    client = Client(server.base)
    keepers = Keepers(server.base, frame)
    keepers.start()
    assert keepers.publisher is not None and keepers.viewer is not None
    session_id = keepers.publisher.session_id
    viewer_path = keepers.viewer.location
    examples = collections.Counter[str]()

    publisher_offers = [run(lambda _: aiortc_offer(viewer=False)), CHROME_OFFER, OBS_OFFER]
    viewer_offers = [run(lambda _: aiortc_offer(viewer=True))]
    # Each base offer, as it is, is taken: the mutants start from offers that work.
    for offer in publisher_offers:
        reply = client.request(
            "POST", "/whip", body=crlf(offer).encode(), headers={"Content-Type": "application/sdp"}
        )
        assert reply.status == 201, reply
        clean_up(client, reply)
    paths = ["/whip", "/whip/", "/whip/fuzz-stream", f"/whep/{session_id}"]

    @fuzz_settings(OFFERS_WHIP)
    @given(offer=mutated(publisher_offers), path=st.sampled_from(paths[:3]))
    def whip_offers(offer: str, path: str) -> None:
        examples["whip"] += 1
        reply = client.request(
            "POST", path, body=offer.encode(), headers={"Content-Type": "application/sdp"}
        )
        no_server_error(reply, f"POST {path}")
        clean_up(client, reply)

    @fuzz_settings(OFFERS_WHEP)
    @given(offer=mutated(viewer_offers + publisher_offers))
    def whep_offers(offer: str) -> None:
        examples["whep"] += 1
        reply = client.request(
            "POST", paths[3], body=offer.encode(), headers={"Content-Type": "application/sdp"}
        )
        no_server_error(reply, "POST /whep")
        clean_up(client, reply)

    # The publisher's own ICE credentials, as a trickling client sends them.
    offered = keepers.publisher.pc.localDescription.sdp
    ufrag = offered.split("a=ice-ufrag:", 1)[1].split("\r\n", 1)[0]
    pwd = offered.split("a=ice-pwd:", 1)[1].split("\r\n", 1)[0]

    @fuzz_settings(FRAGMENTS)
    @given(
        text=fragment(ufrag, pwd),
        target=st.sampled_from([f"/whip/{session_id}", viewer_path]),
        if_match=st.sampled_from([None, "*", '"nope"']),
    )
    def fragments(text: str, target: str, if_match: str | None) -> None:
        examples["trickle"] += 1
        headers = {"Content-Type": "application/trickle-ice-sdpfrag"}
        if if_match is not None:
            headers["If-Match"] = if_match
        reply = client.request("PATCH", target, body=text.encode(), headers=headers)
        no_server_error(reply, f"PATCH {target}")

    grey = np.full((48, 64, 3), 120, np.uint8)
    face = cv2.resize(astronaut_bgr, (160, 160), interpolation=cv2.INTER_AREA)
    images = [encoded(grey, ".png"), encoded(grey, ".jpg"), encoded(face, ".jpg")]

    @fuzz_settings(UPLOADS)
    @given(sent=upload(images))
    def uploads(sent: Upload) -> None:
        examples["upload"] += 1
        reply = client.request(
            "POST", "/api/v1/sources", body=sent.body, headers={"Content-Type": sent.content_type}
        )
        no_server_error(reply, "POST /api/v1/sources")
        if reply.status == 201:
            client.request("DELETE", f"/api/v1/sources/{json.loads(reply.body)['id']}")

    json_routes = [
        ("PATCH", f"/api/v1/sessions/{session_id}"),
        ("POST", "/api/v1/ingests"),
        ("POST", f"/api/v1/sessions/{session_id}/outputs"),
        ("POST", "/api/v1/streams/fuzz-stream/outputs"),
    ]

    @fuzz_settings(JSON_BODIES)
    @given(body=json_body(), route=st.sampled_from(json_routes))
    def json_bodies(body: bytes, route: tuple[str, str]) -> None:
        examples["json"] += 1
        method, path = route
        reply = client.request(
            method, path, body=body, headers={"Content-Type": "application/json"}
        )
        no_server_error(reply, f"{method} {path}")
        clean_up(client, reply)
        if method == "POST" and path.endswith("/outputs") and reply.status == 201:
            output = json.loads(reply.body).get("id")
            client.request("DELETE", f"{path}/{quote(str(output))}")

    templates = route_templates(server.service.settings)
    segments = [session_id, viewer_path.rsplit("/", 1)[1], "fuzz-stream", "nope", ".."]

    @fuzz_settings(REQUESTS)
    @given(
        template=st.sampled_from(templates),
        fill=st.lists(st.sampled_from(segments) | st.text(max_size=30) | token, max_size=3),
        method=st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS"]),
        query=st.dictionaries(
            st.sampled_from(["source", "quality", "faces", "label", "ticket", "name"]),
            token,
            max_size=3,
        ),
        body=st.none() | st.binary(max_size=200) | json_body() | mutated(publisher_offers),
        content_type=st.sampled_from(
            [
                None,
                "application/sdp",
                "application/json",
                "application/trickle-ice-sdpfrag",
                "image/png",
                "multipart/form-data",
                "text/plain",
            ]
        ),
        token_kind=st.sampled_from(["admin", "admin", "none", "wrong"]),
    )
    def requests(
        template: str,
        fill: list[str],
        method: str,
        query: dict[str, str],
        body: str | bytes | None,
        content_type: str | None,
        token_kind: str,
    ) -> None:
        examples["route"] += 1
        path = fill_template(template, fill)
        if query:
            path += "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())
        headers = {"Content-Type": content_type} if content_type else {}
        token = {"admin": TOKEN, "none": None, "wrong": "wrong-token"}[token_kind]
        data = body.encode() if isinstance(body, str) else body
        reply = client.request(method, path, body=data, headers=headers, token=token)
        no_server_error(reply, f"{method} {path[:120]}")
        clean_up(client, reply)

    whip_offers()
    whep_offers()
    fragments()
    uploads()
    json_bodies()
    requests()  # last: it may DELETE the keepers
    client.close()
    keepers.stop()
    end_extra_sessions(server, keep=set())

    total = sum(examples.values())
    print(
        f"fuzzed {total} requests: {dict(examples)}; answers {dict(sorted(client.tally.items()))}"
    )
    assert total >= 2000, examples
    assert not [status for status in client.tally if status >= 500], client.tally
    # Nor did any of it make the server log an error (a traceback behind a 4xx).
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(f"{r.name}: {r.getMessage()[:300]}" for r in errors[:10])

    # The server took all that and still streams: a new publisher's frames come back
    # swapped-through, and a viewer sees them.
    async def still_streams(http: aiohttp.ClientSession) -> None:
        publisher = await publish(http, server.base, [frame], token=TOKEN)
        viewer = await watch(http, server.base, publisher.session_id, token=TOKEN)
        await publisher.wait_frames(10)
        await viewer.wait_frames(10)
        for peer in (viewer, publisher):
            async with http.delete(
                server.base + peer.location, headers={"Authorization": f"Bearer {TOKEN}"}
            ) as response:
                assert response.status == 200
            await peer.close()

    run(still_streams)
    assert not server.service.sessions


def route_templates(settings: Settings) -> list[str]:
    """Every route of the app, as a template (`/whep/{session}/{viewer}`)."""
    from livefuse.web.app import create_app

    templates = set()
    for resource in create_app(settings).router.resources():
        info = resource.get_info()
        if "formatter" in info:
            templates.add(info["formatter"])
        elif "path" in info:
            templates.add(info["path"])
        else:
            templates.add(info["prefix"].rstrip("/") + "/{file}")
    return sorted(templates)


def fill_template(template: str, values: list[str]) -> str:
    """The template with each `{...}` replaced by the next value (percent-encoded), or
    by an odd one when the values run out."""
    parts = template.split("{")
    path = parts[0]
    for index, part in enumerate(parts[1:]):
        _, _, rest = part.partition("}")
        value = values[index] if index < len(values) else "x"
        path += quote(value, safe="") + rest
    return path
