"""The route book: holds the inputs of routing (mode, last applied table, guards, names
learned through DNS) and the routes computed from them.

The decisions are the pure functions of ``routeplan`` (what a snapshot does to what we can
route, where each service routes, when a guard ends); ``RouteBook`` only keeps the inputs,
recomputes the routes whenever one changes (never per request), and is the
``Subscription`` the discovery client feeds (Envoy's vocabulary: ``on_config_update``,
``on_config_update_failed``).

Names the control plane does not list are looked up in DNS before a call fails, in every
mode (the DNS floor); they are cached and kept fresh like every other DNS name, and dropped
from the book when DNS says they do not exist, so an app that asks for random names cannot
grow it without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dnsfallback import CachedLookup, DnsLookupError

from sidecar.balancer import EndpointHealth, ResolvedRoute
from sidecar.errors import NoEndpoints, NoRoute, SnapshotRejected
from sidecar.failover import Event, FailoverState, Mode, Transition
from sidecar.model import Authorization, RouteTable
from sidecar.routeplan import Guard, build_routes, dns_gone, guards_to_release, hello_knowledge, plan_update, routable_now

log = logging.getLogger("sidemesh.sidecar.routing")

# a guard outlives a negative DNS answer by at least this long (see routeplan.guards_to_release)
DEFAULT_GUARD_GRACE_S = 3.0
# how often guards and DNS-learned names are checked against the DNS cache
SWEEP_INTERVAL_S = 1.0
# names learned through DNS that the book keeps at most (the app chooses them)
MAX_DNS_NAMES = 1024


class Resolver(Protocol):
    """What the route book needs of dnsfallback.ServiceResolver."""

    def peek(self, service: str) -> CachedLookup | None: ...
    async def resolve(self, service: str) -> Any: ...
    def watch(self, services: Iterable[str]) -> None: ...
    def unwatch(self, services: Iterable[str] | None = None) -> None: ...
    def on_change(self, callback: Callable[[str, CachedLookup], None]) -> None: ...


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
    released: int = 0


class RouteBook:
    """Holds the inputs of routing and the routes computed from them."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        health: EndpointHealth | None = None,
        failover: FailoverState | None = None,
        settle_timeout_s: float = 3.0,
        guard_grace_s: float = DEFAULT_GUARD_GRACE_S,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.health = health or EndpointHealth()
        self.failover = failover or FailoverState(clock=wall_clock)
        self.settle_timeout_s = settle_timeout_s
        self.guard_grace_s = guard_grace_s
        self.sweep_interval_s = sweep_interval_s
        self._wall = wall_clock
        self.table: RouteTable | None = None
        self.applied_at: float | None = None
        self.guards: dict[str, Guard] = {}
        self.rejected: list[Rejection] = []
        self.counters = _Counters()
        self.controlplane_cause = "no snapshot received yet"
        self._dns_names: set[str] = set()
        self._settled = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None
        self.routes: dict[str, ResolvedRoute] = {}
        # the last authorization policy pushed for each service, kept like last-known-good
        self._authorization: dict[str, Authorization] = {}
        resolver.on_change(self._on_dns_change)

    # ----- Subscription (fed by the discovery client) -----

    @property
    def mode(self) -> Mode:
        return self.failover.mode

    def last_version(self) -> str:
        return self.table.version if self.table else ""

    def known_instances(self) -> tuple[str, ...]:
        return hello_knowledge(self.table, self.guards, self.routes)[0]

    def known_endpoints(self) -> tuple[tuple[str, str, int], ...]:
        return hello_knowledge(self.table, self.guards, self.routes)[1]

    def on_config_update(self, table: RouteTable) -> None:
        """Apply a validated snapshot, or raise SnapshotRejected (the caller NACKs)."""
        now = self._wall()
        routable = routable_now(self.table, self.guards, self.routes)
        plan = plan_update(routable, table, self.guards, now, kept_version=self.table.version if self.table else "-")
        self.table = table
        self.applied_at = now
        self.guards = plan.guards
        for name, entry in table.services.items():
            self._authorization[name] = entry.policy.authorization
        for name in plan.newly_guarded:
            self.counters.guarded += 1
            log.warning("event=update_guarded service=%s version=%s origin=%s reason=%r",
                        name, table.version, plan.guards[name].origin, plan.guards[name].reason)
        for name in plan.released:
            self.counters.released += 1
            log.info("event=guard_released service=%s reason=listed_again version=%s", name, table.version)
        # a name the control plane lists is no longer ours to keep through DNS
        self._dns_names -= set(table.services)
        self.resolver.watch(set(table.services) | set(self.guards))
        self.controlplane_cause = "connected"
        self._release_disowned(now)
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

    def authorization_of(self, service: str) -> Authorization | None:
        """The latest authorization pushed for ``service`` (kept across outages); None if never."""
        return self._authorization.get(service)

    def remember_authorization(self, service: str, authorization: Authorization) -> None:
        """Seed the policy from an earlier run (cached on disk) until a snapshot says otherwise."""
        self._authorization.setdefault(service, authorization)

    # ----- DNS -----

    def _on_dns_change(self, service: str, lookup: CachedLookup) -> None:
        if dns_gone(lookup) and service in self._dns_names:
            self._forget_dns_name(service)
        self._release_disowned(self._wall())
        self._recompute()

    def _release_disowned(self, now: float) -> None:
        """End the guards DNS says are gone (after their grace); keep sweeping while any remain."""
        for name in guards_to_release(self.guards, self.resolver.peek, now, self.guard_grace_s):
            guard = self.guards.pop(name)
            self.counters.released += 1
            log.info("event=guard_released service=%s reason=dns_says_gone origin=%s held_s=%.1f",
                     name, guard.origin, now - guard.since)
            if name not in self._dns_names and (self.table is None or name not in self.table.services):
                self.resolver.unwatch((name,))
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        if self._sweeper is not None or not (self.guards or self._dns_names):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (pure unit tests drive the book by hand)
        self._sweeper = loop.call_later(self.sweep_interval_s, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        for name in [n for n in self._dns_names if dns_gone(self.resolver.peek(n))]:
            self._forget_dns_name(name)
        before = len(self.guards)
        self._release_disowned(self._wall())
        if len(self.guards) != before:
            self._recompute()

    def _forget_dns_name(self, service: str) -> None:
        self._dns_names.discard(service)
        if service not in self.guards and (self.table is None or service not in self.table.services):
            self.resolver.unwatch((service,))
        log.info("event=dns_name_forgotten service=%s reason=dns_says_gone", service)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # ----- data path -----

    def route(self, service: str) -> ResolvedRoute | None:
        """The fast path: a dict lookup. None means: take ``route_slow``."""
        return self.routes.get(service)

    async def route_slow(self, service: str) -> ResolvedRoute:
        """Wait for the mode to settle, then look the name up in DNS (the floor); raise NoRoute."""
        if not self._settled.is_set():
            try:
                await asyncio.wait_for(self._settled.wait(), self.settle_timeout_s)
            except TimeoutError:
                raise NoEndpoints(service, controlplane_cause=self.controlplane_cause, dns_cause="not consulted yet") from None
        route = self.routes.get(service)
        if route is not None:
            return route
        try:
            await self.resolver.resolve(service)
        except DnsLookupError as exc:
            raise NoEndpoints(service, controlplane_cause=self._why_not_listed(service), dns_cause=str(exc)) from exc
        route = self.routes.get(service)
        if route is not None:  # someone else's lookup of the same name landed first
            return route
        if service not in self._dns_names and len(self._dns_names) >= MAX_DNS_NAMES:
            raise NoRoute(f"no route for {service!r}: this sidecar already serves {MAX_DNS_NAMES} names "
                          "through DNS that the control plane does not list", service=service)
        self._dns_names.add(service)
        self.resolver.watch((service,))
        log.info("event=dns_name_learned service=%s mode=%s", service, self.failover.mode)
        self._recompute()
        self._schedule_sweep()
        route = self.routes.get(service)
        if route is None:
            raise NoRoute(f"no endpoints for {service!r}", service=service)
        return route

    def _why_not_listed(self, service: str) -> str:
        if self.failover.mode is Mode.CONTROLPLANE and self.table is not None:
            return f"not listed by snapshot {self.table.version}"
        return self.controlplane_cause

    def _recompute(self) -> None:
        self.routes = build_routes(
            self.failover.mode,
            self.table,
            self.guards,
            self._dns_names,
            self.resolver.peek,
            self.health,
        )

    # ----- admin -----

    def state(self) -> dict[str, Any]:
        now = self._wall()
        services: dict[str, Any] = {}
        listed = set(self.table.services) if self.table is not None else set()
        for name, route in sorted(self.routes.items()):
            guard = self.guards.get(name)
            services[name] = {
                "source": route.source.value,
                "guard": guard.reason if guard else None,
                "listed": name in listed,
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
                {"service": name, "reason": g.reason, "origin": g.origin.value, "since": g.since,
                 "endpoints": len(g.endpoints)}
                for name, g in sorted(self.guards.items())
            ],
            # names routed only because DNS knows them (the DNS floor), not listed by any table
            "dns_names": sorted(self._dns_names - set(self.guards)),
            "rejected": [{"version": r.version, "reason": r.reason, "at": r.at} for r in self.rejected],
        }


def _transition_json(t: Transition) -> dict[str, Any]:
    return {"from": t.from_mode.value, "to": t.to_mode.value, "reason": t.reason, "at": t.at}
