"""The pages in a real headless Chromium: its fake camera plays a y4m clip of a face, the
publisher page streams it over WHIP and shows the swapped video that comes back, and the
viewer page plays the session over WHEP.

Chromium is the system's (Debian `chromium`, installed by `make browser`), driven by
Playwright; LIVEFUSE_CHROMIUM may name another binary. LIVEFUSE_UPDATE_SCREENSHOT=1
also writes the README's screenshot to docs/.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest

from livefuse.settings import Settings
from livefuse.stream.clip import write_clip
from tests.identity import DlibRecognizer
from tests.media import portrait, widescreen
from tests.webrtc_peers import LiveServer, Peer, live_server, publish

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[2] / "docs"
SCREENSHOT = DOCS / "browser_publisher.png"


def chromium_path() -> str:
    path = os.environ.get("LIVEFUSE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(
            f"no Chromium at {path}: run `make browser` (apt-get install chromium) "
            "or set LIVEFUSE_CHROMIUM",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    with live_server(settings.model_copy(update={"idle_timeout_s": 5.0})) as live:
        yield live


@pytest.fixture(scope="module")
def media(
    tmp_path_factory: pytest.TempPathFactory, testdata_dir: Path
) -> tuple[Path, Path, list[int]]:
    """(the camera's y4m clip, a source photo, the face's box in the camera's picture)."""
    from skimage import data

    folder = tmp_path_factory.mktemp("browser")
    astronaut = widescreen(np.ascontiguousarray(data.astronaut()[:, :, ::-1]))
    # A still picture with sensor noise: camera and swapped video can then be compared.
    clip = write_clip(astronaut, folder / "camera.y4m", seconds=1.0, fps=30, static=True)
    t1 = cv2.imread(str(testdata_dir / "t1.jpg"))
    assert t1 is not None, "t1.jpg is missing: run make install"
    recognizer = DlibRecognizer(use_cnn=False)
    boxes, _ = recognizer.detect(t1)
    source = folder / "source.png"
    cv2.imwrite(str(source), portrait(t1, sorted(boxes)[2]))
    cv2.imwrite(str(folder / "other.png"), portrait(t1, sorted(boxes)[0]))
    # A still clip covers the frame with the picture at its own aspect: a plain resize.
    frame = cv2.resize(astronaut, (1280, 720), interpolation=cv2.INTER_AREA)
    faces, _ = recognizer.detect(frame)
    assert faces, "dlib finds no face in the camera's picture"
    return clip, source, [int(v) for v in max(faces, key=lambda b: b[2] - b[0])]


_FACE_AND_CORNER_DIFF = """
([x1, y1, x2, y2]) => {
  const grab = (id) => {
    const video = document.getElementById(id);
    const canvas = document.createElement("canvas");
    canvas.width = 1280; canvas.height = 720;
    const context = canvas.getContext("2d");
    context.drawImage(video, 0, 0, 1280, 720);
    return context;
  };
  const camera = grab("camera"), swapped = grab("swapped");
  const diff = (x, y, w, h) => {
    const a = camera.getImageData(x, y, w, h).data, b = swapped.getImageData(x, y, w, h).data;
    let sum = 0;
    for (let i = 0; i < a.length; i += 4) {
      sum += Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]);
    }
    return sum / (a.length / 4) / 3;
  };
  return { face: diff(x1, y1, x2 - x1, y2 - y1), corner: diff(1000, 500, 200, 150) };
}
"""


def test_publisher_page_shows_swapped_video_and_viewer_plays_it(
    server: LiveServer, media: tuple[Path, Path, list[int]], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    clip, source, box = media
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(),
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={clip}",
                "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox",
            ],
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 760})
            page = context.new_page()
            page.goto(server.base + "/")
            page.set_input_files("#source-file", str(source))
            page.wait_for_function(
                "document.getElementById('source-state').textContent.startsWith('face ready')",
                timeout=30_000,
            )
            page.click("#start")
            page.wait_for_function(
                "Number(document.getElementById('stats').dataset.swapped || 0) >= 1",
                timeout=60_000,
            )
            page.wait_for_function(
                "(() => { const v = document.getElementById('swapped');"
                " return v.videoWidth === 1280 && v.videoHeight === 720 && v.currentTime > 1; })()",
                timeout=30_000,
            )
            assert not page.is_visible("#message.error"), page.text_content("#message")
            session_id = page.text_content("#watch-url").rstrip("/").split("/")[-1]
            assert session_id in server.service.sessions

            # The page shows what the server made: the face differs from the camera's, the
            # rest of the picture does not (beyond the codec's noise).
            diff = page.evaluate(_FACE_AND_CORNER_DIFF, box)
            assert diff["face"] > 3 * diff["corner"] + 4, diff
            page.screenshot(path=str(tmp_path / "publisher.png"))
            if os.environ.get("LIVEFUSE_UPDATE_SCREENSHOT"):
                DOCS.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT))

            # Another face, uploaded mid-stream, is worn at once; the first is a click away.
            live = server.service.sessions[session_id]
            first = live.source.id if live.source else None
            page.set_input_files("#source-file", str(source.parent / "other.png"))
            _wait_for(lambda: live.source is not None and live.source.id != first, "new face")
            page.click(f"#sources .pick[data-source='{first}']")
            _wait_for(lambda: live.source is not None and live.source.id == first, "first face")
            assert live.pc.connectionState == "connected"

            # A viewer (what an OBS Browser Source loads) plays the same session.
            viewer = context.new_page()
            viewer.goto(f"{server.base}/watch/{session_id}")
            viewer.wait_for_function(
                "(() => { const v = document.getElementById('video');"
                " return v.videoWidth === 1280 && v.currentTime > 0.5; })()",
                timeout=30_000,
            )
            assert len(server.service.sessions[session_id].viewers) == 1

            # An address with no stream says so, in words, and waits for one.
            missing = context.new_page()
            missing.goto(f"{server.base}/watch/no-such-session")
            missing.wait_for_function(
                "document.getElementById('message').textContent"
                " === 'Waiting for no-such-session to go live…'",
                timeout=15_000,
            )
            page.click("#stop")
            page.wait_for_function("!document.getElementById('start').disabled")
            _wait_gone(server, session_id)
        finally:
            browser.close()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 15
    while not condition():
        assert time.monotonic() < deadline, f"the page never switched to the {what}"
        time.sleep(0.1)


