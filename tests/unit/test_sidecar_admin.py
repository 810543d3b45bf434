"""The admin API's answers, decided without sockets."""

from __future__ import annotations

import json
from typing import Any

from dnsfallback import CachedLookup

from sidecar.admin import AdminApi
from sidecar.balancer import EndpointHealth
from sidecar.metrics import MetricsExporter, SidecarMetrics
from sidecar.routing import RouteBook
from sidecar.upstream import UpstreamPool


class _NoDns:
    def peek(self, service: str) -> CachedLookup | None:
        return None

    async def resolve(self, service: str) -> Any:
        raise AssertionError("not used")

    def watch(self, services: Any) -> None:
        pass

    def on_change(self, callback: Any) -> None:
        pass


def _api() -> tuple[AdminApi, RouteBook, SidecarMetrics]:
    book = RouteBook(resolver=_NoDns(), health=EndpointHealth())
    metrics = SidecarMetrics()
    exporter = MetricsExporter(metrics, book, UpstreamPool(), service="song", instance="song-1")
    return AdminApi(book, exporter, lambda: {"service": "song", "instance": "song-1"}), book, metrics


def test_ready_is_503_while_connecting_and_200_once_the_mode_settles() -> None:
    api, book, _ = _api()
    status, _, body = api.handle(b"GET", b"/ready")
    assert status == 503 and json.loads(body)["mode"] == "connecting"
    book.on_stream_lost("connection refused")
    status, _, body = api.handle(b"GET", b"/ready")
    assert status == 200 and json.loads(body) == {"ready": True, "mode": "dns"}


def test_state_holds_identity_mode_and_transitions() -> None:
    api, book, _ = _api()
    book.on_stream_lost("connection refused")
    status, ctype, body = api.handle(b"GET", b"/state?pretty")
    doc = json.loads(body)
    assert status == 200 and ctype == b"application/json"
    assert doc["service"] == "song" and doc["mode"] == "dns" and doc["route_version"] is None
    assert doc["transitions"][0]["from"] == "connecting" and doc["transitions"][0]["to"] == "dns"


def test_metrics_are_prometheus_text_with_the_counted_requests() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    api, _, metrics = _api()
    metrics.count("inbound", "-", 200)
    metrics.count("inbound", "-", 200)
    status, ctype, body = api.handle(b"GET", b"/metrics")
    assert status == 200 and ctype.startswith(b"text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    assert samples[("sidemesh_requests_total", (("code", "200"), ("direction", "inbound"), ("service", "-")))] == 2


def test_writes_and_unknown_paths_get_clear_json_errors() -> None:
    api, _, _ = _api()
    status, _, body = api.handle(b"POST", b"/state")
    assert status == 405 and "read-only" in json.loads(body)["error"]
    status, _, body = api.handle(b"GET", b"/nope")
    assert status == 404 and "/nope" in json.loads(body)["error"]
