"""``sidemesh demo chaos``: random faults from a seeded schedule under steady load.

Theory of operation
-------------------
The schedule (``sidemesh.chaosschedule``, pure) is printed first with its seed, so any
run can be replayed. Then, against a running mesh (``sidemesh up``, or compose with
``--compose``):

1. prepare: restore anything left broken (``DrillTarget.restore``), bring artist to the
   profile's base replica count, and wait until the mesh is steady; the sidecars that
   answer then are the ones every later steady state must have;
2. run: open-loop load on song-details (``sidemesh.load``) for the whole duration, one
   task per fault carrying out its steps at their offsets (a step waits for the one
   before it in its fault, so a restore never overtakes what it restores), and a watcher
   that samples the mesh's steadiness every SAMPLE_EVERY_S and gathers every sidecar's
   mode transitions from its ``/state`` (a sidecar keeps only its last 50);
3. report (``sidemesh.chaosreport``, pure): per fault kind the count, requests, failures,
   mode changes and time to recover, and the first failures with their time and text.

Whatever happens (a failed step, Ctrl-C) the drill ends by restoring the mesh: it thaws
what it froze, starts what is down, clears faults and puts artist back to the replica
count it found. Exit status 1 when a request failed or a step could not be carried out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

import aiohttp
import uvloop

from sidemesh import status as status_mod
from sidemesh.chaosreport import (
    Ran,
    Sample,
    failure_lines,
    figures,
    render_faults,
    render_table,
    steadiness,
    table,
)
from sidemesh.chaosschedule import ARTIST, PROFILES, Fault, Schedule, Step, Verb, build_schedule, render_schedule
from sidemesh.ctl import CtlError
from sidemesh.drilltarget import ComposeMesh, LocalMesh
from sidemesh.load import LoadGenerator, Result, song_details_problem

SAMPLE_EVERY_S = 0.25
TRANSITIONS_EVERY_S = 2.0
PROGRESS_EVERY_S = 5.0
PREPARE_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 15.0
STATUS_TIMEOUT_S = 0.8

DrillTarget = LocalMesh | ComposeMesh


def main(args: argparse.Namespace) -> int:
    """Run ``sidemesh demo chaos`` with parsed ``args``; the exit status."""
    profile = PROFILES["compose" if args.compose else "local"]
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    if args.rate <= 0:
        print("sidemesh demo chaos: --rate must be > 0", file=sys.stderr)
        return 2
    try:
        schedule = build_schedule(seed, args.duration, args.fault_rate, profile)
    except ValueError as exc:
        print(f"sidemesh demo chaos: {exc}", file=sys.stderr)
        return 2
    print(f"sidemesh demo chaos: seed={seed} {args.rate:g} req/s on {args.url} for {args.duration:g}s, "
          f"target={profile.name} (replay with --seed {seed})")
    print(render_schedule(schedule), flush=True)
    if args.schedule_only:
        return 0
    try:
        result = uvloop.run(run(args, schedule))
    except CtlError as exc:
        print(f"sidemesh demo chaos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # run() restored the mesh on its way out (its finally), before this reached us
        print(f"sidemesh demo chaos: interrupted; mesh restored (seed {seed})", file=sys.stderr)
        return 130
    print(render(result), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 1 if result["failures"] or result["step_errors"] else 0


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


class Watch:
    """Samples the mesh's steadiness and gathers the sidecars' mode transitions."""

    def __init__(self, target: DrillTarget, expected: frozenset[str]) -> None:
        self.target = target
        self.expected = expected
        self.samples: list[Sample] = []
        self.latest: dict[str, Any] | None = None
        self._transitions: dict[tuple[str, float, str, str], dict[str, Any]] = {}

    @property
    def transitions(self) -> list[dict[str, Any]]:
        return sorted(self._transitions.values(), key=lambda t: t["at"])

    async def sample(self, session: aiohttp.ClientSession) -> Sample:
        begun = time.time()
        report, units = await asyncio.gather(
            status_mod.collect(self.target.control, self.target.admin, timeout=STATUS_TIMEOUT_S,
                               controlplane_http=self.target.controlplane_http),
            _units(self.target, session),
        )
        if report is not None:
            self.latest = report
        s = Sample(begun, time.time(), steadiness(report, units, self.expected))
        self.samples.append(s)
        return s

    async def gather_transitions(self, session: aiohttp.ClientSession) -> None:
        sidecars = [s for s in (self.latest or {}).get("sidecars", []) if s.get("reachable")]

        async def one(sc: dict[str, Any]) -> None:
            try:
                async with session.get(f"http://{sc['admin']}/state",
                                       timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                    state = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return
            for t in (state or {}).get("transitions") or []:
                key = (str(sc.get("instance")), float(t.get("at", 0)), str(t.get("from")), str(t.get("to")))
                self._transitions[key] = {"instance": sc.get("instance"), **t}

        await asyncio.gather(*(one(sc) for sc in sidecars))

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        last = 0.0
        while not stop.is_set():
            await self.sample(session)
            if time.time() - last >= TRANSITIONS_EVERY_S:
                await self.gather_transitions(session)
                last = time.time()
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
            except TimeoutError:
                pass

    async def until_steady(self, session: aiohttp.ClientSession, timeout: float) -> Sample:
        deadline = time.time() + timeout
        while True:
            s = await self.sample(session)
            if not s.why or time.time() > deadline:
                return s
            await asyncio.sleep(SAMPLE_EVERY_S)


async def _units(target: DrillTarget, session: aiohttp.ClientSession) -> list[dict[str, Any]] | None:
    try:
        return await target.units(session)
    except CtlError as exc:
        return [{"name": "sidemesh up", "state": f"unreachable ({exc})", "ready": False}]


async def _do(target: DrillTarget, session: aiohttp.ClientSession, step: Step) -> None:
    if step.verb is Verb.KILL:
        await target.kill(session, step.target)
    elif step.verb is Verb.START:
        await target.start(session, step.target)
    elif step.verb is Verb.FREEZE:
        await target.freeze(session, step.target)
    elif step.verb is Verb.THAW:
        await target.thaw(session, step.target)
    elif step.verb is Verb.FAULT:
        await target.fault(session, step.args[0], step.args[1] if len(step.args) > 1 else None)
    elif step.verb is Verb.CLEAR:
        await target.fault(session, "clear")
    elif step.verb is Verb.SCALE:
        await target.scale(session, step.target, int(step.args[0]))
    else:
        raise CtlError(f"no way to {step.describe()}")


async def _carry_out(args: argparse.Namespace, fault: Fault, t0: float, target: DrillTarget,
                     session: aiohttp.ClientSession) -> Ran:
    started: float | None = None
    ended = 0.0
    errors: list[str] = []
    for step in fault.steps:
        await asyncio.sleep(max(0.0, t0 + step.at_s - time.time()))
        issued = time.time()
        try:
            await _do(target, session, step)
            outcome = "ok"
        except (CtlError, OSError, aiohttp.ClientError) as exc:
            errors.append(f"{step.describe()}: {exc}")
            outcome = f"ERROR {exc}"
        late = issued - (t0 + step.at_s)
        _say(args, f"step +{issued - t0:6.2f}s #{fault.number} {fault.kind.value}: {step.describe()} "
                   f"took={time.time() - issued:.2f}s late={late:.2f}s {outcome}")
        started = issued if started is None else started
        ended = issued
    assert started is not None  # a fault has at least two steps
    return Ran(fault, started, ended, tuple(errors))


async def _prepare(args: argparse.Namespace, schedule: Schedule, target: DrillTarget,
                   session: aiohttp.ClientSession) -> tuple[frozenset[str], dict[str, Any]]:
    """Bring the mesh to the profile's steady state; the sidecars that make it up, and what was done."""
    base = schedule.profile.base_artists
    t = time.time()
    done = await target.restore(session)
    found = await target.replicas(session, ARTIST)
    if found != base:
        await target.scale(session, ARTIST, base)
        done.append(f"scale {ARTIST}={base}")
    why, expected = "not sampled", frozenset[str]()
    deadline = time.time() + PREPARE_TIMEOUT_S
    while True:
        report, units = await asyncio.gather(
            status_mod.collect(target.control, target.admin, timeout=STATUS_TIMEOUT_S,
                               controlplane_http=target.controlplane_http),
            _units(target, session))
        sidecars = [x for x in (report or {}).get("sidecars", []) if x.get("reachable")]
        expected = frozenset(str(x.get("instance")) for x in sidecars)
        artists = sum(1 for x in sidecars if x.get("service") == ARTIST)
        why = steadiness(report, units, expected) or (
            f"{artists} artist sidecars answer, expected {base}" if artists != base else "")
        if not why or time.time() > deadline:
            break
        await asyncio.sleep(SAMPLE_EVERY_S)
    if why:
        _say(args, f"prepare: WARNING the mesh is not steady before the drill ({why}); going on")
    prep = {"found_artists": found, "done": done, "took_s": round(time.time() - t, 2),
            "steady": not why, "why": why, "sidecars": sorted(expected)}
    _say(args, f"prepare: {', '.join(done) or 'nothing to restore'}; steady={not why} "
               f"sidecars={','.join(sorted(expected))} in {prep['took_s']}s")
    return expected, prep


