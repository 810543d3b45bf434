"""Sidecar metrics: plain integers on the hot path, Prometheus text at scrape time.

``prometheus_client`` counters take a lock and a label lookup per increment; on the data
path we only bump a dict entry, and a custom collector turns the numbers into metric
families when ``/metrics`` is scraped (the format itself is prometheus_client's).
prometheus_client is imported at the first scrape: it is ~2 MB an idle sidecar never needs
(issue 5 holds an idle sidecar to 60 MB RSS).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sidecar.failover import Mode

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from sidecar.routing import RouteBook
    from sidecar.upstream import UpstreamPool


# the two sides of the data path, as metric labels and log fields
OUTBOUND = "outbound"
INBOUND = "inbound"
# upper bounds (seconds) of the request-duration histogram's buckets; +Inf is implied
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SidecarMetrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        # (direction, service, route source) -> [count per bucket..., count over the last bucket, sum]
        self.durations: dict[tuple[str, str, str], list[float]] = {}
        self.retries = 0
        # mTLS (sidecar/mtls.py): per connection, not per request
        self.tls_handshakes: dict[tuple[str, str], int] = {}  # (direction, outcome)
        self.peer_failures: dict[tuple[str, str, str], int] = {}  # (direction, service, reason)
        self.denials: dict[tuple[str, str], int] = {}  # (our service, caller)

    def count(self, direction: str, service: str, status: int, *, source: str = "none",
              seconds: float | None = None) -> None:
        """One finished request; with ``seconds``, also its duration per destination and route source."""
        key = (direction, service, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if seconds is not None:
            hkey = (direction, service, source)
            h = self.durations.get(hkey)
            if h is None:
                h = self.durations[hkey] = [0.0] * (len(DURATION_BUCKETS) + 2)
            h[bisect_left(DURATION_BUCKETS, seconds)] += 1
            h[-1] += seconds

    def handshake(self, direction: str, outcome: str) -> None:
        key = (direction, outcome)
        self.tls_handshakes[key] = self.tls_handshakes.get(key, 0) + 1

    def peer_failure(self, direction: str, service: str, reason: str) -> None:
        key = (direction, service, reason)
        self.peer_failures[key] = self.peer_failures.get(key, 0) + 1

    def denied(self, service: str, caller: str) -> None:
        key = (service, caller)
        self.denials[key] = self.denials.get(key, 0) + 1

    def mtls_counts(self) -> dict[str, dict[str, int]]:
        """For ``/state``: handshakes by direction and outcome, peer failures and denials by reason/caller."""
        return {
            "tls_handshakes": {f"{d}/{o}": n for (d, o), n in sorted(self.tls_handshakes.items())},
            "peer_identity_failures": {f"{d}/{s}/{r}": n for (d, s, r), n in sorted(self.peer_failures.items())},
            "authorization_denials": {f"{s}/{c}": n for (s, c), n in sorted(self.denials.items())},
        }

    def total(self, direction: str) -> int:
        return sum(n for (d, _, _), n in self.requests.items() if d == direction)


def cumulative_buckets(h: list[float]) -> list[tuple[str, float]]:
    """Per-bucket counts -> Prometheus' cumulative ``le`` buckets, +Inf last."""
    out, running = [], 0.0
    for bound, n in zip((*DURATION_BUCKETS, float("inf")), h[:-1], strict=True):
        running += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out


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

    def _durations(self) -> Metric:
        from prometheus_client.core import HistogramMetricFamily

        hist = HistogramMetricFamily(
            "sidemesh_request_duration_seconds",
            "Request duration, by direction, destination service and route source (controlplane, dns, cache)",
            labels=["direction", "service", "source"],
        )
        for (direction, service, source), h in sorted(self.m.durations.items()):
            hist.add_metric([direction, service, source], cumulative_buckets(h), sum_value=h[-1])
        return hist

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        req = CounterMetricFamily(
            "sidemesh_requests", "Requests handled, by direction, destination service and status code",
            labels=["direction", "service", "code"],
        )
        for (direction, service, code), n in sorted(self.m.requests.items()):
            req.add_metric([direction, service, str(code)], n)
        yield req
        yield self._durations()
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
        hs = CounterMetricFamily("sidemesh_tls_handshakes", "mTLS handshakes between sidecars, by direction and outcome",
                                 labels=["direction", "outcome"])
        for (direction, outcome), n in sorted(self.m.tls_handshakes.items()):
            hs.add_metric([direction, outcome], n)
        yield hs
        peer = CounterMetricFamily(
            "sidemesh_peer_identity_failures",
            "Peers that did not prove the expected identity (outbound: the service routed to), by reason",
            labels=["direction", "service", "reason"],
        )
        for (direction, service, reason), n in sorted(self.m.peer_failures.items()):
            peer.add_metric([direction, service, reason], n)
        yield peer
        denied = CounterMetricFamily("sidemesh_authorization_denials", "Inbound requests refused by authorization (403)",
                                     labels=["service", "caller"])
        for (service, caller), n in sorted(self.m.denials.items()):
            denied.add_metric([service, caller], n)
        yield denied
        info = GaugeMetricFamily("sidemesh_sidecar_info", "This sidecar", labels=["service", "instance", "route_version"])
        info.add_metric([self.service, self.instance, self.book.last_version()], 1.0)
        yield info
