"""The chaos drill's schedule (``sidemesh.chaosschedule``) and the pure figures it is judged by
(``sidemesh.chaosreport``). No mesh, no clock: the schedule is a function of its inputs.

The rules are checked here independently of ``violations()`` (which the builder runs on
itself), by walking the steps directly; ``violations()`` is then shown to catch what a
broken schedule would do.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from sidemesh.chaosreport import Ran, Sample, failure_lines, figures, steadiness, table
from sidemesh.chaosschedule import (
    COMPOSE,
    LOCAL,
    MAX_ARTISTS,
    RESOURCE_OF,
    TAIL_S,
    Fault,
    Kind,
    Resource,
    Schedule,
    Step,
    Verb,
    build_schedule,
    render_schedule,
    violations,
)
from sidemesh.load import Result

SEEDS = range(60)
DURATIONS = (30.0, 120.0, 600.0)


def _schedules() -> list[Schedule]:
    return [build_schedule(seed, d, rate, profile)
            for seed in SEEDS for d in DURATIONS for rate in (2.0, 6.0, 30.0) for profile in (LOCAL, COMPOSE)]


ALL = _schedules()


def test_the_same_seed_gives_the_same_schedule() -> None:
    a, b = build_schedule(1234, 120), build_schedule(1234, 120)

    assert a == b
    assert render_schedule(a) == render_schedule(b)
    assert len(a.faults) >= 8


def test_different_seeds_give_different_schedules() -> None:
    rendered = {render_schedule(build_schedule(seed, 120)).split("\n", 1)[1] for seed in range(30)}

    assert len(rendered) == 30


def test_every_fault_kind_appears_in_a_two_minute_schedule_whatever_the_seed() -> None:
    for seed in range(200):
        assert build_schedule(seed, 120).kinds() == set(Kind), f"seed {seed}"
        assert build_schedule(seed, 120, profile=COMPOSE).kinds() == set(COMPOSE.kinds), f"seed {seed}"


def test_every_step_falls_inside_the_drill_and_leaves_its_tail_to_recover() -> None:
    for s in ALL:
        for fault, step in s.steps():
            assert 0 < step.at_s <= s.duration_s - TAIL_S, (s.seed, s.duration_s, fault)


def test_faults_are_numbered_in_start_order_and_their_steps_run_in_order() -> None:
    for s in ALL:
        assert [f.number for f in s.faults] == list(range(1, len(s.faults) + 1))
        assert [f.start_s for f in s.faults] == sorted(f.start_s for f in s.faults)
        for f in s.faults:
            assert [st.at_s for st in f.steps] == sorted(st.at_s for st in f.steps), f
            assert f.end_s > f.start_s


def _restores(fault: Fault, base_artists: int) -> bool:
    """Walk one fault's steps: everything it kills it starts, freezes it thaws, faults it clears,
    and its last scale puts artist back to the base count."""
    down: Counter[str] = Counter()
    frozen: Counter[str] = Counter()
    faulted = False
    scaled_to = base_artists
    for st in fault.steps:
        if st.verb is Verb.KILL:
            down[st.target] += 1
        elif st.verb is Verb.START:
            down[st.target] -= 1
        elif st.verb is Verb.FREEZE:
            frozen[st.target] += 1
        elif st.verb is Verb.THAW:
            frozen[st.target] -= 1
        elif st.verb is Verb.FAULT:
            faulted = True
        elif st.verb is Verb.CLEAR:
            faulted = False
        elif st.verb is Verb.SCALE:
            scaled_to = int(st.args[0])
    return not any(down.values()) and not any(frozen.values()) and not faulted and scaled_to == base_artists


def test_every_fault_ends_by_restoring_what_it_broke() -> None:
    for s in ALL:
        for f in s.faults:
            assert _restores(f, s.profile.base_artists), f
            assert f.steps[-1].verb in (Verb.START, Verb.THAW, Verb.CLEAR, Verb.SCALE), f


def test_artist_keeps_between_one_and_four_replicas_and_one_dies_only_while_another_runs() -> None:
    for s in ALL:
        running = set(range(1, s.profile.base_artists + 1))
        for fault, st in s.steps():
            if st.verb is Verb.SCALE:
                n = int(st.args[0])
                assert 1 <= n <= MAX_ARTISTS and n <= s.profile.max_artists, (s.seed, fault)
                running = set(range(1, n + 1))
            elif st.target.startswith("artist-"):
                replica = int(st.target.split("-")[1])
                if st.verb is Verb.KILL:
                    assert replica in running and len(running) >= 2, (s.seed, fault)
                    running.discard(replica)
                else:
                    running.add(replica)
            assert running, (s.seed, fault)
        assert running == set(range(1, s.profile.base_artists + 1))


def _overlapping(s: Schedule) -> list[tuple[Fault, Fault]]:
    return [(a, b) for a in s.faults for b in s.faults
            if a.number < b.number and b.start_s <= a.end_s and a.start_s <= b.end_s]


def test_faults_overlap_only_as_a_companion_strictly_inside_a_control_plane_fault() -> None:
    allowed = {(Kind.CP_KILL, Kind.DNS_KILL), (Kind.CP_KILL, Kind.ARTIST_SCALE), (Kind.CP_KILL, Kind.ARTIST_KILL),
               (Kind.CP_FREEZE, Kind.DNS_KILL), (Kind.CP_DROP_SERVICE, Kind.DNS_KILL)}
    seen = set()
    for s in ALL:
        for a, b in _overlapping(s):
            assert b.inside == a.number, (s.seed, a, b)
            assert (a.kind, b.kind) in allowed, (s.seed, a, b)
            assert RESOURCE_OF[a.kind] is Resource.CONTROLPLANE and RESOURCE_OF[b.kind] is not Resource.CONTROLPLANE
            assert a.start_s < b.start_s and b.end_s < a.end_s, (s.seed, a, b)
            seen.add((a.kind, b.kind))
        for t in {st.at_s for _, st in s.steps()}:
            assert sum(1 for f in s.faults if f.start_s <= t <= f.end_s) <= 2, (s.seed, t)
    assert seen == allowed, "some overlap the design names never happens"


def test_faults_and_freezes_only_reach_a_control_plane_that_no_other_fault_holds() -> None:
    for s in ALL:
        for f in s.faults:
            if f.kind in (Kind.CP_FREEZE, Kind.CP_EMPTY_SNAPSHOT, Kind.CP_DROP_SERVICE):
                others = [g for g in s.faults if g is not f and RESOURCE_OF[g.kind] is Resource.CONTROLPLANE
                          and g.start_s <= f.end_s and f.start_s <= g.end_s]
                assert others == [], (s.seed, f, others)


def test_a_higher_fault_rate_gives_more_faults_up_to_the_recovery_gap() -> None:
    counts = {rate: sum(len(build_schedule(seed, 600, rate).faults) for seed in range(10)) for rate in (1, 3, 6, 60)}
    print(f"faults in 10 x 600 s by faults/minute: {counts}")

    assert counts[1] < counts[3] < counts[6] <= counts[60]


def test_compose_schedules_neither_kill_dns_nor_scale_artist_past_its_two_services() -> None:
    for s in ALL:
        if s.profile is not COMPOSE:
            continue
        assert Kind.DNS_KILL not in s.kinds()
        for _, st in s.steps():
            assert st.target != "dns"
            if st.verb is Verb.SCALE:
                assert int(st.args[0]) in (1, 2)
            if st.target.startswith("artist-"):
                assert st.target in ("artist-1", "artist-2")


def test_drop_service_picks_a_service_of_the_mesh() -> None:
    dropped = {st.args[1] for s in ALL for _, st in s.steps() if st.verb is Verb.FAULT and st.args[0] == "drop-service"}

    assert dropped == {"artist", "song", "image"}


@pytest.mark.parametrize(("duration", "rate"), [(29.0, 6.0), (0.0, 6.0), (120.0, 0.0), (120.0, -1.0)])
def test_inputs_that_allow_no_drill_are_refused(duration: float, rate: float) -> None:
    with pytest.raises(ValueError):
        build_schedule(1, duration, rate)


def test_violations_names_a_kill_never_restored_a_scale_to_zero_and_two_faults_on_one_resource() -> None:
    def sched(*faults: Fault) -> Schedule:
        return Schedule(1, 60.0, 6.0, LOCAL, faults)

    unrestored = Fault(1, Kind.CP_KILL, (Step(5.0, Verb.KILL, "controlplane"),), "down")
    to_zero = Fault(1, Kind.ARTIST_SCALE, (Step(5.0, Verb.SCALE, "artist", ("0",)),
                                            Step(8.0, Verb.SCALE, "artist", ("2",))), "artist=0")
    kill = Fault(1, Kind.CP_KILL, (Step(5.0, Verb.KILL, "controlplane"), Step(9.0, Verb.START, "controlplane")), "")
    fault_on_dead = Fault(2, Kind.CP_EMPTY_SNAPSHOT, (Step(6.0, Verb.FAULT, "controlplane", ("empty-snapshot",)),
                                                      Step(7.0, Verb.CLEAR, "controlplane")), "", inside=1)
    last_replica = Fault(1, Kind.ARTIST_KILL, (Step(5.0, Verb.KILL, "artist-1"), Step(6.0, Verb.START, "artist-1")), "")
    both = Fault(2, Kind.ARTIST_KILL, (Step(5.5, Verb.KILL, "artist-2"), Step(5.8, Verb.START, "artist-2")), "")

    assert any("does not restore" in p for p in violations(sched(unrestored)))
    assert any("1..4 replicas" in p for p in violations(sched(to_zero)))
    problems = violations(sched(kill, fault_on_dead))
    assert any("while the control plane is killed" in p for p in problems), problems
    assert any("overlap on controlplane" in p for p in problems), problems
    problems = violations(sched(last_replica, both))
    assert any("without a replica" in p for p in problems), problems
    assert violations(build_schedule(5, 120)) == []


# ----- the figures the drill is judged by (sidemesh.chaosreport) -----


def _report(overrides: dict[str, dict[str, Any]] | None = None, version: str = "v2") -> dict[str, Any]:
    def sc(name: str) -> dict[str, Any]:
        base = {"instance": name, "reachable": True, "mode": "controlplane", "route_version": version,
                "acked": version, "guards": {}}
        return {**base, **(overrides or {}).get(name, {})}

    return {"controlplane": {"reachable": True, "version": version, "faults": {"empty_snapshot": False,
                                                                                "dropped_services": []}},
            "sidecars": [sc("artist-1"), sc("song-1")]}


EXPECTED = frozenset({"artist-1", "song-1"})


def test_the_mesh_is_steady_only_with_every_expected_sidecar_on_the_control_planes_version() -> None:
    assert steadiness(_report(), [], EXPECTED) == ""
    assert steadiness(None, [], EXPECTED) == "no status"
    assert "song-1 in dns" in steadiness(_report({"song-1": {"mode": "dns"}}), [], EXPECTED)
    assert "artist-1 on v1" in steadiness(_report({"artist-1": {"route_version": "v1"}}), [], EXPECTED)
    assert "acked v1" in steadiness(_report({"artist-1": {"acked": "v1"}}), [], EXPECTED)
    assert "guards" in steadiness(_report({"song-1": {"guards": {"artist": "dropped"}}}), [], EXPECTED)
    assert "missing ['song-1']" in steadiness(_report({"song-1": {"reachable": False}}), [], EXPECTED)
    faulty = _report()
    faulty["controlplane"]["faults"]["dropped_services"] = ["artist"]
    assert "faults" in steadiness(faulty, [], EXPECTED)
    assert "dns killed" in steadiness(_report(), [{"name": "dns", "state": "killed", "ready": False}], EXPECTED)


def _ok(t: float) -> Result:
    return Result(t, 0.01, 200, None)


def _failed(t: float) -> Result:
    return Result(t, 0.01, 503, "HTTP 503: no endpoints")


def test_recovery_runs_from_the_end_of_the_episode_to_the_first_steady_sample_begun_after_it() -> None:
    primary = Fault(1, Kind.CP_KILL, (Step(1, Verb.KILL, "controlplane"), Step(5, Verb.START, "controlplane")), "")
    companion = Fault(2, Kind.DNS_KILL, (Step(2, Verb.KILL, "dns"), Step(3, Verb.START, "dns")), "", inside=1)
    ran = [Ran(primary, 101.0, 105.0), Ran(companion, 102.0, 103.0)]
    samples = [Sample(103.5, 103.7, ""),  # steady-looking but before the episode ended: does not count
               Sample(104.9, 105.2, ""),  # begun before the end: stale
               Sample(105.1, 105.4, "song-1 in dns"),
               Sample(106.0, 106.3, "")]
    results = [_ok(100.5), _ok(101.5), _failed(102.5), _ok(106.2), _ok(106.5)]
    transitions = [{"at": 101.2}, {"at": 106.1}, {"at": 107.0}]

    figs = figures(ran, results, samples, transitions, load_end=120.0)

    assert [f.recovered_s for f in figs] == [1.3, 1.3]
    assert [(f.requests, f.failed, f.mode_changes) for f in figs] == [(3, 1, 2), (2, 1, 1)]
    rows = table(figs, (Kind.CP_KILL, Kind.DNS_KILL, Kind.CP_FREEZE), results)
    assert [r["kind"] for r in rows] == ["cp-kill", "dns-kill", "(no fault)"]
    assert rows[-1]["requests"] == 2 and rows[-1]["failed"] == 0
    assert failure_lines([results[2]], figs, t0=100.0) == [
        "+2.50s [#1 cp-kill +1.50s in, #2 dns-kill +0.50s in] HTTP 503: no endpoints"]


def test_a_fault_not_steady_again_before_the_next_one_starts_is_reported_unrecovered() -> None:
    a = Fault(1, Kind.CP_KILL, (Step(1, Verb.KILL, "controlplane"), Step(2, Verb.START, "controlplane")), "")
    b = Fault(2, Kind.DNS_KILL, (Step(8, Verb.KILL, "dns"), Step(9, Verb.START, "dns")), "")
    samples = [Sample(103.0, 103.2, "song-1 in dns"), Sample(108.5, 108.7, ""), Sample(110.0, 110.2, "")]

    figs = figures([Ran(a, 101.0, 102.0), Ran(b, 108.0, 109.0)], [_ok(105.0)], samples, [], load_end=120.0)

    assert figs[0].recovered_s is None and figs[0].window_end == 108.0 and figs[0].requests == 1
    assert figs[1].recovered_s == 1.2
    assert table(figs, (Kind.CP_KILL,), [])[0]["not_recovered"] == 1
