"""Prometheus metrics for `/metrics`, on a registry of the app's own (not the process's
global one, so several apps can live side by side in tests).

Per-frame values (latency, frames out, errors by stage) are counted as frames leave a
session; the live sessions' state (fps, quality levels, drops, viewers) is summed over
them at scrape time. No series carries a session id. `/metrics` on the app needs the
admin token when tokens are set; `scrape_listener` serves it without one on an address
of its own (settings `metrics_host`, `metrics_port`) for Prometheus.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from livefuse.stream.engine import EngineMetrics
from livefuse.stream.frames import FrameStats
from livefuse.stream.health import StageHealth
from livefuse.stream.quality import QualityController
from livefuse.stream.session import SessionStats

log = logging.getLogger("livefuse.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class EngineView(Protocol):
    """What /metrics reads of the frame engine."""

    @property
    def metrics(self) -> EngineMetrics: ...

    @property
    def governor(self) -> QualityController: ...

    @property
    def health(self) -> StageHealth: ...


class LiveSessionView(Protocol):
    def stats(self) -> SessionStats: ...

    @property
    def viewer_count(self) -> int: ...


class _SessionCollector(Collector):
    """The live sessions as aggregates: no series names a session (its id is a secret
    of sorts, and one series per session is unbounded cardinality for Prometheus).
    Per-session figures are in the authenticated API (`GET /api/v1/sessions`)."""

    def __init__(
        self,
        sessions: Callable[[], Iterable[LiveSessionView]],
        ready: Callable[[], bool],
        engine: Callable[[], EngineView | None],
    ) -> None:
        self._sessions = sessions
        self._ready = ready
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        yield from self._collect_engine()
        sessions = list(self._sessions())
        yield GaugeMetricFamily(
            "livefuse_ready", "1 when the models are loaded and warm", value=float(self._ready())
        )
        yield GaugeMetricFamily("livefuse_sessions", "Live sessions", value=len(sessions))
        all_stats = [session.stats() for session in sessions]
        yield GaugeMetricFamily(
            "livefuse_viewers",
            "WHEP viewers of all live sessions",
            value=sum(session.viewer_count for session in sessions),
        )
        fps = GaugeMetricFamily(
            "livefuse_sessions_fps",
            "Frames per second, summed over the live sessions",
            labels=["direction"],
        )
        fps.add_metric(["in"], sum(stats.fps_in for stats in all_stats))
        fps.add_metric(["out"], sum(stats.fps_out for stats in all_stats))
        yield fps
        yield GaugeMetricFamily(
            "livefuse_sessions_dropped_frames",
            "Frames never processed, summed over the live sessions",
            value=sum(stats.dropped for stats in all_stats),
        )
        by_level = GaugeMetricFamily(
            "livefuse_sessions_by_quality",
            "Live sessions at each quality level",
            labels=["level"],
        )
        levels = collections.Counter(stats.quality for stats in all_stats)
        for level, count in sorted(levels.items()):
            by_level.add_metric([level], count)
        yield by_level
        yield GaugeMetricFamily(
            "livefuse_sessions_latency_p95_seconds_max",
            "The highest frame latency p95 of the live sessions",
            value=max((stats.latency_ms.get("p95", 0.0) for stats in all_stats), default=0.0)
            / 1000.0,
        )
        yield GaugeMetricFamily(
            "livefuse_sessions_passing_through",
            "Live sessions whose last frame went out unswapped after an error",
            value=sum(1 for stats in all_stats if stats.passthrough),
        )

    def _collect_engine(self) -> Iterator[Metric]:
        """The process's one frame engine: how many frames it batched, how busy each of
        its workers is, the level its `auto` sessions share."""
        engine = self._engine()
        if engine is None:
            return
        snapshot = engine.metrics.snapshot()
        batches = CounterMetricFamily("livefuse_engine_batches", "Batches the frame engine has run")
        batches.add_metric([], float(snapshot["batches"]))  # type: ignore[arg-type]
        frames = CounterMetricFamily(
            "livefuse_engine_frames", "Frames the frame engine has taken in"
        )
        frames.add_metric([], float(snapshot["frames"]))  # type: ignore[arg-type]
        busy = GaugeMetricFamily(
            "livefuse_engine_busy_ratio",
            "Share of the time each engine worker has been working since it started",
            labels=["worker"],
        )
        for worker, ratio in snapshot["busy"].items():  # type: ignore[attr-defined]
            busy.add_metric([worker], float(ratio))
        level = GaugeMetricFamily(
            "livefuse_engine_auto_quality",
            "The level the sessions on auto share (1 for the current level)",
            labels=["level"],
        )
        level.add_metric([engine.governor.level.name], 1.0)
        failing = GaugeMetricFamily(
            "livefuse_engine_stage_failing",
            "1 while an engine stage fails on every frame (frames pass through unswapped)",
            labels=["stage"],
        )
        for stage in engine.health.failing():
            failing.add_metric([stage], 1.0)
        yield from (batches, frames, busy, level, failing)


class Metrics:
    def __init__(
        self,
        *,
        sessions: Callable[[], Iterable[LiveSessionView]],
        ready: Callable[[], bool],
        engine: Callable[[], EngineView | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "livefuse_frame_latency_seconds",
            "Time from a frame's arrival to its processed version being ready",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.frames_out = Counter(
            "livefuse_frames_out", "Processed frames sent on", registry=self.registry
        )
        self.faces_swapped = Counter(
            "livefuse_faces_swapped", "Faces replaced by a source", registry=self.registry
        )
        self.errors = Counter(
            "livefuse_frame_errors",
            "Frames sent through unswapped after a failure",
            ["stage"],
            registry=self.registry,
        )
        self.sessions_started = Counter(
            "livefuse_sessions_started", "WHIP sessions started", registry=self.registry
        )
        self.refused = Counter(
            "livefuse_requests_refused",
            "Requests refused by a limit or check",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_SessionCollector(sessions, ready, engine))

    def frame(self, stats: FrameStats) -> None:
        self.latency.observe(stats.latency_ms / 1000.0)
        self.frames_out.inc()
        self.faces_swapped.inc(stats.swapped)
        if stats.error is not None:
            self.errors.labels(stage=stats.error.split(":", 1)[0]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def scrape_listener(
    metrics: Metrics, *, host: str, port: int
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An app cleanup context: a second, token-free listener on `host:port` that answers
    `GET /metrics` and nothing else, for as long as the app runs. OSError (naming the
    address) when it cannot listen."""

    async def scrape(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def listener(_: web.Application) -> AsyncIterator[None]:
        scraper = web.Application()
        scraper.router.add_get("/metrics", scrape)
        runner = web.AppRunner(scraper, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as error:
            await runner.cleanup()
            raise OSError(
                error.errno, f"cannot listen on {host}:{port} for /metrics: {error.strerror}"
            ) from error
        log.info("event=metrics_listener address=%s:%d", host, port)
        try:
            yield
        finally:
            await runner.cleanup()

    return listener
