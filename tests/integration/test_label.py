"""The disclosure label end to end: real aiortc publishers over loopback, the real app, the
frames that come back through the H.264 encode. The server labels by default here
(`label_default`); a session may say otherwise on its WHIP URL or by PATCH."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import cv2
import numpy as np
import pytest

from livefuse.settings import Settings
from tests.media import widescreen
from tests.webrtc_peers import LiveServer, Peer, live_server, publish

pytestmark = pytest.mark.slow

WIDTH, HEIGHT = 640, 360
# The label's box lies in the top right corner: within this much of the frame's width and
# height (ops.draw_label: its text is 3% of the height tall).
CORNER = (slice(0, HEIGHT // 8), slice(WIDTH * 3 // 4, WIDTH))


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    configured = settings.model_copy(
        update={"token": None, "max_sessions": 2, "label_default": True}
    )
    with live_server(configured) as live:
        yield live


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    from skimage import data

    photo = widescreen(np.ascontiguousarray(data.astronaut()[:, :, ::-1]))
    return cv2.resize(photo, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)


def labelled(received: np.ndarray, sent: np.ndarray) -> bool:
    """Whether the received frame's corner shows the label: darkened well below what was
    sent (codec noise is a few levels), with light text on it."""
    corner = received[CORNER].astype(float)
    original = sent[CORNER].astype(float)
    darker = (corner.mean(axis=2) < original.mean(axis=2) * 0.6).mean()
    return bool(darker > 0.1 and (corner.mean(axis=2) > 180).any())


def rest_unchanged(received: np.ndarray, sent: np.ndarray) -> bool:
    """Outside the corner the picture is what was sent (up to the codec)."""
    rest = np.ones(sent.shape[:2], dtype=bool)
    rest[CORNER] = False
    difference = np.abs(received.astype(int) - sent.astype(int)).mean(axis=2)
    return bool(difference[rest].mean() < 8)


async def next_frames(peer: Peer, count: int = 10) -> list[np.ndarray]:
    """Frames that came back after `count` more arrived (the last few kept)."""
    await peer.wait_frames(count)
    return list(peer.received.frames)


async def patch(http: aiohttp.ClientSession, base: str, session_id: str, body: object) -> tuple:
    async with http.patch(f"{base}/api/v1/sessions/{session_id}", json=body) as response:
        return response.status, await response.json()


def test_the_label_follows_the_server_default_the_whip_url_and_patch(
    server: LiveServer, frame: np.ndarray
) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            labelled_by_default = await publish(http, server.base, [frame], token=None)
            unlabelled = await publish(http, server.base, [frame], token=None, label="0")
            try:
                frames = await next_frames(labelled_by_default)
                assert all(labelled(f, frame) and rest_unchanged(f, frame) for f in frames)
                frames = await next_frames(unlabelled)
                assert not any(labelled(f, frame) for f in frames)
                assert all(rest_unchanged(f, frame) for f in frames)

                # Bad input changes nothing.
                status, body = await patch(
                    http, server.base, unlabelled.session_id, {"label": "yes"}
                )
                assert status == 422 and body["error"]["code"] == "bad_label", body
                status, body = await patch(http, server.base, unlabelled.session_id, {})
                assert status == 200 and body["label"] is False

                status, body = await patch(
                    http, server.base, unlabelled.session_id, {"label": True}
                )
                assert status == 200 and body["label"] is True
                await unlabelled.wait_frames(15)  # frames in flight before the change
                frames = await next_frames(unlabelled)
                assert all(labelled(f, frame) and rest_unchanged(f, frame) for f in frames)

                status, body = await patch(
                    http, server.base, labelled_by_default.session_id, {"label": False}
                )
                assert status == 200 and body["label"] is False
                await labelled_by_default.wait_frames(15)
                frames = await next_frames(labelled_by_default)
                assert not any(labelled(f, frame) for f in frames)
            finally:
                for peer in (labelled_by_default, unlabelled):
                    await peer.close()
                    async with http.delete(f"{server.base}{peer.location}"):
                        pass

    asyncio.run(scenario())


def test_a_whip_label_that_is_neither_1_nor_0_is_refused(server: LiveServer) -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection

    async def scenario() -> None:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{server.base}/whip?label=maybe",
                    data=pc.localDescription.sdp,
                    headers={"Content-Type": "application/sdp"},
                ) as response:
                    assert response.status == 422
                    assert "label must be 1 or 0" in await response.text()
        finally:
            await pc.close()
        assert server.service.sessions == {}

    asyncio.run(scenario())
