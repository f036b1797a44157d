"""Real aiortc peers for the service tests: a WHIP publisher fed from in-memory frames, a
WHEP viewer, and a live server on loopback in a thread of its own.

Nothing here stands in for a part of livefuse: the server is the real app, the peers are
real WebRTC endpoints speaking over UDP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import fractions
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiohttp import web
from aiortc import (
    AudioStreamTrack,
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket

from livefuse.settings import Settings
from livefuse.web.app import SERVICE_KEY, create_app
from livefuse.web.service import Service

CLOCK = 90_000


@dataclass
class LiveServer:
    base: str
    service: Service
    loop: asyncio.AbstractEventLoop

    def call(self, make: Callable[[], Any], within_s: float = 30.0) -> Any:
        """Run a coroutine on the server's loop (to look at or end its state safely)."""
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(within_s)


@contextmanager
def live_server(settings: Settings, *, ready_within_s: float = 120.0) -> Iterator[LiveServer]:
    """The app on 127.0.0.1, an ephemeral port, its own event loop thread; models warm."""
    loop = asyncio.new_event_loop()
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="test-server", daemon=True)
    thread.start()
    assert started.wait(30), "the test server did not start"
    port = runner.addresses[0][1]
    service = app[SERVICE_KEY]
    deadline = time.monotonic() + ready_within_s
    while not service.ready:
        assert service.problem == "the models are loading", service.problem
        assert time.monotonic() < deadline, "the models did not load in time"
        time.sleep(0.1)
    try:
        yield LiveServer(base=f"http://127.0.0.1:{port}", service=service, loop=loop)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class FramesTrack(MediaStreamTrack):
    """Loops BGR frames at `fps`, paced like a camera. `pause()` stops it sending (a peer
    that vanishes without a goodbye)."""

    kind = "video"

    def __init__(self, frames: list[np.ndarray], fps: float = 30.0) -> None:
        super().__init__()
        self._frames = [
            av.VideoFrame.from_ndarray(f, format="bgr24").reformat(format="yuv420p") for f in frames
        ]
        self._fps = fps
        self._index = 0
        self._start: float | None = None
        self._paused = asyncio.Event()

    def pause(self) -> None:
        self._paused.set()

    async def recv(self) -> av.VideoFrame:
        if self._paused.is_set():
            await asyncio.Event().wait()  # never again
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._index / self._fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        source = self._frames[self._index % len(self._frames)]
        frame = av.VideoFrame.from_ndarray(source.to_ndarray(), format="yuv420p")
        frame.pts = int(self._index * CLOCK / self._fps)
        frame.time_base = fractions.Fraction(1, CLOCK)
        self._index += 1
        return frame


@dataclass
class Received:
    """Frames that came back, newest last (BGR), and how many."""

    frames: list[np.ndarray] = field(default_factory=list)
    count: int = 0
    keep: int = 8

    def add(self, frame: np.ndarray) -> None:
        self.count += 1
        self.frames.append(frame)
        del self.frames[: -self.keep]


async def _collect(track: MediaStreamTrack, into: Received) -> None:
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if isinstance(frame, av.VideoFrame):
            into.add(frame.to_ndarray(format="bgr24"))


class RtpLog:
    """The video a receiver got, frame by frame as it came off the wire (before aiortc
    decodes it): to check what the sender sent, where it started, where its keyframes
    are. Each frame is the depayloaded bytes of one RTP timestamp (Annex B for H.264).

    It listens by wrapping this one receiver's RTP handler; retransmissions (RTX) are
    not seen, which on loopback means none are missing.
    """

    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self.receiver = receiver
        self.frames: list[tuple[float, bytes]] = []
        """(arrival time on the monotonic clock, data) per complete frame."""
        self.media_ssrc: int | None = None
        self._parts: list[bytes] = []
        self._timestamp: int | None = None
        handle = receiver._handle_rtp_packet

        async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
            await handle(packet, arrival_time_ms)
            data = getattr(packet, "_data", None)  # set by aiortc for media, not RTX
            if data is not None:
                self._add(packet, data)

        receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]

    def _add(self, packet: RtpPacket, data: bytes) -> None:
        self.media_ssrc = packet.ssrc
        if packet.timestamp != self._timestamp:
            self._parts, self._timestamp = [], packet.timestamp
        self._parts.append(data)
        if packet.marker:
            self.frames.append((time.monotonic(), b"".join(self._parts)))
            self._parts = []

    async def send_pli(self) -> None:
        """Report picture loss to the sender, as aiortc does after a decoding error."""
        assert self.media_ssrc is not None, "no video came yet"
        await self.receiver._send_rtcp_pli(self.media_ssrc)


