"""End to end against ``docker compose``: the outage of 8 March 2022, staged as a user would.

Issue 4, "What it must show": song-details through the mesh; under steady load the control
plane is killed and restarted with zero failed requests, every sidecar in ``dns`` within 2 s
and back on the control plane within 5 s; both artist replicas serve before and during the
outage and stopping one of them costs nothing; ``down`` leaves nothing and a second ``up``
works. The figures measured are printed (run with ``-s`` to see them).

The load is an aiohttp client on the host, bounded in rate, count and time, against song's
front door published on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.catalogue import default_catalogue
from sidemesh.load import LoadGenerator, song_details_problem
from tests.e2e.conftest import ADMIN_TOKEN, PROJECT, SIDECARS, Mesh, compose_failover_drill
from tests.support import REPO

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

RATE_PER_S = 50.0
MAX_LOAD_S = 110.0
REQUEST_TIMEOUT_S = 5.0
SONG_IDS = sorted(default_catalogue().songs)  # every song of the demo catalogue
TO_DNS_LIMIT_S = 2.0
BACK_LIMIT_S = 5.0
STEADY_S = 2.0


@dataclass(frozen=True)
class Result:
    """One request of the load: when it started, how it ended, which artist replica served it."""

    started: float  # time.time(), comparable with the sidecars' own timestamps
    status: int  # 0 = no HTTP answer (connection error, timeout)
    artist_served_by: str | None
    error: str | None


@dataclass
class Load:
    """Steady load against song-details (sidemesh.load, the demo's own load) from a background
    thread with its own event loop, so the test can steer compose meanwhile."""

    url: str
    rate: float = RATE_PER_S
    _gen: LoadGenerator | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._gen = LoadGenerator(
            lambda n: f"{self.url}/songs/{SONG_IDS[n % len(SONG_IDS)]}/details",
            rate=self.rate, duration_s=MAX_LOAD_S, timeout_s=REQUEST_TIMEOUT_S,
            keep_bodies=True, check=song_details_problem,
        )
        ready = threading.Event()

        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            ready.set()
            assert self._gen is not None
            await self._gen.run()

        self._thread = threading.Thread(target=lambda: asyncio.run(run()), name="load", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> list[Result]:
        assert self._gen is not None and self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._gen.stop)
        self._thread.join(timeout=REQUEST_TIMEOUT_S + 10)
        return [
            Result(r.started, r.status, str(r.body["artist"]["served_by"]) if r.body else None, r.error)
            for r in self._gen.stats.results
        ]


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if r.status != 200 or r.error is not None]


def describe(results: list[Result]) -> str:
    bad = failures(results)
    codes = Counter(r.status for r in results)
    text = f"{len(results)} requests, {len(bad)} failed, status counts {dict(codes)}"
    for r in bad[:8]:
        text += f"\n  at {r.started:.3f}: status={r.status} error={r.error}"
    return text


def replicas(results: list[Result], since: float, until: float) -> Counter[str]:
    return Counter(r.artist_served_by for r in results if since <= r.started < until and r.artist_served_by)


def first_transition_at(state: dict[str, Any], to: str, after: float) -> float | None:
    """When a sidecar says it entered ``to`` (its own clock, time.time()) after ``after``."""
    times = [t["at"] for t in state.get("transitions", []) if t.get("to") == to and t.get("at", 0) >= after]
    return min(times) if times else None


def measured_switch(mesh: Mesh, to: str, event: tuple[float, float], limit: float,
                    sidecars: list[str]) -> dict[str, float]:
    """Wait until every sidecar is in ``to``; return how long after the event each one switched.

    ``event`` is (when the command was issued, when docker says it took effect): a transition
    counts if the sidecar recorded it after the command was issued, and is measured from the
    moment docker gives (a sidecar may notice a dying peer a few ms before dockerd writes it down).
    """
    issued, happened = event
    mesh.wait_for_modes(to, timeout=limit + 3.0, sidecars=sidecars)
    took: dict[str, float] = {}
    for name, state in mesh.sidecar_states(sidecars).items():
        at = first_transition_at(state, to, issued)
        assert at is not None, f"{name} is in {to} but recorded no transition to it: {state.get('transitions')}"
        # negative: the sidecar saw the stream break a few ms before dockerd recorded the death
        took[name] = at - happened
    return took


def kill_controlplane(mesh: Mesh) -> tuple[float, float]:
    """``docker compose kill controlplane``; (issued, when docker says the container died)."""
    issued = time.time()
    mesh.run("kill", "controlplane")
    return issued, mesh.container_time("controlplane", "FinishedAt")


def start_controlplane(mesh: Mesh) -> tuple[float, float]:
    """``docker compose start controlplane``; (issued, when docker says the container started)."""
    issued = time.time()
    mesh.run("start", "controlplane")
    return issued, mesh.container_time("controlplane", "StartedAt")


def test_song_details_answers_with_song_artist_and_image_through_the_mesh(healthy_mesh: Mesh) -> None:
    status, doc, headers = healthy_mesh.details(7)

    assert status == 200, doc
    assert doc["song"]["id"] == 7
    assert doc["artist"]["id"] == doc["song"]["artist_id"]
    assert doc["image"]["id"] == doc["song"]["image_id"]
    # song asked for artist and image through its sidecar, which routed from the control plane
    assert doc["via"] == {"artist": "controlplane", "image": "controlplane"}, doc["via"]
    assert headers.get("x-sidemesh-route") == "inbound"


def test_every_sidecar_is_on_the_control_plane_with_both_artist_replicas(healthy_mesh: Mesh) -> None:
    states = healthy_mesh.sidecar_states()

    assert {name: s.get("mode") for name, s in states.items()} == {name: "controlplane" for name in SIDECARS}
    artist = states["song-sidecar"]["services"]["artist"]
    assert sorted(e["instance"] for e in artist["endpoints"]) == ["artist-1", "artist-2"], artist


def test_sidecars_fall_back_to_dns_and_back_without_a_failed_request(healthy_mesh: Mesh) -> None:
    mesh = healthy_mesh
    sidecars = list(SIDECARS)
    load = Load(mesh.base_url).start()
    try:
        time.sleep(STEADY_S)
        killed = kill_controlplane(mesh)
        to_dns = measured_switch(mesh, "dns", killed, TO_DNS_LIMIT_S, sidecars)
        in_dns = time.time()
        time.sleep(STEADY_S * 1.5)  # serve a while from DNS
        restarted = start_controlplane(mesh)
        back = measured_switch(mesh, "controlplane", restarted, BACK_LIMIT_S, sidecars)
        time.sleep(STEADY_S)
    finally:
        results = load.stop()
    before = replicas(results, 0, killed[0])
    during = replicas(results, in_dns, restarted[0])
    print(f"\n[outage] {describe(results)}"
          f"\n[outage] time to dns per sidecar (s): { {k: round(v, 3) for k, v in to_dns.items()} }"
          f"\n[outage] time back on the control plane per sidecar (s): { {k: round(v, 3) for k, v in back.items()} }"
          f"\n[outage] artist replicas before: {dict(before)}, during the outage: {dict(during)}")

    assert not failures(results), describe(results)
    assert len(results) >= RATE_PER_S * (STEADY_S * 3), f"load too thin to mean anything: {describe(results)}"
    assert max(to_dns.values()) <= TO_DNS_LIMIT_S, f"a sidecar took more than {TO_DNS_LIMIT_S}s to reach dns: {to_dns}"
    assert max(back.values()) <= BACK_LIMIT_S, f"a sidecar took more than {BACK_LIMIT_S}s to come back: {back}"
    assert set(before) == {"artist-1", "artist-2"}, f"before the outage only {dict(before)} served"
    assert set(during) == {"artist-1", "artist-2"}, f"during the outage only {dict(during)} served"


def test_stopping_an_artist_replica_during_the_outage_fails_no_request(healthy_mesh: Mesh) -> None:
    mesh = healthy_mesh
    survivors = ["song-sidecar", "artist-1-sidecar", "image-sidecar"]
    marks: dict[str, float] = {}
    load = Load(mesh.base_url).start()
    t0 = time.monotonic()
    try:
        time.sleep(STEADY_S)
        killed = kill_controlplane(mesh)
        marks["killed"] = time.monotonic() - t0
        measured_switch(mesh, "dns", killed, TO_DNS_LIMIT_S, list(SIDECARS))
        marks["all_dns"] = time.monotonic() - t0
        time.sleep(STEADY_S / 2)
        stopped = time.time()
        # the replica is its pod: the sidecar first, then the app (the order compose itself uses)
        mesh.run("stop", "artist-2-sidecar", "artist-2")
        stop_took = time.time() - stopped
        marks["artist_2_stopped"] = time.monotonic() - t0
        time.sleep(STEADY_S * 1.5)
        restarted = start_controlplane(mesh)
        marks["controlplane_started"] = time.monotonic() - t0
        back = measured_switch(mesh, "controlplane", restarted, BACK_LIMIT_S, survivors)
        marks["all_back"] = time.monotonic() - t0
        time.sleep(STEADY_S)
    finally:
        results = load.stop()
    after_stop = replicas(results, stopped + stop_took + 1.0, restarted[0])
    print(f"\n[replica stop] {describe(results)}"
          f"\n[replica stop] `stop artist-2-sidecar artist-2` took {stop_took:.2f}s; artist replicas after it: "
          f"{dict(after_stop)}"
          f"\n[replica stop] time back on the control plane (s): { {k: round(v, 3) for k, v in back.items()} }"
          f"\n[replica stop] phases (s since load start): { {k: round(v, 2) for k, v in marks.items()} }")

    assert not failures(results), describe(results)
    assert set(after_stop) == {"artist-1"}, f"after artist-2 stopped, served by {dict(after_stop)}"
    assert max(back.values()) <= BACK_LIMIT_S, back
    song_state = mesh.sidecar_states(["song-sidecar"])["song-sidecar"]
    instances = [e["instance"] for e in song_state["services"]["artist"]["endpoints"]]
    assert instances == ["artist-1"], f"the control plane still routes to a stopped replica: {instances}"


def test_status_from_inside_song_sidecar_lists_every_sidecar_while_the_control_plane_is_down(
    healthy_mesh: Mesh,
) -> None:
    """Issue 4: `docker compose exec song-sidecar sidemesh status` works during the outage."""
    mesh = healthy_mesh
    mesh.run("kill", "controlplane")
    mesh.wait_for_modes("dns", 5.0)
    out = mesh.run("exec", "-T", "song-sidecar", "sidemesh", "status", "--json", timeout=60).stdout
    report = json.loads(out)
    print(f"\nstatus --json from song-sidecar during the outage: {[(s['instance'], s['mode']) for s in report['sidecars']]}")
    assert report["controlplane"]["reachable"] is False
    assert sorted(s["instance"] for s in report["sidecars"]) == ["artist-1", "artist-2", "image-1", "song-1"]
    for sc in report["sidecars"]:
        assert sc["mode"] == "dns" and sc["route_version"] and sc["last_update_age_s"] is not None, sc
    table = mesh.run("exec", "-T", "song-sidecar", "sidemesh", "status", timeout=60).stdout
    assert "MODE" in table and table.count("dns") >= 4, table


def _dashboard_json(mesh: Mesh, path: str) -> Any:
    """GET a path of the compose dashboard from the host (no proxy), decoded; raises on non-200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(mesh.dashboard_url + path, timeout=5) as resp:
        return json.loads(resp.read())


def _poll(what: str, check: Any, timeout: float, interval: float = 0.2) -> Any:
    """``check()`` -> (done, value) until done (errors count as not yet); the value."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < timeout:
        try:
            done, last = check()
        except (OSError, ValueError) as exc:
            done, last = False, exc
        if done:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout}s (last: {last!r})")


def test_the_compose_dashboard_lists_every_sidecar_and_keeps_showing_them_while_the_control_plane_is_down(
    healthy_mesh: Mesh,
) -> None:
    """Issue 14: compose runs the dashboard as a service on 127.0.0.1:15080 (here a free port)."""
    mesh = healthy_mesh
    everyone = {"artist-1", "artist-2", "image-1", "song-1"}
    health = _poll("the dashboard's /healthz", lambda: (True, _dashboard_json(mesh, "/healthz")), 60)
    assert health["ok"] is True and health["rounds"] >= 1, health

    def view(mode: str, reachable: bool) -> tuple[bool, Any]:
        v = _dashboard_json(mesh, "/api/view")["view"]
        return bool(v and {s["instance"] for s in v["sidecars"]} == everyone
                    and {s["mode"] for s in v["sidecars"]} == {mode}
                    and v["controlplane"]["reachable"] is reachable), v

    steady = _poll("every sidecar on the dashboard in controlplane mode", lambda: view("controlplane", True), 20)
    print(f"\n[dashboard] {steady['source']}: {sorted((s['instance'], s['mode']) for s in steady['sidecars'])}")
    assert steady["source"] == "sidecar admin at song:15000"
    assert steady["controlplane"]["address"] == "controlplane:15014"

    killed = time.monotonic()
    mesh.run("kill", "controlplane")
    outage = _poll("every sidecar on the dashboard in dns mode", lambda: view("dns", False), 10, 0.1)
    print(f"[dashboard] every sidecar dns on the dashboard {time.monotonic() - killed:.2f}s after "
          f"`kill controlplane` was issued")
    assert {s["reachable"] for s in outage["sidecars"]} == {True}
    assert _dashboard_json(mesh, "/healthz")["ok"] is True


def test_demo_failover_against_compose_kills_and_starts_the_container_without_a_failure(
    healthy_mesh: Mesh, tmp_path: Path
) -> None:
    """Issue 4: `sidemesh demo failover --compose` drives the drill against the containers."""
    result = compose_failover_drill(REPO / "docker-compose.yml", PROJECT, healthy_mesh.base_url + "/songs/{id}/details",
                                    healthy_mesh.env, tmp_path / "demo.json", timeout=120)
    instances = {sc["instance"] for sc in result["sidecars"]}
    assert instances == {"artist-1", "artist-2", "image-1", "song-1"}, instances


def test_demo_chaos_against_compose_applies_seeded_faults_without_a_failed_request(
    healthy_mesh: Mesh, tmp_path: Path
) -> None:
    """`sidemesh demo chaos --compose`: the same drill as locally, on the containers."""
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "sidemesh", "demo", "chaos", "--compose",
           "--compose-file", str(REPO / "docker-compose.yml"), "--project", PROJECT,
           "--url", healthy_mesh.base_url + "/songs/{id}/details", "--rate", "50",
           "--duration", "45", "--seed", "8", "--fault-rate", "8", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=healthy_mesh.env, cwd=REPO, timeout=240)
    print(proc.stdout[-4000:])
    assert out.exists(), f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    result = json.loads(out.read_text())
    print(f"[chaos --compose] {result['requests']} requests, {result['failures']} failed, "
          f"faults {[(f['kind'], f['recovered_s']) for f in result['faults']]}")
    assert result["failures"] == 0, result["errors"]
    assert result["step_errors"] == [], result["step_errors"]
    assert len(result["faults"]) >= 3 and result["mode_changes"] > 0, result["faults"]
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_injecting_a_fault_from_the_host_needs_the_admin_token(healthy_mesh: Mesh) -> None:
    """The host reaches the control plane through the bridge gateway: not loopback."""
    url = f"http://127.0.0.1:{healthy_mesh.controlplane_port}/faults"

    def post(headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(url, data=b'{"fault": "clear"}', method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = post({})
    print(f"[admin] without the token: {status} {body}")
    assert status == 403 and "token" in body["error"]
    assert post({"Authorization": "Bearer wrong"})[0] == 403
    status, body = post({"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200 and body == {"empty_snapshot": False, "dropped_services": []}
    with urllib.request.urlopen(url, timeout=5) as resp:  # reading stays open
        assert resp.status == 200


def test_down_leaves_nothing_running_and_a_second_up_works(mesh: Mesh) -> None:
    started = time.monotonic()
    mesh.down()
    down_took = time.monotonic() - started

    assert mesh.leftovers() == {"containers": [], "networks": []}

    started = time.monotonic()
    mesh.up()
    mesh.wait_until_serving()
    print(f"\n[down/up] down took {down_took:.1f}s; second up + ready took {time.monotonic() - started:.1f}s")
    status, doc, _ = mesh.details(1)
    assert status == 200, doc