def _wait_gone(server: LiveServer, session_id: str) -> None:
    deadline = time.monotonic() + 15
    while session_id in server.service.sessions:
        assert time.monotonic() < deadline, "Stop did not end the session"
        time.sleep(0.1)


def test_publisher_page_asks_for_the_token_in_words(
    settings: Settings, media: tuple[Path, Path, list[int]]
) -> None:
    """A server with a token: the page says it needs one, takes it, and then works; its
    viewer link carries the server's view token, never the page's own (admin) token."""
    from playwright.sync_api import sync_playwright

    clip, source, _ = media
    token, view_token = "browser-token-51", "browser-view-token-8"
    with (
        live_server(
            settings.model_copy(update={"token": token, "view_tokens": [view_token]})
        ) as live,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=chromium_path(),
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={clip}",
                "--no-sandbox",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(live.base + "/")
            page.set_input_files("#source-file", str(source))
            page.wait_for_selector("#token-row:not([hidden])", timeout=15_000)
            assert "needs an access token" in (page.text_content("#message") or "")
            page.fill("#token", "not-it")
            page.click("#token-save")
            page.set_input_files("#source-file", [])
            page.set_input_files("#source-file", str(source))
            page.wait_for_function(
                "document.getElementById('message').textContent.includes('token is wrong')",
                timeout=15_000,
            )
            page.fill("#token", token)
            page.click("#token-save")
            page.set_input_files("#source-file", [])
            page.set_input_files("#source-file", str(source))
            page.wait_for_function(
                "document.getElementById('source-state').textContent.startsWith('face ready')",
                timeout=30_000,
            )
            page.click("#start")
            page.wait_for_function(
                "Number(document.getElementById('stats').dataset.swapped || 0) >= 1",
                timeout=60_000,
            )
            link = page.text_content("#watch-url") or ""
            assert link.endswith(f"#token={view_token}") and token not in link, link
            viewer = browser.new_page()
            viewer.goto(link)
            viewer.wait_for_function(
                "(() => { const v = document.getElementById('video');"
                " return v.videoWidth > 0 && v.currentTime > 0.5; })()",
                timeout=30_000,
            )
            assert viewer.is_hidden("#bar")
            page.click("#stop")
        finally:
            browser.close()


# -- the viewer page: a named stream across publishers, its token, the favicon -----------


class PublisherThread:
    """aiortc publishers run on an event loop of their own thread, beside Playwright's."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def _publish_named(base: str, picture: np.ndarray, name: str) -> Peer:
    async with aiohttp.ClientSession() as http:
        return await publish(http, base, [picture], token=None, direction="sendonly", name=name)


async def _end(base: str, peer: Peer) -> None:
    async with aiohttp.ClientSession() as http, http.delete(base + peer.location) as response:
        assert response.status == 200
    await peer.close()


_SHOWN_PICTURE = """
() => {
  const video = document.getElementById("video");
  if (!video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = 64; canvas.height = 36;
  const context = canvas.getContext("2d");
  context.drawImage(video, 0, 0, 64, 36);
  return Array.from(context.getImageData(0, 0, 64, 36).data);
}
"""


def _showing(page: Any, pictures: list[np.ndarray]) -> int | None:
    """Which of `pictures` the viewer's video shows now (None: no picture yet)."""
    rgba = page.evaluate(_SHOWN_PICTURE)
    if rgba is None:
        return None
    shown = np.array(rgba, dtype=float).reshape(36, 64, 4)[:, :, 2::-1]  # RGBA -> BGR
    small = [cv2.resize(p, (64, 36), interpolation=cv2.INTER_AREA).astype(float) for p in pictures]
    return int(np.argmin([np.abs(shown - s).mean() for s in small]))


def test_viewer_page_waits_for_a_named_stream_and_follows_its_publishers(
    server: LiveServer, media: tuple[Path, Path, list[int]], testdata_dir: Path
) -> None:
    """An OBS Browser Source set up before the stream starts: the page waits, plays the
    first publisher, says no face is chosen (faces counted), and plays the next
    publisher after the first one stops, by itself."""
    from playwright.sync_api import sync_playwright
    from skimage import data

    astronaut = widescreen(np.ascontiguousarray(data.astronaut()[:, :, ::-1]))
    group = cv2.imread(str(testdata_dir / "t1.jpg"))
    assert group is not None
    pictures = [cv2.resize(p, (640, 360), interpolation=cv2.INTER_AREA) for p in (astronaut, group)]
    publishers = PublisherThread()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium_path(),
                args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox"],
            )
            try:
                page = browser.new_page()
                icon = page.request.get(server.base + "/favicon.ico")
                assert icon.ok and icon.headers["content-type"] == "image/svg+xml"
                assert icon.text().startswith("<svg")
                page.goto(f"{server.base}/watch/studio")
                assert page.evaluate(
                    "fetch(document.querySelector('link[rel=icon]').href).then(r => r.ok)"
                )
                page.wait_for_function(
                    "document.getElementById('message').textContent"
                    " === 'Waiting for studio to go live…'",
                    timeout=15_000,
                )
                for index, picture in enumerate(pictures):
                    peer = publishers.run(_publish_named(server.base, picture, "studio"))
                    # No source: the video goes out as it came, its faces counted.
                    page.wait_for_function(
                        "document.getElementById('message').textContent.startsWith("
                        "'No face chosen yet: the video goes out unswapped')"
                        " && !/\\(0 faces/.test(document.getElementById('message').textContent)",
                        timeout=30_000,
                    )
                    _wait_for(lambda i=index: _showing(page, pictures) == i, f"publisher {index}")
                    publishers.run(_end(server.base, peer))
                    page.wait_for_function(
                        "document.getElementById('message').textContent.startsWith("
                        "'Waiting for studio to go live')"
                        " || document.getElementById('message').textContent.startsWith("
                        "'The stream was interrupted')",
                        timeout=30_000,
                    )
            finally:
                browser.close()
    finally:
        publishers.close()


def test_viewer_page_takes_its_token_typed_in_or_in_the_address(settings: Settings) -> None:
    from playwright.sync_api import sync_playwright

    token = "viewer-token-73"
    with (
        live_server(settings.model_copy(update={"token": token})) as live,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{live.base}/watch/studio")
            page.wait_for_selector("#token-form:not([hidden])", timeout=15_000)
            assert "needs an access token" in (page.text_content("#message") or "")
            page.fill("#token", "not-it")
            page.click("#token-form button")
            page.wait_for_function(
                "document.getElementById('message').textContent.includes('not accepted')",
                timeout=15_000,
            )
            page.fill("#token", token)
            page.click("#token-form button")
            # Let in: nobody publishes there yet, which the page now says.
            page.wait_for_function(
                "document.getElementById('message').textContent"
                " === 'Waiting for studio to go live…'",
                timeout=15_000,
            )
            assert page.is_hidden("#token-form")

            linked = browser.new_page()
            linked.goto(f"{live.base}/watch/studio#token={token}")
            linked.wait_for_function(
                "document.getElementById('message').textContent"
                " === 'Waiting for studio to go live…'",
                timeout=15_000,
            )
            assert linked.is_hidden("#token-form")
        finally:
            browser.close()


def test_publisher_page_without_a_face_says_so_and_counts_the_faces(
    server: LiveServer, media: tuple[Path, Path, list[int]]
) -> None:
    """Was: "faces 0" with a face on camera, until a photo was chosen."""
    from playwright.sync_api import sync_playwright

    clip, source, _ = media
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(),
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={clip}",
                "--no-sandbox",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(server.base + "/")
            page.click("#start")
            page.wait_for_function(
                "document.getElementById('stats').textContent.includes("
                "'faces 1  no source yet: choose a photo')",
                timeout=60_000,
            )
            page.set_input_files("#source-file", str(source))
            page.wait_for_function(
                "document.getElementById('stats').textContent.includes('faces 1  swapped 1')",
                timeout=60_000,
            )
            page.click("#stop")
        finally:
            browser.close()
