"""``sidemesh demo``: drills against a running mesh. ``failover`` is the March 2022 outage;
``chaos`` is random faults from a seeded schedule (``sidemesh.chaos``).

Drives steady load on song-details, kills the control plane (SIGKILL, like
``docker compose kill``), waits, starts it again, and prints per phase (before / outage /
after) the requests, failures, p50 and p99, and every sidecar's mode changes with their
times. Exit status 1 if any request failed, so it doubles as a check.

Both work against ``sidemesh up`` (through its control API) and, with ``--compose``, against
the docker compose deployment (the control-plane container killed and started, as
``docker compose kill/start controlplane`` do); the steering is
``sidemesh.drilltarget``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import uvloop

from sidemesh import chaos
from sidemesh import status as status_mod
from sidemesh.chaosschedule import DEFAULT_FAULTS_PER_MINUTE, MIN_DURATION_S, RECOVERY_GAP_S
from sidemesh.ctl import DEFAULT_CONTROL, ENV_CONTROL, CtlError
from sidemesh.drilltarget import ComposeMesh, LocalMesh
from sidemesh.load import LoadGenerator, Result, song_details_problem, summarize

PHASES = ("before", "outage", "after")


@dataclass(frozen=True, slots=True)
class Plan:
    duration_s: float
    kill_at_s: float
    start_at_s: float

    def __post_init__(self) -> None:
        if not 0 < self.kill_at_s < self.start_at_s < self.duration_s:
            raise ValueError(
                f"need 0 < --kill-at ({self.kill_at_s:g}) < --start-at ({self.start_at_s:g}) < --duration ({self.duration_s:g})"
            )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    import os

    p = argparse.ArgumentParser(
        prog="sidemesh demo",
        description="Drills against a running mesh. `sidemesh demo failover` kills the control plane under load "
        "and shows that no request fails; `sidemesh demo chaos` does the same through random faults of every kind.",
    )
    sub = p.add_subparsers(dest="drill", required=True)
    f = sub.add_parser(
        "failover",
        prog="sidemesh demo failover",
        description="Steady load on song-details; SIGKILL the control plane at --kill-at, start it at --start-at; "
        "print requests, failures, p50/p99 per phase and each sidecar's mode changes. Exit 1 if any request failed.",
    )
    f.add_argument("--compose", action="store_true", help="run against `docker compose up` instead of `sidemesh up`")
    f.add_argument("--compose-file", help="compose file (default: compose's own lookup, ./docker-compose.yml)")
    f.add_argument("--project", help="compose project name (default: compose's own, the directory name)")
    f.add_argument("--control", default=os.environ.get(ENV_CONTROL, DEFAULT_CONTROL),
                   help=f"control API of the running `sidemesh up` (env {ENV_CONTROL}; default %(default)s)")
    f.add_argument("--admin", help="a sidecar admin HOST:PORT to discover the mesh from (compose: found automatically)")
    f.add_argument("--url", default="http://127.0.0.1:8080/songs/{id}/details",
                   help="URL to load; {id} cycles through songs 1-20 (default %(default)s)")
    f.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    f.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    f.add_argument("--kill-at", type=float, default=10.0, help="second at which the control plane is killed (default 10)")
    f.add_argument("--start-at", type=float, default=20.0, help="second at which it is started again (default 20)")
    f.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    f.add_argument("--quiet", action="store_true", help="no progress lines")
    _chaos_parser(sub, os.environ.get(ENV_CONTROL, DEFAULT_CONTROL))
    return p.parse_args(list(argv))


def _chaos_parser(sub: Any, control: str) -> None:
    c = sub.add_parser(
        "chaos",
        prog="sidemesh demo chaos",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Open-loop load on song-details while random faults from a seeded schedule hit the mesh:
control plane kill/start, freeze (SIGSTOP/SIGCONT), restart bursts, injected faults
(empty snapshot, drop a service), DNS server kill/start, artist scaled between 1 and 4,
one artist replica killed and started again. Every fault ends by restoring what it broke.
Faults overlap only where the design says the mesh must cope: DNS dies inside a
control-plane outage (sidecars serve from last-known-good), artist changes inside one
(DNS carries the change).

Prints the seed and the schedule first (the same seed gives the same schedule), then a
table per fault kind: count, requests, failed, mode changes (from the sidecars' /state),
time to recover (from the end of the fault until every sidecar is back on the control
plane on one version and every unit runs), and the first failures with time and error.
Exit 1 if any request failed (or a step could not be carried out), 2 on bad usage or
when no mesh answers.""",
    )
    c.add_argument("--duration", type=float, default=120.0,
                   help=f"seconds of load (default 120, at least {MIN_DURATION_S:g})")
    c.add_argument("--seed", type=int, help="seed of the schedule (default: a random one, printed)")
    c.add_argument("--rate", type=float, default=150.0, help="requests per second (default 150)")
    c.add_argument("--fault-rate", type=float, default=DEFAULT_FAULTS_PER_MINUTE, metavar="F",
                   help=f"faults per minute on average (default {DEFAULT_FAULTS_PER_MINUTE:g}); each fault is "
                   f"followed by at least {RECOVERY_GAP_S:g}s to recover, which caps it")
    c.add_argument("--schedule-only", action="store_true", help="print the schedule and exit; touches no mesh")
    c.add_argument("--compose", action="store_true", help="run against `docker compose up` instead of `sidemesh up` "
                   "(no dns-kill there; artist-scale only stops and starts artist-2)")
    c.add_argument("--compose-file", help="compose file (default: compose's own lookup, ./docker-compose.yml)")
    c.add_argument("--project", help="compose project name (default: compose's own, the directory name)")
    c.add_argument("--control", default=control,
                   help=f"control API of the running `sidemesh up` (env {ENV_CONTROL}; default %(default)s)")
    c.add_argument("--admin", help="a sidecar admin HOST:PORT to discover the mesh from (compose: found automatically)")
    c.add_argument("--url", default="http://127.0.0.1:8080/songs/{id}/details",
                   help="URL to load; {id} cycles through songs 1-20 (default %(default)s)")
    c.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    c.add_argument("--quiet", action="store_true", help="no progress lines")


