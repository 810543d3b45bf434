"""Pure parts of ``sidemesh status``: which sidecars to ask, and the report built from their answers.

No I/O here: ``sidemesh.status`` fetches, this module decides and formats, so the
shape of ``status --json`` and the table are unit tested without a mesh.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ADMIN_PORT = 15000
CP_GRPC_PORT = 15010
CP_HTTP_PORT = 15014


@dataclass(frozen=True, slots=True)
class Target:
    """A sidecar to ask: its admin address, and what we know of it before asking."""

    admin: str
    service: str | None = None
    instance: str | None = None
    address: str | None = None
    state: str | None = None  # the supervisor's state (running|stopped|killed|exited) when known


def targets_from_pods(pods: Iterable[Mapping[str, Any]]) -> list[Target]:
    """Sidecars of a `sidemesh up` mesh, from its control API's /pods."""
    out = []
    for p in pods:
        if p.get("kind") != "pod":
            continue
        port = (p.get("ports") or {}).get("admin", ADMIN_PORT)
        out.append(Target(f"{p['address']}:{port}", p.get("service"), p.get("name"), p.get("address"), p.get("state")))
    return out


def dns_names(seed_state: Mapping[str, Any] | None) -> dict[str, str]:
    """service -> DNS name to look up ourselves, when the seed sidecar resolves through the
    system resolver (compose: Docker's DNS) and we can therefore ask the same one. A sidecar's
    own DNS answers may lag a restarted pod by up to their TTL; the name itself does not."""
    dns = (seed_state or {}).get("dns") or {}
    template = dns.get("template")
    if dns.get("servers") != "system" or not isinstance(template, str) or "{service}" not in template:
        return {}
    return {service: template.format(service=service) for service in sorted((seed_state or {}).get("services") or {})}


def targets_from_seed(
    seed_admin: str,
    seed_state: Mapping[str, Any] | None,
    resolved: Mapping[str, Sequence[str]] | None = None,
) -> list[Target]:
    """Sidecars known to one sidecar (compose): the seed itself, every endpoint in its /state,
    and every address its services' DNS names resolve to (``resolved``: service -> addresses)."""
    targets = [Target(seed_admin, (seed_state or {}).get("service"), (seed_state or {}).get("instance"),
                      (seed_state or {}).get("address"))]
    seen = {(seed_state or {}).get("address"), seed_admin.rpartition(":")[0]}
    for service, entry in sorted(((seed_state or {}).get("services") or {}).items()):
        for ep in (entry or {}).get("endpoints") or []:
            addr = ep.get("address")
            if not addr or addr in seen:
                continue
            seen.add(addr)
            targets.append(Target(f"{_bracket(addr)}:{ADMIN_PORT}", service, ep.get("instance"), addr))
    for service, addrs in sorted((resolved or {}).items()):
        for addr in addrs:
            if addr not in seen:
                seen.add(addr)
                targets.append(Target(f"{_bracket(addr)}:{ADMIN_PORT}", service, None, addr))
    return targets


def controlplane_http_from_target(target: str | None) -> str | None:
    """The control plane's gRPC target 'host:15010' -> its HTTP address 'host:15014'."""
    if not target:
        return None
    host, sep, _ = target.rpartition(":")
    return f"{host if sep else target}:{CP_HTTP_PORT}"


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def build_report(
    controlplane_address: str | None,
    cp_status: Mapping[str, Any] | None,
    cp_error: str | None,
    answers: Sequence[tuple[Target, Mapping[str, Any] | None, str | None]],
    *,
    source: str,
) -> dict[str, Any]:
    """The ``status --json`` document from the control plane's /status and each sidecar's /state."""
    acked: dict[str, Mapping[str, Any]] = {}
    for sc in (cp_status or {}).get("sidecars") or []:
        for key in (sc.get("node_id"), f"{sc.get('service')}@{sc.get('address')}"):
            if key:
                acked[key] = sc
    sidecars: list[dict[str, Any]] = []
    for target, state, err in answers:
        st = state or {}
        instance = st.get("instance") or target.instance
        service = st.get("service") or target.service
        address = st.get("address") or target.address
        cp_view = acked.get(instance or "") or acked.get(f"{service}@{address}")
        cp = st.get("controlplane") or {}
        services = st.get("services") or {}
        sidecars.append({
            "service": service, "instance": instance, "address": address,
            "mode": st.get("mode"), "route_version": st.get("route_version"),
            "mode_since": st.get("mode_since"), "last_update_age_s": st.get("last_update_age_s"),
            "reachable": state is not None, "error": err, "admin": target.admin, "state": target.state,
            "controlplane_connected": cp.get("connected"), "controlplane_error": cp.get("last_error"),
            "acked": cp_view.get("acked_version") if cp_view else None,
            "synced": cp_view.get("status") if cp_view else None,
            "endpoints": {s: len((e or {}).get("endpoints") or []) for s, e in sorted(services.items())},
            "guards": {s: e.get("guard") for s, e in sorted(services.items()) if (e or {}).get("guard")},
            "rejected": len(st.get("rejected") or []),
            "identity": (st.get("identity") or {}).get("spiffe_id"),
            "cert_not_after": (st.get("identity") or {}).get("cert_not_after"),
            "identity_problem": (st.get("identity") or {}).get("problem"),
        })
    sidecars.sort(key=lambda s: (s["service"] or "", _natural(s["instance"] or ""), s["address"] or ""))
    return {
        "controlplane": {
            "address": controlplane_address, "reachable": cp_status is not None,
            "version": (cp_status or {}).get("version"), "error": cp_error,
            "warming_up": (cp_status or {}).get("warming_up"), "faults": (cp_status or {}).get("faults"),
        },
        "sidecars": sidecars,
        "source": source,
    }


