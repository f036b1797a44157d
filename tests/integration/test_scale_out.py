"""Scale-out with real nodes: three `livefuse serve` processes on their own loopback
addresses (127.0.0.2-4), one session each at most, each told of all three with
`--peers`; real aiortc publishers that only know the first node's URL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from livefuse.settings import Settings
from tests.webrtc_peers import Peer, bearer, live_server, publish, watch

pytestmark = pytest.mark.slow
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
TOKEN = "scale-out-token"
AUTH = bearer(TOKEN)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Node:
    host: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


def _loopback_alias_works() -> bool:
    try:
        _free_port(HOSTS[1])
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[Node]]:
    if not _loopback_alias_works():
        pytest.skip("this system cannot bind 127.0.0.3 (loopback is not a /8 here)")
    ports = [_free_port(host) for host in HOSTS]
    peers = ",".join(f"http://{h}:{p}" for h, p in zip(HOSTS, ports, strict=True))
    # No swap processes: three nodes share this machine's cores.
    env = {**os.environ, "LIVEFUSE_SWAP_PROCESSES": "0", "LIVEFUSE_THREADS": "1"}
    started = [
        Node(
            host,
            port,
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "livefuse.cli.main",
                    "serve",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "--max-sessions",
                    "1",
                    "--peers",
                    peers,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
        )
        for host, port in zip(HOSTS, ports, strict=True)
    ]
    try:
        asyncio.run(_all_ready(started))
        yield started
    finally:
        for node in started:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in started:
            try:
                node.process.wait(30)
            except subprocess.TimeoutExpired:
                node.process.kill()


async def _all_ready(nodes: list[Node]) -> None:
    deadline = time.monotonic() + 180
    async with aiohttp.ClientSession() as http:
        for node in nodes:
            while True:
                assert node.process.poll() is None, node.process.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
                try:
                    async with http.get(f"{node.base}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"{node.base} did not get ready"
                await asyncio.sleep(0.3)
    await asyncio.sleep(2.5)  # every node has polled its peers' capacity since


async def sessions_on(http: aiohttp.ClientSession, node: Node) -> int:
    async with http.get(f"{node.base}/api/v1/sessions", headers=AUTH) as response:
        assert response.status == 200
        return len((await response.json())["sessions"])


def host_of(location: str) -> str:
    return urlsplit(location).hostname or ""


def test_three_nodes_one_entry_url(nodes: list[Node]) -> None:
    entry = nodes[0].base
    frame = np.full((180, 320, 3), 90, np.uint8)
    cv2.circle(frame, (160, 90), 40, (200, 180, 160), -1)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{entry}/api/v1/capacity") as response:
                capacity = await response.json()
            assert capacity["max_sessions"] == 1 and capacity["headroom"] == 1, capacity

            publishers: list[Peer] = []
            for _ in HOSTS:
                publishers.append(
                    # The token does not follow a redirect to another host: the redirect
                    # carries a ticket in its place (web/tickets.py).
                    await publish(http, entry, [frame], token=TOKEN, direction="sendonly")
                )
                await asyncio.sleep(1.5)  # the entry's view of its peers catches up
            # Each landed on a node of its own; their Locations are absolute, on that node.
            landed = sorted(host_of(p.location) for p in publishers)
            assert landed == sorted(HOSTS), [p.location for p in publishers]
            assert [await sessions_on(http, n) for n in nodes] == [1, 1, 1]

            # Every node full: the fourth is told to come back later.
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="sendonly")
            await pc.setLocalDescription(await pc.createOffer())
            assert pc.localDescription is not None
            offer = pc.localDescription.sdp
            async with http.post(
                f"{entry}/whip", data=offer, headers={"Content-Type": "application/sdp", **AUTH}
            ) as response:
                assert response.status == 503, await response.text()
                assert response.headers.get("Retry-After")
            async with http.get(f"{entry}/metrics", headers=AUTH) as response:
                scraped = await response.text()
            assert "livefuse_capacity_headroom 0.0" in scraped, scraped

            # One node stops mid-stream (SIGTERM): its session ends cleanly, its publisher
            # sees the connection close, and the node exits normally.
            by_host = {host_of(p.location): p for p in publishers}
            stopped = nodes[2]
            stopped.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(stopped.process.wait, 30) == 0
            victim = by_host[stopped.host]
            deadline = time.monotonic() + 20
            while victim.pc.connectionState not in ("closed", "failed"):
                assert time.monotonic() < deadline, victim.pc.connectionState
                await asyncio.sleep(0.2)
            # Room on the second node; the next publisher goes there, not to the dead one.
            freed = by_host[nodes[1].host]
            async with http.delete(freed.location, headers=AUTH) as response:
                assert response.status == 200
            await asyncio.sleep(3.5)  # long enough for the stopped node to count as gone
            late = await publish(http, entry, [frame], token=TOKEN, direction="sendonly")
            assert host_of(late.location) == nodes[1].host, late.location
            for peer in [*publishers, late]:
                await peer.close()
            await pc.close()

    asyncio.run(scenario())


def test_relay_whip_republishes_to_another_server(settings: Settings) -> None:
    """`--relay-whip`: node A re-publishes its stream over WHIP to a media server (here a
    second livefuse with no source face, which serves it on); a viewer there sees what A
    made of it (A burns the disclosure label in, the media server does not)."""
    with live_server(settings.model_copy(update={"max_sessions": 2})) as media_server:
        relaying = settings.model_copy(
            update={
                "max_sessions": 1,
                "label_default": True,
                "relay_whip": media_server.base + "/whip/{name}",
            }
        )
        with live_server(relaying) as node:
            frame = np.full((360, 640, 3), 70, np.uint8)

            async def scenario() -> None:
                async with aiohttp.ClientSession() as http:
                    publisher = await publish(
                        http, node.base, [frame], token=None, direction="sendonly", name="cam"
                    )
                    viewer = None
                    deadline = time.monotonic() + 30
                    while viewer is None:
                        try:
                            viewer = await watch(http, media_server.base, "cam", token=None)
                        except AssertionError:  # not relayed yet: 404
                            assert time.monotonic() < deadline, "the stream never reached it"
                            await asyncio.sleep(0.5)
                    await viewer.wait_frames(10)
                    seen = viewer.received.frames[-1]
                    height, width = seen.shape[:2]
                    corner = seen[: height // 8, width * 3 // 4 :]
                    rest = seen[height // 4 :, : width // 2]
                    # The label's box and text changed the top right corner; the rest is
                    # the publisher's flat grey (shifted a little by two encodes).
                    grey = np.median(rest.reshape(-1, 3), axis=0)
                    assert float(np.abs(rest - grey).mean()) < 3
                    assert float(np.abs(corner - grey).mean()) > 10
                    async with http.get(f"{node.base}/api/v1/sessions", headers=AUTH) as response:
                        (session,) = (await response.json())["sessions"]
                    assert session["relay_whip"]["state"] == "live", session["relay_whip"]
                    await publisher.close()
                    await viewer.close()

            asyncio.run(scenario())
