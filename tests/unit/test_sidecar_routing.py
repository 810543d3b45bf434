"""Route-book decisions: how a snapshot is applied (plan_update) and where each service routes
(build_routes), with a fake DNS cache peek."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from dnsfallback import CachedLookup, DnsAnswer, DnsLookupError
from sidecar.balancer import EndpointHealth
from sidecar.errors import SnapshotRejected
from sidecar.failover import Mode
from sidecar.model import Endpoint, Policy, RouteTable, ServiceEntry, Source
from sidecar.routing import Guard, build_routes, plan_update

A1 = Endpoint("127.0.1.1", 15006, "artist-1")
I1 = Endpoint("127.0.3.1", 15006, "image-1")


def _table(version: str, **services: tuple[Endpoint, ...]) -> RouteTable:
    return RouteTable(version, "n", MappingProxyType({n: ServiceEntry(n, eps) for n, eps in services.items()}))


def _lookup(*addresses: str, fresh: bool = True) -> CachedLookup:
    answer = DnsAnswer("artist", "artist.mesh.local", addresses, 15006, 2.0, 0.0, 2.0)
    return CachedLookup(answer=answer, error=None, fresh=fresh)


def _nx() -> CachedLookup:
    return CachedLookup(answer=None, error=DnsLookupError("artist", "artist.mesh.local", "nxdomain"), fresh=False)


def _routes(mode: Mode, table: RouteTable | None, guards: dict[str, Guard] | None = None, peeks: dict[str, CachedLookup] | None = None, dns_names: tuple[str, ...] = ()) -> dict[str, tuple[Source, tuple[Endpoint, ...]]]:
    peeks = peeks or {}
    routes = build_routes(mode, table, guards or {}, dns_names, peeks.get, 15006, EndpointHealth())
    return {name: (r.source, r.endpoints) for name, r in routes.items()}


# ----- plan_update -----


def test_empty_snapshot_is_rejected_while_services_are_routable() -> None:
    with pytest.raises(SnapshotRejected) as info:
        plan_update(_table("v1", artist=(A1,)), _table("v2"), {}, now=5.0)
    assert info.value.version == "v2"
    assert "artist" in info.value.reason and "v1" in info.value.reason


def test_empty_snapshot_is_accepted_when_nothing_was_routable() -> None:
    plan = plan_update(None, _table("v1"), {}, now=0.0)
    assert plan.guards == {} and plan.newly_guarded == () and plan.released == ()


def test_a_dropped_service_is_guarded_with_its_last_endpoints() -> None:
    plan = plan_update(_table("v1", artist=(A1,), image=(I1,)), _table("v2", image=(I1,)), {}, now=7.0)
    assert plan.newly_guarded == ("artist",)
    guard = plan.guards["artist"]
    assert guard.endpoints == (A1,) and guard.since == 7.0 and "dropped by snapshot v2" in guard.reason


def test_a_service_left_without_endpoints_is_guarded_too() -> None:
    plan = plan_update(_table("v1", artist=(A1,)), _table("v2", artist=()), {}, now=1.0)
    assert "left without endpoints" in plan.guards["artist"].reason


def test_an_existing_guard_is_kept_not_renewed() -> None:
    old = Guard((A1,), Policy(), "dropped by snapshot v2", since=1.0)
    plan = plan_update(_table("v2", image=(I1,)), _table("v3", image=(I1,)), {"artist": old}, now=9.0)
    assert plan.guards == {"artist": old} and plan.newly_guarded == ()


def test_a_relisted_service_releases_its_guard() -> None:
    old = Guard((A1,), Policy(), "dropped", since=1.0)
    plan = plan_update(_table("v2", image=(I1,)), _table("v3", artist=(A1,), image=(I1,)), {"artist": old}, now=9.0)
    assert plan.guards == {} and plan.released == ("artist",)


# ----- build_routes -----


def test_connecting_has_no_routes() -> None:
    assert _routes(Mode.CONNECTING, _table("v1", artist=(A1,))) == {}


def test_controlplane_mode_routes_the_table_even_when_dns_disagrees() -> None:
    routes = _routes(Mode.CONTROLPLANE, _table("v1", artist=(A1,)), peeks={"artist": _lookup("10.9.9.9")})
    assert routes == {"artist": (Source.CONTROLPLANE, (A1,))}


def test_guarded_service_in_controlplane_mode_uses_fresh_dns_else_the_cache() -> None:
    guard = {"artist": Guard((A1,), Policy(), "dropped", 0.0)}
    table = _table("v2", image=(I1,))
    fresh = _routes(Mode.CONTROLPLANE, table, guard, {"artist": _lookup("127.0.1.9")})
    assert fresh["artist"] == (Source.DNS, (Endpoint("127.0.1.9", 15006, "127.0.1.9"),))
    stale = _routes(Mode.CONTROLPLANE, table, guard, {"artist": _lookup("127.0.1.9", fresh=False)})
    assert stale["artist"] == (Source.CACHE, (A1,))
    assert stale["image"] == (Source.CONTROLPLANE, (I1,))


def test_dns_mode_prefers_a_fresh_answer_over_the_last_known_table() -> None:
    routes = _routes(Mode.DNS, _table("v1", artist=(A1,)), peeks={"artist": _lookup("127.0.1.7", "127.0.1.8")})
    assert routes["artist"][0] is Source.DNS
    assert [ep.address for ep in routes["artist"][1]] == ["127.0.1.7", "127.0.1.8"]


def test_dns_mode_serves_last_known_endpoints_when_dns_has_no_fresh_answer() -> None:
    table = _table("v1", artist=(A1,), image=(I1,))
    routes = _routes(Mode.DNS, table, peeks={"artist": _nx(), "image": _lookup("127.0.3.9", fresh=False)})
    assert routes == {"artist": (Source.CACHE, (A1,)), "image": (Source.CACHE, (I1,))}


def test_dns_mode_serves_a_stale_answer_when_nothing_else_is_known() -> None:
    routes = _routes(Mode.DNS, None, peeks={"song": _lookup("127.0.2.1", fresh=False)}, dns_names=("song",))
    assert routes == {"song": (Source.CACHE, (Endpoint("127.0.2.1", 15006, "127.0.2.1"),))}


def test_dns_mode_without_any_answer_or_table_has_no_route() -> None:
    assert _routes(Mode.DNS, None, peeks={"song": _nx()}, dns_names=("song",)) == {}
