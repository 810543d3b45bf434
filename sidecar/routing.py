"""The route book: which endpoints serve each service, given the mode, the last-known-good
control-plane table, guarded services and DNS.

Decisions are pure functions (``plan_update``, ``build_routes``); ``RouteBook`` holds the
inputs, recomputes the routes whenever one changes (never per request), and is the
``Subscription`` the discovery client feeds (Envoy's vocabulary: ``on_config_update``,
``on_config_update_failed``).

Routing rules (DESIGN.md "Failover"):

* ``controlplane``: the table's endpoints. A service the latest snapshot dropped (or left
  without endpoints) while we still had endpoints for it is *guarded*: kept, and confirmed
  through DNS (DNS answer if fresh, else the last-known endpoints). DNS saying the name does
  not exist releases the guard: the service is really gone. Compare Envoy's minimum-clusters
  guard and gRPC's rule of ignoring resource deletions (gRFC A53).
* ``dns``: a fresh DNS answer wins; else the last-known-good endpoints (table or guard);
  else a stale DNS answer (RFC 8767 serve-stale); else a 503 that names both causes.
* ``connecting``: no routes; requests wait (bounded) until the mode settles.

A snapshot with no services at all, arriving while we route to some, is rejected outright
(NACK): it would empty the table, which is never what a healthy control plane means.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dnsfallback import CachedLookup, DnsLookupError

from sidecar.balancer import EndpointHealth, ResolvedRoute
from sidecar.errors import NoEndpoints, NoRoute, SnapshotRejected, UnknownService
from sidecar.failover import Event, FailoverState, Mode, Transition
from sidecar.model import Endpoint, Policy, RouteTable, Source

log = logging.getLogger("sidemesh.sidecar.routing")

_GONE = ("nxdomain", "no_answer")


class Resolver(Protocol):
    """What the route book needs of dnsfallback.ServiceResolver."""

    def peek(self, service: str) -> CachedLookup | None: ...
    async def resolve(self, service: str) -> Any: ...
    def watch(self, services: Iterable[str]) -> None: ...
    def on_change(self, callback: Callable[[str, CachedLookup], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class Guard:
    """A service kept although the control plane stopped listing it."""

    endpoints: tuple[Endpoint, ...]
    policy: Policy
    reason: str
    since: float


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    guards: dict[str, Guard]
    newly_guarded: tuple[str, ...]
    released: tuple[str, ...]


def plan_update(prev: RouteTable | None, new: RouteTable, guards: Mapping[str, Guard], now: float) -> UpdatePlan:
    """Decide how a validated snapshot is applied; raise SnapshotRejected if it must not be."""
    routable_before = _routable(prev, guards)
    if not new.services and routable_before:
        raise SnapshotRejected(
            new.version,
            f"empty snapshot would remove all {len(routable_before)} services "
            f"({', '.join(sorted(routable_before))}); kept version {prev.version if prev else '-'}",
        )
    out: dict[str, Guard] = {}
    newly: list[str] = []
    for name, endpoints_policy in routable_before.items():
        entry = new.services.get(name)
        if entry is not None and entry.endpoints:
            continue
        if name in guards:
            out[name] = guards[name]
            continue
        endpoints, policy = endpoints_policy
        what = "dropped" if entry is None else "left without endpoints"
        out[name] = Guard(endpoints, policy, f"{what} by snapshot {new.version}; kept last-known endpoints, confirming through DNS", now)
        newly.append(name)
    released = tuple(name for name in guards if name not in out)
    return UpdatePlan(out, tuple(newly), released)


def _routable(table: RouteTable | None, guards: Mapping[str, Guard]) -> dict[str, tuple[tuple[Endpoint, ...], Policy]]:
    out = {name: (g.endpoints, g.policy) for name, g in guards.items()}
    if table is not None:
        out.update({name: (e.endpoints, e.policy) for name, e in table.services.items() if e.endpoints})
    return out


def dns_endpoints(lookup: CachedLookup, port: int) -> tuple[Endpoint, ...]:
    assert lookup.answer is not None
    return tuple(Endpoint(addr, port, addr) for addr in lookup.answer.addresses)


def build_routes(
    mode: Mode,
    table: RouteTable | None,
    guards: Mapping[str, Guard],
    dns_names: Iterable[str],
    peek: Callable[[str], CachedLookup | None],
    dns_port: int,
    health: EndpointHealth,
) -> dict[str, ResolvedRoute]:
    """Every routable service -> its route, for the given inputs. Pure apart from ``peek``."""
    routes: dict[str, ResolvedRoute] = {}
    if mode is Mode.CONNECTING:
        return routes
    if mode is Mode.CONTROLPLANE and table is not None:
        for name, entry in table.services.items():
            if entry.endpoints:
                routes[name] = ResolvedRoute(name, entry.endpoints, Source.CONTROLPLANE, health, entry.policy)
        for name, guard in guards.items():
            if name in routes:
                continue
            lookup = peek(name)
            if lookup is not None and lookup.fresh and lookup.answer and lookup.answer.addresses:
                routes[name] = ResolvedRoute(name, dns_endpoints(lookup, dns_port), Source.DNS, health, guard.policy)
            else:
                routes[name] = ResolvedRoute(name, guard.endpoints, Source.CACHE, health, guard.policy)
        return routes
    # dns mode (or controlplane without a table, which cannot happen: snapshot_applied sets one)
    lkg = _routable(table, guards)
    for name in set(lkg) | set(dns_names):
        lookup = peek(name)
        policy = lkg[name][1] if name in lkg else Policy()
        if lookup is not None and lookup.fresh and lookup.answer and lookup.answer.addresses:
            routes[name] = ResolvedRoute(name, dns_endpoints(lookup, dns_port), Source.DNS, health, policy)
        elif name in lkg:
            routes[name] = ResolvedRoute(name, lkg[name][0], Source.CACHE, health, policy)
        elif lookup is not None and lookup.answer and lookup.answer.addresses:
            routes[name] = ResolvedRoute(name, dns_endpoints(lookup, dns_port), Source.CACHE, health, policy)
    return routes


@dataclass(slots=True)
class Rejection:
    version: str
    reason: str
    at: float


@dataclass(slots=True)
class _Counters:
    transitions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    rejected: int = 0
    guarded: int = 0


class RouteBook:
    """Holds the inputs of routing and the routes computed from them."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        dns_port: int,
        health: EndpointHealth | None = None,
        failover: FailoverState | None = None,
        settle_timeout_s: float = 3.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.dns_port = dns_port
        self.health = health or EndpointHealth()
        self.failover = failover or FailoverState(clock=wall_clock)
        self.settle_timeout_s = settle_timeout_s
        self._wall = wall_clock
        self.table: RouteTable | None = None
        self.applied_at: float | None = None
        self.guards: dict[str, Guard] = {}
        self.rejected: list[Rejection] = []
        self.counters = _Counters()
        self.controlplane_cause = "no snapshot received yet"
        self._dns_names: set[str] = set()
        self._settled = asyncio.Event()
        self.routes: dict[str, ResolvedRoute] = {}
        resolver.on_change(self._on_dns_change)

    # ----- Subscription (fed by the discovery client) -----

    @property
    def mode(self) -> Mode:
        return self.failover.mode

    def last_version(self) -> str:
        return self.table.version if self.table else ""

    def known_instances(self) -> tuple[str, ...]:
        return self.table.instances() if self.table else ()

    def on_config_update(self, table: RouteTable) -> None:
        """Apply a validated snapshot, or raise SnapshotRejected (the caller NACKs)."""
        now = self._wall()
        plan = plan_update(self.table, table, self.guards, now)
        self.table = table
        self.applied_at = now
        self.guards = plan.guards
        for name in plan.newly_guarded:
            self.counters.guarded += 1
            log.warning("event=update_guarded service=%s version=%s reason=%r", name, table.version, plan.guards[name].reason)
        for name in plan.released:
            log.info("event=guard_released service=%s reason=listed_again version=%s", name, table.version)
        self.resolver.watch(set(table.services) | set(self.guards))
        self.controlplane_cause = "connected"
        self._transition(Event.SNAPSHOT_APPLIED, f"snapshot {table.version} applied")
        self._recompute()

    def on_config_update_failed(self, exc: SnapshotRejected) -> None:
        self.counters.rejected += 1
        self.rejected.append(Rejection(exc.version, exc.reason, self._wall()))
        del self.rejected[:-10]
        log.warning("event=snapshot_rejected version=%s reason=%r", exc.version, exc.reason)

    def on_stream_lost(self, reason: str) -> None:
        self.controlplane_cause = f"stream lost ({reason})"
        self._transition(Event.STREAM_LOST, reason)

    def on_initial_fetch_timeout(self, timeout_s: float) -> None:
        if self.failover.mode is Mode.CONNECTING:
            self.controlplane_cause = f"no snapshot within {timeout_s:g}s"
            self._transition(Event.INITIAL_FETCH_TIMEOUT, f"no snapshot within {timeout_s:g}s")

    def _transition(self, event: Event, reason: str) -> None:
        t = self.failover.handle(event, reason)
        if t is None:
            return
        key = (t.from_mode.value, t.to_mode.value, event.value)
        self.counters.transitions[key] = self.counters.transitions.get(key, 0) + 1
        log.warning("event=mode_change from=%s to=%s reason=%r", t.from_mode, t.to_mode, reason)
        if self.failover.settled:
            self._settled.set()
        self._recompute()

    # ----- DNS -----

    def _on_dns_change(self, service: str, lookup: CachedLookup) -> None:
        err = lookup.error
        if service in self.guards and err is not None and err.reason in _GONE and lookup.answer is None:
            del self.guards[service]
            log.info("event=guard_released service=%s reason=dns_%s", service, err.reason)
        self._recompute()

    # ----- data path -----

    def route(self, service: str) -> ResolvedRoute | None:
        """The fast path: a dict lookup. None means: take ``route_slow``."""
        return self.routes.get(service)

    async def route_slow(self, service: str) -> ResolvedRoute:
        """Wait for the mode to settle, resolve through DNS if that can help; raise NoRoute."""
        if not self._settled.is_set():
            try:
                await asyncio.wait_for(self._settled.wait(), self.settle_timeout_s)
            except TimeoutError:
                raise NoEndpoints(service, controlplane_cause=self.controlplane_cause, dns_cause="not consulted yet") from None
        route = self.routes.get(service)
        if route is not None:
            return route
        if self.failover.mode is Mode.CONTROLPLANE:
            raise UnknownService(service)
        try:
            await self.resolver.resolve(service)
        except DnsLookupError as exc:
            raise NoEndpoints(service, controlplane_cause=self.controlplane_cause, dns_cause=str(exc)) from exc
        self._dns_names.add(service)
        self.resolver.watch((service,))
        self._recompute()
        route = self.routes.get(service)
        if route is None:
            raise NoRoute(f"no endpoints for {service!r}", service=service)
        return route

    def _recompute(self) -> None:
        self.routes = build_routes(
            self.failover.mode,
            self.table,
            self.guards,
            self._dns_names,
            self.resolver.peek,
            self.dns_port,
            self.health,
        )

    # ----- admin -----

    def state(self) -> dict[str, Any]:
        now = self._wall()
        services: dict[str, Any] = {}
        for name, route in sorted(self.routes.items()):
            guard = self.guards.get(name)
            services[name] = {
                "source": route.source.value,
                "guard": guard.reason if guard else None,
                "policy": {"timeout_s": route.policy.timeout_s, "retries": route.policy.retries, "lb": route.policy.lb},
                "endpoints": [
                    {
                        "address": ep.address,
                        "port": ep.port,
                        "instance": ep.instance,
                        "source": route.source.value,
                        "ejected": self.health.is_ejected(ep.key),
                    }
                    for ep in route.endpoints
                ],
            }
        return {
            "mode": self.failover.mode.value,
            "mode_since": self.failover.since,
            "route_version": self.table.version if self.table else None,
            "applied_at": self.applied_at,
            "last_update_age_s": round(now - self.applied_at, 3) if self.applied_at else None,
            "transitions": [_transition_json(t) for t in self.failover.history],
            "services": services,
            "guarded": [
                {"service": name, "reason": g.reason, "since": g.since, "endpoints": len(g.endpoints)}
                for name, g in sorted(self.guards.items())
            ],
            "rejected": [{"version": r.version, "reason": r.reason, "at": r.at} for r in self.rejected],
        }


def _transition_json(t: Transition) -> dict[str, Any]:
    return {"from": t.from_mode.value, "to": t.to_mode.value, "reason": t.reason, "at": t.at}
