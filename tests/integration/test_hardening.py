"""Bad input, squatters, floods and scoped tokens against the real app (issue 18).

Each test names the defect it pins down: it failed on the code before the fix. One server
for the module, with an admin, a publish and a view token; tests that need other limits
start a server of their own (the models load in under a second once cached).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import VideoStreamTrack

from livefuse.settings import Settings
from tests.webrtc_peers import FramesTrack, LiveServer, Peer, bearer, live_server, publish, watch

ADMIN = "admin-token-5b1e"
PUBLISH = "publish-token-77c0"
VIEW = "view-token-e2d9"
pytestmark = pytest.mark.slow


def hardened(settings: Settings, **changes: object) -> Settings:
    """The module's server settings: scoped tokens, no swap processes (nothing here is
    about swap speed, and the cores are shared), short limits."""
    return settings.model_copy(
        update={
            "token": ADMIN,
            "publish_tokens": [PUBLISH],
            "view_tokens": [VIEW],
            "swap_processes": 0,
            "max_sessions": 2,
            "max_image_bytes": 2_000_000,
            "max_sdp_bytes": 16 * 1024,
            **changes,
        }
    )


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    with live_server(hardened(settings)) as live:
        yield live


@pytest.fixture(autouse=True)
def _sessions_end_with_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" not in request.fixturenames:
        return
    live: LiveServer = request.getfixturevalue("server")
    for session_id in list(live.service.sessions):
        live.call(lambda sid=session_id: live.service.end_session(sid, reason="test over"))


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    from skimage import data

    astronaut = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    return cv2.resize(astronaut, (640, 360), interpolation=cv2.INTER_AREA)


def run(scenario: Callable[[aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            await scenario(http)

    asyncio.run(main())


async def offer_text(*, viewer: bool = False) -> str:
    """A real offer from an aiortc peer: a publisher's (video sendrecv + audio) or a
    viewer's (recvonly)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if viewer:
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
    else:
        pc.addTransceiver(VideoStreamTrack(), direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    text = pc.localDescription.sdp
    await pc.close()
    return text


def without_lines(sdp: str, prefix: str) -> str:
    return "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith(prefix))


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes | str, content_type: str, token: str | None
) -> tuple[int, str]:
    async with http.post(
        url, data=body, headers={"Content-Type": content_type, **bearer(token)}
    ) as response:
        return response.status, await response.text()


