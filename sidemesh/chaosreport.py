"""Pure parts of ``sidemesh demo chaos``: the steady state, each fault's figures, the table.

No I/O here: ``sidemesh.chaos`` runs the faults and samples the mesh; this module
decides what the samples mean and formats them, so the rules are read in one place.

Steady state: the control plane answers with no fault injected, every sidecar the drill
started with answers, is in ``controlplane`` mode on the control plane's current
version, has ACKed it, and guards nothing; locally also every unit of ``sidemesh up``
runs and is ready. A fault *recovers* at the first sample begun after the end of its
episode (itself and its companion) that finds the mesh steady, before the next episode
begins. Its window, from its first step to that moment (or to the next episode when it
never recovered), is what requests, failures and mode changes are counted in; a request
in two overlapping windows counts for both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidemesh.chaosschedule import Fault, Kind
from sidemesh.load import Result, percentile

FIRST_FAILURES = 10


def steadiness(
    report: Mapping[str, Any] | None,
    units: Sequence[Mapping[str, Any]] | None,
    expected: frozenset[str],
) -> str:
    """Why the mesh is not in its steady state, or '' when it is (see the module docstring)."""
    if report is None:
        return "no status"
    cp = report.get("controlplane") or {}
    if not cp.get("reachable"):
        return "control plane unreachable"
    version = cp.get("version")
    faults = cp.get("faults") or {}
    if faults.get("empty_snapshot") or faults.get("dropped_services"):
        return f"control plane faults {faults}"
    sidecars = report.get("sidecars") or []
    answering = {s.get("instance") for s in sidecars if s.get("reachable")}
    if answering != expected:
        missing, extra = sorted(expected - answering), sorted(str(i) for i in answering - expected)
        return f"sidecars missing {missing} extra {extra}"
    for s in sidecars:
        name = s.get("instance")
        if s.get("mode") != "controlplane":
            return f"{name} in {s.get('mode')}"
        if s.get("route_version") != version or s.get("acked") != version:
            return f"{name} on {s.get('route_version')} acked {s.get('acked')}, control plane on {version}"
        if s.get("guards"):
            return f"{name} guards {sorted(s['guards'])}"
    for u in units or ():
        if u.get("state") != "running" or not u.get("ready"):
            return f"{u.get('name')} {u.get('state')}{'' if u.get('ready') else ' not ready'}"
    return ""


@dataclass(frozen=True, slots=True)
class Sample:
    begun: float  # time.time() when the observation started
    at: float  # ... and when it ended
    why: str  # steadiness(): '' when steady


@dataclass(frozen=True, slots=True)
class Ran:
    """A fault as it really ran: when its first and last steps were issued, and step errors."""

    fault: Fault
    started: float
    ended: float
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Figures:
    number: int
    kind: Kind
    started: float
    ended: float
    episode_end: float
    recovered_s: float | None  # from the episode's end; None: not before the next episode
    window_end: float
    requests: int
    failed: int
    mode_changes: int
    errors: tuple[str, ...]


def figures(
    ran: Sequence[Ran],
    results: Sequence[Result],
    samples: Sequence[Sample],
    transitions: Sequence[Mapping[str, Any]],
    load_end: float,
) -> list[Figures]:
    """Per fault: recovery, and the requests, failures and mode changes in its window."""
    episode_end: dict[int, float] = {}
    episode_start: dict[int, float] = {}
    for r in ran:
        e = r.fault.episode
        episode_end[e] = max(episode_end.get(e, r.ended), r.ended)
        episode_start[e] = min(episode_start.get(e, r.started), r.started)
    out = []
    for r in ran:
        e = r.fault.episode
        end = episode_end[e]
        later = [s for k, s in episode_start.items() if k != e and s > end]
        next_start = min(later, default=load_end)
        recovered = next((s.at for s in samples if s.begun >= end and s.at <= next_start and not s.why), None)
        window_end = recovered if recovered is not None else next_start
        inside = [x for x in results if r.started <= x.started < window_end]
        out.append(Figures(
            number=r.fault.number, kind=r.fault.kind, started=r.started, ended=r.ended, episode_end=end,
            recovered_s=None if recovered is None else round(recovered - end, 3), window_end=window_end,
            requests=len(inside), failed=sum(1 for x in inside if not x.ok),
            mode_changes=sum(1 for t in transitions if r.started <= float(t.get("at", 0)) < window_end),
            errors=r.errors,
        ))
    return out


def table(figs: Sequence[Figures], kinds: Iterable[Kind], results: Sequence[Result]) -> list[dict[str, Any]]:
    """One row per kind (in ``kinds`` order, those that ran), then the requests outside every window."""
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        of_kind = [f for f in figs if f.kind is kind]
        if not of_kind:
            continue
        rec = [f.recovered_s for f in of_kind if f.recovered_s is not None]
        rows.append({
            "kind": kind.value, "count": len(of_kind),
            "requests": sum(f.requests for f in of_kind), "failed": sum(f.failed for f in of_kind),
            "mode_changes": sum(f.mode_changes for f in of_kind),
            "recover_p50_s": percentile(rec, 50) if rec else None, "recover_max_s": max(rec) if rec else None,
            "not_recovered": len(of_kind) - len(rec),
        })
    outside = [x for x in results if not any(f.started <= x.started < f.window_end for f in figs)]
    rows.append({"kind": "(no fault)", "count": None, "requests": len(outside),
                 "failed": sum(1 for x in outside if not x.ok), "mode_changes": None,
                 "recover_p50_s": None, "recover_max_s": None, "not_recovered": None})
    return rows


def failure_lines(failures: Sequence[Result], figs: Sequence[Figures], t0: float,
                  limit: int = FIRST_FAILURES) -> list[str]:
    """The first failures: when (seconds after the load started), during which faults, and why."""
    lines = []
    for x in failures[:limit]:
        during = [f"#{f.number} {f.kind.value} +{x.started - f.started:.2f}s in"
                  for f in figs if f.started <= x.started < f.window_end]
        lines.append(f"+{x.started - t0:.2f}s [{', '.join(during) or 'no fault'}] {x.error}")
    return lines


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    def num(v: object) -> str:
        return "-" if v is None else str(v)

    def secs(v: object) -> str:
        return f"{v:.2f}s" if isinstance(v, (int, float)) else "-"

    head = (f"{'kind':<18} {'count':>5} {'requests':>9} {'failed':>7} {'mode changes':>13} "
            f"{'recover p50':>12} {'recover max':>12} {'not recovered':>14}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['kind']:<18} {num(r['count']):>5} {r['requests']:>9} {r['failed']:>7} "
                     f"{num(r['mode_changes']):>13} {secs(r['recover_p50_s']):>12} {secs(r['recover_max_s']):>12} "
                     f"{num(r['not_recovered']):>14}")
    return "\n".join(lines)


def render_faults(faults: Sequence[Mapping[str, Any]]) -> str:
    """One line per fault as it ran (the ``faults`` of the drill's JSON): window, recovery, counts."""
    lines = []
    for f in faults:
        rec = "not before the next fault" if f["recovered_s"] is None else f"{f['recovered_s']:.2f}s"
        errs = f" STEP ERRORS: {'; '.join(f['errors'])}" if f["errors"] else ""
        lines.append(f"  #{f['number']:<3} {f['kind']:<18} +{f['started_s']:.1f}s..+{f['ended_s']:.1f}s "
                     f"recovered={rec} requests={f['requests']} failed={f['failed']} "
                     f"mode_changes={f['mode_changes']}{errs}")
    return "\n".join(lines)
