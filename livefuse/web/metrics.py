"""Prometheus metrics for `/metrics`, on a registry of the app's own (not the process's
global one, so several apps can live side by side in tests).

Per-frame values (latency, frames out, errors by stage) are counted as frames leave a
session; per-session state (fps, quality level, drops, viewers) is read from the live
sessions at scrape time, so a session that ends takes its series with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from livefuse.stream.engine import EngineMetrics
from livefuse.stream.frames import FrameStats
from livefuse.stream.quality import QualityController
from livefuse.stream.session import SessionStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class EngineView(Protocol):
    """What /metrics reads of the frame engine."""

    @property
    def metrics(self) -> EngineMetrics: ...

    @property
    def governor(self) -> QualityController: ...


class LiveSessionView(Protocol):
    id: str

    def stats(self) -> SessionStats: ...

    @property
    def viewer_count(self) -> int: ...


class _SessionCollector(Collector):
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
        yield GaugeMetricFamily("livefuse_sessions", "Live WHIP sessions", value=len(sessions))
        viewers = GaugeMetricFamily(
            "livefuse_viewers", "WHEP viewers per session", labels=["session"]
        )
        fps = GaugeMetricFamily(
            "livefuse_session_fps", "Frames per second", labels=["session", "direction"]
        )
        dropped = GaugeMetricFamily(
            "livefuse_session_dropped_frames", "Frames never processed", labels=["session"]
        )
        quality = GaugeMetricFamily(
            "livefuse_session_quality",
            "Quality level in force (1 for the current level)",
            labels=["session", "level"],
        )
        p95 = GaugeMetricFamily(
            "livefuse_session_latency_p95_seconds", "Frame latency p95", labels=["session"]
        )
        for session in sessions:
            stats = session.stats()
            viewers.add_metric([session.id], session.viewer_count)
            fps.add_metric([session.id, "in"], stats.fps_in)
            fps.add_metric([session.id, "out"], stats.fps_out)
            dropped.add_metric([session.id], stats.dropped)
            quality.add_metric([session.id, stats.quality], 1.0)
            p95.add_metric([session.id], stats.latency_ms.get("p95", 0.0) / 1000.0)
        yield from (viewers, fps, dropped, quality, p95)

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
        yield from (batches, frames, busy, level)


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
