"""The mesh graph from each sidecar's window: edges from the callers' outbound counters, clients from
what reached a service beyond the mesh's own calls, p99 and route sources per edge, columns."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sidemesh.dashboard.graph import CLIENTS, SidecarCalls, build_graph, layout
from sidemesh.dashboard.rates import Counts

INF = math.inf


def _song(*, seconds: float = 10.0, to_artist: float = 2000, artist_503: float = 0, inbound: float = 2000,
          source: str = "dns") -> SidecarCalls:
    requests = {("inbound", "-", 200): inbound, ("outbound", "artist", 200): to_artist,
                ("outbound", "image", 200): to_artist}
    if artist_503:
        requests[("outbound", "artist", 503)] = artist_503
    durations = {
        ("outbound", "artist", source): {0.001: 0.0, 0.01: (to_artist + artist_503) * 0.98, INF: to_artist + artist_503},
        ("outbound", "image", "controlplane"): {0.001: to_artist / 2, 0.01: to_artist, INF: to_artist},
        ("inbound", "-", "inbound"): {0.001: 0.0, 0.1: inbound, INF: inbound},
    }
    return SidecarCalls("song", "song-1", "dns", Counts(seconds, requests, durations),
                        {"artist": source, "image": "controlplane", "song": "dns"})


def _callee(service: str, instance: str, inbound: float, *, seconds: float = 10.0, mode: str | None = "dns") -> SidecarCalls:
    return SidecarCalls(service, instance, mode, Counts(seconds, {("inbound", "-", 200): inbound}, {}))


def _edges(graph: dict[str, Any]) -> dict[str, Any]:
    return {e["id"]: e for e in graph["edges"]}


def test_an_edge_is_what_the_callers_sent_outbound_per_second() -> None:
    g = build_graph([_song(), _callee("artist", "artist-1", 2000), _callee("image", "image-1", 2000)])
    edges = _edges(g)
    assert set(edges) == {"clients->song", "song->artist", "song->image"}
    assert edges["song->artist"]["rps"] == pytest.approx(200.0)
    assert edges["clients->song"]["rps"] == pytest.approx(200.0)


def test_calls_the_caller_failed_itself_count_as_errors_of_the_edge() -> None:
    edges = _edges(build_graph([_song(to_artist=1900, artist_503=100), _callee("artist", "artist-1", 1900)]))
    e = edges["song->artist"]
    assert e["rps"] == pytest.approx(200.0)
    assert e["errors_rps"] == pytest.approx(10.0)
    assert e["error_rate"] == pytest.approx(0.05)


def test_an_edge_shows_its_current_route_source_its_window_mix_and_a_p99_from_its_buckets() -> None:
    e = _edges(build_graph([_song(source="cache")]))["song->artist"]
    assert e["source"] == "cache"
    assert e["sources"] == {"cache": 1.0}
    # 98 % under 10 ms, the rest in the +Inf bucket: p99 is the highest finite bound
    assert e["p99_ms"] == pytest.approx(10.0)
    image = _edges(build_graph([_song()]))["song->image"]
    assert image["p99_ms"] == pytest.approx(1.0 + 9.0 * (0.99 * 2000 - 1000) / 1000)


def test_a_service_the_mesh_calls_gets_no_clients_edge_for_counting_noise() -> None:
    g = build_graph([_song(), _callee("artist", "artist-1", 2010)])  # 0.5 % more than song sent
    assert "clients->artist" not in _edges(g)


def test_outside_calls_beyond_the_mesh_calls_show_as_a_clients_edge() -> None:
    g = build_graph([_song(), _callee("artist", "artist-1", 3000)])
    assert _edges(g)["clients->artist"]["rps"] == pytest.approx(100.0)


def test_instances_show_their_own_inbound_rate_and_mode_and_a_silent_one_is_unreachable() -> None:
    g = build_graph([_song(), _callee("artist", "artist-1", 1200), _callee("artist", "artist-2", 800),
                     _callee("artist", "artist-3", 0, mode=None, seconds=0.0)])
    artist = next(n for n in g["nodes"] if n["id"] == "artist")
    assert [(i["instance"], i["rps"], i["reachable"]) for i in artist["instances"]] == [
        ("artist-1", 120.0, True), ("artist-2", 80.0, True), ("artist-3", 0.0, False)]
    assert artist["rps"] == pytest.approx(200.0)


def test_an_edge_seen_before_stays_on_the_graph_without_traffic() -> None:
    quiet = SidecarCalls("song", "song-1", "controlplane", Counts(), {"artist": "controlplane"})
    edges = _edges(build_graph([quiet], known=[("song", "artist"), (CLIENTS, "song")]))
    assert edges["song->artist"]["rps"] == 0.0 and edges["song->artist"]["source"] == "controlplane"
    assert edges["clients->song"]["rps"] == 0.0


def test_columns_follow_the_calls_from_the_clients() -> None:
    cols = layout(["artist", "image", "song"], [(CLIENTS, "song"), ("song", "artist"), ("song", "image")])
    assert cols == {CLIENTS: 0, "song": 1, "artist": 2, "image": 2}
    assert layout(["a", "b"], [("a", "b"), ("b", "a")])["a"] == 1  # a cycle nobody enters
