"""The routing rules (``sidecar.routeplan``): how a snapshot is applied to what the sidecar can
route now (plan_update), where each service routes (build_routes), when a guard ends
(guards_to_release) and what a Hello tells a fresh control plane (hello_knowledge); with a fake
DNS cache peek. One test per transition of "a sidecar never knows less after a transition"."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from dnsfallback import CachedLookup, DnsAnswer, DnsLookupError
from sidecar.balancer import EndpointHealth, ResolvedRoute
from sidecar.errors import SnapshotRejected
from sidecar.failover import Mode
from sidecar.model import Endpoint, Policy, RouteTable, ServiceEntry, Source
from sidecar.routeplan import Guard, Origin, build_routes, guards_to_release, hello_knowledge, plan_update, routable_now

A1 = Endpoint("127.0.1.1", 15006, "artist-1")
I1 = Endpoint("127.0.3.1", 15006, "image-1")


def _table(version: str, **services: tuple[Endpoint, ...]) -> RouteTable:
    return RouteTable(version, "n", MappingProxyType({n: ServiceEntry(n, eps) for n, eps in services.items()}))


def _lookup(*addresses: str, fresh: bool = True) -> CachedLookup:
    answer = DnsAnswer("artist", "artist.mesh.local", tuple((a, 15006) for a in addresses), 2.0, 0.0, 2.0)
    return CachedLookup(answer=answer, error=None, fresh=fresh)


def _nx() -> CachedLookup:
    return CachedLookup(answer=None, error=DnsLookupError("artist", "artist.mesh.local", "nxdomain"), fresh=False)


def _routes(mode: Mode, table: RouteTable | None, guards: dict[str, Guard] | None = None, peeks: dict[str, CachedLookup] | None = None, dns_names: tuple[str, ...] = ()) -> dict[str, tuple[Source, tuple[Endpoint, ...]]]:
    peeks = peeks or {}
    routes = build_routes(mode, table, guards or {}, dns_names, peeks.get, EndpointHealth())
    return {name: (r.source, r.endpoints) for name, r in routes.items()}


def _plan(prev: RouteTable | None, new: RouteTable, guards: dict[str, Guard] | None = None, now: float = 0.0,
          routes: dict[str, Any] | None = None) -> Any:
    guards = guards or {}
    return plan_update(routable_now(prev, guards, routes or {}), new, guards, now, kept_version=prev.version if prev else "-")


def _dns_route(name: str, *addresses: str, source: Source = Source.DNS) -> ResolvedRoute:
    return ResolvedRoute(name, tuple(Endpoint(a, 15006, a) for a in addresses), source, EndpointHealth())


# ----- plan_update -----


def test_empty_snapshot_is_rejected_while_services_are_routable() -> None:
    with pytest.raises(SnapshotRejected) as info:
        _plan(_table("v1", artist=(A1,)), _table("v2"), now=5.0)
    assert info.value.version == "v2"
    assert "artist" in info.value.reason and "v1" in info.value.reason


def test_empty_snapshot_is_accepted_when_nothing_was_routable() -> None:
    plan = _plan(None, _table("v1"))
    assert plan.guards == {} and plan.newly_guarded == () and plan.released == ()


def test_a_dropped_service_is_guarded_with_its_last_endpoints() -> None:
    plan = _plan(_table("v1", artist=(A1,), image=(I1,)), _table("v2", image=(I1,)), now=7.0)
    assert plan.newly_guarded == ("artist",)
    guard = plan.guards["artist"]
    assert guard.endpoints == (A1,) and guard.since == 7.0 and "dropped by snapshot v2" in guard.reason


def test_a_service_left_without_endpoints_is_guarded_too() -> None:
    plan = _plan(_table("v1", artist=(A1,)), _table("v2", artist=()), now=1.0)
    assert "left without endpoints" in plan.guards["artist"].reason


def test_an_existing_guard_is_kept_not_renewed() -> None:
    old = Guard((A1,), Policy(), "dropped by snapshot v2", since=1.0)
    plan = _plan(_table("v2", image=(I1,)), _table("v3", image=(I1,)), {"artist": old}, now=9.0)
    assert plan.guards == {"artist": old} and plan.newly_guarded == ()


def test_a_relisted_service_releases_its_guard() -> None:
    old = Guard((A1,), Policy(), "dropped", since=1.0)
    plan = _plan(_table("v2", image=(I1,)), _table("v3", artist=(A1,), image=(I1,)), {"artist": old}, now=9.0)
    assert plan.guards == {} and plan.released == ("artist",)


def test_a_service_routed_through_dns_before_the_first_snapshot_is_guarded_when_the_snapshot_lacks_it() -> None:
    """connecting/dns -> controlplane on a snapshot that does not list artist yet (it registers later)."""
    routes = {"artist": _dns_route("artist", "127.0.1.1"), "image": _dns_route("image", "127.0.3.1")}
    plan = _plan(None, _table("v1", song=(Endpoint("127.0.2.1", 15006, "song-1"),)), now=3.0, routes=routes)
    assert set(plan.newly_guarded) == {"artist", "image"}
    guard = plan.guards["artist"]
    assert guard.origin is Origin.DNS and guard.endpoints == (Endpoint("127.0.1.1", 15006, "127.0.1.1"),)
    assert "routed through DNS" in guard.reason and "v1" in guard.reason


def test_a_name_served_from_last_known_endpoints_in_dns_mode_is_guarded_by_a_restarted_control_plane() -> None:
    """dns -> controlplane after a restart: the fresh control plane has not heard from image yet."""
    lkg = _table("v1", artist=(A1,), image=(I1,))
    routes = {"artist": _dns_route("artist", "127.0.1.1"), "image": ResolvedRoute("image", (I1,), Source.CACHE, EndpointHealth())}
    plan = _plan(lkg, _table("v9", artist=(A1,)), now=4.0, routes=routes)
    assert plan.newly_guarded == ("image",)
    assert plan.guards["image"].endpoints == (I1,) and plan.guards["image"].origin is Origin.CONTROLPLANE


def test_a_dns_floor_name_in_controlplane_mode_is_guarded_by_the_next_snapshot() -> None:
    """controlplane -> controlplane: a name the app reached through DNS stays when a new version arrives."""
    routes = {"artist": ResolvedRoute("artist", (A1,), Source.CONTROLPLANE, EndpointHealth()),
              "lyrics": _dns_route("lyrics", "127.0.4.1")}
    plan = _plan(_table("v1", artist=(A1,)), _table("v2", artist=(A1,)), now=5.0, routes=routes)
    assert plan.newly_guarded == ("lyrics",) and plan.guards["lyrics"].origin is Origin.DNS


def test_a_snapshot_that_lists_a_dns_learned_name_takes_it_over_without_a_guard() -> None:
    routes = {"artist": _dns_route("artist", "127.0.1.1")}
    plan = _plan(None, _table("v1", artist=(A1,)), routes=routes)
    assert plan.guards == {} and plan.newly_guarded == ()


def test_an_empty_snapshot_is_rejected_when_only_dns_names_are_routable() -> None:
    with pytest.raises(SnapshotRejected):
        _plan(None, _table("v1"), routes={"artist": _dns_route("artist", "127.0.1.1")})


# ----- guards_to_release -----


def test_a_guard_is_released_once_dns_says_nxdomain_and_the_grace_has_passed() -> None:
    guards = {"artist": Guard((A1,), Policy(), "dropped", since=10.0)}
    assert guards_to_release(guards, {"artist": _nx()}.get, now=11.0, grace_s=3.0) == ()
    assert guards_to_release(guards, {"artist": _nx()}.get, now=13.0, grace_s=3.0) == ("artist",)


def test_a_guard_is_kept_while_dns_answers_or_cannot_be_reached() -> None:
    guards = {"artist": Guard((A1,), Policy(), "dropped", since=0.0)}
    unreachable = CachedLookup(answer=None, error=DnsLookupError("artist", "artist.mesh.local", "timeout"), fresh=False)
    assert guards_to_release(guards, {"artist": _lookup("127.0.1.1")}.get, now=99.0, grace_s=3.0) == ()
    assert guards_to_release(guards, {"artist": unreachable}.get, now=99.0, grace_s=3.0) == ()
    assert guards_to_release(guards, {}.get, now=99.0, grace_s=3.0) == ()


# ----- hello_knowledge -----


def test_the_hello_names_table_instances_and_the_addresses_learned_through_dns() -> None:
    guards = {"image": Guard((I1,), Policy(), "dropped", since=0.0)}
    routes = {"artist": ResolvedRoute("artist", (A1,), Source.CONTROLPLANE, EndpointHealth()),
              "lyrics": _dns_route("lyrics", "127.0.4.1", "127.0.4.2")}
    instances, endpoints = hello_knowledge(_table("v1", artist=(A1,)), guards, routes)
    assert instances == ("artist-1", "image-1")
    assert endpoints == (("lyrics", "127.0.4.1", 15006), ("lyrics", "127.0.4.2", 15006))


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


def test_controlplane_mode_routes_an_unlisted_name_learned_through_dns() -> None:
    routes = _routes(Mode.CONTROLPLANE, _table("v1", artist=(A1,)), peeks={"lyrics": _lookup("127.0.4.1")},
                     dns_names=("lyrics",))
    assert routes["lyrics"] == (Source.DNS, (Endpoint("127.0.4.1", 15006, "127.0.4.1"),))
    assert routes["artist"] == (Source.CONTROLPLANE, (A1,))


def test_controlplane_mode_drops_an_unlisted_name_dns_says_is_gone() -> None:
    routes = _routes(Mode.CONTROLPLANE, _table("v1", artist=(A1,)), peeks={"lyrics": _nx()}, dns_names=("lyrics",))
    assert "lyrics" not in routes
