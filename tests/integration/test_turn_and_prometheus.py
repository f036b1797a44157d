"""deploy/'s coturn and Prometheus, for real, around a running livefuse.

- coturn (Debian's `turnserver`) runs deploy/coturn/turnserver.conf, only its ports and
  addresses moved to loopback (and loopback peers allowed, which the deployed file
  refuses). livefuse is configured with that TURN server and its shared secret. A WHEP
  viewer restricted to relay candidates, with the credentials livefuse hands to pages,
  plays a published session: frames arrive, and the path they took is the TURN relay.
- Prometheus (Debian's `prometheus`) runs deploy/prometheus/prometheus.yml, only the
  target and the interval changed, scrapes that livefuse while a session is live, and
  its query API returns the sessions gauge; every query of the Grafana dashboard is
  valid PromQL on the scraped data and names only series livefuse exposes.

Both skip, saying why, where the binary is missing (`make servers` installs them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
import yaml
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)

from livefuse.settings import Settings
from tests.webrtc_peers import LiveServer, Peer, bearer, live_server, publish, watch

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOKEN = "turn-test-token-51c0"
TURN_SECRET = "turn-test-secret-8d2e"
AUTH = bearer(TOKEN)
# coturn's relay ports in the test: away from the kernel's ephemeral range
# (32768-60999 by default), so a relayed address is told apart from a direct one.
RELAY_PORTS = (61000, 61199)


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise AssertionError("no port free for both TCP and UDP")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def started(
    command: list[str], *, cwd: Path, ready: Callable[[], bool], what: str
) -> Iterator[Server]:
    """Run `command` until the block ends; `ready` is polled until the server answers."""
    log = cwd / f"{what}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, log)
    try:
        deadline = time.monotonic() + 30
        while not ready():
            assert process.poll() is None, f"{what} exited:\n{server.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{what} did not start:\n{server.log_text()}"
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def accepts_tcp(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    return check


# -- coturn with deploy's configuration -----------------------------------------------------

# What the test moves: where coturn listens and relays, and where it writes.
_MOVED = {"listening-port", "listening-ip", "relay-ip", "external-ip", "min-port", "max-port"}
_MOVED |= {"pidfile", "log-file", "static-auth-secret", "allowed-peer-ip"}


def coturn_config(port: int, workdir: Path) -> str:
    """deploy/coturn/turnserver.conf with its ports and addresses on loopback."""
    kept = []
    for line in (DEPLOY / "coturn" / "turnserver.conf").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key and not key.startswith("#") and key in _MOVED:
            continue
        kept.append(line)
    assert "use-auth-secret" in kept, "deploy's coturn must take the REST credentials"
    return "\n".join(
        [
            *kept,
            "# -- the test's own --",
            "listening-ip=127.0.0.1",
            "relay-ip=127.0.0.1",
            f"listening-port={port}",
            f"min-port={RELAY_PORTS[0]}",
            f"max-port={RELAY_PORTS[1]}",
            # Every peer here is on loopback, which the deployed file refuses.
            "allow-loopback-peers",
            f"static-auth-secret={TURN_SECRET}",
            f"pidfile={workdir / 'turnserver.pid'}",
            "log-file=stdout",
            # No user database is used with use-auth-secret; keep its default file here.
            f"userdb={workdir / 'turndb'}",
            "verbose",
            "",
        ]
    )


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        pytest.skip("coturn's turnserver is not installed: `make servers` installs it")
    workdir = tmp_path_factory.mktemp("coturn")
    port = free_port()
    config = workdir / "turnserver.conf"
    config.write_text(coturn_config(port, workdir))
    with started(
        [turnserver, "-c", str(config)], cwd=workdir, ready=accepts_tcp(port), what="coturn"
    ) as server:
        yield server, port


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """The service's token-free scrape listener, as deploy/ configures it."""
    return free_port()


@pytest.fixture(scope="module")
def server(
    settings: Settings, coturn: tuple[Server, int], metrics_port: int
) -> Iterator[LiveServer]:
    _, port = coturn
    configured = settings.model_copy(
        update={
            "token": TOKEN,
            "max_sessions": 2,
            "turn_urls": [f"turn:127.0.0.1:{port}?transport=udp"],
            "turn_secret": TURN_SECRET,
            "turn_ttl_s": 600,
            "metrics_host": "127.0.0.1",
            "metrics_port": metrics_port,
        }
    )
    with live_server(configured) as live:
        yield live


