"""Issue 3: the mesh survives its control plane. One real `sidemesh up` mesh, real processes,
real DNS, steady load while the control plane is killed, frozen, restarted and lied by.

Timings the issue names are asserted as named (a busy 2-core machine is the budget they
were set for) and every measured figure is printed, so `pytest -s` shows them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import pytest

from sidemesh.load import LoadGenerator, LoadStats, song_details_problem
from tests.mesh import Mesh, get_json

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def _load(mesh: Mesh, *, rate: float, duration_s: float, keep_bodies: bool = False) -> LoadGenerator:
    return LoadGenerator(lambda i: mesh.url(f"/songs/{i % 20 + 1}/details"), rate=rate, duration_s=duration_s,
                         keep_bodies=keep_bodies, check=song_details_problem)


def _assert_no_failures(stats: LoadStats, what: str) -> None:
    failures = stats.failures
    print(f"{what}: {len(stats.results)} requests, {len(failures)} failed")
    assert not failures, f"{what}: {len(failures)} of {len(stats.results)} failed, e.g. {[f.error for f in failures[:5]]}"


def _modes(mesh: Mesh) -> dict[str, str]:
    return {name: st["mode"] for name, st in mesh.sidecar_states().items()}


async def _cli(mesh: Mesh, *args: str) -> str:
    return await asyncio.to_thread(mesh.ok, *args)


def _restore(mesh: Mesh) -> None:
    """Leave the mesh as the next test expects it: everything running and synced."""
    for p in mesh.pods():
        if p["kind"] in ("controlplane", "dns") and p["state"] != "running":
            mesh.ok("start", p["name"])
    mesh.wait_until("every sidecar synced", mesh.all_synced, timeout=10)


def test_demo_failover_kills_and_restarts_the_control_plane_under_200_rps_without_a_failure(
    mesh: Mesh, tmp_path: Any
) -> None:
    """Points 1 and 7: 200 req/s for 30 s, SIGKILL at 10 s, start at 20 s."""
    out = tmp_path / "demo.json"
    proc = mesh.cli("demo", "failover", "--url", mesh.url("/songs/{id}/details"), "--rate", "200",
                    "--duration", "30", "--kill-at", "10", "--start-at", "20", "--json", str(out), timeout=90)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(out.read_text())
    for phase in ("before", "outage", "after"):
        assert result["phases"][phase]["requests"] >= 1900, result["phases"]
        assert result["phases"][phase]["failures"] == 0
    assert "before" in proc.stdout and "outage" in proc.stdout and "after" in proc.stdout
    assert len(result["sidecars"]) == 3
    for sc in result["sidecars"]:
        print(f"{sc['instance']}: dns {sc['to_dns_after_kill_s']}s after kill, "
              f"controlplane {sc['to_controlplane_after_start_s']}s after start")
        assert sc["to_dns_after_kill_s"] is not None and sc["to_dns_after_kill_s"] <= 1.0, sc
        assert sc["to_controlplane_after_start_s"] is not None and sc["to_controlplane_after_start_s"] <= 3.0, sc
    _restore(mesh)


async def test_replicas_scaled_during_the_outage_get_traffic_through_dns_and_removed_ones_none(mesh: Mesh) -> None:
    """Point 2: the dead control plane never sees artist-2/3; DNS (TTL 1 s) does."""
    ttl = 1.0
    await _cli(mesh, "kill", "controlplane")
    await asyncio.to_thread(mesh.wait_until, "all sidecars in dns",
                            lambda: set(_modes(mesh).values()) == {"dns"}, 2.0)
    load = _load(mesh, rate=100, duration_s=14, keep_bodies=True)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(1.0)
    await _cli(mesh, "scale", "artist=3")
    scaled_up = time.time()
    await asyncio.sleep(5.0)
    await _cli(mesh, "scale", "artist=1")
    scaled_down = time.time()
    stats = await task
    _assert_no_failures(stats, "scale during outage")

    def served(r: Any) -> str:
        return str(r.body["artist"]["served_by"])

    ok = [r for r in stats.results if r.ok and r.body]
    firsts = {}
    for name in ("artist-2", "artist-3"):
        times = [r.started for r in ok if served(r) == name and r.started >= scaled_up]
        assert times, f"{name} never served during the outage"
        firsts[name] = min(times) - scaled_up
    print(f"new replicas first served after the scale returned: {firsts} (budget TTL+1 = {ttl + 1}s)")
    assert all(v <= ttl + 1.0 for v in firsts.values()), firsts
    late = [served(r) for r in ok if r.started >= scaled_down + ttl + 1.0 and served(r) != "artist-1"]
    print(f"calls to removed replicas later than TTL+1 s after scale-down: {len(late)}")
    assert late == []
    await asyncio.to_thread(_restore, mesh)


def test_a_pod_started_while_the_control_plane_is_down_serves_within_3s(mesh: Mesh) -> None:
    """Point 3: song's pod (service + sidecar) starts during the outage."""
    mesh.ok("kill", "controlplane")
    mesh.ok("stop", "song-1")
    t0 = time.monotonic()
    mesh.ok("start", "song-1")

    def serves() -> bool:
        body = get_json(mesh.url("/songs/3/details"), timeout=1.0)
        return bool(body["artist"] and body["image"])

    mesh.wait_until("song details from a cold-started pod", serves, timeout=3.0 - (time.monotonic() - t0))
    took = time.monotonic() - t0
    print(f"cold-started song pod served song details {took:.2f}s after `sidemesh start song-1`")
    assert took <= 3.0
    assert get_json(f"http://{mesh.unit('song-1')['address']}:15000/state")["mode"] == "dns"
    _restore(mesh)


