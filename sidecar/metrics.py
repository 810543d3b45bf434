"""Sidecar metrics: plain integers on the hot path, Prometheus text at scrape time.

``prometheus_client`` counters take a lock and a label lookup per increment; on the data
path we only bump a dict entry, and a custom collector turns the numbers into metric
families when ``/metrics`` is scraped (the format itself is prometheus_client's).
prometheus_client is imported at the first scrape: it is ~2 MB an idle sidecar never needs
(issue 5 holds an idle sidecar to 60 MB RSS).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sidecar.failover import Mode

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from sidecar.routing import RouteBook
    from sidecar.upstream import UpstreamPool


class SidecarMetrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.retries = 0

    def count(self, direction: str, service: str, status: int) -> None:
        key = (direction, service, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def total(self, direction: str) -> int:
        return sum(n for (d, _, _), n in self.requests.items() if d == direction)


class MetricsExporter:
    """A prometheus_client collector over the sidecar's plain counters."""

    def __init__(self, metrics: SidecarMetrics, book: RouteBook, pool: UpstreamPool, *, service: str, instance: str) -> None:
        self.m = metrics
        self.book = book
        self.pool = pool
        self.service = service
        self.instance = instance
        self._registry: Any = None

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self)
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        req = CounterMetricFamily(
            "sidemesh_requests", "Requests handled, by direction, destination service and status code",
            labels=["direction", "service", "code"],
        )
        for (direction, service, code), n in sorted(self.m.requests.items()):
            req.add_metric([direction, service, str(code)], n)
        yield req
        retries = CounterMetricFamily("sidemesh_retries", "Requests retried on another endpoint")
        retries.add_metric([], self.m.retries)
        yield retries
        trans = CounterMetricFamily(
            "sidemesh_mode_transitions", "Failover mode changes", labels=["from", "to", "reason"]
        )
        for (frm, to, reason), n in sorted(self.book.counters.transitions.items()):
            trans.add_metric([frm, to, reason], n)
        yield trans
        mode = GaugeMetricFamily("sidemesh_mode", "1 for the current failover mode", labels=["mode"])
        for m in Mode:
            mode.add_metric([m.value], 1.0 if self.book.mode is m else 0.0)
        yield mode
        rejected = CounterMetricFamily("sidemesh_snapshots_rejected", "Control-plane snapshots NACKed")
        rejected.add_metric([], self.book.counters.rejected)
        yield rejected
        guarded = CounterMetricFamily("sidemesh_services_guarded", "Services kept although a snapshot dropped them")
        guarded.add_metric([], self.book.counters.guarded)
        yield guarded
        eps = GaugeMetricFamily("sidemesh_endpoints", "Endpoints per service and source", labels=["service", "source"])
        for name, route in sorted(self.book.routes.items()):
            eps.add_metric([name, route.source.value], len(route.endpoints))
        yield eps
        conns = CounterMetricFamily("sidemesh_upstream_connects", "Upstream connections opened")
        conns.add_metric([], self.pool.connects)
        yield conns
        fails = CounterMetricFamily("sidemesh_upstream_connect_failures", "Upstream connects that failed")
        fails.add_metric([], self.pool.connect_failures)
        yield fails
        info = GaugeMetricFamily("sidemesh_sidecar_info", "This sidecar", labels=["service", "instance", "route_version"])
        info.add_metric([self.service, self.instance, self.book.last_version()], 1.0)
        yield info