async def run(args: argparse.Namespace, schedule: Schedule) -> dict[str, Any]:
    target: DrillTarget = (ComposeMesh(args.compose_file, args.project, args.admin) if args.compose
                           else LocalMesh(args.control, args.admin))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await target.check(session)
        expected, prep = await _prepare(args, schedule, target, session)
        load = LoadGenerator(lambda i: args.url.format(id=i % 20 + 1), rate=args.rate,
                             duration_s=schedule.duration_s,
                             check=song_details_problem if "/details" in args.url else None)
        watch = Watch(target, expected)
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch.run(session, stop))
        load_task = asyncio.create_task(load.run())
        await asyncio.sleep(0)
        t0 = load.started_at or time.time()
        progress = asyncio.create_task(_progress(args, schedule, load, watch, t0))
        restored: list[str] = []
        try:
            ran = list(await asyncio.gather(*(_carry_out(args, f, t0, target, session) for f in schedule.faults)))
            stats = await load_task
            load_end = time.time()
            final = await watch.until_steady(session, SETTLE_TIMEOUT_S)
            stop.set()
            await watcher
            await watch.gather_transitions(session)
        finally:
            progress.cancel()
            stop.set()
            load.stop()
            restored = await _restore(target, session, prep["found_artists"], schedule.profile.base_artists)
    results: list[Result] = stats.results
    figs = figures(ran, results, watch.samples, watch.transitions, load_end)
    rows = table(figs, schedule.profile.kinds, results)
    failures = stats.failures
    return {
        "seed": schedule.seed, "duration_s": schedule.duration_s, "rate": args.rate,
        "faults_per_minute": schedule.faults_per_minute, "target": schedule.profile.name,
        "note": schedule.profile.note, "url": args.url, "t0": t0, "prepare": prep,
        "schedule": [{"number": f.number, "kind": f.kind.value, "detail": f.detail, "inside": f.inside,
                      "steps": [{"at_s": s.at_s, "step": s.describe()} for s in f.steps]} for f in schedule.faults],
        "faults": [{"number": f.number, "kind": f.kind.value, "started_s": round(f.started - t0, 3),
                    "ended_s": round(f.ended - t0, 3), "recovered_s": f.recovered_s, "requests": f.requests,
                    "failed": f.failed, "mode_changes": f.mode_changes, "errors": list(f.errors)} for f in figs],
        "table": rows,
        "requests": len(results),
        "failures": len(failures),
        "errors": failure_lines(failures, figs, t0),
        "step_errors": [f"#{f.number} {f.kind.value}: {e}" for f in figs for e in f.errors],
        "mode_changes": sum(1 for t in watch.transitions if t0 <= float(t["at"]) <= load_end),
        "steady_at_end": not final.why, "not_steady_why": final.why,
        "restored": restored,
    }


