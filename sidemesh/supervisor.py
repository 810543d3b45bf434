"""The process supervisor behind ``sidemesh up``: starts, signals and watches real processes.

Theory of operation: every unit (control plane, DNS server, pod = app + sidecar,
dashboard) is a set of ``python -m sidemesh ...`` child processes in their own session (so a
Ctrl-C in the terminal reaches only us, and we stop them in order), each writing
to its own log file. A watcher task per process notices exits; an exit we did not
ask for is reported (``event=process_exited``) and never restarted, because in a
drill the user kills things on purpose. All actions (kill, stop, start, scale)
run one at a time under a lock. The DNS server's records follow the pods that are
running and ready: every change marks them dirty and one task PUTs them, retrying
while the DNS server is up but not answering yet (e.g. right after ``start dns``).

What to run and where comes from ``sidemesh.layout`` (pure); this module only does I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp


from sidemesh.localissuer import LocalIssuer
from sidemesh.layout import (
    ADMIN_PORT,
    CP_HTTP_PORT,
    DNS_API_PORT,
    DnsRecords,
    HostPort,
    LayoutError,
    MeshLayout,
    UnitSpec,
    check_replicas,
    dns_records,
    http_url,
    plan_scale,
    record_addresses,
    records_text,
    resolve_target,
)

log = logging.getLogger("sidemesh.up")

STOP_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 15.0
POLL_S = 0.05
RECORDS_RETRY_S = 0.1
DNS_WITHDRAW_TIMEOUT_S = 2.0
_PR_SET_PDEATHSIG = 1
# proxies in the user's environment must not reach our children: grpc honours http_proxy
_DROP_ENV = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Children get SIGTERM if the supervisor itself dies (e.g. SIGKILLed), so nothing is orphaned."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _DROP_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Running:
    """One child process and whether its exit was asked for."""

    role: str
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    expected_exit: bool = False
    watcher: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass
class Unit:
    """A unit and its live state: running | stopped | killed | exited; ready once it answers."""

    spec: UnitSpec
    state: str = "stopped"
    ready: bool = False
    started_at: float | None = None
    procs: dict[str, Running] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        s = self.spec
        pids = {r: p.pid for r, p in self.procs.items() if p.alive}
        main_pid = pids.get("sidecar", pids.get("main"))
        return {
            "name": s.name, "kind": s.kind, "service": s.service, "replica": s.replica,
            "address": s.address, "ports": dict(s.ports), "state": self.state, "ready": self.ready,
            "pid": main_pid, "app_pid": pids.get("app"), "sidecar_pid": pids.get("sidecar"),
            "pids": sorted(pids.values()),
            "logs": {r: str(p.log_path) for r, p in self.procs.items()},
        }


class ActionError(Exception):
    """A steering request that cannot be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Supervisor:
    """Runs the units of a MeshLayout and carries out kill/stop/start/scale on them."""

    def __init__(
        self,
        layout: MeshLayout,
        log_dir: Path,
        *,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        stop_timeout: float = STOP_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.log_dir = log_dir
        self._python = python
        self._env = child_env(env)
        self._stop_timeout = stop_timeout
        self._clock = clock
        self.units: dict[str, Unit] = {}
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._records_task: asyncio.Task[None] | None = None
        self._closing = False
        self._pushed: tuple[int | None, str] | None = None
        self._pushed_records: DnsRecords = {}
        self._issuer = None if layout.insecure else LocalIssuer(layout, clock=clock)

    # ---- lifecycle -------------------------------------------------------

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=1.0, connect=0.5)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._records_task = asyncio.create_task(self._records_loop(), name="dns-records")

    async def start_all(self, specs: Iterable[UnitSpec]) -> None:
        """Start these units at once (readiness is awaited separately with ``wait_ready``)."""
        async with self._lock:
            units = [Unit(spec) for spec in specs]
            for u in units:
                self.units[u.spec.name] = u
            await asyncio.gather(*(self._spawn(u) for u in units))

    async def wait_ready(self, names: Iterable[str] | None = None, timeout: float = READY_TIMEOUT_S) -> dict[str, float | None]:
        """Poll until the named units answer; returns name -> seconds it took (None if never)."""
        units = [self.units[n] for n in (names if names is not None else list(self.units))]
        t0 = self._clock()
        results = await asyncio.gather(*(self._await_ready(u, t0 + timeout) for u in units))
        self._dirty.set()
        await self._await_converged(t0 + timeout)
        return {u.spec.name: (None if r is None else r - t0) for u, r in zip(units, results, strict=True)}

    async def close(self) -> None:
        """Stop everything: SIGTERM, wait, SIGKILL stragglers; then drop the HTTP session."""
        self._closing = True
        async with self._lock:
            # pods first, so sidecars leave while the control plane still hears them (and do not
            # fail over to DNS on the way out); then the control plane and the DNS server. The
            # dashboard, which only reads, goes with the pods.
            for kinds in (("pod", "dashboard"), ("controlplane", "dns")):
                await asyncio.gather(*(self._signal_unit(u, signal.SIGTERM, "stopped")
                                       for u in self.units.values() if u.spec.kind in kinds))
        if self._issuer is not None:
            await self._issuer.close()
        if self._records_task is not None:
            self._records_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._records_task
        if self._session is not None:
            await self._session.close()

    def child_pids(self) -> list[int]:
        return [p.pid for u in self.units.values() for p in u.procs.values() if p.alive and p.pid]

    # ---- steering (the control API calls these) ---------------------------

    def describe(self) -> list[dict[str, Any]]:
        return [u.describe() for u in self.units.values()]

    async def kill(self, name: str) -> list[dict[str, Any]]:
        """SIGKILL every process of NAME (like ``docker compose kill``)."""
        return await self._act(name, lambda u: self._signal_unit(u, signal.SIGKILL, "killed"))

    async def stop(self, name: str) -> list[dict[str, Any]]:
        """SIGTERM every process of NAME, wait, SIGKILL what is left."""
        return await self._act(name, lambda u: self._signal_unit(u, signal.SIGTERM, "stopped"))

    async def start(self, name: str) -> list[dict[str, Any]]:
        """Start again whatever of NAME is not running, same address and arguments; wait till ready."""

        async def start_one(u: Unit) -> None:
            await self._spawn(u)
            await self._await_ready(u, self._clock() + READY_TIMEOUT_S)

        done = await self._act(name, start_one)
        await self._await_converged(self._clock() + READY_TIMEOUT_S)
        return done

    async def scale(self, service: str, replicas: object) -> dict[str, Any]:
        """Run replicas 1..N of SERVICE; stop and remove those above N. Waits for new pods to be ready."""
        try:
            n = check_replicas(service, replicas, max_replicas=self.layout.max_replicas)
            self.layout.pod_address(service, 1)
        except LayoutError as exc:
            raise ActionError(str(exc)) from exc
        async with self._lock:
            states = {u.spec.replica: u.state for u in self._pods(service) if u.spec.replica}
            plan = plan_scale(states, n)
            units = []
            for r in plan.start:
                name = f"{service}-{r}"
                if name not in self.units:
                    self.units[name] = Unit(self.layout.pod(service, r))
                units.append(self.units[name])
            removed = [self.units[f"{service}-{r}"] for r in plan.remove]
            for u in removed:
                u.ready = False
            self._dirty.set()
            t0 = self._clock()
            await asyncio.gather(*(self._signal_unit(u, signal.SIGTERM, "stopped") for u in removed),
                                 *(self._spawn(u) for u in units))
            for u in removed:
                del self.units[u.spec.name]
            ready = await asyncio.gather(*(self._await_ready(u, t0 + READY_TIMEOUT_S) for u in units))
            self._dirty.set()
            await self._await_converged(t0 + READY_TIMEOUT_S)
        return {
            "service": service, "replicas": n,
            "started": [u.spec.name for u in units], "removed": [u.spec.name for u in removed],
            "ready_s": {u.spec.name: (None if r is None else round(r - t0, 3)) for u, r in zip(units, ready, strict=True)},
            "pods": [u.describe() for u in self._pods(service)],
        }

    async def _act(self, name: str, action: Callable[[Unit], Any]) -> list[dict[str, Any]]:
        async with self._lock:
            try:
                specs = resolve_target(name, (u.spec for u in self.units.values()), services=self.layout.mesh.names)
            except LayoutError as exc:
                raise ActionError(str(exc), status=404) from exc
            units = [self.units[s.name] for s in specs]
            before = {u.spec.name: (u.state, [p.pid for p in u.procs.values() if p.alive]) for u in units}
            await asyncio.gather(*(action(u) for u in units))
            self._dirty.set()
        return [{**u.describe(), "before": before[u.spec.name][0], "before_pids": before[u.spec.name][1],
                 "changed": before[u.spec.name][0] != u.state} for u in units]

    def _pods(self, service: str) -> list[Unit]:
        return sorted((u for u in self.units.values() if u.spec.service == service), key=lambda u: u.spec.replica or 0)

    # ---- processes -------------------------------------------------------

    async def _spawn(self, unit: Unit) -> None:
        for pspec in unit.spec.processes:
            running = unit.procs.get(pspec.role)
            if running is not None and running.alive:
                continue
            suffix = "" if pspec.role == "main" else f"-{pspec.role}"
            path = self.log_dir / f"{unit.spec.name}{suffix}.log"
            logfile = await asyncio.to_thread(open, path, "ab")
            command = (self._python, "-m", "sidemesh") if pspec.program is None else (pspec.program,)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command, *pspec.args,
                    stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                    env={**self._env, **pspec.env}, cwd=pspec.cwd, start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                # a mesh file's program that is not there (or not executable): the unit is down,
                # `up` goes on with the others, and the log says why
                log.warning("event=spawn_failed name=%s process=%s program=%s error=%r",
                            unit.spec.name, pspec.role, command[0], exc.strerror or str(exc))
                logfile.write(f"sidemesh up: cannot run {command[0]!r}: {exc.strerror or exc}\n".encode())
                unit.state = "exited"
                unit.ready = False
                self._dirty.set()
                return
            finally:
                logfile.close()
            running = Running(pspec.role, path, proc)
            running.watcher = asyncio.create_task(self._watch(unit, running), name=f"watch-{unit.spec.name}-{pspec.role}")
            unit.procs[pspec.role] = running
        unit.state = "running"
        unit.started_at = self._clock()
        if unit.spec.kind == "pod" and unit.spec.service and self._issuer is not None:
            self._issuer.watch(unit.spec.name, unit.spec.service, lambda: unit.state == "running")
        pids = " ".join(f"{r}={p.pid}" for r, p in unit.procs.items())
        log.info("event=started name=%s address=%s %s", unit.spec.name, unit.spec.address, pids)

    async def _watch(self, unit: Unit, running: Running) -> None:
        assert running.proc is not None
        code = await running.proc.wait()
        if running.expected_exit or self._closing:
            return
        log.warning("event=process_exited name=%s process=%s pid=%s code=%s log=%s",
                    unit.spec.name, running.role, running.pid, code, running.log_path)
        if unit.procs.get(running.role) is running and unit.state == "running":
            unit.state = "exited"
            unit.ready = False
            self._dirty.set()

    async def _signal_unit(self, unit: Unit, sig: int, state: str) -> None:
        alive = [p for p in unit.procs.values() if p.alive]
        if not alive and unit.state != "running":
            return  # already down: keep how it went down (killed/stopped/exited)
        unit.ready = False
        self._dirty.set()
        if sig == signal.SIGTERM and unit.spec.kind == "pod":
            # a pod leaves without failing a call: out of DNS first, then its sidecar (which
            # leaves the control plane and drains), and its app only once nothing routes to it
            await self._await_dns_withdrawn(unit)
            order = [[p for p in alive if p.role == "sidecar"], [p for p in alive if p.role != "sidecar"]]
        else:
            order = [alive]
        unit.state = state
        for group in order:
            await self._signal_and_wait(unit, group, sig)
        codes = " ".join(f"{p.role}={p.proc.returncode}" for p in alive if p.proc is not None)
        log.info("event=%s name=%s %s", state, unit.spec.name, codes)

    async def _signal_and_wait(self, unit: Unit, procs: list[Running], sig: int) -> None:
        for p in procs:
            p.expected_exit = True
            with contextlib.suppress(ProcessLookupError):
                assert p.proc is not None
                p.proc.send_signal(sig)
        waits = [p.proc.wait() for p in procs if p.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout=self._stop_timeout)
        except TimeoutError:
            for p in procs:
                if p.alive and p.proc is not None:
                    log.warning("event=kill_straggler name=%s process=%s pid=%s", unit.spec.name, p.role, p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        p.proc.kill()
            await asyncio.gather(*(p.proc.wait() for p in procs if p.proc is not None))

    async def _await_dns_withdrawn(self, unit: Unit) -> None:
        """Wait (bounded) until the DNS server no longer answers with this pod's address."""
        deadline = self._clock() + DNS_WITHDRAW_TIMEOUT_S
        while self._clock() < deadline:
            dns = next((u for u in self.units.values() if u.spec.kind == "dns"), None)
            if dns is None or dns.state != "running":
                return
            if self._pushed is not None and unit.spec.address not in record_addresses(self._pushed_records):
                return
            await asyncio.sleep(POLL_S / 5)
        log.warning("event=dns_withdraw_timeout name=%s after_s=%.1f", unit.spec.name, DNS_WITHDRAW_TIMEOUT_S)

    # ---- readiness -------------------------------------------------------

    async def _await_ready(self, unit: Unit, deadline: float) -> float | None:
        while self._clock() < deadline:
            if unit.state != "running":
                return None
            if await self._is_ready(unit.spec):
                unit.ready = True
                self._dirty.set()
                return self._clock()
            await asyncio.sleep(POLL_S)
        log.warning("event=not_ready name=%s after_s=%.1f", unit.spec.name, READY_TIMEOUT_S)
        return None

    async def _await_converged(self, deadline: float) -> None:
        """While the control plane runs: wait until it reports every running pod's sidecar synced
        on its current version, so "ready" means every table already holds every pod (a sidecar
        that is /ready may still lack a peer that registered a moment later)."""
        cp = next((u for u in self.units.values() if u.spec.kind == "controlplane"), None)
        while cp is not None and cp.state == "running" and self._clock() < deadline:
            pods = {u.spec.name for u in self.units.values() if u.spec.kind == "pod" and u.state == "running" and u.ready}
            status = await self._get_json(f"http://{cp.spec.address}:{CP_HTTP_PORT}/status")
            if isinstance(status, dict):
                synced = {s.get("node_id") for s in status.get("sidecars") or [] if s.get("status") == "synced"}
                if pods <= synced:
                    return
            await asyncio.sleep(POLL_S)

    async def _get_json(self, url: str) -> Any:
        assert self._session is not None
        try:
            async with self._session.get(url) as resp:
                return await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None

    async def _is_ready(self, spec: UnitSpec) -> bool:
        if spec.kind == "controlplane":
            return await self._http_ok(f"http://{spec.address}:{CP_HTTP_PORT}/healthz")
        if spec.kind == "dns":
            return await self._http_ok(f"http://{spec.address}:{DNS_API_PORT}/records")
        if spec.kind == "dashboard":
            # 200 once it has asked the mesh a whole round
            return await self._http_ok(http_url(HostPort(spec.address, spec.ports["http"]), "/healthz"))
        health = self.layout.mesh.service(spec.service).health if spec.service else ""
        app = spec.ports["app"]
        # the app answers its health path (the mesh file's `health`), or at least accepts connections
        checks = [self._http_ok(f"http://{spec.address}:{app}{health}") if health else _port_open(spec.address, app),
                  self._http_ok(f"http://{spec.address}:{ADMIN_PORT}/ready")]
        if "publish" in spec.ports:
            checks.append(_port_open(self.layout.publish.host, self.layout.publish.port))
        return all(await asyncio.gather(*checks))

    async def _http_ok(self, url: str) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(url) as resp:
                # read the (small) body: a connection left with unread data is reset, which an
                # app's server may log as an error
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    # ---- DNS records -----------------------------------------------------

    def records(self) -> DnsRecords:
        # a pod enters DNS only once it answers (app port open, sidecar /ready): a record for a pod
        # whose app is still starting sends callers to a 503 and gets the pod ejected
        return dns_records((u.spec, u.state if u.ready or u.state != "running" else "starting")
                           for u in self.units.values())

    async def _records_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            dns = next((u for u in self.units.values() if u.spec.kind == "dns"), None)
            if dns is None or dns.state != "running":
                continue
            records = self.records()
            # a restarted DNS server (new pid) starts empty, so it always gets the records again
            key = (dns.procs["main"].pid if "main" in dns.procs else None, repr(records))
            if key == self._pushed:
                continue
            if await self._put_records(dns.spec.address, records):
                self._pushed = key
                self._pushed_records = records
                log.info("event=dns_records %s", records_text(records))
            else:
                await asyncio.sleep(RECORDS_RETRY_S)
                self._dirty.set()

    async def _put_records(self, address: str, records: DnsRecords) -> bool:
        assert self._session is not None
        try:
            async with self._session.put(f"http://{address}:{DNS_API_PORT}/records", json=records) as resp:
                if resp.status != 200:  # a refusal will not change on retry: report it, do not loop
                    log.warning("event=dns_records_refused status=%s body=%s", resp.status, (await resp.text())[:200])
                return True
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=0.5)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
