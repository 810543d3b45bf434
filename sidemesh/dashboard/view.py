"""What the page shows at one moment, as one JSON document: the control plane, every sidecar, the graph.

Built from one round of answers (``sidemesh.status.Answers``: the same questions ``sidemesh
status`` asks) and the graph of the window. While the control plane does not answer, its
last answer is shown with the time it was given, so the ACK table of the moment it died stays
readable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidemesh.status import Answers


def controlplane_view(answers: Answers | None, last: tuple[float, Mapping[str, Any]] | None,
                      report: Mapping[str, Any] | None) -> dict[str, Any]:
    """Reachable or not, version, faults, and every sidecar's ACK state (``last``: (when, /status) of its
    last answer, shown while it does not answer)."""
    cp = dict((report or {}).get("controlplane") or {"reachable": False, "address": None, "error": "no mesh found"})
    unit = next((p for p in (answers.pods if answers else None) or [] if p.get("kind") == "controlplane"), None)
    cp["unit_state"] = None if unit is None else unit.get("state")
    status = answers.controlplane if answers else None
    shown, as_of = (status, None) if status is not None else ((last[1], last[0]) if last else (None, None))
    cp["as_of"] = as_of  # None: live; else the wall time of the answer shown
    cp["started_at"] = (shown or {}).get("started_at")
    cp["last_version"] = (shown or {}).get("version")
    cp["acks"] = [
        {"node_id": s.get("node_id"), "service": s.get("service"), "address": s.get("address"),
         "acked_version": s.get("acked_version"), "status": s.get("status"),
         "last_nack": (s.get("last_nack") or {}).get("reason")}
        for s in (shown or {}).get("sidecars") or []
    ]
    return cp


def sidecars_view(report: Mapping[str, Any] | None, states: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The status report's rows, with each sidecar's rejected snapshots and guards spelled out."""
    rows = []
    for s in (report or {}).get("sidecars") or []:
        st = states.get(s.get("admin") or "") or {}
        rejected = st.get("rejected") or []
        rows.append({
            "service": s["service"], "instance": s["instance"], "address": s["address"], "admin": s["admin"],
            "reachable": s["reachable"], "error": s["error"], "unit_state": s["state"],
            "mode": s["mode"], "mode_since": s["mode_since"], "route_version": s["route_version"],
            "last_update_age_s": s["last_update_age_s"],
            "controlplane_connected": s["controlplane_connected"], "controlplane_error": s["controlplane_error"],
            "acked": s["acked"], "synced": s["synced"],
            "guards": s["guards"],
            "rejected": len(rejected),
            "last_rejected": None if not rejected else {"version": rejected[-1].get("version"),
                                                        "reason": rejected[-1].get("reason"),
                                                        "at": rejected[-1].get("at")},
            "endpoints": s["endpoints"],
        })
    return rows


def mode_counts(sidecars: list[dict[str, Any]]) -> dict[str, int]:
    """Sidecars per mode; those that did not answer count as ``unreachable``."""
    out: dict[str, int] = {}
    for s in sidecars:
        key = s["mode"] if s["reachable"] and s["mode"] else "unreachable"
        out[key] = out.get(key, 0) + 1
    return out
