"""`sidemesh up` as a user runs it: one real mesh (module-scoped) steered by the real CLI.

The mesh gets its own /24 loopback subnet and its own published address, never
the defaults, so these tests run while a user's `sidemesh up` runs. The tests
share the mesh and run in file order: ready -> status -> scale -> kill under
load -> control plane kill/stop/start -> SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.mesh import Mesh, first_ok, running_mesh
from tests.support import REPO, loopback_address, loopback_subnet
from tests.mesh import get_json as _get_json

pytestmark = pytest.mark.timeout(120)

MESH_WITH_DASHBOARD = True  # the module mesh runs `sidemesh up` with its dashboard (tests/mesh.py)

READY_BUDGET_S = 5.0
LOAD_CLIENTS = 50
LOAD_SECONDS = 2.0
LOAD_CAP_S = 10.0
LOAD_MAX_PER_CLIENT = 400


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_up_is_ready_within_5s_and_serves_song_details(mesh: Mesh) -> None:
    print(f"\nsidemesh up ready in {mesh.ready_s:.2f} s")
    assert mesh.ready_s < READY_BUDGET_S
    doc = _get_json(mesh.url("/songs/1/details"))
    assert doc["song"]["id"] == 1
    assert doc["artist"]["served_by"] == "artist-1"
    assert doc["image"]["served_by"] == "image-1"
    assert doc["served_by"] == "song-1"
    assert "curl " + mesh.publish + "/songs/1/details" in mesh.proc.log()
    names = {p["name"]: p for p in mesh.pods()}
    # the dashboard starts once the mesh is ready (the next test checks it)
    assert set(names) == {"dns", "controlplane", "artist-1", "song-1", "image-1", "dashboard"}
    assert all(p["state"] == "running" and p["ready"] for n, p in names.items() if n != "dashboard")
    assert names["artist-1"]["app_pid"] and names["artist-1"]["sidecar_pid"]


def test_up_starts_the_dashboard_prints_its_url_and_it_answers_healthz_and_lists_every_sidecar(mesh: Mesh) -> None:
    url = f"http://{mesh.subnet}.1:15080/"  # tests.mesh gives every mesh its own dashboard address
    took = first_ok(url + "healthz", timeout=10)
    health = _get_json(url + "healthz")
    print(f"\ndashboard {url}: /healthz 200 {took:.2f} s after `mesh ready` was seen; {health}")
    mesh.wait_until("the dashboard's URL printed", lambda: f"\ndashboard: {url}\n" in mesh.proc.log(), timeout=2)
    assert health["ok"] is True and health["rounds"] >= 1
    assert _get_json(f"http://{mesh.control}/mesh")["dashboard"] == url
    mesh.wait_until("the dashboard unit ready", lambda: mesh.unit("dashboard")["ready"], timeout=5)
    unit = mesh.unit("dashboard")
    assert unit["kind"] == "dashboard" and unit["address"] == f"{mesh.subnet}.1" and unit["ports"] == {"http": 15080}
    assert _alive(unit["pid"])

    seen: list[Any] = []

    def steady() -> bool:
        # the page's data is a moment: its first rounds may predate the control plane's first answer
        seen.append(v := _get_json(url + "api/view")["view"])
        return bool(v and {s["instance"] for s in v["sidecars"]} == {"artist-1", "song-1", "image-1"}
                    and {s["mode"] for s in v["sidecars"]} == {"controlplane"} and v["controlplane"]["reachable"])

    took = mesh.wait_until("every sidecar on the dashboard, on the control plane", steady, timeout=5)
    print(f"the dashboard showed every sidecar on the reachable control plane {took:.2f} s later")
    assert seen[-1]["source"] == f"sidemesh up at {mesh.control}"
    with urllib.request.urlopen(url, timeout=2) as resp:  # the page itself
        assert resp.status == 200 and b"sidemesh" in resp.read()


def _inbound_count(pod: dict[str, Any]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{pod['address']}:{pod['ports']['admin']}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sidemesh_requests_total" and sample.labels["direction"] == "inbound":
                total += sample.value
    return total


def test_a_song_details_call_is_counted_inbound_by_each_of_the_three_sidecars(mesh: Mesh) -> None:
    """Issue 2 point 2: the request went through the mesh, and every sidecar agrees with the control plane."""
    pods = {p["name"]: p for p in mesh.running_pods()}
    before = {name: _inbound_count(p) for name, p in pods.items()}
    doc = _get_json(mesh.url("/songs/5/details"))
    assert doc["via"] == {"artist": "controlplane", "image": "controlplane"}
    after = {name: _inbound_count(p) for name, p in pods.items()}
    print(f"\ninbound requests counted: { {n: after[n] - before[n] for n in pods} }")
    assert {n: after[n] - before[n] for n in pods} == {"song-1": 1, "artist-1": 1, "image-1": 1}
    cp = _get_json(f"http://{mesh.subnet}.2:15014/status")
    acked = {s["node_id"]: s["acked_version"] for s in cp["sidecars"]}
    for name, p in pods.items():
        state = _get_json(f"http://{p['address']}:{p['ports']['admin']}/state")
        assert state["mode"] == "controlplane"
        assert state["route_version"] == acked[name] == cp["version"]


def _addresses(records: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    return {service: [pod["address"] for pod in pods] for service, pods in records.items()}


def test_dns_server_follows_the_running_pods_and_their_sidecars_inbound_ports(mesh: Mesh) -> None:
    mesh_info = _get_json(f"http://{mesh.control}/mesh")
    records = _get_json(f"http://{mesh_info['dns']['api']}/records")
    assert records == {service: [{"address": f"{mesh.subnet}.{n}1", "port": 15006, "instance": f"{service}-1"}]
                       for n, service in ((1, "artist"), (2, "song"), (3, "image"))}
    # and every sidecar asks for them when it falls back to DNS
    state = _get_json(f"http://{mesh.subnet}.21:15000/state")
    assert state["dns"]["srv"] == "_mesh-inbound._tcp.{service}.mesh.local"


def test_dns_server_gets_the_records_again_after_kill_and_start(mesh: Mesh) -> None:
    out = mesh.cli("kill", "dns")
    assert out.returncode == 0 and "killed dns" in out.stdout, out.stderr
    out = mesh.cli("start", "dns")
    assert out.returncode == 0 and "started dns" in out.stdout, out.stderr
    want = {"artist": [f"{mesh.subnet}.11"], "song": [f"{mesh.subnet}.21"], "image": [f"{mesh.subnet}.31"]}
    took = mesh.wait_until("records back in the restarted DNS server",
                           lambda: _addresses(_get_json(f"http://{mesh.subnet}.3:15054/records")) == want, timeout=2)
    print(f"\nstart dns: records back {took:.3f} s after the command returned")


def test_status_json_shows_every_sidecar_synced_on_the_control_plane_version(mesh: Mesh) -> None:
    def all_synced() -> bool:
        st = mesh.status()
        return st["controlplane"]["reachable"] and all(
            s["mode"] == "controlplane" and s["route_version"] == st["controlplane"]["version"] for s in st["sidecars"])

    mesh.wait_until("all sidecars on the control plane's version", all_synced, timeout=5)
    st = mesh.status()
    assert set(st["controlplane"]) >= {"address", "reachable", "version"}
    assert st["controlplane"]["address"] == f"{mesh.subnet}.2:15014"
    assert sorted(s["instance"] for s in st["sidecars"]) == ["artist-1", "image-1", "song-1"]
    for s in st["sidecars"]:
        assert set(s) >= {"service", "instance", "address", "mode", "route_version", "mode_since", "last_update_age_s"}
        assert s["acked"] == st["controlplane"]["version"]
    table = mesh.cli("status")
    assert table.returncode == 0 and "controlplane" in table.stdout and "s ago" in table.stdout, table.stdout


def test_ctl_errors_are_clear(mesh: Mesh) -> None:
    out = mesh.cli("kill", "artist-7")
    assert out.returncode == 1 and "unknown name 'artist-7'" in out.stderr
    nobody = f"{loopback_subnet()}.1:15100"
    out = mesh.cli("kill", "--control", nobody, "dns")
    assert out.returncode == 1
    assert f"no running `sidemesh up` at {nobody}; start one with `sidemesh up`" in out.stderr
    out = mesh.cli("scale", "artist=lots")
    assert out.returncode == 1 and "whole number" in out.stderr


def test_second_up_on_busy_addresses_says_so_and_exits_nonzero(mesh: Mesh) -> None:
    out = mesh.cli("up", "--subnet", mesh.subnet, "--publish", mesh.publish, "--control", mesh.control, timeout=20)
    assert out.returncode == 1
    assert "already in use" in out.stderr and mesh.control in out.stderr


async def _details_burst(url: str, n: int, concurrency: int) -> collections.Counter[str]:
    served: collections.Counter[str] = collections.Counter()
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async def one() -> None:
            async with sem, session.get(url) as resp:
                assert resp.status == 200, await resp.text()
                served[(await resp.json())["artist"]["served_by"]] += 1
        await asyncio.gather(*(one() for _ in range(n)))
    return served


def test_scale_artist_2_reaches_every_sidecar_within_1s_and_gets_half_the_calls(mesh: Mesh) -> None:
    t0 = time.monotonic()
    out = mesh.cli("scale", "artist=2")
    scale_s = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "started artist-2" in out.stdout

    def everyone_knows_artist_2() -> bool:
        for pod in mesh.running_pods():
            state = _get_json(f"http://{pod['address']}:15000/state", timeout=0.5)
            if "artist-2" not in {e["instance"] for e in state["services"]["artist"]["endpoints"]}:
                return False
        return True

    spread_s = mesh.wait_until("artist-2 in every sidecar's table", everyone_knows_artist_2, timeout=3)
    print(f"\nscale artist=2: command {scale_s:.2f} s ({out.stdout.strip()}); "
          f"in every sidecar's /state {spread_s:.3f} s after it returned")
    assert spread_s < 1.0
    served = asyncio.run(_details_burst(mesh.url("/songs/2/details"), 200, 10))
    print(f"artist calls over 200 details: {dict(served)}")
    assert set(served) == {"artist-1", "artist-2"}
    assert 60 <= served["artist-2"] <= 140
    records = _addresses(_get_json(f"http://{mesh.subnet}.3:15054/records"))
    assert records["artist"] == [f"{mesh.subnet}.11", f"{mesh.subnet}.12"]


async def _load_with_kill(mesh: Mesh, name: str) -> tuple[int, int, collections.Counter[str], float]:
    url = mesh.url("/songs/3/details")
    ok = 0
    failures: collections.Counter[str] = collections.Counter()
    t0 = time.monotonic()
    # load runs LOAD_SECONDS after the kill landed, never longer than LOAD_CAP_S in all
    deadline = t0 + LOAD_CAP_S
    env = {**os.environ, "SIDEMESH_CONTROL": mesh.control}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        for _ in range(LOAD_MAX_PER_CLIENT):
            if time.monotonic() > deadline:
                return
            try:
                async with session.get(url) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        ok += 1
                    else:
                        failures[f"{resp.status} {body[:120]!r}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1

    async def killer() -> float:
        await asyncio.sleep(1.0)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidemesh", "kill", name, env=env,
                                                    stdout=asyncio.subprocess.PIPE, cwd=REPO)
        out, _ = await proc.communicate()
        nonlocal deadline
        assert proc.returncode == 0 and f"killed {name}" in out.decode(), out
        deadline = min(deadline, time.monotonic() + LOAD_SECONDS)
        return time.monotonic() - t0

    connector = aiohttp.TCPConnector(limit=LOAD_CLIENTS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(client(session) for _ in range(LOAD_CLIENTS)))
        killed_at = await kill_task
    return ok, sum(failures.values()), failures, killed_at


def test_kill_artist_2_under_50_clients_fails_no_request(mesh: Mesh) -> None:
    ok, failed, failures, killed_at = asyncio.run(_load_with_kill(mesh, "artist-2"))
    print(f"\nkill artist-2 landed at {killed_at:.2f} s under {LOAD_CLIENTS} clients, load until "
          f"{LOAD_SECONDS:g} s after: {ok} ok, {failed} failed {dict(failures)}")
    assert ok > 100
    assert failed == 0
    pods = {p["name"]: p for p in mesh.pods()}
    assert pods["artist-2"]["state"] == "killed" and pods["artist-2"]["pids"] == []
    mesh.wait_until("DNS without artist-2",
                    lambda: _addresses(_get_json(f"http://{mesh.subnet}.3:15054/records"))["artist"]
                    == [f"{mesh.subnet}.11"],
                    timeout=2)


def test_status_works_with_the_control_plane_killed_and_start_brings_it_back(mesh: Mesh) -> None:
    out = mesh.cli("kill", "controlplane")
    assert out.returncode == 0 and "killed controlplane" in out.stdout, out.stderr
    t0 = time.monotonic()
    st = mesh.status()
    assert st["controlplane"]["reachable"] is False
    assert st["controlplane"]["address"] == f"{mesh.subnet}.2:15014"
    running = [s for s in st["sidecars"] if s["state"] == "running"]
    assert len(running) == 3 and all(s["reachable"] for s in running)
    dns_s = mesh.wait_until("every sidecar in dns mode",
                            lambda: all(s["mode"] == "dns" for s in mesh.status()["sidecars"] if s["reachable"]),
                            timeout=5, interval=0.1)
    print(f"\ncontrol plane killed: status answered in {time.monotonic() - t0:.2f} s; all sidecars dns "
          f"after {dns_s:.2f} s")
    assert _get_json(mesh.url("/songs/4/details"))["artist"]["served_by"] == "artist-1"
    assert "UNREACHABLE" in mesh.cli("status").stdout

    out = mesh.cli("start", "controlplane")
    assert out.returncode == 0 and "started controlplane" in out.stdout and "ready" in out.stdout, out.stdout
    back_s = mesh.wait_until(
        "every sidecar back on the control plane",
        lambda: (st := mesh.status())["controlplane"]["reachable"]
        and all(s["mode"] == "controlplane" for s in st["sidecars"] if s["reachable"]),
        timeout=8, interval=0.1)
    print(f"control plane started: all sidecars on it again {back_s:.2f} s later")


def test_stop_and_start_controlplane_by_name(mesh: Mesh) -> None:
    out = mesh.cli("stop", "controlplane")
    assert out.returncode == 0 and "stopped controlplane" in out.stdout, out.stderr
    cp = next(p for p in mesh.pods() if p["name"] == "controlplane")
    assert cp["state"] == "stopped" and cp["pid"] is None
    assert _get_json(mesh.url("/songs/5/details"))["song"]["id"] == 5
    out = mesh.cli("start", "controlplane")
    assert out.returncode == 0 and "started controlplane" in out.stdout
    cp = next(p for p in mesh.pods() if p["name"] == "controlplane")
    assert cp["state"] == "running" and _alive(cp["pid"])


def test_status_without_sidemesh_up_discovers_sidecars_from_one_sidecar_admin(mesh: Mesh) -> None:
    nobody = f"{loopback_subnet()}.1:15100"
    out = mesh.cli("status", "--json", "--control", nobody, "--admin", f"{mesh.subnet}.21:15000")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["controlplane"]["address"] == f"{mesh.subnet}.2:15014"
    assert st["controlplane"]["reachable"] is True
    found = {s["instance"]: s for s in st["sidecars"] if s["reachable"]}
    assert {"artist-1", "song-1", "image-1"} <= set(found)
    assert all(s["mode"] for s in found.values())


def test_a_process_that_dies_is_reported_not_restarted_and_start_brings_back_only_it(mesh: Mesh) -> None:
    pod = next(p for p in mesh.pods() if p["name"] == "image-1")
    os.kill(pod["app_pid"], signal.SIGKILL)
    mesh.wait_until("image-1 exited", lambda: next(p for p in mesh.pods() if p["name"] == "image-1")["state"]
                    == "exited", timeout=3)
    assert f"event=process_exited name=image-1 process=app pid={pod['app_pid']} code=-9" in mesh.proc.log()
    mesh.wait_until("DNS without image",
                    lambda: "image" not in _get_json(f"http://{mesh.subnet}.3:15054/records"), timeout=2)
    time.sleep(0.5)
    after = next(p for p in mesh.pods() if p["name"] == "image-1")
    assert after["state"] == "exited" and after["app_pid"] is None  # not restarted behind the user's back
    assert after["sidecar_pid"] == pod["sidecar_pid"]
    out = mesh.cli("start", "image-1")
    assert out.returncode == 0 and "started image-1" in out.stdout, out.stderr
    again = next(p for p in mesh.pods() if p["name"] == "image-1")
    assert again["state"] == "running" and again["sidecar_pid"] == pod["sidecar_pid"]
    assert again["app_pid"] not in (None, pod["app_pid"])
    assert _get_json(mesh.url("/songs/6/details"))["image"]["served_by"] == "image-1"


def test_fault_reaches_the_control_plane_found_through_sidemesh_up(mesh: Mesh) -> None:
    out = mesh.cli("fault", "controlplane", "drop-service", "image")
    assert out.returncode == 0 and "image" in out.stdout, out.stderr
    status = _get_json(f"http://{mesh.subnet}.2:15014/status")
    assert "image" in json.dumps(status["faults"])
    out = mesh.cli("fault", "controlplane", "clear")
    assert out.returncode == 0, out.stderr
    assert "image" not in json.dumps(_get_json(f"http://{mesh.subnet}.2:15014/status")["faults"])
    assert mesh.cli("fault", "controlplane", "drop-service").returncode == 2


def test_sigterm_to_up_stops_every_child_and_exits_0(mesh: Mesh) -> None:
    pids = [pid for p in mesh.pods() for pid in p["pids"]]
    assert len(pids) >= 7
    t0 = time.monotonic()
    mesh.proc.signal(signal.SIGTERM)
    code = mesh.proc.popen.wait(timeout=15)
    print(f"\nSIGTERM: `sidemesh up` exited {code} after {time.monotonic() - t0:.2f} s; children {pids}")
    assert code == 0
    assert [pid for pid in pids if _alive(pid)] == []


def test_a_taken_dashboard_port_is_a_warning_and_the_mesh_starts_and_serves_without_it() -> None:
    host = loopback_address()
    with socket.socket() as holder:
        holder.bind((host, 0))
        holder.listen()
        port = holder.getsockname()[1]
        with running_mesh("--dashboard", f"{host}:{port}") as other:
            log = other.proc.log()
            print(f"\nsidemesh up with its dashboard port taken: ready in {other.ready_s:.2f} s")
            assert (f"sidemesh up: warning: not starting the dashboard: {host}:{port}/tcp: already in use"
                    in log), log
            assert "dashboard: http://" not in log
            assert {p["name"] for p in other.pods()} == {"dns", "controlplane", "artist-1", "song-1", "image-1"}
            assert _get_json(f"http://{other.control}/mesh")["dashboard"] is None
            assert _get_json(other.url("/songs/2/details"))["song"]["id"] == 2
