"""One H.264 encode per session, end to end: real aiortc viewers on loopback against the
real app, the video checked as it came off the wire (tests/h264_stream.py) and as aiortc
decoded it. The encoder's own counts are read from the session API (`stats.encode`).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from livefuse.settings import Settings
from livefuse.stream.clip import render_clip
from livefuse.stream.shared_encode import KEYFRAME_INTERVAL_S, MIN_KEYFRAME_SPACING_S
from tests.h264_stream import decode, is_keyframe, problems
from tests.media import widescreen
from tests.webrtc_peers import LiveServer, Peer, RtpLog, live_server, publish, watch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    configured = settings.model_copy(
        update={"token": None, "max_sessions": 2, "max_viewers": 4, "idle_timeout_s": 3.0}
    )
    with live_server(configured) as live:
        yield live


@pytest.fixture(autouse=True)
def _sessions_end_with_the_test(server: LiveServer) -> Iterator[None]:
    yield
    service = server.service
    for session_id in list(service.sessions):
        server.call(functools.partial(service.end_session, session_id, reason="test over"))


@pytest.fixture(scope="module")
def moving_frames() -> list[np.ndarray]:
    from skimage import data

    photo = widescreen(np.ascontiguousarray(data.astronaut()[:, :, ::-1]))
    return list(render_clip(photo, seconds=2.0, fps=30, seed=3))


def run(scenario: Callable[[aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            await scenario(http)

    asyncio.run(main())


async def stats(http: aiohttp.ClientSession, base: str, session_id: str) -> Any:
    async with http.get(f"{base}/api/v1/sessions/{session_id}") as response:
        assert response.status == 200, await response.text()
        return (await response.json())["stats"]


def first_video_codec(sdp: str) -> str:
    video = sdp.split("m=video ", 1)[1]
    first = video.split("\r\n", 1)[0].split()[2]
    return video.split(f"a=rtpmap:{first} ", 1)[1].split("/", 1)[0]


def wire_frames(viewer: Peer) -> list[bytes]:
    assert viewer.rtp is not None
    return [data for _, data in viewer.rtp.frames]


def keyframe_arrivals(log: RtpLog, after: float = 0.0) -> list[float]:
    return [at for at, data in log.frames if at > after and is_keyframe(data)]


def encoder_threads(session_id: str) -> list[str]:
    prefix = f"livefuse-{session_id[:8]}-h264"
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


async def end(http: aiohttp.ClientSession, base: str, *peers: Peer) -> None:
    for peer in peers:
        async with http.delete(base + peer.location) as response:
            assert response.status == 200, await response.text()
        await peer.close()


def test_three_viewers_share_one_encode(
    server: LiveServer, moving_frames: list[np.ndarray]
) -> None:
    async def scenario(http: aiohttp.ClientSession) -> None:
        publisher = await publish(
            http, server.base, moving_frames, token=None, direction="sendonly"
        )
        sid = publisher.session_id
        viewers = [await watch(http, server.base, sid, token=None, rtp=True) for _ in range(3)]
        for viewer in viewers:
            assert first_video_codec(viewer.answer) == "H264"
            await viewer.wait_frames(15)
        before = await stats(http, server.base, sid)
        await asyncio.sleep(4.0)
        after = await stats(http, server.base, sid)
        output = after["frames_out"] - before["frames_out"]
        encoded = after["encode"]["frames"] - before["encode"]["frames"]
        # One encode per output frame for the three of them, not one each.
        assert output >= 30, (before, after)
        assert 0.8 * output <= encoded <= output + 2, (output, encoded, after["encode"])
        assert after["encode"]["errors"] == 0
        assert len(encoder_threads(sid)) == 1
        for viewer in viewers:
            frames = wire_frames(viewer)
            assert problems(frames) == []
            assert decode(frames) == len(frames) >= encoded
            assert viewer.received.frames[-1].shape == (720, 1280, 3)
        await end(http, server.base, *viewers)
        await end(http, server.base, publisher)
        assert encoder_threads(sid) == []

    run(scenario)


def test_a_viewers_pli_gets_a_keyframe_rate_limited(
    server: LiveServer, moving_frames: list[np.ndarray]
) -> None:
    async def scenario(http: aiohttp.ClientSession) -> None:
        publisher = await publish(
            http, server.base, moving_frames, token=None, direction="sendonly"
        )
        sid = publisher.session_id
        viewer = await watch(http, server.base, sid, token=None, rtp=True)
        log = viewer.rtp
        assert log is not None
        await viewer.wait_frames(10)
        # Ask when the last keyframe is older than the spacing and the periodic one is
        # not yet due: what comes then is the one asked for.
        deadline = time.monotonic() + 10
        while not (
            MIN_KEYFRAME_SPACING_S + 0.1
            <= time.monotonic() - keyframe_arrivals(log)[-1]
            <= KEYFRAME_INTERVAL_S - 0.4
        ):
            assert time.monotonic() < deadline, "no moment to ask"
            await asyncio.sleep(0.01)
        before = (await stats(http, server.base, sid))["encode"]
        asked = time.monotonic()
        await log.send_pli()
        while not keyframe_arrivals(log, after=asked):
            assert time.monotonic() - asked < 1.0, "no keyframe within a second of a PLI"
            await asyncio.sleep(0.01)
        first = keyframe_arrivals(log, after=asked)[0]

        # A second PLI inside the window: no keyframe until the window has passed.
        await log.send_pli()
        await asyncio.sleep(first + MIN_KEYFRAME_SPACING_S - 0.15 - time.monotonic())
        assert keyframe_arrivals(log, after=first) == []
        during = (await stats(http, server.base, sid))["encode"]
        assert during["keyframe_requests"] >= before["keyframe_requests"] + 2
        assert during["forced_keyframes"] == before["forced_keyframes"] + 1
        # ... and it is served once the window is over.
        await asyncio.sleep(0.6)
        later = keyframe_arrivals(log, after=first)
        assert later and later[0] - first >= MIN_KEYFRAME_SPACING_S - 0.15, later
        assert problems(wire_frames(viewer)) == []
        await end(http, server.base, viewer, publisher)

    run(scenario)


def test_a_late_viewer_starts_at_a_keyframe(
    server: LiveServer, moving_frames: list[np.ndarray]
) -> None:
    """The publisher watches its own video (sendrecv) from the start; a viewer joins in the
    middle of a run of P-frames and still decodes from its first frame."""

    async def scenario(http: aiohttp.ClientSession) -> None:
        publisher = await publish(http, server.base, moving_frames, token=None)
        sid = publisher.session_id
        assert first_video_codec(publisher.answer) == "H264"
        await publisher.wait_frames(40)
        before = (await stats(http, server.base, sid))["encode"]
        late = await watch(http, server.base, sid, token=None, rtp=True)
        await late.wait_frames(30)
        frames = wire_frames(late)
        assert is_keyframe(frames[0])
        assert problems(frames) == []
        assert decode(frames) == len(frames)
        after = await stats(http, server.base, sid)
        assert after["encode"]["keyframe_requests"] > before["keyframe_requests"]  # it asked
        assert after["encode"]["errors"] == 0
        # The publisher's own video kept coming throughout.
        count = publisher.received.count
        await publisher.wait_frames(10)
        assert publisher.received.count > count
        await end(http, server.base, late, publisher)

    run(scenario)


def test_a_vp8_only_viewer_gets_its_own_encode(
    server: LiveServer, moving_frames: list[np.ndarray]
) -> None:
    async def scenario(http: aiohttp.ClientSession) -> None:
        publisher = await publish(
            http, server.base, moving_frames, token=None, direction="sendonly"
        )
        sid = publisher.session_id
        vp8 = await watch(http, server.base, sid, token=None, codecs=["VP8"])
        assert first_video_codec(vp8.answer) == "VP8"
        assert "H264" not in vp8.answer
        await vp8.wait_frames(15)
        assert vp8.received.frames[-1].shape == (720, 1280, 3)
        assert (await stats(http, server.base, sid))["encode"] == {}  # no H.264 sender yet
        h264 = await watch(http, server.base, sid, token=None, rtp=True)
        await h264.wait_frames(15)
        await vp8.wait_frames(15)  # both at once
        assert problems(wire_frames(h264)) == []
        assert (await stats(http, server.base, sid))["encode"]["frames"] > 0
        await end(http, server.base, vp8, h264, publisher)

    run(scenario)
