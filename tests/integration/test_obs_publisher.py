"""A publisher as OBS is one, against the real service over loopback: H.264 it encodes
itself, keyframes far apart, the picture-loss reports (PLI) it gets ignored. Its stream
starts between two keyframes, so the server cannot decode anything until the next one.

The server must then ask for a keyframe once a second (not after every frame), log the
undecodable start once and count the rest, and show the video from the keyframe on.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import time
from collections.abc import Iterator

import aiohttp
import av
import cv2
import numpy as np
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtp import RTCP_PSFB_PLI, AnyRtcpPacket, RtcpPsfbPacket

from livefuse.settings import Settings
from livefuse.stream.codecs import PLI_INTERVAL_S
from tests.webrtc_peers import CLOCK, LiveServer, live_server

pytestmark = pytest.mark.slow

FPS = 30
KEYFRAME_INTERVAL = 90  # frames: 3 s at 30 fps (OBS's default is 250 frames, ~8 s)
STARTS_AT = 10  # the first frame sent: 80 undecodable P-frames before the next keyframe


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    with live_server(settings.model_copy(update={"token": None, "max_sessions": 2})) as live:
        yield live


def encode_h264(frames: list[np.ndarray]) -> list[av.Packet]:
    """The frames as x264 encodes them for a live stream: Baseline, no B-frames, a
    keyframe every KEYFRAME_INTERVAL frames and no others, its headers in the stream."""
    height, width = frames[0].shape[:2]
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = fractions.Fraction(1, FPS)
    encoder.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "profile": "baseline",
        "g": str(KEYFRAME_INTERVAL),
        "keyint_min": str(KEYFRAME_INTERVAL),
        "sc_threshold": "0",
    }
    packets: list[av.Packet] = []
    for index, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(image, format="bgr24").reformat(format="yuv420p")
        frame.pts = index
        packets.extend(encoder.encode(frame))
    packets.extend(encoder.encode(None))
    return packets


class EncodedTrack(MediaStreamTrack):
    """Pre-encoded H.264 at FPS, as OBS's WHIP output sends it: `packets[start:]`, then
    from its second keyframe on, round and round. A PLI changes nothing."""

    kind = "video"

    def __init__(self, packets: list[av.Packet], *, start: int) -> None:
        super().__init__()
        keyframes = [i for i, packet in enumerate(packets) if packet.is_keyframe]
        assert keyframes[:2] == [0, KEYFRAME_INTERVAL], keyframes
        self._data = [bytes(packet) for packet in packets]
        self._order = list(range(start, len(packets)))
        self._loop_from = keyframes[1]
        self._sent = 0
        self._started: float | None = None

    async def recv(self) -> av.Packet:
        if self._started is None:
            self._started = time.monotonic()
        delay = self._started + self._sent / FPS - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._sent < len(self._order):
            index = self._order[self._sent]
        else:
            index = self._loop_from + (self._sent - len(self._order)) % (
                len(self._data) - self._loop_from
            )
        packet = av.Packet(self._data[index])
        packet.pts = self._sent * CLOCK // FPS
        packet.time_base = fractions.Fraction(1, CLOCK)
        self._sent += 1
        return packet


def count_plis(sender: RTCRtpSender) -> list[float]:
    """When each PLI reached `sender` (monotonic clock), by wrapping this one sender's
    RTCP handler."""
    arrivals: list[float] = []
    handle = sender._handle_rtcp_packet

    async def handle_rtcp_packet(packet: AnyRtcpPacket) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
            arrivals.append(time.monotonic())
        await handle(packet)

    sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]
    return arrivals


async def session_stats(http: aiohttp.ClientSession, base: str, session_id: str) -> dict:
    async with http.get(f"{base}/api/v1/sessions/{session_id}") as response:
        assert response.status == 200
        body: dict = await response.json()
        return body


def test_a_publisher_starting_between_keyframes_gets_one_pli_a_second_and_one_log_line(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    from skimage import data

    astronaut = cv2.resize(np.ascontiguousarray(data.astronaut()[:, :, ::-1]), (320, 240))
    frames = [np.roll(astronaut, 2 * i, axis=1) for i in range(KEYFRAME_INTERVAL + 60)]
    packets = encode_h264(frames)
    track = EncodedTrack(packets, start=STARTS_AT)

    async def scenario() -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transceiver = pc.addTransceiver(track, direction="sendonly")
        transceiver.setCodecPreferences(
            [
                codec
                for codec in RTCRtpSender.getCapabilities("video").codecs
                if codec.mimeType.lower() == "video/h264"
            ]
        )
        plis = count_plis(transceiver.sender)
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{server.base}/whip",
                data=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            ) as response:
                answer = await response.text()
                assert response.status == 201, answer
                session_id = response.headers["Location"].rsplit("/", 1)[1]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            published = time.monotonic()
            try:
                # The keyframe comes 80 frames in; then the video shows.
                deadline = published + 60
                while True:
                    body = await session_stats(http, server.base, session_id)
                    if body["stats"]["frames_in"] >= FPS:
                        break
                    assert time.monotonic() < deadline, body
                    await asyncio.sleep(0.2)
                elapsed = time.monotonic() - published
                video_in = body["stats"]["video_in"]
            finally:
                await pc.close()
                async with http.delete(f"{server.base}/whip/{session_id}"):
                    pass
        undecodable = KEYFRAME_INTERVAL - STARTS_AT
        # Every undecodable frame was counted, and most asked aiortc for a keyframe (how
        # many depends on how its receive loop groups them on a busy machine)...
        assert video_in["undecodable_frames"] >= undecodable * 0.9, video_in
        assert video_in["pli_requested"] >= video_in["undecodable_frames"] * 0.5, video_in
        assert video_in["pli_requested"] > 3 * video_in["pli_sent"], video_in
        # ...but the publisher heard one PLI a second at most (it ignores them all).
        # (+2: the first goes at once, one more may arrive while the test closes.)
        assert 1 <= len(plis) <= math.ceil(elapsed / PLI_INTERVAL_S) + 2, (plis, elapsed)
        assert video_in["pli_sent"] <= len(plis)

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    aiortc_lines = [r.getMessage() for r in caplog.records if r.name.startswith("aiortc")]
    assert not [line for line in aiortc_lines if "failed to decode" in line]
    ours = [r.getMessage() for r in caplog.records if "event=undecodable_video" in r.getMessage()]
    assert len(ours) == 1, ours
