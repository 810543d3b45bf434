"""The rules of what a sidecar may route: pure decisions, no I/O, no clock of their own.

The rule under all of them (DESIGN.md, "Failover"): **a sidecar never knows less after a
transition than before.** Whatever it can route now -- a control-plane table entry, a guarded
service, a name it serves through DNS -- stays routable across every mode change and every
snapshot until the control plane lists it again or DNS says the name does not exist.

* ``plan_update`` applies a validated snapshot to what is routable *now* (``routable_now``):
  every routable service the snapshot does not list with endpoints becomes a *guard* -- kept
  with the endpoints it had, confirmed through DNS -- whether it came from an earlier table,
  from DNS while the control plane was away, or from the DNS floor. Compare Envoy's minimum
  clusters guard and gRPC's rule of ignoring resource deletions (gRFC A53). A snapshot with no
  services at all while something is routable is rejected outright (NACK): it would empty the
  table, which a healthy control plane never means.
* ``build_routes`` turns the inputs into one route per service. In ``controlplane`` mode the
  table's services route as listed; every other known name (guards, names learned through
  DNS) takes a fresh DNS answer, else its last-known endpoints, else a stale DNS answer
  (RFC 8767). ``dns`` mode is the same with the whole last table counted as last-known. DNS is
  the floor in every mode: a name nobody listed is looked up before a call fails.
* ``guards_to_release``: a guard ends once DNS answers NXDOMAIN or NODATA for its name --
  whether that answer came before or after the drop -- and the guard is older than the grace
  period (a pod whose sidecar registered before DNS published it must not be dropped in the
  moment between). Fake registrations therefore live at most their lease plus one grace.
* ``hello_knowledge`` says what a (re)connecting sidecar knows, so a freshly started control
  plane waits for those instances and endpoints before it pushes (the warm-up gate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from dnsfallback import CachedLookup

from sidecar.balancer import EndpointHealth, ResolvedRoute
from sidecar.errors import SnapshotRejected
from sidecar.failover import Mode
from sidecar.model import Endpoint, Policy, RouteTable, Source

Peek = Callable[[str], CachedLookup | None]
Known = tuple[tuple[Endpoint, ...], Policy]


class Origin(StrEnum):
    """Where a guarded service's endpoints were learned."""

    CONTROLPLANE = "controlplane"  # an earlier table listed it
    DNS = "dns"  # routed through DNS; the control plane has never listed it since


@dataclass(frozen=True, slots=True)
class Guard:
    """A service kept routable although the latest snapshot does not list it."""

    endpoints: tuple[Endpoint, ...]
    policy: Policy
    reason: str
    since: float
    origin: Origin = Origin.CONTROLPLANE


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    guards: dict[str, Guard]
    newly_guarded: tuple[str, ...]
    released: tuple[str, ...]


def routable_now(
    table: RouteTable | None, guards: Mapping[str, Guard], routes: Mapping[str, ResolvedRoute]
) -> dict[str, tuple[tuple[Endpoint, ...], Policy, Origin]]:
    """Everything the sidecar can route right now, with the endpoints a guard would keep.

    Control-plane endpoints (they carry instance ids) win over DNS ones for the same name.
    """
    out: dict[str, tuple[tuple[Endpoint, ...], Policy, Origin]] = {}
    for name, route in routes.items():
        origin = Origin.CONTROLPLANE if route.source is Source.CONTROLPLANE else Origin.DNS
        out[name] = (route.endpoints, route.policy, origin)
    for name, guard in guards.items():
        out[name] = (guard.endpoints, guard.policy, guard.origin)
    if table is not None:
        for name, entry in table.services.items():
            if entry.endpoints:
                out[name] = (entry.endpoints, entry.policy, Origin.CONTROLPLANE)
    return out