def raw_exchange(base: str, request: bytes, *, timeout_s: float = 20.0) -> bytes:
    """Send bytes as they are (what no HTTP client library would send) and return the
    status line of the answer. A server that waits for more times out here."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
        connection.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            data = connection.recv(4096)
            if not data:
                break
            answer += data
    return answer.split(b"\r\n", 1)[0]


# -- item 1: every malformed offer, fragment and body gets a 4xx -------------------------


def test_offers_aiortc_cannot_parse_or_build_are_400_on_whip_and_whep(
    server: LiveServer, frame: np.ndarray
) -> None:
    """Was 500: aiortc's parser asserts on a short candidate and raises StopIteration on
    an fmtp for an unknown payload type; a video mid outside BUNDLE (or with NUL or
    non-ASCII in it) half-builds the peer, whose close raised AttributeError and lost
    the 400."""

    async def scenario(http: aiohttp.ClientSession) -> None:
        publisher = await publish(http, server.base, [frame], token=ADMIN)
        for viewer, path in ((False, "/whip"), (True, f"/whep/{publisher.session_id}")):
            offer = await offer_text(viewer=viewer)
            first_mid = "a=mid:0"
            assert first_mid in offer
            broken = {
                "short candidate": offer.replace(
                    "a=end-of-candidates", "a=candidate:1 1 udp\r\na=end-of-candidates", 1
                ),
                "fmtp for an unknown payload": offer.replace(
                    "a=rtcp-mux", "a=rtcp-mux\r\na=fmtp:250 apt=1", 1
                ),
                "mid outside BUNDLE": offer.replace(first_mid, "a=mid:7", 1),
                "NUL in mid": offer.replace(first_mid, "a=mid:0\x00", 1),
                "unicode mid": offer.replace(first_mid, "a=mid:0\u00e9", 1),
            }
            for what, sdp in broken.items():
                status, text = await post(
                    http, server.base + path, sdp.encode(), "application/sdp", ADMIN
                )
                assert status == 400, (path, what, status, text)
                assert text.strip() and "\n" not in text.strip(), (what, text)
        assert len(server.service.sessions) == 1  # none of them took a slot
        await publisher.wait_frames(5)  # and the publisher streams on
        await publisher.close()

    run(scenario)


def test_offers_that_cannot_connect_are_refused_with_400(server: LiveServer) -> None:
    """Was 201 and a slot held: no DTLS fingerprint, or the video m-line on port 0."""

    async def scenario(http: aiohttp.ClientSession) -> None:
        offer = await offer_text()
        video_port = offer.split("m=video ", 1)[1].split(" ", 1)[0]
        for what, sdp, says in (
            ("no fingerprint", without_lines(offer, "a=fingerprint"), "fingerprint"),
            ("video port 0", offer.replace(f"m=video {video_port} ", "m=video 0 ", 1), "video"),
        ):
            status, text = await post(
                http, server.base + "/whip", sdp.encode(), "application/sdp", ADMIN
            )
            assert status == 400 and says in text, (what, status, text)
        assert not server.service.sessions

    run(scenario)


def test_bad_multipart_uploads_are_400(server: LiveServer) -> None:
    """Was 500: a form without a boundary or with another one than declared (ValueError),
    a part header line of 8 KiB (LineTooLong)."""
    image = cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    part = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n'
    cases = {
        "no boundary": ("multipart/form-data", b"--XX\r\n" + part + b"\r\n" + image),
        "other boundary": (
            "multipart/form-data; boundary=XX",
            b"--YY\r\n" + part + b"\r\n" + image + b"\r\n--YY--\r\n",
        ),
        "8 KiB part header": (
            "multipart/form-data; boundary=XX",
            b"--XX\r\n"
            + part
            + b"X-Long: "
            + b"a" * 8192
            + b"\r\n\r\n"
            + image
            + b"\r\n--XX--\r\n",
        ),
    }

    async def scenario(http: aiohttp.ClientSession) -> None:
        for what, (content_type, body) in cases.items():
            async with http.post(
                server.base + "/api/v1/sources",
                data=body,
                headers={"Content-Type": content_type, **bearer(ADMIN)},
            ) as response:
                answer = await response.json()
                assert response.status == 400, (what, response.status, answer)
                assert answer["error"]["code"] == "bad_form", (what, answer)

    run(scenario)


def test_bad_json_and_bad_chunked_bodies_are_400(server: LiveServer, frame: np.ndarray) -> None:
    """Was 500: JSON nested deeper than the parser's recursion limit (RecursionError)."""

    async def scenario(http: aiohttp.ClientSession) -> None:
        publisher = await publish(http, server.base, [frame], token=ADMIN)
        url = f"{server.base}/api/v1/sessions/{publisher.session_id}"
        for body in (b"[" * 12_000, b'{"a":' * 3_000, b"\xff\xfe{", b'{"quality": "high"'):
            async with http.patch(
                url, data=body, headers={"Content-Type": "application/json", **bearer(ADMIN)}
            ) as response:
                answer = await response.json()
                assert response.status == 400, (body[:20], answer)
                assert answer["error"]["code"] == "bad_json"
        await publisher.close()

    run(scenario)
    # A chunked body whose chunk size is not hex: a clean 400, on an /api path too.
    status = raw_exchange(
        server.base,
        b"POST /api/v1/sources HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ADMIN.encode()
        + b"\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"zz\r\nabc\r\n0\r\n\r\n",
    )
    assert status.split()[1] == b"400", status


