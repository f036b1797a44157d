"""The service's state: the frame engine, sources, live sessions and their viewers.

One `Service` per app. The models are loaded once into the process's one `FrameEngine`,
which every session's frames go through. Each publisher (a WHIP peer, or an FFmpeg ingest)
gets a `LiveSession` (its peer connection or ingest, its `StreamSession`). What it
publishes goes to a `Broadcast`: the channel its viewers (WHEP) and pushes (RTMP) read.
An unnamed session's broadcast is its own and ends with it; a named stream's (`/whip/NAME`)
belongs to the name, so its viewers and pushes carry on across publisher restarts.
Ending a session, for whatever reason (DELETE, the peer's connection failing, no video
for a while, shutdown), goes through `end_session`, which closes everything it owns
exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection

from livefuse.engines.backend import Backend, select_backend
from livefuse.engines.pipeline import FacePipeline, FaceSelection
from livefuse.engines.store import ModelError
from livefuse.settings import Settings
from livefuse.stream import codecs
from livefuse.stream.channel import Channel
from livefuse.stream.engine import FrameEngine
from livefuse.stream.ingest import Ingest
from livefuse.stream.push import PushOutput
from livefuse.stream.quality import QualityMode
from livefuse.stream.session import SessionStats, StreamSession
from livefuse.stream.startup import load_pipeline, start_engine
from livefuse.web.errors import sdp_error
from livefuse.web.ice import ice_servers
from livefuse.web.metrics import Metrics
from livefuse.web.peers import Capacity, PeerSet
from livefuse.web.relay_metrics import RelayCollector
from livefuse.web.sources import Source, SourcePreparer, SourceStore
from livefuse.web.whip_client import WhipRelay, relay_url

log = logging.getLogger("livefuse.service")

RETRY_AFTER_BUSY_S = 10
RETRY_AFTER_STARTING_S = 5


class EndedError(RuntimeError):
    """The stream a request named ended while it was being handled."""


NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A stream name: what goes in /whip/NAME, /whep/NAME and /watch/NAME."""


@dataclass
class Broadcast:
    """A channel's audience: its WHEP viewers and RTMP pushes, and the session that
    publishes into it now (None between two publishers of a named stream)."""

    key: str
    """The stream's name, or its one session's id."""
    channel: Channel
    named: bool
    viewers: dict[str, RTCPeerConnection] = field(default_factory=dict)
    outputs: dict[str, PushOutput] = field(default_factory=dict)
    publisher: str | None = None
    claimed: bool = False
    """A new publisher is being set up on it (from its claim to `add_session`): a second
    one gets 409, and the name is not let go meanwhile."""
    whip_relay: WhipRelay | None = None
    """The re-publication to a media server (`--relay-whip`), while there is one."""

    @property
    def idle(self) -> bool:
        return self.publisher is None and not self.claimed and not self.viewers and not self.outputs

    def outputs_dict(self) -> list[dict[str, Any]]:
        return [output.stats().as_dict() for output in self.outputs.values()]


@dataclass
class LiveSession:
    id: str
    stream: StreamSession
    broadcast: Broadcast
    source: Source | None
    mode: str
    """"sendrecv" (the processed video goes back to the publisher too), "sendonly", or
    "ingest" (an FFmpeg feed: `ingest`, no peer connection)."""
    pc: RTCPeerConnection | None = None
    ingest: Ingest | None = None
    created: float = field(default_factory=time.time)

    @property
    def name(self) -> str | None:
        return self.broadcast.key if self.broadcast.named else None

    @property
    def viewers(self) -> dict[str, RTCPeerConnection]:
        return self.broadcast.viewers

    @property
    def viewer_count(self) -> int:
        return len(self.broadcast.viewers)

    @property
    def connection(self) -> str:
        if self.pc is not None:
            return self.pc.connectionState
        return self.ingest.state if self.ingest is not None else "new"

    def stats(self) -> SessionStats:
        return self.stream.stats()

    def as_dict(self) -> dict[str, Any]:
        settings = self.stream.engine_session
        return {
            "id": self.id,
            "source": self.source.id if self.source else None,
            "quality": settings.quality,
            "enabled": settings.enabled,
            "faces": settings.face_selection,
            "label": settings.label,
            "mode": self.mode,
            "name": self.name,
            "viewers": self.viewer_count,
            "created": self.created,
            "connection": self.connection,
            "whep": f"/whep/{self.broadcast.key}",
            "watch": f"/watch/{self.broadcast.key}",
            "ingest": self.ingest.stats().as_dict() if self.ingest is not None else None,
            "outputs": self.broadcast.outputs_dict(),
            "relay_whip": relay.stats() if (relay := self.broadcast.whip_relay) else None,
            "stats": self.stats().as_dict(),
        }