async def _restore(target: DrillTarget, session: aiohttp.ClientSession, found: int, base: int) -> list[str]:
    """Put the mesh back as the drill found it; never raises (it runs on the way out)."""
    try:
        done = await target.restore(session)
        if found != base and await target.replicas(session, ARTIST) != found:
            await target.scale(session, ARTIST, found)
            done.append(f"scale {ARTIST}={found}")
        return done
    except (CtlError, OSError, aiohttp.ClientError) as exc:
        return [f"RESTORE FAILED: {exc}"]


async def _progress(args: argparse.Namespace, schedule: Schedule, load: LoadGenerator, watch: Watch,
                    t0: float) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        now = time.time() - t0
        res = load.stats.results
        active = " ".join(f"#{f.number}:{f.kind.value}" for f in schedule.faults if f.start_s <= now <= f.end_s)
        modes = ",".join(f"{s.get('instance')}:{s.get('mode')}" for s in (watch.latest or {}).get("sidecars", []))
        steady = watch.samples[-1].why if watch.samples else "?"
        _say(args, f"load +{now:6.1f}s requests={len(res)} failed={sum(1 for r in res if not r.ok)} "
                   f"active={active or '-'} steady={'yes' if not steady else 'no (' + steady + ')'} modes={modes}")


def render(result: dict[str, Any]) -> str:
    lines = ["", "faults as they ran (recovered: from the end of the fault, or of its companion, until the "
             "mesh is steady again):", render_faults(result["faults"]), "", render_table(result["table"]), ""]
    lines.append(f"mode changes seen: {result['mode_changes']}; mesh steady at the end: "
                 f"{'yes' if result['steady_at_end'] else 'NO (' + result['not_steady_why'] + ')'}; "
                 f"restored: {', '.join(result['restored']) or 'nothing left to restore'}")
    if result["step_errors"]:
        lines.append("STEP ERRORS (the drill could not do what its schedule says):")
        lines += [f"  {e}" for e in result["step_errors"]]
    if result["failures"]:
        lines.append(f"FAILED: {result['failures']} of {result['requests']} requests failed "
                     f"(seed {result['seed']}); first ones:")
        lines += [f"  {e}" for e in result["errors"]]
    else:
        kinds = sum(1 for r in result["table"] if r["count"])
        lines.append(f"OK: {result['requests']} requests, zero failed, through {len(result['faults'])} faults "
                     f"of {kinds} kinds (seed {result['seed']})")
    return "\n".join(lines)
