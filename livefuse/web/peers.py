"""Scale-out: one WHIP URL in front of many nodes, with the redirects RFC 9725 provides.

Every node answers `GET /api/v1/capacity` (its sessions, its limit, its engine's load,
whether it takes another publisher, and the named streams it holds). A node started with
`--peers` polls its peers' capacity (short timeouts; a peer that does not answer is left
out until it does) and, when it is full or a peer has clearly more room, answers a WHIP
offer with `307 Temporary Redirect` to that peer: the publisher re-sends the offer there
and its session lives there (its `Location` is absolute, since PATCH and DELETE do not
follow redirects). A viewer of a named stream held elsewhere is sent to its node the same
way. When every node is full the node itself answers 503 with `Retry-After`.

Membership is whatever `--peers` says: base URLs (`http://10.0.0.5:8080,...`), or
`dns:NAME[:PORT]`, whose A/AAAA records are the peers, re-resolved at every poll (a
Kubernetes headless Service: pods that come and go are followed without a cluster manager
of our own). A node recognises itself among them by the random id its capacity carries.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger("livefuse.peers")

POLL_EVERY_S = 1.0
POLL_TIMEOUT_S = 0.5
STALE_AFTER_S = 3.0
"""A peer whose last answer is older than this is not redirected to."""
_DEFAULT_PORT = 8080


@dataclass(frozen=True)
class Capacity:
    node: str
    """A random id per process: how a node finds itself among its peers."""
    sessions: int
    max_sessions: int
    starting: int
    accepting: bool
    """Ready, not shutting down, and below its session limit."""
    engine_load: float
    """The busiest engine stage's share of the last seconds (0..1)."""
    streams: tuple[str, ...]
    """The named streams it holds (their viewers go there)."""
    url: str | None = None
    """The base URL clients reach it at (its `public_url`), when it says."""

    @property
    def headroom(self) -> int:
        if not self.accepting:
            return 0
        return max(0, self.max_sessions - self.sessions - self.starting)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "sessions": self.sessions,
            "max_sessions": self.max_sessions,
            "starting": self.starting,
            "headroom": self.headroom,
            "accepting": self.accepting,
            "engine_load": round(self.engine_load, 3),
            "streams": list(self.streams),
            "url": self.url,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Capacity:
        """A peer's answer, checked (ValueError for what is not one)."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            return cls(
                node=str(data["node"]),
                sessions=int(data["sessions"]),
                max_sessions=int(data["max_sessions"]),
                starting=int(data.get("starting", 0)),
                accepting=bool(data["accepting"]),
                engine_load=float(data.get("engine_load", 0.0)),
                streams=tuple(str(name) for name in data.get("streams", [])),
                url=str(data["url"]) if data.get("url") else None,
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a capacity: {error}") from error


def parse_peers(spec: str) -> list[str]:
    """The entries of `--peers`: base URLs and `dns:NAME[:PORT]`; ValueError when one is
    neither."""
    entries = [entry.strip().rstrip("/") for entry in spec.split(",") if entry.strip()]
    if not entries:
        raise ValueError("--peers is empty")
    for entry in entries:
        if entry.startswith(("http://", "https://")):
            continue
        if entry.startswith("dns:") and entry[4:].split(":")[0]:
            continue
        raise ValueError(
            f"--peers entry {entry!r} is neither a base URL (http://host:port) nor dns:NAME[:PORT]"
        )
    return entries


class PeerSet:
    """The peers' latest capacity, polled in the background. Used on the event loop."""

    def __init__(self, spec: str, *, own_node: str) -> None:
        self._entries = parse_peers(spec)
        self._own_node = own_node
        self._latest: dict[str, tuple[Capacity, float]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)
        self._http = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="livefuse-peers")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def _poll(self) -> None:
        while True:
            bases = await self._bases()
            await asyncio.gather(*(self._ask(base) for base in bases))
            for gone in set(self._latest) - set(bases):
                del self._latest[gone]
            await asyncio.sleep(POLL_EVERY_S)

    async def _bases(self) -> list[str]:
        bases: list[str] = []
        loop = asyncio.get_running_loop()
        for entry in self._entries:
            if not entry.startswith("dns:"):
                bases.append(entry)
                continue
            host, _, port = entry[4:].partition(":")
            try:
                records = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as error:
                log.warning("event=peers_unresolved name=%s error=%r", host, str(error))
                continue
            for family, *_, address in records:
                ip = address[0]
                shown = f"[{ip}]" if family == socket.AF_INET6 else ip
                bases.append(f"http://{shown}:{port or _DEFAULT_PORT}")
        return sorted(set(bases))

    async def _ask(self, base: str) -> None:
        assert self._http is not None
        try:
            async with self._http.get(f"{base}/api/v1/capacity") as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                capacity = Capacity.from_dict(await response.json())
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            if base in self._latest:
                log.warning("event=peer_unreachable peer=%s error=%r", base, str(error))
                del self._latest[base]
            return
        self.record(base, capacity)

    def record(self, base: str, capacity: Capacity) -> None:
        """A peer's answer (from the poll)."""
        if capacity.node == self._own_node:
            return  # this node, among the DNS records
        if base not in self._latest:
            log.info("event=peer_seen peer=%s headroom=%d", base, capacity.headroom)
        self._latest[base] = (capacity, time.monotonic())

    def live(self) -> dict[str, Capacity]:
        """The peers that answered lately, by base URL."""
        now = time.monotonic()
        return {base: c for base, (c, at) in self._latest.items() if now - at <= STALE_AFTER_S}

    def roomiest(self) -> tuple[str, Capacity] | None:
        """The live peer with the most headroom (the least loaded engine among equals),
        by the URL clients reach it at."""
        candidates = [(c.url or b, c) for b, c in self.live().items() if c.headroom > 0]
        if not candidates:
            return None
        return max(candidates, key=lambda bc: (bc[1].headroom, -bc[1].engine_load))

    def holder_of(self, name: str) -> str | None:
        """The URL clients reach a live peer that holds the named stream at."""
        return next((c.url or b for b, c in self.live().items() if name in c.streams), None)


def publisher_target(own: Capacity, peers: PeerSet, *, name: str | None) -> str | None:
    """Where a new publisher should go instead of here (a peer's base URL), or None to
    stay. A named stream held by a peer goes there (its viewers are there); otherwise a
    full node sends it to the peer with most room, and so does one that a peer beats by
    more than one session of headroom (spreading publishers across the nodes)."""
    if name is not None and name in own.streams:
        return None  # its viewers and pushes are here: full, it is 503 here, not elsewhere
    if name is not None:
        holder = peers.holder_of(name)
        if holder is not None:
            return holder
    best = peers.roomiest()
    if best is None:
        return None
    base, capacity = best
    if own.headroom == 0 or capacity.headroom > own.headroom + 1:
        return base
    return None
