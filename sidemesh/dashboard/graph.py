"""The mesh as a graph: services and their instances as nodes, the calls between them as edges.

Pure rules, from what each sidecar's counters did over the window (``rates.Counts``):

- An edge ``A -> B`` is what A's sidecars sent outbound to B (``direction="outbound",
  service="B"``). Its rate counts every request, including those A's sidecar answered
  itself because it could not route them, which is exactly what a failover failure looks
  like; errors are the 5xx among them; p99 comes from the duration buckets of those calls.
- Requests from outside the mesh (``clients``) are what B's sidecars received inbound
  beyond what the mesh's own sidecars sent to B. That difference means something only when
  every sidecar's window covers the same time, so the caller says when it does
  (``clients=False`` while a sidecar has only its baseline scrape). Sidecars count inbound calls under
  ``service="-"``: the destination is the sidecar's own service.
- An edge's ``source`` is how its callers route to B right now (``/state``: controlplane,
  dns or cache); ``sources`` is the share of the window's calls per source, from the
  duration histogram's ``source`` label.
- Columns for drawing: ``clients`` first, then each service one column right of its
  nearest caller (breadth first); services nobody calls start at column 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidemesh.dashboard.rates import Counts, add_buckets, quantile

CLIENTS = "clients"
OUTBOUND, INBOUND = "outbound", "inbound"
# a destination of "-" is a request the sidecar could not even name (malformed): no edge
UNNAMED = "-"
# below this share of a service's inbound, the remainder is counting noise, not clients
CLIENT_NOISE = 0.05


@dataclass(frozen=True, slots=True)
class SidecarCalls:
    """One sidecar as the graph needs it."""

    service: str
    instance: str
    mode: str | None  # None when it did not answer
    counts: Counts
    routes: Mapping[str, str] = field(default_factory=dict)  # destination service -> route source now


def _is_error(code: int) -> bool:
    return code >= 500 or code == 0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def build_graph(sidecars: Sequence[SidecarCalls], known: Iterable[tuple[str, str]] = (), *,
                clients: bool = True) -> dict[str, Any]:
    """``{"nodes": [...], "edges": [...]}`` for the page; rates in requests per second. ``known``: edges
    seen earlier, shown without traffic so an idle mesh keeps its shape."""
    calls: dict[tuple[str, str], dict[str, Any]] = {}
    for frm, to in known:
        _edge(calls, frm, to)["now"].update([INBOUND] if frm == CLIENTS else [])
    inbound: dict[str, list[float]] = {}  # service -> [requests, errors]
    inbound_buckets: dict[str, list[Mapping[float, float]]] = {}
    instances: dict[str, list[dict[str, Any]]] = {}
    for sc in sidecars:
        secs = sc.counts.seconds
        own_in = [0.0, 0.0]
        for (direction, dest, code), n in sc.counts.requests.items():
            if direction == INBOUND:
                own_in[0] += n
                own_in[1] += n if _is_error(code) else 0.0
            elif direction == OUTBOUND and dest != UNNAMED:
                e = _edge(calls, sc.service, dest)
                e["rps"] += n / secs if secs else 0.0
                e["errors_rps"] += (n / secs if secs else 0.0) if _is_error(code) else 0.0
        for (direction, dest, source), buckets in sc.counts.durations.items():
            if direction == INBOUND:
                inbound_buckets.setdefault(sc.service, []).append(buckets)
            elif direction == OUTBOUND and dest != UNNAMED:
                e = _edge(calls, sc.service, dest)
                e["buckets"].append(buckets)
                e["by_source"][source] = e["by_source"].get(source, 0.0) + max(buckets.values(), default=0.0)
        for dest, source in sc.routes.items():
            if (sc.service, dest) in calls:
                calls[(sc.service, dest)]["now"].add(source)
        tot = inbound.setdefault(sc.service, [0.0, 0.0])
        tot[0] += own_in[0] / secs if secs else 0.0
        tot[1] += own_in[1] / secs if secs else 0.0
        instances.setdefault(sc.service, []).append({
            "instance": sc.instance, "mode": sc.mode, "reachable": sc.mode is not None,
            "rps": round(own_in[0] / secs, 3) if secs else 0.0,
        })
    if clients:
        _add_clients(calls, inbound, inbound_buckets)
    edges = [_finish(frm, to, e) for (frm, to), e in sorted(calls.items())]
    services = sorted(set(instances) | {e["to"] for e in edges} | {e["from"] for e in edges} - {CLIENTS})
    columns = layout(services, [(e["from"], e["to"]) for e in edges])
    rows: dict[int, int] = {}
    nodes = []
    for name in [CLIENTS] * any(e["from"] == CLIENTS for e in edges) + services:
        col = columns.get(name, 0 if name == CLIENTS else 1)
        rows[col] = rows.get(col, -1) + 1
        into = [e for e in edges if e["to"] == name]
        nodes.append({
            "id": name, "kind": "clients" if name == CLIENTS else "service", "column": col, "row": rows[col],
            "rps": round(sum(e["rps"] for e in into), 3),
            "errors_rps": round(sum(e["errors_rps"] for e in into), 3),
            "instances": instances.get(name, []),  # in the order given: status's natural order
        })
    return {"nodes": nodes, "edges": edges}


def _edge(calls: dict[tuple[str, str], dict[str, Any]], frm: str, to: str) -> dict[str, Any]:
    e = calls.get((frm, to))
    if e is None:
        e = calls[(frm, to)] = {"rps": 0.0, "errors_rps": 0.0, "buckets": [], "by_source": {}, "now": set()}
    return e


def _add_clients(calls: dict[tuple[str, str], dict[str, Any]], inbound: Mapping[str, list[float]],
                 inbound_buckets: Mapping[str, list[Mapping[float, float]]]) -> None:
    for service, (rps, errors) in inbound.items():
        from_mesh = [e for (frm, to), e in calls.items() if to == service and frm != CLIENTS]
        outside = rps - sum(e["rps"] for e in from_mesh)
        if rps <= 0 or (from_mesh and outside <= CLIENT_NOISE * rps):
            continue
        e = _edge(calls, CLIENTS, service)
        e["now"].add(INBOUND)
        e["rps"] = max(0.0, outside)
        e["errors_rps"] = max(0.0, errors - sum(e2["errors_rps"] for e2 in from_mesh))
        if not from_mesh:  # inbound durations are then all the clients' calls
            e["buckets"] = list(inbound_buckets.get(service, []))


def _finish(frm: str, to: str, e: Mapping[str, Any]) -> dict[str, Any]:
    total = sum(e["by_source"].values())
    now = sorted(e["now"])
    return {
        "id": f"{frm}->{to}", "from": frm, "to": to,
        "rps": round(e["rps"], 3), "errors_rps": round(e["errors_rps"], 3),
        "error_rate": round(e["errors_rps"] / e["rps"], 4) if e["rps"] else 0.0,
        "p99_ms": _ms(quantile(0.99, add_buckets(e["buckets"]))),
        "source": "/".join(now) if now else None,
        "sources": {s: round(n / total, 3) for s, n in sorted(e["by_source"].items()) if n} if total else {},
    }


def layout(services: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Column of each node: clients 0, then breadth first from the services nobody in the mesh calls."""
    callers: dict[str, set[str]] = {s: set() for s in services}
    for frm, to in edges:
        callers.setdefault(to, set()).add(frm)
    columns = {CLIENTS: 0}
    frontier = sorted(s for s in services if not (callers.get(s, set()) - {CLIENTS}))
    for s in frontier:
        columns[s] = 1
    while frontier:
        nxt = []
        for s in frontier:
            for frm, to in edges:
                if frm == s and to not in columns:
                    columns[to] = columns[s] + 1
                    nxt.append(to)
        frontier = sorted(nxt)
    for s in services:  # in a cycle nobody enters from outside: next to the others
        columns.setdefault(s, 1)
    return columns