# ----- the drill -----


async def _poll_modes(mesh: LocalMesh | ComposeMesh, latest: dict[str, Any], stop: asyncio.Event) -> None:
    while not stop.is_set():
        report = await status_mod.collect(mesh.control, mesh.admin, timeout=0.8)
        if report is not None:
            latest["report"] = report
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def _transitions(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every sidecar's own record of its mode changes (times from its clock, the same host clock)."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        for sc in (report or {}).get("sidecars", []):
            try:
                async with session.get(f"http://{sc['admin']}/state") as resp:
                    state = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                state = None
            out.append({
                "service": sc.get("service"),
                "instance": sc.get("instance"),
                "mode": (state or {}).get("mode"),
                "route_version": (state or {}).get("route_version"),
                "transitions": (state or {}).get("transitions", []),
            })
    return out


def first_change(transitions: list[dict[str, Any]], to: str, after: float) -> float | None:
    """Seconds from ``after`` to the first transition into ``to`` at or after it."""
    for t in transitions:
        if t.get("to") == to and t.get("at", 0) >= after - 0.05:
            return max(0.0, t["at"] - after)
    return None


async def run_failover(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(args.duration, args.kill_at, args.start_at)
    mesh: LocalMesh | ComposeMesh = (
        ComposeMesh(args.compose_file, args.project, args.admin) if args.compose else LocalMesh(args.control, args.admin)
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await mesh.check(session)
        load = LoadGenerator(lambda i: args.url.format(id=i % 20 + 1), rate=args.rate, duration_s=plan.duration_s,
                             check=song_details_problem if "/details" in args.url else None)
        latest: dict[str, Any] = {}
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll_modes(mesh, latest, stop))
        load_task = asyncio.create_task(load.run())
        await asyncio.sleep(0)
        t0 = time.time()
        marks: dict[str, float] = {}

        async def at(offset: float, what: str) -> None:
            await asyncio.sleep(max(0.0, t0 + offset - time.time()))
            marks[what] = time.time()
            if what == "kill":
                await mesh.kill(session, "controlplane")
                _say(args, f"  +{time.time() - t0:5.1f}s  control plane killed")
            else:
                await mesh.start(session, "controlplane")
                _say(args, f"  +{time.time() - t0:5.1f}s  control plane started")

        async def progress() -> None:
            while not load_task.done():
                await asyncio.sleep(1.0)
                res = load.stats.results
                modes = " ".join(
                    f"{s.get('instance')}={s.get('mode')}" for s in (latest.get("report") or {}).get("sidecars", [])
                )
                failed = sum(1 for r in res if not r.ok)
                _say(args, f"  +{time.time() - t0:5.1f}s  requests={len(res)} failed={failed}  {modes}")

        prog = asyncio.create_task(progress())
        await at(plan.kill_at_s, "kill")
        await at(plan.start_at_s, "start")
        stats = await load_task
        await asyncio.sleep(0.5)  # let the last transitions land
        stop.set()
        await poller
        prog.cancel()
        report = await status_mod.collect(mesh.control, mesh.admin, timeout=2.0) or latest.get("report")
        sidecars = await _transitions(report)
    kill_at, start_at = marks["kill"], marks["start"]
    phases = {
        "before": summarize(stats.between(0, kill_at)),
        "outage": summarize(stats.between(kill_at, start_at)),
        "after": summarize(stats.between(start_at, float("inf"))),
    }
    for sc in sidecars:
        sc["to_dns_after_kill_s"] = first_change(sc["transitions"], "dns", kill_at)
        sc["to_controlplane_after_start_s"] = first_change(sc["transitions"], "controlplane", start_at)
    failures: list[Result] = stats.failures
    return {
        "t0": t0,
        "kill_at": kill_at,
        "start_at": start_at,
        "rate": args.rate,
        "phases": phases,
        "failures": len(failures),
        "errors": [f"+{r.started - t0:.2f}s {r.error}" for r in failures[:10]],
        "sidecars": sidecars,
        "controlplane": (report or {}).get("controlplane"),
    }


def render(result: dict[str, Any]) -> str:
    t0 = result["t0"]
    lines = ["", f"{'phase':<8} {'requests':>9} {'failures':>9} {'p50 ms':>8} {'p99 ms':>8}"]
    for name in PHASES:
        p = result["phases"][name]
        lines.append(f"{name:<8} {p['requests']:>9} {p['failures']:>9} {p['p50_ms']:>8.1f} {p['p99_ms']:>8.1f}")
    lines += ["", f"control plane killed at +{result['kill_at'] - t0:.1f}s, started at +{result['start_at'] - t0:.1f}s", ""]
    lines.append(f"{'sidecar':<12} {'mode now':<13} {'to dns':>8} {'back':>8}  changes")
    for sc in result["sidecars"]:
        changes = ", ".join(
            f"+{t['at'] - t0:.2f}s {t['from']}->{t['to']}" for t in sc["transitions"] if t.get("at", 0) >= t0 - 1
        )
        dns = sc["to_dns_after_kill_s"]
        back = sc["to_controlplane_after_start_s"]
        lines.append(
            f"{sc['instance'] or '?':<12} {sc['mode'] or 'unreachable':<13} "
            f"{'-' if dns is None else f'{dns:.2f}s':>8} {'-' if back is None else f'{back:.2f}s':>8}  {changes or '-'}"
        )
    lines.append("")
    if result["failures"]:
        lines.append(f"FAILED: {result['failures']} requests failed; first ones:")
        lines += [f"  {e}" for e in result["errors"]]
    else:
        total = sum(result["phases"][p]["requests"] for p in PHASES)
        lines.append(f"OK: {total} requests, zero failed, through a control-plane outage")
    return "\n".join(lines)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.drill == "chaos":
        return chaos.main(args)
    try:
        Plan(args.duration, args.kill_at, args.start_at)
    except ValueError as exc:
        print(f"sidemesh demo failover: {exc}", file=sys.stderr)
        return 2
    _say(args, f"sidemesh demo failover: {args.rate:g} req/s on {args.url} for {args.duration:g}s; "
               f"kill control plane at +{args.kill_at:g}s, start at +{args.start_at:g}s")
    try:
        result = uvloop.run(run_failover(args))
    except CtlError as exc:
        print(f"sidemesh demo failover: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 1 if result["failures"] else 0
