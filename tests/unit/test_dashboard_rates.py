"""The dashboard's counter arithmetic: Prometheus text in, per-window increases and p99 out."""

from __future__ import annotations

import math

import pytest

from dnsfallback import DnsConfig, ServiceResolver
from sidecar.metrics import MetricsExporter, SidecarMetrics
from sidecar.routing import RouteBook
from sidecar.upstream import UpstreamPool
from sidemesh.dashboard.rates import MetricsSample, SidecarWindow, merge, parse, quantile

INF = math.inf


def _exposition(m: SidecarMetrics) -> str:
    book = RouteBook(resolver=ServiceResolver(DnsConfig()))
    body, _ = MetricsExporter(m, book, UpstreamPool(), service="song", instance="song-1").render()
    return body.decode()


async def test_parse_reads_request_counters_and_duration_buckets_of_a_real_sidecar_exposition() -> None:
    m = SidecarMetrics()
    for _ in range(3):
        m.count("outbound", "artist", 200, source="dns", seconds=0.003)
    m.count("outbound", "artist", 503, source="dns", seconds=0.0002)
    m.count("inbound", "-", 200, source="inbound", seconds=0.02)
    sample = parse(_exposition(m))
    assert sample.requests == {("outbound", "artist", 200): 3, ("outbound", "artist", 503): 1,
                               ("inbound", "-", 200): 1}
    dns = sample.durations[("outbound", "artist", "dns")]
    assert dns[0.0005] == 1 and dns[0.005] == 4 and dns[INF] == 4
    assert set(sample.durations) == {("outbound", "artist", "dns"), ("inbound", "-", "inbound")}


def _sample(n: float, *, le_fast: float | None = None) -> MetricsSample:
    fast = n if le_fast is None else le_fast
    return MetricsSample({("outbound", "artist", 200): n}, {("outbound", "artist", "dns"): {0.01: fast, INF: n}})


def test_a_window_rate_is_the_increase_over_the_time_the_deltas_span() -> None:
    w = SidecarWindow(keep_s=30)
    for t, n in ((0.0, 100), (1.0, 300), (2.0, 500), (3.0, 700)):
        w.add(t, _sample(n))
    c = w.counts(now=3.0, window_s=2.0)
    assert c.seconds == pytest.approx(2.0)
    assert c.requests[("outbound", "artist", 200)] == 400
    assert c.durations[("outbound", "artist", "dns")][INF] == 400


def test_the_first_scrape_of_a_sidecar_is_only_a_baseline() -> None:
    w = SidecarWindow(keep_s=30)
    w.add(0.0, _sample(10_000))
    assert w.counts(now=0.0, window_s=10).requests == {}


def test_a_restarted_sidecar_counts_its_new_value_as_increase_instead_of_a_negative_rate() -> None:
    w = SidecarWindow(keep_s=30)
    for t, n in ((0.0, 900), (1.0, 1000), (2.0, 40), (3.0, 140)):
        w.add(t, _sample(n))
    assert w.counts(now=3.0, window_s=10).requests[("outbound", "artist", 200)] == 100 + 40 + 100


def test_a_sidecar_that_missed_rounds_neither_loses_requests_nor_counts_them_twice() -> None:
    w = SidecarWindow(keep_s=30)
    w.add(0.0, _sample(0))
    w.add(0.5, _sample(100))
    w.add(3.5, _sample(700))  # unreachable for two rounds
    c = w.counts(now=3.5, window_s=10)
    assert c.requests[("outbound", "artist", 200)] / c.seconds == pytest.approx(200.0)


def test_deltas_older_than_the_window_are_left_out_and_those_past_keep_are_dropped() -> None:
    w = SidecarWindow(keep_s=5)
    for t in range(0, 21):
        w.add(float(t), _sample(t * 10.0))
    assert w.counts(now=20.0, window_s=3.0).requests[("outbound", "artist", 200)] == 30
    assert w.counts(now=20.0, window_s=100.0).seconds <= 6.0


def test_merge_adds_counts_and_buckets() -> None:
    a = SidecarWindow(keep_s=30)
    b = SidecarWindow(keep_s=30)
    for t in (0.0, 1.0):
        a.add(t, _sample(t * 5))
        b.add(t, _sample(t * 7, le_fast=t * 6))
    m = merge([a.counts(1.0, 5), b.counts(1.0, 5)])
    assert m.requests[("outbound", "artist", 200)] == 12
    assert m.durations[("outbound", "artist", "dns")] == {0.01: 11, INF: 12}


def test_p99_interpolates_inside_its_bucket_like_histogram_quantile() -> None:
    # 100 observations: 90 under 10 ms, 10 between 10 and 50 ms; rank 99 is the 9th of those 10
    buckets = {0.01: 90.0, 0.05: 100.0, INF: 100.0}
    assert quantile(0.99, buckets) == pytest.approx(0.01 + 0.04 * 9 / 10)
    assert quantile(0.5, buckets) == pytest.approx(0.01 * 50 / 90)


def test_p99_in_the_inf_bucket_is_the_highest_finite_bound_and_nothing_observed_is_none() -> None:
    assert quantile(0.99, {0.01: 1.0, 10.0: 1.0, INF: 5.0}) == 10.0
    assert quantile(0.99, {0.01: 0.0, INF: 0.0}) is None
    assert quantile(0.99, {}) is None