def test_over_long_url_is_414_without_a_traceback(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Was 400 with an aiohttp ERROR traceback for every URL over 8 KiB."""
    caplog.set_level(logging.INFO)
    for length in (9_000, 70_000):
        status = raw_exchange(
            server.base,
            b"GET /watch/" + b"a" * length + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert status.split()[1] == b"414", (length, status)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    # A header line over the limit: refused as a client error, quietly too.
    status = raw_exchange(
        server.base,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9_000 + b"\r\n\r\n",
    )
    assert status.split()[1] in (b"400", b"431"), status
    assert not [r for r in caplog.records if r.exc_info], caplog.text


# -- item 3: uploads are checked before they are read, and read a few at a time ----------


def test_busy_upload_is_refused_before_its_body_is_read(settings: Settings) -> None:
    """Was: every upload read whole (45 MB each) before the 503. Now, with one upload
    being read, the next is answered 503 + Retry-After while its body is still unsent."""
    with live_server(hardened(settings, max_concurrent_uploads=1)) as live:
        host, port = live.base.removeprefix("http://").split(":")
        head = (
            "POST /api/v1/sources HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Authorization: Bearer {ADMIN}\r\nContent-Length: 1500000\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port)), timeout=20) as first:
            first.sendall(head + b"\x89PNG" + b"\0" * 1000)  # and the rest never comes
            # Only the headers of the second: its answer must come without its body.
            deadline_status = raw_exchange(live.base, head)
            assert deadline_status.split()[1] == b"503", deadline_status
            # Too large by its Content-Length: 413 unread as well.
            too_large = head.replace(b"1500000", b"9000000")
            assert raw_exchange(live.base, too_large).split()[1] == b"413"
            # Not an image by its declared type: 415 unread.
            as_text = head.replace(b"image/png", b"text/plain")
            assert raw_exchange(live.base, as_text).split()[1] == b"415"
        # The first gave up; a new upload gets its turn again.
        grey = cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()

        async def scenario(http: aiohttp.ClientSession) -> None:
            status, text = await post(http, live.base + "/api/v1/sources", grey, "image/png", ADMIN)
            assert status == 422 and "no_face" in text, (status, text)

        run(scenario)


# -- item 5: scoped tokens, /metrics ------------------------------------------------------


def test_tokens_are_scoped(server: LiveServer, frame: np.ndarray) -> None:
    """Was: one token for everything (and viewer links carried it). A view token may
    watch and nothing else; a publish token may publish, upload and steer its session;
    the admin token may do all, /metrics included."""

    async def scenario(http: aiohttp.ClientSession) -> None:
        base = server.base
        offer = await offer_text()
        for token in (VIEW, None, "not-a-token"):
            status, text = await post(http, base + "/whip", offer, "application/sdp", token)
            assert status == (403 if token == VIEW else 401), (token, status, text)
        status, text = await post(http, base + "/api/v1/sources", b"x", "image/png", VIEW)
        assert status == 403 and "publish" in text, text
        for token, allowed in ((VIEW, False), (PUBLISH, False), (ADMIN, True)):
            async with http.get(base + "/metrics", headers=bearer(token)) as response:
                assert (response.status == 200) is allowed, (token, response.status)

        publisher = await publish(http, base, [frame], token=PUBLISH)
        session_url = f"{base}/api/v1/sessions/{publisher.session_id}"
        async with http.patch(session_url, json={"quality": "fast"}, headers=bearer(PUBLISH)) as r:
            assert r.status == 200, await r.text()
        async with http.patch(session_url, json={"quality": "fast"}, headers=bearer(VIEW)) as r:
            assert r.status == 403
        viewer = await watch(http, base, publisher.session_id, token=VIEW)
        await viewer.wait_frames(3)
        async with http.delete(base + viewer.location, headers=bearer(VIEW)) as r:
            assert r.status == 200
        await viewer.close()
        async with http.delete(base + publisher.location, headers=bearer(VIEW)) as r:
            assert r.status == 403  # a viewer cannot end the publisher
        async with http.delete(base + publisher.location, headers=bearer(PUBLISH)) as r:
            assert r.status == 200
        await publisher.close()

    run(scenario)


def test_metrics_name_no_session_and_scrape_listener_needs_no_token(
    settings: Settings, frame: np.ndarray
) -> None:
    """Was: /metrics open to all with `livefuse_viewers{session=...}` per live session."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        scrape_port = probe.getsockname()[1]
    configured = hardened(settings, metrics_host="127.0.0.1", metrics_port=scrape_port)
    with live_server(configured) as live:

        async def scenario(http: aiohttp.ClientSession) -> None:
            publisher = await publish(http, live.base, [frame], token=ADMIN)
            viewer = await watch(http, live.base, publisher.session_id, token=ADMIN)
            await viewer.wait_frames(3)
            async with http.get(live.base + "/metrics") as response:
                assert response.status == 401
            async with http.get(live.base + "/metrics", headers=bearer(ADMIN)) as response:
                assert response.status == 200
                text = await response.text()
            async with http.get(f"http://127.0.0.1:{scrape_port}/metrics") as response:
                assert response.status == 200
                scraped = await response.text()
            for metrics in (text, scraped):
                assert publisher.session_id not in metrics
                assert viewer.location.rsplit("/", 1)[1] not in metrics
                assert "session=" not in metrics
                assert "livefuse_viewers 1.0" in metrics
                assert "livefuse_sessions 1.0" in metrics
            async with http.get(f"http://127.0.0.1:{scrape_port}/api/v1/sessions") as response:
                assert response.status == 404  # the scrape listener serves /metrics alone
            await viewer.close()
            await publisher.close()

        run(scenario)


def test_empty_or_blank_tokens_are_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    """Was: `--token ""` started a server on which an empty Bearer passed."""
    from livefuse.cli.main import main

    for flags in (["--token", ""], ["--publish-token", " "], ["--view-token", ""]):
        assert main(["serve", "--port", "0", *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "token" in err, (flags, err)


# -- item 2: slots that cannot be squatted -----------------------------------------------


def test_offer_that_never_connects_loses_its_slot(settings: Settings, frame: np.ndarray) -> None:
    """Was: an offer whose ICE never completes held a slot until the idle timeout (15 s),
    so two every 15 s kept every publisher out. Now it is ended once the ICE deadline
    passes, and a second pending offer from the same address is 429."""
    configured = hardened(settings, ice_connect_timeout_s=1.0, idle_timeout_s=60.0)
    with live_server(configured) as live:

        async def scenario(http: aiohttp.ClientSession) -> None:
            squatter = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            squatter.addTransceiver(FramesTrack([frame]), direction="sendrecv")
            await squatter.setLocalDescription(await squatter.createOffer())
            assert squatter.localDescription is not None
            squat = squatter.localDescription.sdp
            # The answer is never applied: ICE never starts on the squatter's side.
            status, _ = await post(http, live.base + "/whip", squat, "application/sdp", ADMIN)
            assert status == 201
            status, text = await post(http, live.base + "/whip", squat, "application/sdp", ADMIN)
            assert status == 429 and "pending" in text, (status, text)
            for _ in range(200):
                if not live.service.sessions:
                    break
                await asyncio.sleep(0.05)
            assert not live.service.sessions, "the unconnected session kept its slot"
            await squatter.close()
            # Real publishers get both slots.
            peers: list[Peer] = [
                await publish(http, live.base, [frame], token=ADMIN) for _ in range(2)
            ]
            for peer in peers:
                await peer.wait_frames(3)
                await peer.close()

        run(scenario)


# -- item 4: failures are loud -------------------------------------------------------------


def test_readyz_is_503_while_a_stage_fails_on_every_frame(server: LiveServer) -> None:
    """Was: /readyz 200 while every frame passed through unswapped. Frames the server's
    own engine cannot read (one channel) fail in its first stage, frame after frame."""
    engine = server.service.engine
    assert engine is not None
    session = engine.open_session()

    async def readyz(http: aiohttp.ClientSession) -> tuple[int, str]:
        async with http.get(server.base + "/readyz") as response:
            return response.status, await response.text()

    try:
        for index in range(engine.health.threshold):
            session.process(np.full((90, 160), 70, np.uint8), timestamp=index / 30)
        status, text = asyncio.run(_with_http(readyz))
        assert status == 503 and "to_array" in text, (status, text)
        session.process(np.full((90, 160, 3), 70, np.uint8), timestamp=1.0)
        status, text = asyncio.run(_with_http(readyz))
        assert status == 200, (status, text)
    finally:
        session.close()


async def _with_http(call: Callable[[aiohttp.ClientSession], Awaitable[tuple[int, str]]]) -> Any:
    async with aiohttp.ClientSession() as http:
        return await call(http)