@pytest.fixture(autouse=True)
def _sessions_end_with_the_test(server: LiveServer) -> Iterator[None]:
    yield
    service = server.service
    for session_id in list(service.sessions):
        server.call(lambda sid=session_id: service.end_session(sid, reason="test over"))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    from skimage import data

    astronaut = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    return [cv2.resize(astronaut, (640, 360), interpolation=cv2.INTER_AREA)]


def run(scenario: Callable[[aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            await scenario(http)

    asyncio.run(main())


def parse_links(header: str) -> list[dict[str, str]]:
    """RFC 8288 Link values: {"url": ..., and each parameter}."""
    links = []
    for match in re.finditer(r"<([^>]*)>((?:\s*;\s*[\w-]+=\"(?:[^\"\\]|\\.)*\")*)", header):
        params = dict(re.findall(r";\s*([\w-]+)=\"((?:[^\"\\]|\\.)*)\"", match.group(2)))
        links.append({"url": match.group(1), **params})
    return links


def assert_valid_turn_credential(username: str, credential: str) -> None:
    expiry = int(username.split(":", 1)[0])
    assert time.time() < expiry <= time.time() + 600 + 5
    digest = hmac.new(TURN_SECRET.encode(), username.encode(), hashlib.sha1).digest()
    assert base64.b64decode(credential) == digest


def nominated_pair(pc: RTCPeerConnection) -> Any:
    """The candidate pair ICE chose for the (bundled) transport: aioice's, as aiortc
    reports no candidate-pair statistics."""
    transport = pc.getTransceivers()[0].receiver.transport.transport
    pairs = transport._connection._nominated
    assert pairs, "ICE nominated no candidate pair"
    return pairs[1]


async def whep_headers(http: aiohttp.ClientSession, base: str, session_id: str) -> Any:
    """The headers of a WHEP answer (a viewer that is ended at once)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        async with http.post(
            f"{base}/whep/{session_id}",
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", **AUTH},
        ) as response:
            assert response.status == 201, await response.text()
            headers = response.headers.copy()
        async with http.delete(base + headers["Location"], headers=AUTH) as response:
            assert response.status == 200
        return headers
    finally:
        await pc.close()


def test_relay_only_viewer_plays_a_stream_through_coturn(
    server: LiveServer, coturn: tuple[Server, int], frames: list[np.ndarray]
) -> None:
    turn, port = coturn

    async def scenario(http: aiohttp.ClientSession) -> None:
        publisher = await publish(http, server.base, frames, token=TOKEN, direction="sendonly")
        viewer: Peer | None = None
        try:
            # What a page gets: the TURN server with a credential good for a while.
            async with http.get(f"{server.base}/api/v1/ice-servers", headers=AUTH) as response:
                assert response.status == 200, await response.text()
                ice = await response.json()
            (entry,) = ice["iceServers"]
            assert entry["urls"] == [f"turn:127.0.0.1:{port}?transport=udp"]
            assert_valid_turn_credential(entry["username"], entry["credential"])

            # What OBS gets: the same server in the answer's Link header (RFC 9725).
            headers = await whep_headers(http, server.base, publisher.session_id)
            (link,) = parse_links(headers["Link"])
            assert link["url"] == entry["urls"][0] and link["rel"] == "ice-server"
            assert link["credential-type"] == "password"
            assert_valid_turn_credential(link["username"], link["credential"])

            relay_only = RTCConfiguration(
                iceServers=[RTCIceServer(**entry)],
                iceTransportPolicy=RTCIceTransportPolicy.RELAY,
            )
            viewer = await watch(
                http, server.base, publisher.session_id, token=TOKEN, configuration=relay_only
            )
            offered = [
                line for line in viewer.pc.localDescription.sdp.splitlines() if "candidate:" in line
            ]
            assert offered and all(" typ relay" in line for line in offered), offered
            await viewer.wait_frames(20, within_s=60)
            assert viewer.received.frames[-1].shape == (360, 640, 3)

            pair = nominated_pair(viewer.pc)
            local = pair.local_candidate
            assert local.type == "relay", pair
            assert local.host == "127.0.0.1" and RELAY_PORTS[0] <= local.port <= RELAY_PORTS[1]
            # coturn saw the allocation, made with livefuse's short-lived credential.
            assert f"username=<{entry['username']}>" in turn.log_text()
        finally:
            if viewer is not None:
                await viewer.close()
            await publisher.close()

    run(scenario)


# -- Prometheus with deploy's configuration -------------------------------------------------


def prometheus_config(target: str, workdir: Path) -> Path:
    """deploy/prometheus/prometheus.yml scraping `target` every second, its rule files
    beside it as in the compose file."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "livefuse"]
    job["static_configs"] = [{"targets": [target]}]
    for rule_file in config.get("rule_files", []):
        shutil.copy(DEPLOY / "prometheus" / rule_file, workdir / rule_file)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prometheus(
    server: LiveServer, metrics_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed: `make servers` installs it")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = prometheus_config(f"127.0.0.1:{metrics_port}", workdir)
    port = free_port()
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with started(command, cwd=workdir, ready=accepts_tcp(port), what="prometheus") as process:
        yield process, f"http://127.0.0.1:{port}"


async def query(http: aiohttp.ClientSession, prometheus: str, promql: str) -> list[Any]:
    async with http.get(f"{prometheus}/api/v1/query", params={"query": promql}) as response:
        body = await response.json()
    assert response.status == 200 and body["status"] == "success", (promql, body)
    return list(body["data"]["result"])


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "livefuse.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _family(name: str) -> str:
    # A counter's samples end in _total, a histogram's in _bucket, _sum and _count.
    return re.sub(r"_(total|bucket|sum|count|created)$", "", name)


def exposed_families(metrics_text: str) -> set[str]:
    """The metric families of an exposition, with or without samples yet (a labelled
    counter has none until its first increment)."""
    declared = re.findall(r"^# TYPE (\S+) ", metrics_text, re.M)
    sampled = re.findall(r"^(livefuse_[a-z0-9_]+)", metrics_text, re.M)
    return {_family(name) for name in (*declared, *sampled)}


def series_names(promql: str) -> set[str]:
    return {_family(name) for name in re.findall(r"\blivefuse_[a-z0-9_]+", promql)}


def test_prometheus_scrapes_livefuse_with_the_deploy_config(
    server: LiveServer,
    prometheus: tuple[Server, str],
    metrics_port: int,
    frames: list[np.ndarray],
) -> None:
    _, prometheus_url = prometheus

    async def scenario(http: aiohttp.ClientSession) -> None:
        publisher = await publish(http, server.base, frames, token=TOKEN, direction="sendonly")
        try:
            deadline = time.monotonic() + 60
            while True:
                result = await query(http, prometheus_url, 'livefuse_sessions{job="livefuse"}')
                if result and float(result[0]["value"][1]) == 1.0:
                    break
                if time.monotonic() > deadline:
                    async with http.get(f"{prometheus_url}/api/v1/targets") as response:
                        targets = (await response.json())["data"]["activeTargets"]
                    pytest.fail(f"the sessions gauge never read 1: {result}; targets: {targets}")
                await asyncio.sleep(0.5)
            assert result[0]["metric"]["instance"] == f"127.0.0.1:{metrics_port}"
            up = await query(http, prometheus_url, 'up{job="livefuse"}')
            assert float(up[0]["value"][1]) == 1.0

            # The alert rules loaded and evaluate.
            async with http.get(f"{prometheus_url}/api/v1/rules") as response:
                groups = (await response.json())["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert rules and all(rule["health"] == "ok" for rule in rules), rules

            # The dashboard: valid queries, on series that exist.
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                families = exposed_families(await response.text())
            for promql in dashboard_queries():
                missing = series_names(promql) - families
                assert not missing, f"{promql}: livefuse exposes no {sorted(missing)}"
                await query(http, prometheus_url, promql)
            # Frames flow: the output rate, from two scrapes or more.
            fps_query = "sum(rate(livefuse_frames_out_total[1m]))"
            while not (fps := await query(http, prometheus_url, fps_query)) or not float(
                fps[0]["value"][1]
            ):
                assert time.monotonic() < deadline + 30, f"no output rate: {fps}"
                await asyncio.sleep(0.5)
        finally:
            await publisher.close()

    run(scenario)
