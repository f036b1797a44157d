"""The node's capacity and the broadcast relay on /metrics: headroom, named streams,
ingests and RTMP pushes, as aggregates
read from the service at scrape time (no series names a session or a URL: both can
carry secrets, and per-stream labels would grow without bound)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from livefuse.stream.ingest import IngestState
from livefuse.stream.push import PushState

if TYPE_CHECKING:
    from livefuse.web.service import Service

_INGEST_STATES: tuple[IngestState, ...] = ("connecting", "live", "retrying", "ended", "closed")
_PUSH_STATES: tuple[PushState, ...] = ("connecting", "live", "retrying", "closed")


def _by_state(
    name: str, documentation: str, states: tuple[str, ...], seen: list[str]
) -> GaugeMetricFamily:
    """A gauge with a series per state (0 included, so a dashboard sees each one)."""
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    counts = Counter(seen)
    for state in states:
        family.add_metric([state], counts[state])
    return family


class RelayCollector(Collector):
    def __init__(self, service: Callable[[], Service]) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service()
        capacity = service.capacity()
        yield GaugeMetricFamily(
            "livefuse_capacity_max_sessions",
            "Sessions this node takes at most",
            value=capacity.max_sessions,
        )
        yield GaugeMetricFamily(
            "livefuse_capacity_headroom",
            "Sessions this node would still take now",
            value=capacity.headroom,
        )
        yield GaugeMetricFamily(
            "livefuse_capacity_accepting",
            "1 while this node takes new publishers",
            value=int(capacity.accepting and capacity.headroom > 0),
        )
        yield GaugeMetricFamily(
            "livefuse_capacity_engine_load",
            "The busiest engine stage's share of time",
            value=capacity.engine_load,
        )
        yield GaugeMetricFamily(
            "livefuse_named_streams",
            "Named streams (with a publisher or not)",
            value=len(service.broadcasts),
        )
        ingests = [s.ingest.stats() for s in service.sessions.values() if s.ingest is not None]
        yield _by_state(
            "livefuse_ingests", "Pull ingests by state", _INGEST_STATES, [i.state for i in ingests]
        )
        yield GaugeMetricFamily(
            "livefuse_ingest_reconnects",
            "Reconnects of the running ingests, summed",
            value=sum(i.reconnects for i in ingests),
        )
        broadcasts = {id(s.broadcast): s.broadcast for s in service.sessions.values()}
        broadcasts.update({id(b): b for b in service.broadcasts.values()})
        pushes = [o.stats() for b in broadcasts.values() for o in b.outputs.values()]
        yield _by_state(
            "livefuse_outputs", "RTMP pushes by state", _PUSH_STATES, [p.state for p in pushes]
        )
        yield GaugeMetricFamily(
            "livefuse_output_bitrate_kbps",
            "Bitrate of the running pushes, summed",
            value=sum(p.bitrate_kbps for p in pushes),
        )
        yield GaugeMetricFamily(
            "livefuse_output_dropped_frames",
            "Frames the running pushes fell behind on, summed",
            value=sum(p.dropped for p in pushes),
        )
        yield GaugeMetricFamily(
            "livefuse_output_reconnects",
            "Reconnects of the running pushes, summed",
            value=sum(p.reconnects for p in pushes),
        )
