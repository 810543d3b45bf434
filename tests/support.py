"""Shared helpers for tests that run real processes on real sockets.

Every test that starts servers gets its own loopback addresses (127.x.y.z) so
the mesh's fixed ports (15000/15001/15006/15010/15014/8080) never clash between
tests, and every process it starts is stopped (and its log printed when the
test failed) by ``ProcessGroup.close()``.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_counter = itertools.count(1)
# a /16 per pytest process so parallel runs do not collide
_NET = 100 + (os.getpid() % 100)


def loopback_subnet() -> str:
    """A fresh '127.A.B' prefix; a pod is then f'{prefix}.{n}'."""
    n = next(_counter)
    return f"127.{_NET}.{n % 250 + 1}"


def loopback_address() -> str:
    """A fresh 127.x.y.z address nobody else in this test run uses."""
    return f"{loopback_subnet()}.1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
            time.sleep(0.05)


def wait_for_http(url: str, timeout: float = 10.0, status: int = 200) -> bytes:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == status:
                    return resp.read()
                last = resp.status
        except Exception as exc:  # noqa: BLE001 - we retry until the deadline
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class ProcessGroup:
    """Starts ``python -m sidemesh ...`` processes and cleans them all up."""

    procs: list[Proc] = field(default_factory=list)
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sidemesh-test-")))

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log_path = self.logdir / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "sidemesh", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=REPO,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.log()}" for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.signal(signal.SIGKILL)
                p.popen.wait(timeout=5)


def jitter_sleep(a: float, b: float) -> None:
    time.sleep(random.uniform(a, b))
