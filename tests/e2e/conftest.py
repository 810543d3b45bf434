"""The compose deployment as a pytest fixture: build, ``up``, wait, always ``down -v``.

The session fixture ``mesh`` runs ``scripts/offline-build`` (which starts dockerd when none
runs and builds the image with no registry), then ``docker compose -p sidemesh-e2e up -d``
with song's front door on a free loopback port, and waits until every sidecar routes from
the control plane and song-details answers 200. Whatever happens, the project is taken
down with ``down -v`` at the end of the session. When Docker cannot be brought up the
tests FAIL with the reason (issue 4: in CI a missing engine must never pass as a skip).

Everything the tests poll inside the deployment (each sidecar's ``/state`` on :15000) is
asked from inside the song pod with ``docker exec``, over the compose network; from the
host the tests only talk to the published 127.0.0.1 ports.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
PROJECT = "sidemesh-e2e"
IMAGE = os.environ.get("SIDEMESH_IMAGE", "sidemesh:latest")
# the control plane's admin token for this run (POST /faults from the host needs it)
ADMIN_TOKEN = secrets.token_urlsafe(16)
BUILD_TIMEOUT_S = 900.0
UP_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 60.0

# compose service of each sidecar -> the DNS name its admin port answers on, seen from the song pod
SIDECARS: dict[str, str] = {
    "song-sidecar": "127.0.0.1",
    "artist-1-sidecar": "artist-1",
    "artist-2-sidecar": "artist-2",
    "image-sidecar": "image",
}
# which app container holds each sidecar's network namespace
POD_OF: dict[str, str] = {
    "song-sidecar": "song",
    "artist-1-sidecar": "artist-1",
    "artist-2-sidecar": "artist-2",
    "image-sidecar": "image",
}

# Run inside the song pod: fetch /state of the given sidecars in parallel, print one JSON object.
_STATES_SCRIPT = r"""
import json, sys, urllib.request as u
from concurrent.futures import ThreadPoolExecutor
opener = u.build_opener(u.ProxyHandler({}))
targets = json.loads(sys.argv[1])
def get(item):
    name, host = item
    try:
        with opener.open("http://%s:15000/state" % host, timeout=1.5) as resp:
            return name, json.load(resp)
    except Exception as exc:
        return name, {"error": repr(exc)}
with ThreadPoolExecutor(len(targets) or 1) as pool:
    print(json.dumps(dict(pool.map(get, targets.items()))))
"""


def compose_command() -> list[str]:
    """``docker compose`` (v2) when the plugin exists, else Debian's ``docker-compose`` 1.29."""
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30
    ).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed "
                "(apt-get install -y docker-compose, or scripts/docker-engine installs it)")


