"""The request-duration histogram: plain bucket counts on the hot path, Prometheus' cumulative
histogram at scrape time (parsed back with prometheus_client's own parser)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from dnsfallback import DnsConfig, ServiceResolver
from sidecar.metrics import DURATION_BUCKETS, MetricsExporter, SidecarMetrics, cumulative_buckets
from sidecar.routing import RouteBook
from sidecar.upstream import UpstreamPool


def _exporter(m: SidecarMetrics) -> MetricsExporter:
    book = RouteBook(resolver=ServiceResolver(DnsConfig()))
    return MetricsExporter(m, book, UpstreamPool(), service="song", instance="song-1")


async def test_durations_land_in_cumulative_buckets_per_destination_and_route_source() -> None:
    m = SidecarMetrics()
    for seconds in (0.0004, 0.003, 0.003, 0.2, 30.0):
        m.count("outbound", "artist", 200, source="controlplane", seconds=seconds)
    m.count("outbound", "artist", 200, source="dns", seconds=0.001)
    m.count("outbound", "image", 503)  # no duration: counted, not timed
    body, _ = _exporter(m).render()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}

    def bucket(source: str, le: str) -> float:
        return samples[("sidemesh_request_duration_seconds_bucket",
                        tuple(sorted({"direction": "outbound", "service": "artist", "source": source, "le": le}.items())))]

    assert bucket("controlplane", "0.0005") == 1
    assert bucket("controlplane", "0.005") == 3
    assert bucket("controlplane", "0.25") == 4
    assert bucket("controlplane", "10.0") == 4
    assert bucket("controlplane", "+Inf") == 5
    assert bucket("dns", "0.001") == 1
    key = ("sidemesh_request_duration_seconds_count",
           tuple(sorted({"direction": "outbound", "service": "artist", "source": "controlplane"}.items())))
    assert samples[key] == 5
    assert not any(name.startswith("sidemesh_request_duration") and dict(labels).get("service") == "image"
                   for name, labels in samples)


def test_cumulative_buckets_end_with_inf_holding_every_observation() -> None:
    h = [1.0] * len(DURATION_BUCKETS) + [2.0, 0.5]
    buckets = cumulative_buckets(h)
    assert buckets[-1] == ("+Inf", len(DURATION_BUCKETS) + 2.0)
    assert [b for _, b in buckets] == sorted(b for _, b in buckets)
