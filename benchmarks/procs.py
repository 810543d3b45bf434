"""Child processes of a benchmark run and what /proc says about them.

Every server a benchmark starts (nginx, Envoy, sidecars, control plane) and
every load tool runs through one ``Children`` set: each child gets its own
session (so a signal reaches the whole child tree), its output goes to a log
file in the run's temp dir, and leaving the ``with`` block -- normally, by an
exception, by Ctrl-C or SIGTERM (see ``exit_on_sigterm``) -- stops them all:
SIGTERM, a short grace period, then SIGKILL.

CPU and memory come from /proc: ``utime + stime`` of /proc/PID/stat (all threads,
so Envoy's worker and main threads count) summed over the process and its
descendants, ``VmRSS``/``VmHWM`` of /proc/PID/status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE_S = 5.0


class BenchError(RuntimeError):
    """A benchmark step failed (a server did not start, a load tool failed...)."""


@dataclass
class Child:
    """One started process and its log file."""

    name: str
    popen: subprocess.Popen[Any]  # bytes, or text with pipe=True
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Children:
    """The processes of one benchmark run; all stopped on ``close()``."""

    logdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None, pipe: bool = False) -> Child:
        """Start ``argv`` in its own session, output to ``logdir/name.log``.

        With ``pipe`` its stdin and stdout are pipes (text, line-buffered) and
        only stderr goes to the log.
        """
        log_path = self.logdir / f"{name}.log"
        with open(log_path, "wb") as log:
            try:
                popen = subprocess.Popen(
                    list(argv), stdout=subprocess.PIPE if pipe else log,
                    stderr=log if pipe else subprocess.STDOUT,
                    stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
                    env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
                    text=pipe or None, bufsize=1 if pipe else -1,
                )
            except OSError as exc:
                raise BenchError(f"cannot start {name}: {argv[0]}: {exc}") from exc
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def run(self, name: str, argv: Sequence[str], *, timeout: float) -> str:
        """Run a load tool to completion (bounded by ``timeout``) and return its output."""
        child = self.start(name, argv)
        try:
            code = child.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            stop(child)
            raise BenchError(f"{name} did not finish within {timeout:.0f}s") from exc
        finally:
            if child in self.children and not child.alive:
                self.children.remove(child)
        output = child.log_path.read_text(errors="replace")
        if code != 0:
            raise BenchError(f"{name} exited {code}: {' '.join(argv)}\n{output[-2000:]}")
        return output

    def stop(self, child: Child) -> None:
        """Stop one child now (SIGTERM, then SIGKILL after the grace period)."""
        stop(child)
        if child in self.children:
            self.children.remove(child)

    def close(self) -> None:
        """Stop every child still running, the most recently started first."""
        for child in reversed(self.children):
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            try:
                child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.popen.wait(timeout=STOP_GRACE_S)
        self.children.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def stop(child: Child) -> None:
    """SIGTERM the child's session, SIGKILL it if it is still there after the grace period."""
    _signal_group(child, signal.SIGTERM)
    try:
        child.popen.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(child, signal.SIGKILL)
        child.popen.wait(timeout=STOP_GRACE_S)


def _signal_group(child: Child, sig: int) -> None:
    # the child leads its own session, so its pgid is its pid; a child that
    # forked workers (nginx, SO_REUSEPORT sidecars) takes them down with it
    try:
        os.killpg(child.pid, sig)
    except (ProcessLookupError, PermissionError):
        if child.alive:
            child.popen.send_signal(sig)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit and SIGINT into KeyboardInterrupt, so that
    ``with Children(...)`` blocks clean up (SIGINT too when the benchmark was
    started in the background by a shell, which leaves it ignored)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        print(f"signal {signum}: stopping every child process", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------- /proc


def run_main(main: Callable[[], int]) -> None:
    """``sys.exit(main())``, with Ctrl-C reported as exit 130 (the with-blocks have stopped every child by then)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (one scan of /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, []))
    return found


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/PID/stat."""
    # comm (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) of ``pid`` and its descendants."""
    ticks = 0
    for p in descendants(pid):
        try:
            ticks += parse_stat_cpu_ticks(Path(f"/proc/{p}/stat").read_text())
        except OSError:
            continue
    return ticks / CLOCK_TICKS


def parse_status_kb(status: str, key: str) -> int:
    """The value in kB of ``key`` (``VmRSS``, ``VmHWM``) in /proc/PID/status text."""
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc status")


def memory_mb(pid: int, key: str = "VmRSS") -> float:
    """``key`` of /proc/PID/status in MiB, summed over ``pid`` and its descendants."""
    total = 0
    for p in descendants(pid):
        try:
            total += parse_status_kb(Path(f"/proc/{p}/status").read_text(), key)
        except (OSError, BenchError):
            continue
    return total / 1024


# ---------------------------------------------------------------- sockets


def port_is_free(host: str, port: int) -> bool:
    """True when ``host:port`` can be bound right now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout: float, child: Child | None = None) -> None:
    """Wait until something accepts on ``host:port``; fail early if ``child`` died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if child is not None and not child.alive:
            raise BenchError(f"{child.name} exited {child.popen.returncode}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.05)


def http_get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    """A blocking GET (the benchmark driver is synchronous); returns status and body."""
    # no proxy from the environment: everything here is loopback
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
