"""The broadcast relay against real servers: nginx with its RTMP module as the feed's
server and as the platform's ingest (started here, on loopback), the real app and models,
`livefuse relay` as a process of its own, real aiortc peers for the named streams.

The feed is bench/relay_av.py's marked clip: a face, a frame number in a barcode, and a
flash on the same frame as a beep every 2 s, encoded once as an encoder would send it.
What comes back is read with FFmpeg (PyAV) and judged by an independent recogniser.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import io
import multiprocessing
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from bench.relay_av import EncodedFeed, Playback, Publisher, beep_onsets, encode_feed
from bench.rtmp_server import NginxRtmp, nginx_rtmp, nginx_rtmp_missing
from livefuse.settings import Settings
from livefuse.stream.feeds import has_srt
from tests.identity import SAME_PERSON_THRESHOLD, DlibRecognizer
from tests.media import portrait
from tests.webrtc_peers import LiveServer, Peer, bearer, live_server, publish, watch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nginx_rtmp_missing() is not None, reason=str(nginx_rtmp_missing())),
]
TOKEN = "relay-test-token"
AUTH = bearer(TOKEN)
FEED_SIZE = (640, 360)


@pytest.fixture(scope="module")
def target_photo(testdata_dir: Path) -> np.ndarray:
    photo = cv2.imread(str(testdata_dir / "astronaut.png"))
    assert photo is not None
    return photo[0:288, 0:512]


@pytest.fixture(scope="module")
def feed(target_photo: np.ndarray) -> EncodedFeed:
    return encode_feed(target_photo, seconds=4.0, size=FEED_SIZE)


@pytest.fixture(scope="module")
def recognizer() -> DlibRecognizer:
    return DlibRecognizer()


@pytest.fixture(scope="module")
def source_person(testdata_dir: Path, recognizer: DlibRecognizer, tmp_path_factory: Any) -> Path:
    """The third person of insightface's t1.jpg as a 256 px portrait, saved as a file."""
    t1 = cv2.imread(str(testdata_dir / "t1.jpg"))
    assert t1 is not None, "t1.jpg is missing: run make install"
    boxes, _ = recognizer.detect(t1)
    path = tmp_path_factory.mktemp("source") / "person.png"
    cv2.imwrite(str(path), portrait(t1, sorted(boxes)[2]))
    return path


@pytest.fixture(scope="module")
def source_bgr(source_person: Path) -> np.ndarray:
    image = cv2.imread(str(source_person))
    assert image is not None
    return image


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    configured = settings.model_copy(
        update={
            "token": TOKEN,
            "max_sessions": 3,
            "idle_timeout_s": 3.0,
            "publisher_gone_s": 1.5,
            # Several offers from this one address at once (the name race below).
            "max_pending_publishers_per_address": 8,
        }
    )
    with live_server(configured) as live:
        yield live


@pytest.fixture
def rtmp() -> Iterator[NginxRtmp]:
    with nginx_rtmp() as server:
        yield server


@contextlib.contextmanager
def publishing(url: str, feed: EncodedFeed) -> Iterator[Publisher]:
    publisher = Publisher(url, feed)
    publisher.start()
    try:
        yield publisher
    finally:
        publisher.stop()


@contextlib.contextmanager
def playing(url: str, *, keep_every: int = 0) -> Iterator[Playback]:
    playback = Playback(url, keep_every=keep_every)
    playback.start()
    try:
        yield playback
    finally:
        playback.stop()


def wait_until(check: Callable[[], Any], *, within_s: float, what: str) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {within_s} s"
        time.sleep(0.2)