class Service:
    def __init__(
        self,
        *,
        settings: Settings,
        face_pipeline: FacePipeline | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self.face_pipeline = face_pipeline
        self._owns_pipeline = face_pipeline is None
        self.backend = backend or select_backend("cpu", threads=1)
        self.engine: FrameEngine | None = None
        """The process's one frame engine, made once the models are loaded."""
        self.ready = False
        self.problem: str | None = "the models are loading"
        self.sources = SourceStore(limit=settings.max_sources)
        self.preparer = SourcePreparer(max_uploads=settings.max_concurrent_uploads)
        self.pending_publishers = PendingOffers(
            per_address=settings.max_pending_publishers_per_address,
            what="WHIP",
            refused=lambda: self.metrics.refused.labels(reason="pending").inc(),
        )
        self.pending_viewers = PendingOffers(
            per_address=settings.max_pending_viewers_per_address,
            what="WHEP",
            refused=lambda: self.metrics.refused.labels(reason="pending").inc(),
        )
        """Offers answered whose connection is not up yet, by client address (issue 18)."""
        self.sessions: dict[str, LiveSession] = {}
        self.broadcasts: dict[str, Broadcast] = {}
        """Named streams, by name (an unnamed session's broadcast hangs off it alone)."""
        self.metrics = Metrics(
            sessions=lambda: list(self.sessions.values()),
            ready=lambda: self.ready,
            engine=lambda: self.engine,
        )
        self.metrics.registry.register(RelayCollector(lambda: self))
        self.node_id = secrets.token_hex(8)
        """Who this process is among its peers (GET /api/v1/capacity)."""
        self.peers = (
            PeerSet(settings.peers, own_node=self.node_id) if settings.peers is not None else None
        )
        self._starting = 0
        self._stopping = False
        self._ending: dict[str, asyncio.Task[bool]] = {}
        self._background: set[asyncio.Task[object]] = set()
        self._load_task: asyncio.Task[None] | None = None
        codecs.install()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm the models in the background; /readyz says when they are."""
        self._load_task = asyncio.get_running_loop().create_task(
            self._load(), name="livefuse-load-models"
        )
        if self.peers is not None:
            await self.peers.start()

    async def _load(self) -> None:
        try:
            self.face_pipeline, self.engine = await asyncio.to_thread(self._load_and_warm)
        except ModelError as error:
            self.problem = str(error)
            log.error("event=models_unavailable problem=%r", str(error))
            return
        except Exception as error:  # /readyz says so; the process keeps serving the rest
            self.problem = f"the frame engine could not start: {type(error).__name__}: {error}"
            log.exception("event=engine_unavailable")
            return
        self.ready, self.problem = True, None
        log.info("event=models_ready")

    def _load_and_warm(self) -> tuple[FacePipeline, FrameEngine]:
        pipeline = self.face_pipeline or load_pipeline(self.settings, backend=self.backend)
        return pipeline, start_engine(pipeline, self.settings)

    async def stop(self) -> None:
        """End every session cleanly, then the engine (graceful shutdown)."""
        self._stopping = True  # no new sessions from here on
        if self.peers is not None:
            await self.peers.close()
        if self._load_task is not None:
            # Not cancelled: the loading thread would go on and leave an engine behind.
            await asyncio.gather(self._load_task, return_exceptions=True)
        await asyncio.gather(
            *(self.end_session(s, reason="shutdown") for s in list(self.sessions)),
            *self._ending.values(),
            *self._background,
            return_exceptions=True,
        )
        # Named streams between publishers still have viewers and pushes to end.
        broadcasts = list(self.broadcasts.values())
        self.broadcasts.clear()
        await asyncio.gather(
            *(self._close_broadcast(b) for b in broadcasts), return_exceptions=True
        )
        self.preparer.close()
        self.ready = False
        # Joining the engine's workers and its swap processes takes a moment: not on the loop.
        await asyncio.to_thread(self._close_engine)

    def _close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.face_pipeline is not None and self._owns_pipeline:
            self.face_pipeline.close()

    # -- sessions -----------------------------------------------------------------------

    def capacity(self) -> Capacity:
        """This node's headroom, as its peers and autoscalers read it."""
        engine = self.engine
        load = max(engine.metrics.busy_ratio().values(), default=0.0) if engine else 0.0
        return Capacity(
            node=self.node_id,
            sessions=len(self.sessions),
            max_sessions=self.settings.max_sessions,
            starting=self._starting,
            accepting=self.ready and not self._stopping,
            engine_load=load,
            streams=tuple(self.broadcasts),
            url=self.settings.public_url,
        )

    def require_ready(self) -> FacePipeline:
        if not self.ready or self.face_pipeline is None:
            raise sdp_error(
                503,
                "not_ready",
                f"the service is not ready: {self.problem}",
                headers={"Retry-After": str(RETRY_AFTER_STARTING_S)},
            )
        return self.face_pipeline

    def _refuse_if_stopping(self) -> None:
        if self._stopping:
            raise sdp_error(
                503,
                "shutting_down",
                "the server is shutting down",
                headers={"Retry-After": str(RETRY_AFTER_STARTING_S)},
            )

    def reserve_session(self) -> None:
        """Count a session being set up against the limit, or refuse with 503."""
        self._refuse_if_stopping()
        if len(self.sessions) + self._starting >= self.settings.max_sessions:
            self.metrics.refused.labels(reason="capacity").inc()
            raise sdp_error(
                503,
                "at_capacity",
                f"the server is at its limit of {self.settings.max_sessions} live sessions; "
                "try again shortly",
                headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
            )
        self._starting += 1

    def release_reservation(self) -> None:
        self._starting -= 1

    def peer_configuration(self) -> RTCConfiguration:
        # An explicit (possibly empty) list: aiortc would otherwise ask a public STUN
        # server, and wait for it where there is none. With TURN configured the server
        # gathers relay candidates too, which a client that cannot reach it directly can.
        servers = [server.rtc() for server in ice_servers(self.settings)]
        return RTCConfiguration(iceServers=servers)

    def new_peer_connection(self) -> RTCPeerConnection:
        return RTCPeerConnection(self.peer_configuration())

    def new_stream(
        self,
        session_id: str,
        *,
        quality: QualityMode,
        face_selection: FaceSelection,
        broadcast: Broadcast | None = None,
        idle_timeout_s: float | None = None,
    ) -> StreamSession:
        """The session's stream, publishing into `broadcast`'s channel when it has one
        (a named stream) or a channel of its own."""
        assert self.engine is not None, "sessions start once the service is ready"
        return StreamSession(
            session_id=session_id,
            engine=self.engine,
            loop=asyncio.get_running_loop(),
            idle_timeout_s=idle_timeout_s or self.settings.idle_timeout_s,
            quality=quality,
            face_selection=face_selection,
            label=self.settings.label_default,
            on_frame=self.metrics.frame,
            on_idle=lambda stream: self.schedule_end(stream.id, reason="no video"),
            channel=broadcast.channel if broadcast is not None else None,
        )

    # -- broadcasts: named streams, viewers, pushes ---------------------------------------

    def find_broadcast(self, key: str) -> Broadcast | None:
        """A named stream by name, or a session's broadcast by the session's id."""
        if key in self.broadcasts:
            return self.broadcasts[key]
        session = self.sessions.get(key)
        return session.broadcast if session is not None else None

    async def claim_name(self, name: str) -> Broadcast:
        """The named stream's broadcast for a new publisher: made if new; 409 while
        another publisher is live on it. A publisher silent for `publisher_gone_s` (OBS
        killed, a network gone) is ended and replaced."""
        broadcast = self.broadcasts.get(name)
        if broadcast is None:
            broadcast = Broadcast(
                key=name, channel=Channel(loop=asyncio.get_running_loop(), name=name), named=True
            )
            self.broadcasts[name] = broadcast
        current = self.sessions.get(broadcast.publisher) if broadcast.publisher else None
        silent_s = time.monotonic() - current.stream.last_input if current else 0.0
        if broadcast.claimed or (current and silent_s < self.settings.publisher_gone_s):
            raise sdp_error(
                409,
                "name_in_use",
                f"the stream {name!r} is live from another publisher; end that one first "
                "(DELETE its session) or publish under another name",
            )
        # Claimed before any await: a second publisher arriving meanwhile gets 409, and
        # ending the silent one below does not let the name go.
        broadcast.claimed = True
        if current is not None:
            await self.end_session(current.id, reason=f"replaced after {silent_s:.0f} s silent")
        return broadcast

    async def start_ingest(
        self,
        *,
        url: str,
        name: str | None,
        source: Source | None,
        quality: QualityMode,
        face_selection: FaceSelection,
        label: bool,
    ) -> LiveSession:
        """A session fed by an FFmpeg ingest of `url` (checked by the caller): it counts
        against the session limit like a WHIP publisher, and stays up while a live feed
        reconnects; a file that ends ends it."""
        loop = asyncio.get_running_loop()
        # A feed that drops is retried: its silence does not end the session.
        async with self.opening_session(
            name=name, quality=quality, face_selection=face_selection, idle_timeout_s=math.inf
        ) as (session_id, stream, broadcast):
            stream.engine_session.source = source.face if source else None
            stream.engine_session.label = label
            ingest = Ingest(
                url=url,
                session=stream,
                on_end=lambda _: loop.call_soon_threadsafe(
                    functools.partial(self.schedule_end, session_id, reason="the feed ended")
                ),
            )
            session = LiveSession(
                id=session_id,
                stream=stream,
                broadcast=broadcast,
                source=source,
                mode="ingest",
                ingest=ingest,
            )
            self.add_session(session)
        ingest.start()
        return session

    @contextlib.asynccontextmanager
    async def opening_session(
        self,
        *,
        name: str | None,
        quality: QualityMode,
        face_selection: FaceSelection,
        idle_timeout_s: float | None = None,
    ) -> AsyncIterator[tuple[str, StreamSession, Broadcast]]:
        """A new publisher's session while it is set up: (its id, its stream, its
        broadcast). It counts against the session limit from here (503 when full), on
        its named stream (409 while another publisher is live there) or a channel of its
        own. The caller makes it live with `add_session`; if anything inside fails, the
        stream is closed and a name nobody uses is let go."""
        broadcast = await self.claim_name(name) if name is not None else None
        stream: StreamSession | None = None
        reserved = False
        try:
            self.reserve_session()
            reserved = True
            session_id = self.new_id()
            stream = self.new_stream(
                session_id,
                quality=quality,
                face_selection=face_selection,
                broadcast=broadcast,
                idle_timeout_s=idle_timeout_s,
            )
            own = Broadcast(key=session_id, channel=stream.channel, named=False)
            yield session_id, stream, broadcast or own
        except BaseException:
            if stream is not None:
                await stream.close()
            if broadcast is not None:
                broadcast.claimed = False
                await self.forget_if_idle(broadcast)
            raise
        finally:
            if reserved:
                self.release_reservation()

    def add_session(self, session: LiveSession) -> None:
        """Make a session set up in `opening_session` live (503 if the service began
        shutting down meanwhile: its engine is going)."""
        self._refuse_if_stopping()
        self.sessions[session.id] = session
        broadcast = session.broadcast
        broadcast.publisher = session.id
        broadcast.claimed = False
        self.metrics.sessions_started.inc()
        if self.settings.relay_whip is not None and broadcast.whip_relay is None:
            broadcast.whip_relay = WhipRelay(
                url=relay_url(self.settings.relay_whip, name=broadcast.key),
                channel=broadcast.channel,
                token=self.settings.relay_whip_token,
                configuration=self.peer_configuration(),
            )
            broadcast.whip_relay.start()

    def live_broadcast(self, key: str) -> Broadcast | None:
        """A named stream or a live session's broadcast, unless it has ended."""
        broadcast = self.find_broadcast(key)
        return None if broadcast is None or broadcast.channel.closed else broadcast

    async def add_output(self, broadcast: Broadcast, *, url: str, bitrate_kbps: int) -> PushOutput:
        """Start pushing `broadcast` to an RTMP(S) URL (FeedUrlError for one it cannot;
        EndedError if the stream ended while the request was read)."""
        if self.live_broadcast(broadcast.key) is not broadcast:
            raise EndedError(f"{broadcast.key!r} ended")
        output = PushOutput(
            output_id=self.new_id(),
            url=url,
            channel=broadcast.channel,
            loop=asyncio.get_running_loop(),
            bitrate_kbps=bitrate_kbps,
        )
        broadcast.outputs[output.id] = output
        output.start()
        return output

    async def remove_output(self, broadcast: Broadcast, output_id: str) -> bool:
        output = broadcast.outputs.pop(output_id, None)
        if output is None:
            return False
        await output.close()
        await self.forget_if_idle(broadcast)
        return True

    async def _close_broadcast(self, broadcast: Broadcast) -> None:
        outputs, viewers = list(broadcast.outputs.values()), list(broadcast.viewers.values())
        broadcast.outputs.clear()
        broadcast.viewers.clear()
        relay, broadcast.whip_relay = broadcast.whip_relay, None
        await asyncio.gather(
            *(output.close() for output in outputs),
            *(close_peer(pc) for pc in viewers),
            *([relay.close()] if relay is not None else []),
        )
        await broadcast.channel.close()

    async def forget_if_idle(self, broadcast: Broadcast) -> None:
        """A named stream with no publisher, viewer or push left goes away."""
        if broadcast.named and broadcast.idle and self.broadcasts.get(broadcast.key) is broadcast:
            del self.broadcasts[broadcast.key]
            await self._close_broadcast(broadcast)

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a fire-and-forget task until it is done (the loop keeps only weak refs)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(12)

    def schedule_end(self, session_id: str, *, reason: str) -> None:
        """End a session from a callback (no awaiting there)."""
        if session_id in self.sessions and session_id not in self._ending:
            task = asyncio.get_running_loop().create_task(
                self.end_session(session_id, reason=reason), name=f"livefuse-end-{session_id[:8]}"
            )
            self._ending[session_id] = task
            task.add_done_callback(lambda _: self._ending.pop(session_id, None))

    async def end_session(self, session_id: str, *, reason: str) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        stats = session.stream.stats()
        log.info(
            "event=session_end session=%s reason=%r frames_in=%d frames_out=%d dropped=%d "
            "errors=%d viewers=%d",
            session_id,
            reason,
            stats.frames_in,
            stats.frames_out,
            stats.dropped,
            sum(stats.errors.values()),
            session.viewer_count,
        )
        if session.ingest is not None:
            await asyncio.to_thread(session.ingest.close)
        await session.stream.close()
        if session.pc is not None:
            await close_peer(session.pc)
        broadcast = session.broadcast
        if broadcast.publisher == session.id:
            broadcast.publisher = None
        if not broadcast.named or self._stopping:
            await self._close_broadcast(broadcast)
            self.broadcasts.pop(broadcast.key, None)
        else:
            await self.forget_if_idle(broadcast)
        return True

    async def end_viewer(self, key: str, viewer_id: str) -> bool:
        broadcast = self.find_broadcast(key)
        pc = broadcast.viewers.pop(viewer_id, None) if broadcast else None
        if broadcast is None or pc is None:
            return False
        log.info("event=viewer_end stream=%s viewer=%s", key, viewer_id)
        await close_peer(pc)
        await self.forget_if_idle(broadcast)
        return True


async def close_peer(pc: RTCPeerConnection) -> None:
    """Close a peer connection, its tracks and its transports; never raises.

    A peer an offer left half-built (aiortc gave up in setRemoteDescription, so some
    transceiver has no transport) makes `pc.close()` raise AttributeError midway: that
    must not replace the 400 the offer earned, nor leave the transports that do exist
    (their sockets) open."""
    for transceiver in pc.getTransceivers():
        track = transceiver.sender.track
        if track is not None:
            track.stop()
    try:
        await pc.close()
    except Exception as error:  # whatever aiortc trips on, the job gets finished
        log.debug("event=peer_close_partial error=%r", error)
        await _stop_transports(pc)


async def _stop_transports(pc: RTCPeerConnection) -> None:
    """What `pc.close()` did not get to: every DTLS transport the peer has and the ICE
    transport under it, each on its own (one failing does not keep the rest open)."""
    transports: dict[int, Any] = {}
    for transceiver in pc.getTransceivers():
        for dtls in (transceiver.receiver.transport, transceiver.sender.transport):
            if dtls is not None:
                transports[id(dtls)] = dtls
    if pc.sctp is not None:
        transports[id(pc.sctp.transport)] = pc.sctp.transport
    for dtls in transports.values():
        for stop in (dtls.stop, dtls.transport.stop):
            try:
                await stop()
            except Exception as error:  # the next one still gets closed
                log.debug("event=transport_stop_failed error=%r", error)
    pc.remove_all_listeners()


def _noop() -> None:
    pass


class PendingOffers:
    """Offers answered whose peer connection is not up yet, counted by client address:
    one address may hold `per_address` of them, so it cannot keep every slot with offers
    that never connect (each lasts at most `ice_connect_timeout_s` anyway)."""

    def __init__(self, *, per_address: int, what: str, refused: Callable[[], None] = _noop) -> None:
        self.per_address = per_address
        self.what = what
        self._refused = refused
        self._counts: Counter[str] = Counter()

    def hold(self, address: str, *, retry_after_s: float) -> Callable[[], None]:
        """One more pending offer from `address`, or 429 + Retry-After. Returns its
        release, which may be called any number of times."""
        if self._counts[address] >= self.per_address:
            self._refused()
            raise sdp_error(
                429,
                "too_many_pending",
                f"{self._counts[address]} {self.what} offer(s) from this address are still "
                "connecting (pending); try again once they are up",
                headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
            )
        self._counts[address] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._counts[address] -= 1
                if self._counts[address] <= 0:
                    del self._counts[address]

        return release

    def __len__(self) -> int:
        return sum(self._counts.values())


def watch_ice_deadline(
    pc: RTCPeerConnection,
    *,
    timeout_s: float,
    on_settled: Callable[[], None],
    on_timeout: Callable[[], None],
) -> None:
    """Call `on_timeout` unless `pc` is connected (ICE and DTLS) within `timeout_s`, and
    `on_settled` once, when it connects, fails, closes or times out: a peer that counts
    against a limit from its offer must come up soon or give its place back."""
    loop = asyncio.get_running_loop()
    settled = False

    def settle() -> bool:
        nonlocal settled
        if settled:
            return False
        settled = True
        deadline.cancel()
        on_settled()
        return True

    def expire() -> None:
        state = pc.connectionState
        if settle() and state not in ("connected", "failed", "closed"):
            on_timeout()

    deadline = loop.call_later(timeout_s, expire)

    @pc.on("connectionstatechange")
    def changed() -> None:
        if pc.connectionState in ("connected", "failed", "closed"):
            settle()