@dataclass
class Peer:
    pc: RTCPeerConnection
    location: str
    received: Received
    track: FramesTrack | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    answer: str = ""
    etag: str = ""
    audio_frames: int = 0
    rtp: RtpLog | None = None

    @property
    def session_id(self) -> str:
        return self.location.split("/")[2]

    async def wait_frames(self, count: int, *, within_s: float = 30.0) -> None:
        deadline = time.monotonic() + within_s
        target = self.received.count + count
        while self.received.count < target:
            assert time.monotonic() < deadline, (
                f"only {self.received.count} frames came back within {within_s} s"
            )
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.pc.close()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _post_offer(
    http: aiohttp.ClientSession, url: str, pc: RTCPeerConnection, token: str | None
) -> tuple[str, str, str]:
    """(Location, the answer's SDP, ETag)."""
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    async with http.post(
        url,
        data=pc.localDescription.sdp,
        headers={"Content-Type": "application/sdp", **bearer(token)},
    ) as response:
        text = await response.text()
        assert response.status == 201, f"{url}: {response.status} {text}"
        assert response.content_type == "application/sdp"
        location = response.headers["Location"]
        etag = response.headers.get("ETag", "")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    await _connected(pc, url)
    return location, text, etag


async def _connected(pc: RTCPeerConnection, url: str, *, within_s: float = 20.0) -> None:
    """Wait for ICE and DTLS to come up, as a client does before it counts as started:
    until then the server counts the offer as pending for this address (one WHIP offer
    at a time by default) and ends it past its ICE deadline."""
    deadline = time.monotonic() + within_s
    while pc.connectionState != "connected":
        assert pc.connectionState not in ("failed", "closed"), f"{url}: {pc.connectionState}"
        assert time.monotonic() < deadline, f"{url}: not connected within {within_s} s"
        await asyncio.sleep(0.02)


async def publish(
    http: aiohttp.ClientSession,
    base: str,
    frames: list[np.ndarray],
    *,
    token: str | None,
    source: str | None = None,
    direction: str = "sendrecv",
    quality: str | None = None,
    audio: bool = False,
    label: str | None = None,
    name: str | None = None,
) -> Peer:
    """A WHIP publisher; with sendrecv, what comes back is collected. `audio` adds a
    microphone (aiortc's silent audio track); `label` is the `?label=` of the WHIP URL;
    `name` publishes the named stream `/whip/NAME`."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = FramesTrack(frames)
    pc.addTransceiver(track, direction=direction)
    if audio:
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    received = Received()
    peer = Peer(pc=pc, location="", received=received, track=track)

    @pc.on("track")
    def on_track(remote: MediaStreamTrack) -> None:
        if remote.kind == "video":
            peer.tasks.append(asyncio.ensure_future(_collect(remote, received)))

    params = {"source": source, "quality": quality, "label": label}
    query = "&".join(f"{k}={v}" for k, v in params.items() if v)
    peer.location, peer.answer, peer.etag = await _post_offer(
        http, f"{base}/whip{'/' + name if name else ''}?{query}", pc, token
    )
    return peer


async def watch(
    http: aiohttp.ClientSession,
    base: str,
    session_id: str,
    *,
    token: str | None,
    codecs: Sequence[str] | None = None,
    rtp: bool = False,
    configuration: RTCConfiguration | None = None,
) -> Peer:
    """A WHEP viewer of a session (video and audio). `codecs` (e.g. ["VP8"]) narrows the
    video formats it offers; `rtp` logs the video as it arrives (`Peer.rtp`);
    `configuration` gives it ICE servers (default: none, host candidates only)."""
    pc = RTCPeerConnection(configuration or RTCConfiguration(iceServers=[]))
    video = pc.addTransceiver("video", direction="recvonly")
    if codecs is not None:
        wanted = {f"video/{name}".lower() for name in codecs}
        video.setCodecPreferences(
            [
                codec
                for codec in RTCRtpSender.getCapabilities("video").codecs
                if codec.mimeType.lower() in wanted
            ]
        )
    pc.addTransceiver("audio", direction="recvonly")
    received = Received()
    peer = Peer(pc=pc, location="", received=received)
    if rtp:
        peer.rtp = RtpLog(video.receiver)

    async def count_audio(remote: MediaStreamTrack) -> None:
        while True:
            try:
                await remote.recv()
            except MediaStreamError:
                return
            peer.audio_frames += 1

    @pc.on("track")
    def on_track(remote: MediaStreamTrack) -> None:
        if remote.kind == "video":
            peer.tasks.append(asyncio.ensure_future(_collect(remote, received)))
        else:
            peer.tasks.append(asyncio.ensure_future(count_audio(remote)))

    peer.location, peer.answer, peer.etag = await _post_offer(
        http, f"{base}/whep/{session_id}", pc, token
    )
    return peer