def run(scenario: Callable[[aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            await scenario(http)

    asyncio.run(main())


def assert_reads_as_source(
    pictures: list[np.ndarray],
    recognizer: DlibRecognizer,
    source: np.ndarray,
    target: np.ndarray,
) -> None:
    """The faces in `pictures` read as the source person, and as the source more than as
    the target they replaced."""
    (_, source_descriptor), *_ = recognizer.descriptors(source)
    (_, target_descriptor), *_ = recognizer.descriptors(target)
    to_source, to_target = [], []
    for picture in pictures:
        found = recognizer.descriptors(picture)
        if not found:
            continue
        _, descriptor = max(found, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
        to_source.append(recognizer.distance(descriptor, source_descriptor))
        to_target.append(recognizer.distance(descriptor, target_descriptor))
    assert len(to_source) >= len(pictures) // 2, "too few faces found in the pushed video"
    assert statistics.median(to_source) < SAME_PERSON_THRESHOLD, to_source
    assert statistics.median(to_source) < statistics.median(to_target), (to_source, to_target)


def frame_numbers_advance(playback: Playback) -> bool:
    numbers = [n for _, n, _ in playback.arrivals if n is not None]
    return len(set(numbers)) >= 30


# -- livefuse relay ------------------------------------------------------------------------


def test_relay_command_pushes_swapped_video_with_its_audio(
    rtmp: NginxRtmp,
    feed: EncodedFeed,
    source_person: Path,
    source_bgr: np.ndarray,
    target_photo: np.ndarray,
    recognizer: DlibRecognizer,
) -> None:
    command = [
        sys.executable,
        "-m",
        "livefuse.cli.main",
        "relay",
        "--input",
        rtmp.url("in"),
        "--source",
        str(source_person),
        "--output",
        rtmp.url("out"),
        "--quality",
        "high",
    ]
    with (
        publishing(rtmp.url("in"), feed),
        playing(rtmp.url("out"), keep_every=15) as playback,
    ):
        relay = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(
                lambda: len(playback.pictures) >= 8 and len(playback.flashes) >= 2,
                within_s=120,
                what="8 pictures and 2 flashes did not come out of the relay",
            )
        finally:
            relay.send_signal(signal.SIGTERM)
            _, stderr = relay.communicate(timeout=60)
    assert relay.returncode == 0, stderr
    assert "-> rtmp://127.0.0.1" in stderr and "done:" in stderr, stderr
    # The frames come out in order, each once (the barcode's numbers go up, looping).
    numbers = [n for _, n, _ in playback.arrivals if n is not None]
    steps = [(b - a) % feed.frames for a, b in zip(numbers, numbers[1:], strict=False)]
    assert statistics.median(steps) == 1, steps[:50]
    # A keyframe every 2 s of the stream's time, as platforms ask (one may come a frame or
    # two late when the machine stalls; the grid holds).
    gaps = np.diff(playback.keyframes)
    assert len(gaps) >= 2 and 1.9 <= float(np.median(gaps)) <= 2.2, playback.keyframes
    assert all(g <= 3.0 for g in gaps), playback.keyframes
    # The feed's audio came along: its beeps are there, one near each flash.
    beeps = beep_onsets(playback.audio_level)
    assert beeps, "no beep in the pushed audio"
    assert any(abs(b - f) < 0.2 for f in playback.flashes for b in beeps)
    assert playback.audio_seconds > 0.8 * (playback.arrivals[-1][2] - playback.arrivals[0][2])
    assert_reads_as_source(playback.pictures[-6:], recognizer, source_bgr, target_photo)


def test_relay_command_refuses_what_it_cannot_use(hanks_path: Path) -> None:
    def relay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "livefuse.cli.main", "relay", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    ftp = relay("--input", "ftp://x/y", "--source", str(hanks_path), "--output", "rtmp://h/a/k")
    assert ftp.returncode == 2 and "unsupported scheme 'ftp'" in ftp.stderr, ftp.stderr
    out = relay("--input", "rtmp://h/a/k", "--source", str(hanks_path), "--output", "http://h/x")
    assert out.returncode == 2 and "unsupported scheme 'http'" in out.stderr, out.stderr
    unreachable = relay(
        "--input", "rtmp://127.0.0.1:9/live/none", "--source", str(hanks_path),
        "--output", "rtmp://127.0.0.1:9/live/out", "--seconds", "2",
    )  # fmt: skip
    assert unreachable.returncode == 1, unreachable.stderr
    assert "nothing was relayed: the input gave no frame" in unreachable.stderr
    missing = relay(
        "--input", "rtmp://h/a/k", "--source", "/nonexistent.png", "--output", "rtmp://h/a/k"
    )
    assert missing.returncode == 2 and "source:" in missing.stderr, missing.stderr


# -- ingests and pushes in the service -------------------------------------------------------


async def upload(http: aiohttp.ClientSession, base: str, image: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    async with http.post(
        f"{base}/api/v1/sources",
        data=encoded.tobytes(),
        headers={"Content-Type": "image/png", **AUTH},
    ) as response:
        body = await response.json()
        assert response.status == 201, body
        return str(body["id"])


async def api(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, *, expect: int
) -> Any:
    async with http.request(method, url, json=body, headers=AUTH) as response:
        text = await response.text()
        assert response.status == expect, f"{method} {url}: {response.status} {text}"
        return await response.json() if response.content_type == "application/json" else text


async def poll(check: Callable[[], Awaitable[Any]], *, within_s: float, what: str) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {within_s} s"
        await asyncio.sleep(0.2)


def test_ingest_pushed_on_through_the_service(
    server: LiveServer,
    rtmp: NginxRtmp,
    feed: EncodedFeed,
    source_bgr: np.ndarray,
    target_photo: np.ndarray,
    recognizer: DlibRecognizer,
) -> None:
    base = server.base

    async def scenario(http: aiohttp.ClientSession) -> None:
        source = await upload(http, base, source_bgr)
        body = {"url": rtmp.url("in"), "source": source, "quality": "high"}
        ingest = await api(http, "POST", f"{base}/api/v1/ingests", body, expect=201)
        assert ingest["mode"] == "ingest" and ingest["source"] == source
        session = ingest["id"]

        async def live() -> Any:
            state = await api(http, "GET", f"{base}/api/v1/ingests/{session}", expect=200)
            return (
                state if state["ingest"]["state"] == "live" and state["stats"]["swapped"] else None
            )

        state = await poll(live, within_s=30, what="the ingest did not go live and swap")
        assert state["ingest"]["width"] == FEED_SIZE[0]
        assert "rtmp://127.0.0.1" in state["ingest"]["url"]
        listed = await api(http, "GET", f"{base}/api/v1/ingests", expect=200)
        assert [i["id"] for i in listed["ingests"]] == [session]

        out = {"url": rtmp.url("out-secret-key")}
        output = await api(
            http, "POST", f"{base}/api/v1/sessions/{session}/outputs", out, expect=201
        )
        assert "secret" not in output["url"], "the stream key shows in the stats"
        with playing(rtmp.url("out-secret-key"), keep_every=15) as playback:
            await poll(
                lambda: asyncio.sleep(
                    0, len(playback.pictures) >= 6 and len(playback.flashes) >= 1
                ),
                within_s=60,
                what="6 pictures did not come out of the push",
            )
            state = await api(http, "GET", f"{base}/api/v1/sessions/{session}", expect=200)
            (pushed,) = state["outputs"]
            assert pushed["state"] == "live" and pushed["frames_sent"] > 0, pushed
            async with http.get(f"{base}/metrics", headers=AUTH) as response:
                scraped = await response.text()
            assert 'livefuse_outputs{state="live"} 1.0' in scraped, scraped
            assert 'livefuse_ingests{state="live"} 1.0' in scraped
            assert session not in scraped, "a session id on /metrics"
        assert beep_onsets(playback.audio_level), "the feed's audio did not come through"
        assert_reads_as_source(playback.pictures[-6:], recognizer, source_bgr, target_photo)

        await api(
            http, "DELETE", f"{base}/api/v1/sessions/{session}/outputs/{output['id']}", expect=204
        )
        await api(http, "DELETE", f"{base}/api/v1/ingests/{session}", expect=204)
        await api(http, "GET", f"{base}/api/v1/ingests/{session}", expect=404)
        sessions = await api(http, "GET", f"{base}/api/v1/sessions", expect=200)
        assert sessions["sessions"] == []

    with publishing(rtmp.url("in"), feed):
        run(scenario)


def test_ingest_and_output_refuse_bad_input(server: LiveServer) -> None:
    base = server.base

    async def scenario(http: aiohttp.ClientSession) -> None:
        url = f"{base}/api/v1/ingests"
        for body, code in [
            ({"url": "ftp://example.com/x"}, "bad_url"),
            ({"url": "rtmp:///no-host"}, "bad_url"),
            ({}, "bad_url"),
            ({"url": "rtmp://h/a/k", "name": "no spaces"}, "bad_name"),
            ({"url": "rtmp://h/a/k", "source": "nope"}, "unknown_source"),
            ({"url": "rtmp://h/a/k", "quality": "ultra"}, "bad_quality"),
            ({"url": "rtmp://h/a/k", "colour": "red"}, "unknown_field"),
        ]:
            refused = await api(http, "POST", url, body, expect=422)
            assert refused["error"]["code"] == code, (body, refused)
        if not has_srt():
            refused = await api(http, "POST", url, {"url": "srt://h:9000"}, expect=422)
            assert "libsrt" in refused["error"]["message"]
        async with http.post(url, data=b"{not json", headers=AUTH) as response:
            assert response.status == 400
        await api(
            http, "POST", f"{base}/api/v1/sessions/nope/outputs", {"url": "rtmp://h/a"}, expect=404
        )

        # Unreachable: the session starts and keeps retrying, saying why.
        ingest = await api(
            http, "POST", url, {"url": "rtmp://127.0.0.1:9/live/nothing"}, expect=201
        )

        async def retrying() -> Any:
            state = await api(http, "GET", f"{url}/{ingest['id']}", expect=200)
            return state if state["ingest"]["state"] == "retrying" else None

        state = await poll(retrying, within_s=30, what="the unreachable ingest did not retry")
        assert state["ingest"]["last_error"], state
        assert "nothing" not in state["ingest"]["last_error"], "the stream key shows"
        output_url = f"{base}/api/v1/sessions/{ingest['id']}/outputs"
        await api(http, "POST", output_url, {"url": "https://example.com/x"}, expect=422)
        await api(http, "POST", output_url, {"url": "rtmp://h/a", "bitrate_kbps": 5}, expect=422)
        await api(http, "DELETE", f"{url}/{ingest['id']}", expect=204)

    run(scenario)


def test_feed_that_stops_and_an_ingest_server_that_restarts(
    server: LiveServer, feed: EncodedFeed, source_bgr: np.ndarray
) -> None:
    """The feed drops and comes back: the ingest reconnects. The platform's server goes
    away and comes back on its port: the push reconnects. The session lives throughout."""
    base = server.base
    with nginx_rtmp() as feed_server, nginx_rtmp() as platform:

        async def scenario(http: aiohttp.ClientSession) -> None:
            source = await upload(http, base, source_bgr)
            body = {"url": feed_server.url("in"), "source": source, "quality": "fast"}
            with publishing(feed_server.url("in"), feed) as first:
                ingest = await api(http, "POST", f"{base}/api/v1/ingests", body, expect=201)
                url = f"{base}/api/v1/ingests/{ingest['id']}"

                async def state() -> Any:
                    return await api(http, "GET", url, expect=200)

                await poll(
                    lambda: _has(state, "ingest", "state", "live"), within_s=30, what="not live"
                )
                output = await api(
                    http,
                    "POST",
                    f"{base}/api/v1/sessions/{ingest['id']}/outputs",
                    {"url": platform.url("out")},
                    expect=201,
                )
                await poll(
                    lambda: _output_state(state, "live"), within_s=30, what="the push is not live"
                )
                first.stop()  # the encoder goes away mid-stream
                await poll(
                    lambda: _has(state, "ingest", "state", "retrying"),
                    within_s=30,
                    what="the ingest did not notice its feed dropped",
                )
            frames_before = (await state())["ingest"]["frames"]
            with publishing(feed_server.url("in"), feed):
                await poll(
                    lambda: _has(state, "ingest", "state", "live"),
                    within_s=60,
                    what="the ingest did not reconnect to its feed",
                )
                await poll(
                    lambda: _more_frames(state, frames_before),
                    within_s=30,
                    what="no frames after the feed came back",
                )
                # The platform's server restarts on the same port.
                platform.stop()
                await poll(
                    lambda: _output_state(state, "retrying"),
                    within_s=30,
                    what="the push did not notice its server went away",
                )
                platform.start()
                await poll(
                    lambda: _output_state(state, "live"),
                    within_s=60,
                    what="the push did not resume",
                )
                with playing(platform.url("out")) as playback:
                    await poll(
                        lambda: asyncio.sleep(0, frame_numbers_advance(playback)),
                        within_s=30,
                        what="no frames from the resumed push",
                    )
                final = await state()
                assert final["outputs"][0]["reconnects"] >= 1, final["outputs"]
                assert final["ingest"]["reconnects"] >= 1, final["ingest"]
            await api(
                http,
                "DELETE",
                f"{base}/api/v1/sessions/{ingest['id']}/outputs/{output['id']}",
                expect=204,
            )
            await api(http, "DELETE", url, expect=204)

        run(scenario)


async def _has(state: Callable[[], Awaitable[Any]], part: str, key: str, value: Any) -> bool:
    return bool((await state())[part][key] == value)


async def _output_state(state: Callable[[], Awaitable[Any]], value: str) -> bool:
    outputs = (await state())["outputs"]
    return bool(outputs and outputs[0]["state"] == value)


async def _more_frames(state: Callable[[], Awaitable[Any]], before: int) -> bool:
    return bool((await state())["ingest"]["frames"] > before + 30)


# -- named streams ---------------------------------------------------------------------------


def test_named_stream_viewer_keeps_playing_across_publisher_restarts(
    server: LiveServer, target_photo: np.ndarray
) -> None:
    """A WHEP viewer of /whep/studio keeps its one connection while three publishers
    follow each other on /whip/studio: one ends with DELETE, one vanishes (its
    replacement takes over once it has been silent), and each one's picture reaches the
    viewer. A second publisher while one is live gets 409."""
    base = server.base
    frame = cv2.resize(target_photo, (640, 360))
    pictures = [frame, cv2.flip(frame, 1), cv2.GaussianBlur(frame, (0, 0), 6)]

    def closest(received: np.ndarray) -> int:
        errors = [float(np.abs(received.astype(np.int16) - p).mean()) for p in pictures]
        return int(np.argmin(errors))

    async def shows(viewer: Peer, index: int) -> bool:
        await viewer.wait_frames(5)
        return closest(viewer.received.frames[-1]) == index

    async def scenario(http: aiohttp.ClientSession) -> None:
        first = await publish(
            http, base, [pictures[0]], token=TOKEN, direction="sendonly", name="studio"
        )
        viewer = await watch(http, base, "studio", token=TOKEN)
        assert viewer.location.startswith("/whep/studio/")
        await poll(lambda: shows(viewer, 0), within_s=30, what="the viewer did not see publisher 1")

        async with http.post(
            f"{base}/whip/studio",
            data=first.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", **AUTH},
        ) as response:
            assert response.status == 409, await response.text()

        async with http.delete(base + first.location, headers=AUTH) as response:
            assert response.status == 200
        await first.close()
        second = await publish(
            http, base, [pictures[1]], token=TOKEN, direction="sendonly", name="studio"
        )
        await poll(lambda: shows(viewer, 1), within_s=30, what="the viewer did not see publisher 2")

        # Publisher 2 vanishes without a goodbye; publisher 3 takes the name once it is
        # silent (409 until then).
        assert second.track is not None
        second.track.pause()

        async def third_accepted() -> Peer | None:
            try:
                return await publish(
                    http, base, [pictures[2]], token=TOKEN, direction="sendonly", name="studio"
                )
            except AssertionError as refused:
                assert " 409 " in str(refused), refused
                return None

        third = await poll(third_accepted, within_s=20, what="publisher 3 was never let in")
        await poll(lambda: shows(viewer, 2), within_s=30, what="the viewer did not see publisher 3")
        assert viewer.pc.connectionState == "connected"
        streams = await api(http, "GET", f"{base}/api/v1/streams", expect=200)
        (studio,) = streams["streams"]
        assert studio["name"] == "studio" and studio["viewers"] == 1
        assert studio["publisher"] == third.session_id

        # /whip/ with a trailing slash publishes an unnamed session.
        async with http.post(
            f"{base}/whip/",
            data=second.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", **AUTH},
        ) as response:
            assert response.status == 201, await response.text()
            unnamed = response.headers["Location"]
        for location in (third.location, unnamed):
            async with http.delete(base + location, headers=AUTH) as response:
                assert response.status == 200
        await third.close()
        await second.close()
        async with http.delete(base + viewer.location, headers=AUTH) as response:
            assert response.status == 200
        await viewer.close()
        # Nothing publishes or watches it any more: the name is free and gone.
        streams = await api(http, "GET", f"{base}/api/v1/streams", expect=200)
        assert streams["streams"] == []

    run(scenario)


# -- HTTP(S): a file, an HLS playlist ----------------------------------------------------------


@contextlib.contextmanager
def http_files(root: Path) -> Iterator[str]:
    """A plain HTTP server of `root` on loopback (Python's own): the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def write_hls(feed: EncodedFeed, folder: Path) -> Path:
    """The feed remuxed as an HLS playlist of 1 s segments."""
    source = av.open(io.BytesIO(feed.flv), "r", format="flv")
    playlist = folder / "index.m3u8"
    target = av.open(
        str(playlist),
        "w",
        format="hls",
        options={"hls_time": "1", "hls_list_size": "0", "hls_playlist_type": "vod"},
    )
    streams = {s.index: target.add_stream_from_template(s) for s in source.streams}
    for packet in source.demux():
        if packet.dts is None:
            continue
        packet.stream = streams[packet.stream.index]
        target.mux(packet)
    target.close()
    source.close()
    return playlist


def test_ingest_of_a_file_and_of_hls_over_http(
    server: LiveServer, feed: EncodedFeed, source_bgr: np.ndarray, tmp_path: Path
) -> None:
    """A file over HTTP plays at its own pace and, once it ends, ends its session; an HLS
    playlist goes live and swaps."""
    (tmp_path / "clip.flv").write_bytes(feed.flv)
    write_hls(feed, tmp_path)
    base = server.base

    async def scenario(http_client: aiohttp.ClientSession, files: str) -> None:
        source = await upload(http_client, base, source_bgr)
        url = f"{base}/api/v1/ingests"
        body = {"url": f"{files}/clip.flv", "source": source, "quality": "fast"}
        started = time.monotonic()
        clip = await api(http_client, "POST", url, body, expect=201)
        assert clip["ingest"]["live"] is False

        async def ended() -> bool:
            async with http_client.get(f"{url}/{clip['id']}", headers=AUTH) as response:
                return response.status == 404

        await poll(ended, within_s=60, what="the file's session did not end with the file")
        # Paced: a 4 s file takes about 4 s, not the moment it takes to decode it.
        assert time.monotonic() - started > feed.seconds * 0.7

        body = {"url": f"{files}/index.m3u8", "source": source, "quality": "fast"}
        hls = await api(http_client, "POST", url, body, expect=201)

        async def swapping() -> bool:
            state = await api(http_client, "GET", f"{url}/{hls['id']}", expect=200)
            return bool(state["ingest"]["state"] == "live" and state["stats"]["swapped"])

        await poll(swapping, within_s=60, what="the HLS ingest did not go live and swap")
        await api(http_client, "DELETE", f"{url}/{hls['id']}", expect=204)

    async def main() -> None:
        with http_files(tmp_path) as files:
            async with aiohttp.ClientSession() as http_client:
                await scenario(http_client, files)

    asyncio.run(main())


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and then never says a word (an overloaded
    ingest): the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for connection in held:
            connection.close()
        listener.close()


def test_a_push_to_a_server_that_never_answers_stalls_nothing(
    server: LiveServer, rtmp: NginxRtmp, feed: EncodedFeed, source_bgr: np.ndarray
) -> None:
    """PyAV holds Python's lock while it connects an output: the push runs in a process
    of its own, so the session keeps flowing and the API keeps answering."""
    base = server.base

    async def scenario(http: aiohttp.ClientSession, port: int) -> None:
        source = await upload(http, base, source_bgr)
        body = {"url": rtmp.url("in"), "source": source, "quality": "fast"}
        ingest = await api(http, "POST", f"{base}/api/v1/ingests", body, expect=201)
        url = f"{base}/api/v1/ingests/{ingest['id']}"

        async def frames() -> int:
            return int((await api(http, "GET", url, expect=200))["ingest"]["frames"])

        await poll(lambda: _has_frames(frames, 30), within_s=30, what="the ingest is not live")
        output = await api(
            http,
            "POST",
            f"{base}/api/v1/sessions/{ingest['id']}/outputs",
            {"url": f"rtmp://127.0.0.1:{port}/live/stalled"},
            expect=201,
        )
        before = await frames()
        await asyncio.sleep(3)  # the push is connecting to a server that never answers
        after = await frames()
        assert after > before + 30, (before, after)
        state = await api(http, "GET", url, expect=200)
        assert state["outputs"][0]["state"] in ("connecting", "retrying"), state["outputs"]
        assert state["outputs"][0]["frames_sent"] == 0
        await api(
            http,
            "DELETE",
            f"{base}/api/v1/sessions/{ingest['id']}/outputs/{output['id']}",
            expect=204,
        )
        await api(http, "DELETE", url, expect=204)

    async def main() -> None:
        with silent_server() as port, publishing(rtmp.url("in"), feed):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
                await scenario(http, port)

    asyncio.run(main())
    leftover = [c.name for c in multiprocessing.active_children() if "push" in c.name]
    assert not leftover, leftover


async def _has_frames(frames: Callable[[], Awaitable[int]], count: int) -> bool:
    return await frames() >= count


def test_a_silent_publisher_with_no_audience_is_replaced_on_a_live_stream(
    server: LiveServer, target_photo: np.ndarray
) -> None:
    """The name's first publisher vanishes with nobody watching; the next one takes the
    name over, and a viewer who comes then sees it (the stream did not die with the
    first). Two offers racing for the name: one gets it, the other 409."""
    base = server.base
    frame = cv2.resize(target_photo, (640, 360))

    async def scenario(http: aiohttp.ClientSession) -> None:
        first = await publish(http, base, [frame], token=TOKEN, direction="sendonly", name="solo")
        assert first.track is not None
        await asyncio.sleep(1.0)
        first.track.pause()

        async def second_accepted() -> Peer | None:
            try:
                return await publish(
                    http, base, [frame], token=TOKEN, direction="sendonly", name="solo"
                )
            except AssertionError as refused:
                assert " 409 " in str(refused), refused
                return None

        second = await poll(second_accepted, within_s=20, what="the silent one was not replaced")
        viewer = await watch(http, base, "solo", token=TOKEN)
        await viewer.wait_frames(10)

        async def offer() -> int:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="sendonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(
                f"{base}/whip/race",
                data=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp", **AUTH},
            ) as response:
                status = response.status
                if status == 201:
                    async with http.delete(
                        base + response.headers["Location"], headers=AUTH
                    ) as ended:
                        assert ended.status == 200
            await pc.close()
            return status

        assert sorted(await asyncio.gather(offer(), offer())) == [201, 409]
        for peer in (second, viewer):
            async with http.delete(base + peer.location, headers=AUTH) as response:
                assert response.status == 200
            await peer.close()
        await first.close()

    run(scenario)