def parse_docker_time(text: str) -> float:
    """Docker's RFC 3339 time with nanoseconds ('2026-11-24T14:40:25.123456789Z') -> unix time."""
    date, _, frac = text.rstrip("Z").partition(".")
    whole = datetime.strptime(date, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return whole + (float("0." + frac) if frac else 0.0)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Mesh:
    """Handle on the running compose project: compose commands, exec, state, HTTP front door."""

    compose: list[str]
    port: int
    controlplane_port: int
    dashboard_port: int
    env: dict[str, str]
    _ids: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The compose service ``dashboard``, published on the host's loopback."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def run(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker compose -p sidemesh-e2e ARGS``; raises with its output when it fails."""
        cmd = [*self.compose, "-p", PROJECT, "-f", str(REPO / "docker-compose.yml"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}")
        return proc

    def container_id(self, service: str) -> str:
        """The container of a service (cached; compose recreates them only on ``up`` after ``down``)."""
        if service not in self._ids:
            out = self.run("ps", "-q", service).stdout.strip()
            if not out:
                raise AssertionError(f"compose service {service} has no container")
            self._ids[service] = out.splitlines()[0]
        return self._ids[service]

    def forget_containers(self) -> None:
        self._ids.clear()

    def exec_python(self, service: str, code: str, *args: str, timeout: float = 20.0) -> str:
        """Run ``python3 -c CODE ARGS`` in a service's container (plain ``docker exec``: fast)."""
        cmd = ["docker", "exec", "-i", self.container_id(service), "python3", "-c", code, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"python3 in {service} exited {proc.returncode}: {_tail(proc.stderr)}")
        return proc.stdout

    def sidecar_states(self, sidecars: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Each sidecar's ``/state`` (or ``{"error": ...}``), fetched from inside the song pod."""
        names = list(SIDECARS) if sidecars is None else sidecars
        targets = {name: SIDECARS[name] for name in names}
        return json.loads(self.exec_python("song", _STATES_SCRIPT, json.dumps(targets)))

    def modes(self, sidecars: list[str] | None = None) -> dict[str, str]:
        """Each sidecar's mode, or ``unreachable`` when its admin did not answer."""
        return {name: state.get("mode", "unreachable") for name, state in self.sidecar_states(sidecars).items()}

    def wait_for_modes(self, mode: str, timeout: float, sidecars: list[str] | None = None) -> tuple[float, dict[str, str]]:
        """Poll until every sidecar is in ``mode``; returns (time it took, last modes)."""
        start = time.monotonic()
        modes: dict[str, str] = {}
        while True:
            try:
                modes = self.modes(sidecars)
            except AssertionError as exc:  # the song pod itself is restarting: retry
                modes = {"song-pod": f"exec failed: {exc}"}
            if modes and all(m == mode for m in modes.values()):
                return time.monotonic() - start, modes
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not every sidecar reached mode={mode} within {timeout:.1f}s: {modes}")
            time.sleep(0.1)

    def details(self, song_id: int = 1, timeout: float = 5.0) -> tuple[int, dict[str, Any], dict[str, str]]:
        """GET /songs/ID/details through song's sidecar; (status, JSON body, headers)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.base_url}/songs/{song_id}/details", timeout=timeout) as resp:
                return resp.status, json.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                doc = json.loads(body)
            except ValueError:
                doc = {"raw": body.decode(errors="replace")}
            return exc.code, doc, dict(exc.headers)

    def logs(self, tail: int = 80) -> str:
        """``ps -a`` and the last lines of every container's log, for failure reports."""
        ps = self.run("ps", "-a", check=False, timeout=60)
        proc = self.run("logs", "--no-color", f"--tail={tail}", check=False, timeout=60)
        return ps.stdout + ps.stderr + proc.stdout + proc.stderr

    def container_time(self, service: str, key: str) -> float:
        """``State.StartedAt`` / ``State.FinishedAt`` of a service's container as a unix time.

        The moment docker says the control plane died (or started) is what the sidecars'
        switch times are measured from, not when a slow ``docker-compose`` CLI returned.
        """
        proc = subprocess.run(["docker", "inspect", "-f", "{{.State.%s}}" % key, self.container_id(service)],
                              capture_output=True, text=True, timeout=30, check=True)
        return parse_docker_time(proc.stdout.strip())

    def up(self) -> None:
        self.forget_containers()
        self.run("up", "-d", timeout=UP_TIMEOUT_S)

    def down(self) -> None:
        self.forget_containers()
        self.run("down", "-v", "--remove-orphans", "--timeout", "5", timeout=120, check=False)

    def wait_until_serving(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Every sidecar on the control plane and song-details 200; returns seconds it took."""
        start = time.monotonic()
        self.wait_for_modes("controlplane", timeout)
        last: object = None
        while time.monotonic() - start < timeout:
            try:
                status, doc, _ = self.details()
                if status == 200:
                    return time.monotonic() - start
                last = (status, doc)
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"song-details did not answer 200 within {timeout}s (last: {last})")

    def leftovers(self) -> dict[str, list[str]]:
        """Containers and networks of the project that still exist (should be none after down)."""
        label = f"label=com.docker.compose.project={PROJECT}"
        containers = subprocess.run(["docker", "ps", "-a", "-q", "--filter", label],
                                    capture_output=True, text=True, timeout=30).stdout.split()
        networks = subprocess.run(["docker", "network", "ls", "-q", "--filter", label],
                                  capture_output=True, text=True, timeout=30).stdout.split()
        return {"containers": containers, "networks": networks}


def _build_image() -> None:
    """scripts/offline-build, or FAIL saying why Docker could not be brought up."""
    script = REPO / "scripts" / "offline-build"
    started = time.monotonic()
    try:
        proc = subprocess.run([str(script), "--image", IMAGE], capture_output=True, text=True,
                              cwd=REPO, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/offline-build did not finish within {BUILD_TIMEOUT_S:.0f}s")
    except OSError as exc:
        pytest.fail(f"cannot run scripts/offline-build: {exc}")
    if proc.returncode != 0:
        pytest.fail("Docker could not be brought up or the sidemesh image could not be built "
                    f"(scripts/offline-build exited {proc.returncode}):\n{_tail(proc.stderr)}\n{_tail(proc.stdout)}")
    print(f"\noffline-build took {time.monotonic() - started:.1f}s\n{_tail(proc.stderr, 8)}")


@pytest.fixture(scope="session")
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """The compose deployment, built and up, every sidecar on the control plane."""
    _build_image()
    compose = compose_command()
    port, cp_port, dash_port = free_port(), free_port(), free_port()
    env = {**os.environ, "SIDEMESH_PORT": str(port), "SIDEMESH_CONTROLPLANE_HTTP_PORT": str(cp_port),
           "SIDEMESH_DASHBOARD_PORT": str(dash_port), "SIDEMESH_IMAGE": IMAGE, "SIDEMESH_ADMIN_TOKEN": ADMIN_TOKEN}
    mesh = Mesh(compose, port, cp_port, dash_port, env)
    mesh.down()  # a project left over by an interrupted earlier run
    failures_before = request.session.testsfailed
    try:
        started = time.monotonic()
        mesh.up()
        took = mesh.wait_until_serving()
        print(f"\ncompose up + ready took {time.monotonic() - started:.1f}s (ready {took:.1f}s after up returned)")
        yield mesh
    except BaseException:
        print(f"----- compose logs -----\n{mesh.logs()}")
        raise
    finally:
        if request.session.testsfailed > failures_before:
            print(f"----- compose logs (a test failed) -----\n{mesh.logs(200)}")
        mesh.down()
        left = mesh.leftovers()
        if left["containers"] or left["networks"]:
            print(f"WARNING: after down -v the project still has {left}")


@pytest.fixture
def healthy_mesh(mesh: Mesh) -> Mesh:
    """The mesh as a test expects to find it: every pod running, every sidecar on the control plane."""
    mesh.run("start", "controlplane", "artist-2", "artist-2-sidecar")
    try:
        mesh.wait_until_serving()
    except AssertionError:
        print(f"----- the mesh did not come back healthy -----\n{mesh.logs()}")
        raise
    return mesh


def compose_failover_drill(compose_file: Path, project: str, url: str, env: dict[str, str], out: Path,
                           *, timeout: float) -> dict[str, Any]:
    """`sidemesh demo failover --compose` against a compose project: 50 req/s, the control-plane
    container killed at 4 s and started at 8 s. Checks what every such drill must show (exit 0, no
    failed request, load in every phase, every sidecar to dns after the kill); returns its JSON result."""
    cmd = [sys.executable, "-m", "sidemesh", "demo", "failover", "--compose", "--compose-file", str(compose_file),
           "--project", project, "--url", url, "--rate", "50",
           "--duration", "14", "--kill-at", "4", "--start-at", "8", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    print(proc.stdout[-2500:])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["failures"] == 0
    assert all(result["phases"][p]["requests"] >= 150 for p in ("before", "outage", "after")), result["phases"]
    assert all(sc["to_dns_after_kill_s"] is not None for sc in result["sidecars"]), result["sidecars"]
    return result
