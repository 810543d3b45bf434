"""`sidemesh demo chaos` against a fresh real `sidemesh up`: two minutes of seeded random faults
of every kind under 150 req/s, and not one failed request.

The seed is fixed, so the schedule is known (printed by the drill and rebuilt here): it holds
every kind, DNS killed inside a control-plane outage (last-known-good only), inside a freeze and
inside a drop of artist, artist scaled down to one replica inside an outage (DNS alone carries
it), and two restart bursts. The drill's JSON is read back, and the table and the first failures
are printed (`pytest -s`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidemesh.chaosschedule import Kind, build_schedule, render_schedule
from tests.mesh import running_mesh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(330)]

SEED = 1575
DURATION_S = 120
RATE = 150


def test_demo_chaos_runs_every_fault_kind_for_two_minutes_without_a_failed_request(tmp_path: Path) -> None:
    schedule = build_schedule(SEED, DURATION_S)
    assert schedule.kinds() == set(Kind)
    overlaps = {(schedule.faults[f.inside - 1].kind, f.kind) for f in schedule.faults if f.inside is not None}
    assert {(Kind.CP_KILL, Kind.DNS_KILL), (Kind.CP_FREEZE, Kind.DNS_KILL), (Kind.CP_KILL, Kind.ARTIST_SCALE)} <= overlaps
    out = tmp_path / "chaos.json"
    with running_mesh() as mesh:
        proc = mesh.cli("demo", "chaos", "--duration", str(DURATION_S), "--seed", str(SEED), "--rate", str(RATE),
                        "--url", mesh.url("/songs/{id}/details"), "--json", str(out), timeout=270)
        print(proc.stdout[-9000:])
        print(proc.stderr[-3000:])
        if proc.returncode != 0:
            mesh.dump_logs()
    assert out.exists(), f"the drill wrote no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())

    # the seed and the very schedule come first, before anything touches the mesh
    assert proc.stdout.startswith(f"sidemesh demo chaos: seed={SEED} ")
    assert render_schedule(schedule) in proc.stdout
    assert proc.stdout.index(render_schedule(schedule)) < proc.stdout.index("prepare:")

    # every fault ran, as scheduled, and the table has a row for each kind
    assert [f["kind"] for f in result["faults"]] == [f.kind.value for f in schedule.faults]
    assert result["step_errors"] == []
    rows = {r["kind"]: r for r in result["table"]}
    for kind in Kind:
        assert rows[kind.value]["count"] == sum(1 for f in schedule.faults if f.kind is kind), rows[kind.value]
        assert any(line.startswith(kind.value) for line in proc.stdout.splitlines()), f"no table row for {kind}"
    assert result["requests"] >= 0.9 * RATE * DURATION_S, f"load too thin: {result['requests']} requests"

    # a drill where nothing happened proves nothing: every outage sent the sidecars to dns and back
    print(f"mode changes seen: {result['mode_changes']}; per fault: "
          f"{[(f['number'], f['kind'], f['mode_changes'], f['recovered_s']) for f in result['faults']]}")
    for f in result["faults"]:
        if f["kind"] in (Kind.CP_KILL.value, Kind.CP_RESTART_BURST.value):
            assert f["mode_changes"] >= 6, f"#{f['number']} {f['kind']}: too few mode changes {f}"
    assert result["mode_changes"] >= 6 * sum(1 for f in schedule.faults if f.kind is Kind.CP_KILL)

    # every fault was followed by the mesh's steady state before the next one began
    assert [f for f in result["faults"] if f["recovered_s"] is None] == []
    assert result["steady_at_end"], result["not_steady_why"]

    # and the point of it all
    assert result["failures"] == 0, "\n".join([f"{result['failures']} failed requests; first ones:",
                                              *result["errors"]])
    assert proc.returncode == 0, proc.stderr[-2000:]