def _natural(name: str) -> tuple[str, int]:
    base, _, num = name.rpartition("-")
    return (base, int(num)) if num.isdigit() else (name, 0)


def humanise_age(seconds: float | None) -> str:
    """3.2 -> '3.2s ago', 252 -> '4m12s ago', None -> '-'."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s ago"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m ago"


def render_table(report: Mapping[str, Any], *, now: float) -> str:
    """The human table of ``sidemesh status``; ``now`` is the wall clock (unix time)."""
    cp = report["controlplane"]
    if cp["reachable"]:
        active = describe_faults(cp.get("faults"))
        extra = f"  faults: {active}" if active else ""
        extra += "  (warming up)" if cp.get("warming_up") else ""
        head = f"control plane {cp['address']}: reachable, version {cp['version']}{extra}"
    else:
        head = f"control plane {cp['address'] or '?'}: UNREACHABLE ({cp.get('error') or 'no answer'})"
    rows = [("SERVICE", "INSTANCE", "ADDRESS", "MODE", "ROUTE VERSION", "MODE SINCE", "LAST UPDATE", "ACKED",
             "IDENTITY", "CERT EXPIRES")]
    for s in report["sidecars"]:
        if not s["reachable"]:
            why = s.get("state") if s.get("state") not in (None, "running") else "unreachable"
            rows.append((s["service"] or "?", s["instance"] or "?", s["address"] or s["admin"], why.upper(),
                         "-", "-", "-", "-", "-", "-"))
            continue
        since = None if s["mode_since"] is None else now - float(s["mode_since"])
        acked = "-" if s["acked"] is None else f"{s['acked']} ({s['synced']})"
        mode = s["mode"] or "?"
        if s.get("guards"):
            mode += " guarded:" + ",".join(s["guards"])
        rows.append((s["service"] or "?", s["instance"] or "?", s["address"] or "?", mode,
                     str(s["route_version"] or "-"), humanise_age(since), humanise_age(s["last_update_age_s"]), acked,
                     *identity_columns(s, now)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([head, "", *lines])


def identity_columns(sidecar: Mapping[str, Any], now: float) -> tuple[str, str]:
    """(identity, certificate expiry) for the table: 'insecure' without one, the problem when unusable."""
    identity = sidecar.get("identity")
    if not identity:
        return "insecure", "-"
    short = str(identity).split("/service/", 1)[-1]
    not_after = sidecar.get("cert_not_after")
    if sidecar.get("identity_problem"):
        return short, "NONE: " + str(sidecar["identity_problem"])[:60]
    if not_after is None:
        return short, "-"
    left = float(not_after) - now
    return short, (f"in {humanise_age(left)[:-4]}" if left > 0 else "EXPIRED")


def describe_faults(faults: Mapping[str, Any] | None) -> str:
    """The control plane's injected faults in words ('' when none)."""
    if not faults:
        return ""
    parts = ["empty-snapshot"] if faults.get("empty_snapshot") else []
    parts += [f"drop-service {name}" for name in faults.get("dropped_services") or []]
    return ", ".join(parts)
