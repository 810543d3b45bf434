"""The Grafana dashboard (deploy/grafana/sidemesh.json) is built on the metric names and labels a
sidecar really exports: every query parses as PromQL (promql-parser, the Prometheus grammar), and
every series it selects, with every label it matches on, is in a real sidecar's exposition."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from dnsfallback import DnsConfig, ServiceResolver
from sidecar.metrics import MetricsExporter, SidecarMetrics
from sidecar.routing import RouteBook
from sidecar.upstream import UpstreamPool

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sidemesh.json"
# Grafana's own variables, and the labels Prometheus adds to every scraped series
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s"}
TARGET_LABELS = {"instance", "job"}


def _exported() -> dict[str, set[str]]:
    """Sample name -> its label names, from a sidecar that has served and failed calls."""
    m = SidecarMetrics()
    m.count("outbound", "artist", 200, source="dns", seconds=0.002)
    m.count("outbound", "artist", 503, source="cache", seconds=0.001)
    m.count("inbound", "-", 200, source="inbound", seconds=0.004)
    book = RouteBook(resolver=ServiceResolver(DnsConfig()))
    book.counters.transitions[("controlplane", "dns", "stream_lost")] = 1
    body, _ = MetricsExporter(m, book, UpstreamPool(), service="song", instance="song-1").render()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def _queries() -> Iterator[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    for panel in doc["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]
    for annotation in doc["annotations"]["list"]:
        yield annotation["name"], annotation["expr"]


def _selectors(node: Any) -> Iterator[Any]:
    """Every vector selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | float | int):
            yield from _selectors(child)
    for arg in getattr(node, "args", None) or []:
        yield from _selectors(arg)


def test_every_grafana_query_parses_and_selects_only_series_and_labels_a_sidecar_exports() -> None:
    exported = _exported()
    queries = list(_queries())
    assert len(queries) >= 8
    for title, expr in queries:
        for macro, value in GRAFANA_MACROS.items():
            expr = expr.replace(macro, value)
        parsed = promql_parser.parse(expr)
        selectors = list(_selectors(parsed))
        assert selectors, title
        for sel in selectors:
            assert sel.name in exported, f"{title}: {sel.name} is not exported by a sidecar"
            for matcher in sel.matchers.matchers:
                assert matcher.name in exported[sel.name] | TARGET_LABELS, f"{title}: {sel.name} has no {matcher.name}"


def test_the_edges_join_each_callers_counters_to_its_service_through_the_sidecar_info_series() -> None:
    edge_queries = [expr for title, expr in _queries() if "per edge" in title]
    assert len(edge_queries) == 3
    for expr in edge_queries:
        assert "group_left (caller)" in expr and "sidemesh_sidecar_info" in expr
    assert {"service", "instance"} <= _exported()["sidemesh_sidecar_info"]
