"""The service's state: the frame engine, sources, live sessions and their viewers.

One `Service` per app. The models are loaded once into the process's one `FrameEngine`,
which every session's frames go through; each WHIP publisher gets a `LiveSession` (its
peer connection, its `StreamSession`, its WHEP viewers). Ending a session, for whatever
reason (DELETE, the peer's connection failing, no video for a while, shutdown), goes
through `end_session`, which closes everything it owns exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection

from livefuse.engines.backend import Backend, select_backend
from livefuse.engines.pipeline import FacePipeline, FaceSelection
from livefuse.engines.store import ModelError
from livefuse.settings import Settings
from livefuse.stream import codecs
from livefuse.stream.engine import FrameEngine
from livefuse.stream.quality import QualityMode
from livefuse.stream.session import SessionStats, StreamSession
from livefuse.stream.startup import load_pipeline, start_engine
from livefuse.web.errors import sdp_error
from livefuse.web.ice import ice_servers
from livefuse.web.metrics import Metrics
from livefuse.web.sources import Source, SourcePreparer, SourceStore

log = logging.getLogger("livefuse.service")

RETRY_AFTER_BUSY_S = 10
RETRY_AFTER_STARTING_S = 5


@dataclass
class LiveSession:
    id: str
    stream: StreamSession
    pc: RTCPeerConnection
    source: Source | None
    mode: str
    """"sendrecv" (the processed video goes back to the publisher too) or "sendonly"."""
    viewers: dict[str, RTCPeerConnection] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def viewer_count(self) -> int:
        return len(self.viewers)

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
            "mode": self.mode,
            "viewers": self.viewer_count,
            "created": self.created,
            "connection": self.pc.connectionState,
            "whep": f"/whep/{self.id}",
            "watch": f"/watch/{self.id}",
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
        self.preparer = SourcePreparer()
        self.sessions: dict[str, LiveSession] = {}
        self.metrics = Metrics(
            sessions=lambda: list(self.sessions.values()),
            ready=lambda: self.ready,
            engine=lambda: self.engine,
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
        if self._load_task is not None:
            # Not cancelled: the loading thread would go on and leave an engine behind.
            await asyncio.gather(self._load_task, return_exceptions=True)
        await asyncio.gather(
            *(self.end_session(s, reason="shutdown") for s in list(self.sessions)),
            *self._ending.values(),
            *self._background,
            return_exceptions=True,
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

    def require_ready(self) -> FacePipeline:
        if not self.ready or self.face_pipeline is None:
            raise sdp_error(
                503,
                "not_ready",
                f"the service is not ready: {self.problem}",
                headers={"Retry-After": str(RETRY_AFTER_STARTING_S)},
            )
        return self.face_pipeline

    def reserve_session(self) -> None:
        """Count a session being set up against the limit, or refuse with 503."""
        if self._stopping:
            raise sdp_error(
                503,
                "shutting_down",
                "the server is shutting down",
                headers={"Retry-After": str(RETRY_AFTER_STARTING_S)},
            )
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

    def new_peer_connection(self) -> RTCPeerConnection:
        # An explicit (possibly empty) list: aiortc would otherwise ask a public STUN
        # server, and wait for it where there is none. With TURN configured the server
        # gathers relay candidates too, which a client that cannot reach it directly can.
        servers = [server.rtc() for server in ice_servers(self.settings)]
        return RTCPeerConnection(RTCConfiguration(iceServers=servers))

    def new_stream(
        self, session_id: str, *, quality: QualityMode, face_selection: FaceSelection
    ) -> StreamSession:
        assert self.engine is not None, "sessions start once the service is ready"
        return StreamSession(
            session_id=session_id,
            engine=self.engine,
            loop=asyncio.get_running_loop(),
            idle_timeout_s=self.settings.idle_timeout_s,
            quality=quality,
            face_selection=face_selection,
            on_frame=self.metrics.frame,
            on_idle=lambda stream: self.schedule_end(stream.id, reason="no video"),
        )

    def add_session(self, session: LiveSession) -> None:
        self.sessions[session.id] = session
        self.metrics.sessions_started.inc()

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
        await session.stream.close()
        await asyncio.gather(
            *(close_peer(pc) for pc in session.viewers.values()), close_peer(session.pc)
        )
        session.viewers.clear()
        return True

    async def end_viewer(self, session_id: str, viewer_id: str) -> bool:
        session = self.sessions.get(session_id)
        pc = session.viewers.pop(viewer_id, None) if session else None
        if pc is None:
            return False
        log.info("event=viewer_end session=%s viewer=%s", session_id, viewer_id)
        await close_peer(pc)
        return True


async def close_peer(pc: RTCPeerConnection) -> None:
    for transceiver in pc.getTransceivers():
        track = transceiver.sender.track
        if track is not None:
            track.stop()
    await pc.close()