def plan_update(
    routable: Mapping[str, tuple[tuple[Endpoint, ...], Policy, Origin]],
    new: RouteTable,
    guards: Mapping[str, Guard],
    now: float,
    *,
    kept_version: str = "-",
) -> UpdatePlan:
    """Decide how a validated snapshot is applied; raise SnapshotRejected if it must not be."""
    if not new.services and routable:
        raise SnapshotRejected(
            new.version,
            f"empty snapshot would remove all {len(routable)} services "
            f"({', '.join(sorted(routable))}); kept version {kept_version}",
        )
    out: dict[str, Guard] = {}
    newly: list[str] = []
    for name, (endpoints, policy, origin) in sorted(routable.items()):
        entry = new.services.get(name)
        if entry is not None and entry.endpoints:
            continue
        if name in guards:
            out[name] = guards[name]
            continue
        if origin is Origin.DNS:
            reason = (f"routed through DNS; not listed by snapshot {new.version}; kept until the control plane "
                      "lists it or DNS says it does not exist")
        else:
            what = "dropped" if entry is None else "left without endpoints"
            reason = f"{what} by snapshot {new.version}; kept last-known endpoints, confirming through DNS"
        out[name] = Guard(endpoints, policy, reason, now, origin)
        newly.append(name)
    released = tuple(sorted(name for name in guards if name not in out))
    return UpdatePlan(out, tuple(newly), released)


def dns_gone(lookup: CachedLookup | None) -> bool:
    """True when the latest DNS answer for a name says it has no addresses (NXDOMAIN/NODATA)."""
    return lookup is not None and lookup.answer is None and lookup.error is not None and lookup.error.is_negative


def guards_to_release(guards: Mapping[str, Guard], peek: Peek, now: float, grace_s: float) -> tuple[str, ...]:
    """The guards DNS has disowned and that are older than the grace period."""
    return tuple(sorted(name for name, g in guards.items() if now - g.since >= grace_s and dns_gone(peek(name))))


def dns_endpoints(lookup: CachedLookup) -> tuple[Endpoint, ...]:
    """The endpoints of a DNS answer, each on the port DNS gave it (its SRV port, else the configured one).

    A DNS endpoint has no instance id: its ``instance`` is its address (see ``hello_knowledge``).
    """
    assert lookup.answer is not None
    return tuple(Endpoint(addr, port, addr) for addr, port in lookup.answer.endpoints)


def build_routes(
    mode: Mode,
    table: RouteTable | None,
    guards: Mapping[str, Guard],
    dns_names: Iterable[str],
    peek: Peek,
    health: EndpointHealth,
) -> dict[str, ResolvedRoute]:
    """Every routable service -> its route, for the given inputs. Pure apart from ``peek``."""
    routes: dict[str, ResolvedRoute] = {}
    if mode is Mode.CONNECTING:
        return routes
    last_known: dict[str, Known] = {name: (g.endpoints, g.policy) for name, g in guards.items()}
    if table is not None:
        for name, entry in table.services.items():
            if not entry.endpoints:
                continue
            if mode is Mode.CONTROLPLANE:
                routes[name] = ResolvedRoute(name, entry.endpoints, Source.CONTROLPLANE, health, entry.policy)
            else:
                last_known[name] = (entry.endpoints, entry.policy)
    for name in sorted((set(last_known) | set(dns_names)) - set(routes)):
        lookup = peek(name)
        known = last_known.get(name)
        policy = known[1] if known is not None else Policy()
        if lookup is not None and lookup.fresh and lookup.answer and lookup.answer.addresses:
            routes[name] = ResolvedRoute(name, dns_endpoints(lookup), Source.DNS, health, policy)
        elif known is not None:
            routes[name] = ResolvedRoute(name, known[0], Source.CACHE, health, policy)
        elif lookup is not None and lookup.answer and lookup.answer.addresses:
            routes[name] = ResolvedRoute(name, dns_endpoints(lookup), Source.CACHE, health, policy)
    return routes


def hello_knowledge(
    table: RouteTable | None, guards: Mapping[str, Guard], routes: Mapping[str, ResolvedRoute]
) -> tuple[tuple[str, ...], tuple[tuple[str, str, int], ...]]:
    """(instance ids, (service, address, port) of DNS-learned endpoints) the sidecar routes to.

    A DNS endpoint has no instance id (its ``instance`` is its address); the control plane
    matches those by service, address and port against registrations.
    """
    instances: set[str] = set(table.instances()) if table is not None else set()
    endpoints: set[tuple[str, str, int]] = set()

    def note(service: str, eps: Iterable[Endpoint]) -> None:
        for ep in eps:
            if ep.instance and ep.instance != ep.address:
                instances.add(ep.instance)
            else:
                endpoints.add((service, ep.address, ep.port))

    for name, guard in guards.items():
        note(name, guard.endpoints)
    for name, route in routes.items():
        note(name, route.endpoints)
    return tuple(sorted(instances)), tuple(sorted(endpoints))
