"""Process-wide settings, read from `LIVEFUSE_*` environment variables.

There is no module-level instance: the edge (the CLI, the service) builds one `Settings`
and passes it down, so tests and embedders can hold several side by side.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "livefuse"


def _cpu_quota_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The cores a cgroup v2 CPU limit allows (a container's `--cpus`, a Kubernetes
    limit), or None without one. The affinity mask still shows every core of the host."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _default_threads() -> int:
    # The CPUs this process may run on (a container's or CI's cpuset), not the host's count.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _check_token(value: str) -> None:
    # An empty Bearer would pass an empty token; a token with blanks or controls cannot
    # travel in a header as it is (and is a paste gone wrong).
    if not value.strip():
        raise ValueError("a token must not be empty")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("a token must not contain spaces or control characters")


# What aiortc takes as a TURN server (RFC 7065, no IPv6 literal).
_TURN_URL = re.compile(r"turns?:[^?:\s]+(:[0-9]+)?(\?transport=(udp|tcp))?")

# Each swap process loads its own copy of the models and holds two shared-memory blocks;
# past this many, the engine's single tracking stage sets the pace anyway.
_MAX_DEFAULT_SWAP_PROCESSES = 8


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIVEFUSE_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=_default_home)
    """Root of everything livefuse keeps on disk: models/, testdata/."""

    threads: int = Field(default_factory=_default_threads, ge=1)
    """Intra-op threads for inference runtimes."""

    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Largest decoded image accepted (width x height)."""

    max_image_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    """Largest encoded image accepted."""

    # -- the service (`livefuse serve`; its flags override these) ------------------------

    host: str = "127.0.0.1"
    """Address `livefuse serve` listens on."""

    port: int = Field(default=8080, ge=0, le=65535)

    token: str | None = None
    """The admin token (`--token`): allowed everywhere, /metrics included. With any token
    set (admin, publish or view), /api (but /api/v1/capacity), /whip, /whep and /metrics
    need `Authorization: Bearer <token>` of a scope that covers them (web/auth.py). An
    empty or blank token is refused at start-up."""

    publish_tokens: list[str] = Field(default_factory=list)
    """Publish tokens (`--publish-token T`, repeatable; a JSON list in the environment):
    WHIP (publish, trickle, end), source faces (/api/v1/sources), the sessions API (read
    and PATCH), ingests and RTMP outputs, and WHEP too (a publisher may watch its
    stream). What OBS's Bearer Token field and the publisher page get."""

    view_tokens: list[str] = Field(default_factory=list)
    """View tokens (`--view-token T`, repeatable): WHEP and what the watch page needs
    (/api/v1/ice-servers) only, so a viewer link (`/watch/NAME#token=T`) that gets passed
    around lets nobody publish or steer a session. With publish or view tokens but no
    admin token, nothing is admin-only reachable: /metrics answers only on the scrape
    listener (`metrics_port`)."""

    metrics_host: str = "127.0.0.1"
    """Address of the unauthenticated Prometheus scrape listener (with `metrics_port`)."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """When set, a second small listener on `metrics_host:metrics_port` answers
    `GET /metrics` (and nothing else) without a token, for Prometheus: scrape
    `http://<metrics_host>:<metrics_port>/metrics` (e.g. `LIVEFUSE_METRICS_HOST=0.0.0.0
    LIVEFUSE_METRICS_PORT=9464` in a container, the port published to Prometheus
    only). The figures are aggregates with no session ids. Unset: /metrics is served on
    the main port only, behind the admin token when tokens are set."""

    max_concurrent_uploads: int = Field(default=2, ge=1)
    """Source uploads read and prepared at once; one more is answered 503 + Retry-After
    before its body is read. Uploads in memory stay below this times `max_image_bytes`
    (twice that while one is joined), whatever the number of clients."""

    ice_connect_timeout_s: float = Field(default=5.0, gt=0)
    """A WHIP publisher or WHEP viewer counts against its limit from its offer, and is
    ended unless its peer connection (ICE and DTLS) is up within this long."""

    max_pending_publishers_per_address: int = Field(default=1, ge=1)
    """WHIP offers from one client address whose connection is not up yet; one more is
    429 with Retry-After (one address cannot hold every slot with offers that never
    connect). Behind a reverse proxy every client shares the proxy's address."""

    heap_trim_interval_s: float = Field(default=60.0, ge=0)
    """How often the C heap's free pages are handed back to the system (glibc's
    malloc_trim, stream/heap.py), so RSS neither creeps up over long sessions nor stays
    up after they end. 0: never."""

    max_pending_viewers_per_address: int = Field(default=4, ge=1)
    """WHEP offers from one client address whose connection is not up yet (several
    OBS browser sources start at once); one more is 429 with Retry-After."""

    max_sessions: int = Field(default=2, ge=1)
    """Concurrent WHIP sessions; one more is refused with 503 and Retry-After."""

    max_viewers: int = Field(default=16, ge=1)
    """WHEP viewers per session."""

    max_sources: int = Field(default=64, ge=1)
    """Source faces kept in memory; the oldest unused one goes first."""

    max_sdp_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest SDP offer or trickle-ICE fragment accepted."""

    idle_timeout_s: float = Field(default=15.0, gt=0)
    """A session whose publisher sends no video for this long is ended (a vanished peer)."""

    label_default: bool = False
    """Burn a small "AI-generated" label into the video of every session that does not
    say otherwise (WHIP `?label=0|1`, PATCH `label`): for relays that must disclose
    synthetic media (`livefuse serve --label`)."""

    swapper: Literal["mesh", "inswapper"] = "mesh"
    """The service's face swapper: the embedded mesh swapper, or inswapper_128 + ArcFace
    (bring your own: `livefuse models pull`)."""

    detector: Literal["centerface", "scrfd"] = "centerface"
    """The service's face detector: embedded CenterFace, or SCRFD (bring your own)."""

    enhancer: Literal["none", "gfpgan", "codeformer"] = "none"
    """Face enhancer on swapped faces (bring your own); adaptive quality drops it first."""

    occlusion: bool = False
    """Keep hands, glasses and hair in front of swapped faces (BiSeNet, bring your own)."""

    swap_processes: int | None = Field(default=None, ge=0)
    """Child processes that take part of each batch's face swaps on the CPU (the frame
    engine's CPU scheduler, stream/swap_pool.py): threads of one process mostly wait for
    each other's GIL there. None: one per core the process may use (its affinity and any
    cgroup CPU limit), at most 8, none below two cores. 0 swaps every face in the engine's
    own thread. Each uses up to about 24 MB of shared memory (/dev/shm) at 720p."""

    push_bitrate_kbps: int = Field(default=3000, ge=100, le=50_000)
    """Video bitrate of an RTMP push (`/outputs`, `livefuse relay --output`) when the
    request names none."""

    max_outputs: int = Field(default=4, ge=0)
    """RTMP pushes per session (each is one more H.264 encode)."""

    peers: str | None = None
    """Other nodes of this service (`livefuse serve --peers`): base URLs separated by
    commas, or `dns:NAME[:PORT]` whose A/AAAA records are the peers (a Kubernetes headless
    Service). A full node redirects new publishers to the peer with most room (307)."""

    public_url: str | None = None
    """This node's base URL as clients reach it (e.g. `https://node-3.live.example.net`),
    when peers are set: what a peer redirects publishers to, and the base of the
    absolute Locations of its sessions. Default: the address the peers polled it at, and
    the Host of each request."""

    relay_whip: str | None = None
    """Re-publish every stream's swapped video and audio to a media server over WHIP
    (`livefuse serve --relay-whip URL`); `{name}` in the URL becomes the stream's name (or
    the session's id), e.g. `http://mediamtx:8889/{name}/whip`."""

    relay_whip_token: str | None = None
    """Bearer token for the `relay_whip` server, when it asks for one."""

    publisher_gone_s: float = Field(default=3.0, gt=0)
    """A named stream's publisher that has sent no video for this long counts as gone: a
    new publisher on the name takes its place instead of getting 409 (OBS restarted after
    a crash sends no DELETE)."""

    ice_servers: list[str] = Field(default_factory=list)
    """STUN/TURN URLs for the server's peer connections (JSON list in the environment).
    Empty: host candidates only, enough on a LAN or loopback."""

    turn_urls: list[str] = Field(default_factory=list)
    """TURN URLs (JSON list, e.g. `["turn:turn.example.net:3478?transport=udp"]`) given
    short-lived credentials from `turn_secret` (coturn's `use-auth-secret`): announced on
    WHIP/WHEP answers and to the pages, and used by the server's own peer connections."""

    turn_secret: str | None = None
    """The TURN server's `static-auth-secret`; TURN URLs are used only with it."""

    turn_ttl_s: int = Field(default=24 * 3600, ge=60)
    """How long a TURN credential lasts. The TURN server checks it on every refresh of a
    relay, so it must outlast the longest session, and a leaked one is dead after it."""

    @field_validator("token")
    @classmethod
    def _check_admin_token(cls, value: str | None) -> str | None:
        if value is not None:
            _check_token(value)
        return value

    @field_validator("publish_tokens", "view_tokens")
    @classmethod
    def _check_scoped_tokens(cls, values: list[str]) -> list[str]:
        for value in values:
            _check_token(value)
        return values

    def token_problem(self) -> str | None:
        """Why the tokens cannot be used as they are, or None. For values that skipped
        validation (`model_copy(update=...)`, as `livefuse serve` applies its flags)."""
        scoped = [self.token] if self.token is not None else []
        try:
            for value in [*scoped, *self.publish_tokens, *self.view_tokens]:
                _check_token(value)
        except ValueError as error:
            return str(error)
        everyone = [*scoped, *self.publish_tokens, *self.view_tokens]
        if len(set(everyone)) != len(everyone):
            return "the same token is given twice (a token has one scope: admin, publish or view)"
        return None

    @property
    def has_tokens(self) -> bool:
        return self.token is not None or bool(self.publish_tokens or self.view_tokens)

    @field_validator("turn_urls")
    @classmethod
    def _check_turn_urls(cls, values: list[str]) -> list[str]:
        # Caught at start-up, not as a failed negotiation on every peer's offer.
        for url in values:
            if not _TURN_URL.fullmatch(url):
                raise ValueError(
                    f"{url!r} is not a TURN URL: turn:HOST[:PORT][?transport=udp|tcp] (or turns:)"
                )
        return values

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def resolved_swap_processes(self) -> int:
        if self.swap_processes is not None:
            return self.swap_processes
        cores = float(_default_threads())
        quota = _cpu_quota_cores()
        if quota is not None:
            cores = min(cores, quota)
        if cores < 2:
            return 0
        return min(int(cores), _MAX_DEFAULT_SWAP_PROCESSES)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def testdata_dir(self) -> Path:
        return self.home / "testdata"
