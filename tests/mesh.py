"""A real `sidemesh up` mesh for integration tests, steered through its CLI and control API.

Each mesh gets its own loopback subnet and published address, never the defaults, so
tests run while a user's `sidemesh up` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import REPO, Proc, ProcessGroup, free_port, loopback_address, loopback_subnet


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class Mesh:
    proc: Proc
    subnet: str
    control: str
    publish: str
    ready_s: float
    logdir: Path

    def url(self, path: str) -> str:
        return f"http://{self.publish}{path}"

    def pods(self) -> list[dict[str, Any]]:
        return list(get_json(f"http://{self.control}/pods"))

    def running_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.pods() if p["kind"] == "pod" and p["state"] == "running"]

    def unit(self, name: str) -> dict[str, Any]:
        return next(p for p in self.pods() if p["name"] == name)

    def sidecar_states(self) -> dict[str, dict[str, Any]]:
        """instance -> /state of every running pod's sidecar."""
        out = {}
        for p in self.running_pods():
            out[p["name"]] = get_json(f"http://{p['address']}:{p['ports']['admin']}/state")
        return out

    def cli(self, *args: str, timeout: float = 40.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SIDEMESH_CONTROL": self.control}
        return subprocess.run([sys.executable, "-m", "sidemesh", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO)

    def ok(self, *args: str, timeout: float = 40.0) -> str:
        out = self.cli(*args, timeout=timeout)
        assert out.returncode == 0, f"sidemesh {' '.join(args)} failed: {out.stdout}\n{out.stderr}"
        return out.stdout

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.ok("status", "--json")))

    def wait_until(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 0.02) -> float:
        t0 = time.monotonic()
        while True:
            try:
                if check():
                    return time.monotonic() - t0
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{what} not within {timeout}s\n{self.proc.log()[-4000:]}")
            time.sleep(interval)

    def all_synced(self) -> bool:
        """Every sidecar in controlplane mode on the control plane's current version, ACKed."""
        st = self.status()
        version = st["controlplane"]["version"]
        return bool(
            version
            and st["sidecars"]
            and all(s["mode"] == "controlplane" and s["route_version"] == version and s.get("acked") == version
                    for s in st["sidecars"])
        )

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
        """GET through the published front door: (status, body, headers), errors included."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def put_records(self, records: dict[str, list[Any]]) -> None:
        """Replace the local DNS server's records (as `sidemesh up` does when pods come and go)."""
        api = get_json(f"http://{self.control}/mesh")["dns"]["api"]
        req = urllib.request.Request(f"http://{api}/records", data=json.dumps(records).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200

    def dump_logs(self) -> None:
        print(self.proc.log()[-5000:])
        for f in sorted(self.logdir.glob("*.log")):
            print(f"----- {f.name} -----\n{f.read_text(errors='replace')[-3000:]}")


def dashboard_args(subnet: str, extra: tuple[str, ...], dashboard: bool) -> tuple[str, ...]:
    """No dashboard unless the test asks for one (one more process polling every sidecar is load
    the timing tests need not carry); when asked, on the mesh's own address beside its control
    API, never the default 127.0.0.1:15080, which a user's `sidemesh up` may hold."""
    if any(a.startswith(("--dashboard", "--no-dashboard")) for a in extra):
        return ()
    return ("--dashboard", f"{subnet}.1:15080") if dashboard else ("--no-dashboard",)


@contextmanager
def running_mesh(*extra: str, dns_ttl: str = "1", dashboard: bool = False) -> Iterator[Mesh]:
    group = ProcessGroup()
    subnet = loopback_subnet()
    publish_host = loopback_address()
    publish = f"{publish_host}:{free_port(publish_host)}"
    control = f"{subnet}.1:15100"
    t0 = time.monotonic()
    proc = group.start("up", "up", "--subnet", subnet, "--publish", publish, "--control", control,
                       "--dns-ttl", dns_ttl, "--log-dir", str(group.logdir / "mesh"),
                       *dashboard_args(subnet, extra, dashboard), *extra)
    mesh = None
    try:
        deadline = t0 + 20
        ready_s = None
        while time.monotonic() < deadline and proc.alive:
            if "mesh ready in" in proc.log():
                ready_s = time.monotonic() - t0
                break
            time.sleep(0.02)
        assert ready_s is not None, f"sidemesh up never became ready:\n{proc.log()}"
        mesh = Mesh(proc, subnet, control, publish, ready_s, group.logdir / "mesh")
        yield mesh
    finally:
        group.close()


# ----- helpers for the zero-failure checks and the chaos drill (additions; the above is shared) -----


def post_json(url: str, body: dict[str, Any], timeout: float = 40.0) -> Any:
    """POST JSON and decode the JSON answer; urllib raises HTTPError on a non-2xx status."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def control(mesh: Mesh, verb: str, timeout: float = 40.0, **body: Any) -> Any:
    """A verb of the mesh's control API (kill/stop/start: name=...; scale: service=..., replicas=...),
    straight over HTTP: no `python -m sidemesh` start-up in the timing of a drill step."""
    return post_json(f"http://{mesh.control}/{verb}", body, timeout=timeout)


def first_ok(url: str, timeout: float, interval: float = 0.02) -> float:
    """Poll ``url`` until it answers 200; seconds it took. Errors before that are expected (nothing
    listens yet) and not counted; after ``timeout`` an AssertionError names the last one."""
    t0 = time.monotonic()
    last: object = None
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
                last = resp.status
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{url} never answered 200 within {timeout}s (last: {last})")


def restore_steady(mesh: Mesh, *, artists: int = 1, timeout: float = 20.0) -> None:
    """Every unit running, artist at ``artists`` replicas, every sidecar synced: the mesh as a fresh
    `sidemesh up` leaves it, for the next test of a module that shares one mesh."""
    for p in mesh.pods():
        if p["kind"] in ("controlplane", "dns") and p["state"] != "running":
            control(mesh, "start", name=p["name"])
    for p in mesh.pods():
        if p["kind"] == "pod" and p["state"] != "running":
            control(mesh, "start", name=p["name"])
    control(mesh, "scale", service="artist", replicas=artists)
    mesh.wait_until("every sidecar synced", mesh.all_synced, timeout=timeout)


@contextmanager
def booting_mesh(*extra: str, dns_ttl: str = "1", dashboard: bool = False) -> Iterator[Mesh]:
    """A fresh `sidemesh up`, handed over the moment its process is spawned: nothing answers yet and
    nobody waited for "mesh ready", so a test sees the mesh converge. ``ready_s`` is NaN."""
    group = ProcessGroup()
    subnet = loopback_subnet()
    publish_host = loopback_address()
    publish = f"{publish_host}:{free_port(publish_host)}"
    control_addr = f"{subnet}.1:15100"
    proc = group.start("up", "up", "--subnet", subnet, "--publish", publish, "--control", control_addr,
                       "--dns-ttl", dns_ttl, "--log-dir", str(group.logdir / "mesh"),
                       *dashboard_args(subnet, extra, dashboard), *extra)
    try:
        yield Mesh(proc, subnet, control_addr, publish, float("nan"), group.logdir / "mesh")
    finally:
        group.close()