async def test_a_frozen_control_plane_is_detected_within_5s_and_no_request_fails(mesh: Mesh) -> None:
    """Point 4: SIGSTOP keeps the sockets open but nothing answers; gRPC keepalive notices."""
    pid = mesh.unit("controlplane")["pid"]
    load = _load(mesh, rate=100, duration_s=9)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(1.0)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        took = await asyncio.to_thread(mesh.wait_until, "every sidecar in dns after SIGSTOP",
                                       lambda: set(_modes(mesh).values()) == {"dns"}, 5.0, 0.05)
        print(f"frozen control plane detected by every sidecar within {took:.2f}s")
        assert time.monotonic() - t0 <= 5.0
        await asyncio.sleep(1.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    stats = await task
    _assert_no_failures(stats, "frozen control plane")
    await asyncio.to_thread(_restore, mesh)


async def test_five_control_plane_restarts_in_30s_lose_nothing_and_end_synced(mesh: Mesh) -> None:
    """Point 5."""
    load = _load(mesh, rate=100, duration_s=30)
    task = asyncio.create_task(load.run())
    t0 = time.monotonic()
    for i in range(5):
        await asyncio.sleep(max(0.0, t0 + i * 5.5 + 1.0 - time.monotonic()))
        await _cli(mesh, "kill", "controlplane")
        await asyncio.sleep(1.5)
        await _cli(mesh, "start", "controlplane")
    print(f"five restarts took {time.monotonic() - t0:.1f}s")
    stats = await task
    _assert_no_failures(stats, "five restarts")
    took = await asyncio.to_thread(mesh.wait_until, "all sidecars synced on one version", mesh.all_synced, 5.0)
    st = await asyncio.to_thread(mesh.status)
    versions = {s["route_version"] for s in st["sidecars"]}
    print(f"synced {took:.2f}s after the load ended on version {versions}")
    assert versions == {st["controlplane"]["version"]}


async def test_a_lying_control_plane_is_nacked_or_guarded_and_no_request_fails(mesh: Mesh) -> None:
    """Point 8: an empty snapshot is NACKed; a snapshot without artist is guarded; clear re-syncs."""
    load = _load(mesh, rate=100, duration_s=9)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(1.0)
    await _cli(mesh, "fault", "controlplane", "empty-snapshot")

    def all_rejected_empty() -> bool:
        states = mesh.sidecar_states().values()
        return all(any("empty snapshot" in r["reason"] for r in st["rejected"]) for st in states)

    await asyncio.to_thread(mesh.wait_until, "every sidecar NACKed the empty snapshot", all_rejected_empty, 2.0)
    cp = get_json(f"http://{mesh.unit('controlplane')['address']}:15014/status")
    assert all(s["status"] == "nacked" for s in cp["sidecars"]), cp["sidecars"]
    await asyncio.sleep(1.0)
    await _cli(mesh, "fault", "controlplane", "clear")
    await _cli(mesh, "fault", "controlplane", "drop-service", "artist")

    def artist_guarded() -> bool:
        states = mesh.sidecar_states().values()
        return all(st["services"]["artist"]["guard"] and st["services"]["artist"]["endpoints"] for st in states)

    await asyncio.to_thread(mesh.wait_until, "artist guarded on every sidecar", artist_guarded, 2.0)
    song = mesh.sidecar_states()["song-1"]
    print(f"song-1 guard on artist: {song['services']['artist']['guard']!r} "
          f"(source {song['services']['artist']['source']})")
    assert song["services"]["artist"]["source"] in ("dns", "cache")
    await asyncio.sleep(2.0)
    await _cli(mesh, "fault", "controlplane", "clear")
    stats = await task
    _assert_no_failures(stats, "faulty control plane")
    await asyncio.to_thread(mesh.wait_until, "every sidecar synced after clear", mesh.all_synced, 3.0)
    states = mesh.sidecar_states().values()
    assert all(st["services"]["artist"]["guard"] is None for st in states)


async def test_with_control_plane_and_dns_both_gone_calls_keep_working_on_last_known_good(mesh: Mesh) -> None:
    """Point 9."""
    load = _load(mesh, rate=100, duration_s=8)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(1.0)
    await _cli(mesh, "kill", "controlplane")
    await _cli(mesh, "kill", "dns")
    stats = await task
    _assert_no_failures(stats, "control plane and DNS gone")
    routes = {r.route for r in stats.results[-100:]}
    print(f"routes seen at the end: {routes}")
    states = mesh.sidecar_states()
    assert all(st["mode"] == "dns" for st in states.values())
    assert states["song-1"]["services"]["artist"]["source"] == "cache"
    await asyncio.to_thread(_restore, mesh)
