"""``sidemesh up``: the whole mesh on this machine, in the foreground, without Docker.

Starts the DNS server, the control plane and every pod (app + sidecar) at once,
each on its own loopback address (see ``sidemesh.layout``), waits until all
answer, prints what is where and the curl line, then serves the control API that
``sidemesh scale/kill/stop/start/status`` talk to. Ctrl-C or SIGTERM stops every
process it started and exits 0. The pods are the services of a mesh file
(``-f``, ``sidemesh.meshfile``; the demo's by default). A mesh file that cannot
be used is one line and exit status 2; a busy address or port is reported before
anything starts, with exit status 1.

Beside the mesh it runs ``sidemesh dashboard`` (``--dashboard``, default
127.0.0.1:15080), started once the mesh is ready, so it costs the start-up nothing (on
a busy machine one more Python process starting with the others delays them), and its
URL is printed as soon as it answers ``/healthz``. A dashboard port that is taken, or
a dashboard that does not answer within ``--ready-timeout``, is a warning, not a
failure: the mesh runs without it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web

from identity.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError
from identity.store import ensure_tokens, load_or_create_ca
from sidemesh.console import LogTailer, mesh_table
from sidemesh.controlapi import make_app
from sidemesh.layout import (
    DASHBOARD,
    DEFAULT_CERT_TTL,
    DEFAULT_DASHBOARD,
    DEFAULT_DNS_TTL,
    DEFAULT_PUBLISH,
    DEFAULT_SUBNET,
    DEFAULT_ZONE,
    IDENTITY_PORT,
    HostPort,
    LayoutError,
    MeshLayout,
    http_url,
    parse_dashboard,
    parse_hostport,
    parse_replicas,
)
from sidemesh.meshfile import MeshFileError, MeshSpec, demo_mesh, load_mesh, runs_sidemesh
from sidemesh.supervisor import READY_TIMEOUT_S, Supervisor

ENV_MESH_FILE = "SIDEMESH_MESH_FILE"
ENV_SUBNET = "SIDEMESH_SUBNET"
ENV_PUBLISH = "SIDEMESH_PUBLISH"
ENV_CONTROL = "SIDEMESH_CONTROL"
ENV_LOG_DIR = "SIDEMESH_LOG_DIR"
ENV_DASHBOARD = "SIDEMESH_DASHBOARD_LISTEN"  # the same variable `sidemesh dashboard --listen` reads

log = logging.getLogger("sidemesh.up")


@dataclass(frozen=True, slots=True)
class UpConfig:
    layout: MeshLayout
    replicas: dict[str, int]
    control: HostPort
    log_dir: Path | None
    console: str
    ready_timeout: float
    dashboard: HostPort | None = None  # where `sidemesh dashboard` listens; None: not started


def parse_args(argv: Sequence[str]) -> UpConfig:
    p = argparse.ArgumentParser(
        prog="sidemesh up",
        description="Run the whole mesh locally in the foreground (no Docker): DNS server, control plane, "
        "and every service of the mesh file (default: the demo's artist, song, image) with its sidecar, "
        "every pod on its own loopback address. Ctrl-C stops everything.",
    )
    p.add_argument("-f", "--file", default=os.environ.get(ENV_MESH_FILE), metavar="MESH.toml",
                   help=f"the mesh file: services, their commands, ports, replicas, policy, who may call whom "
                   f"(docs/onboarding.md); env {ENV_MESH_FILE}; default the demo's")
    p.add_argument("--replicas", action="append", default=[], metavar="SERVICE=N",
                   help="replicas of a service (repeatable or comma-separated), e.g. --replicas artist=2; "
                   "default the mesh file's (the demo: 1 each)")
    p.add_argument("--subnet", default=os.environ.get(ENV_SUBNET, DEFAULT_SUBNET),
                   help=f"loopback prefix for the mesh: 127.A (pods at 127.A.<service>.<replica>) or 127.A.B "
                   f"(pods at 127.A.B.<service*10+replica>, at most 9 replicas); env {ENV_SUBNET}; default %(default)s")
    p.add_argument("--publish", default=os.environ.get(ENV_PUBLISH), metavar="ADDR:PORT",
                   help=f"where the front door's (the mesh file's [publish] service, the demo's song) first sidecar "
                   f"also listens inbound, for curl; env {ENV_PUBLISH}; default 127.0.0.1:<its [publish] port> "
                   f"({DEFAULT_PUBLISH} for the demo)")
    p.add_argument("--control", default=os.environ.get(ENV_CONTROL), metavar="ADDR:PORT",
                   help=f"address of the control API that `sidemesh scale/kill/...` use; env {ENV_CONTROL}; "
                   "default <subnet>.0.1:15100 (127.10.0.1:15100)")
    p.add_argument("--dns-ttl", type=float, default=DEFAULT_DNS_TTL,
                   help="TTL in seconds of the local DNS server's answers; default %(default)s")
    p.add_argument("--zone", default=DEFAULT_ZONE, help="the local DNS zone; default %(default)s")
    p.add_argument("--log-dir", default=os.environ.get(ENV_LOG_DIR), metavar="DIR",
                   help=f"directory for the per-process log files; env {ENV_LOG_DIR}; default a new temp dir (printed)")
    p.add_argument("--console", choices=("events", "all", "none"), default="events",
                   help="which child log lines to echo: events (mode changes, warnings, errors), all, none; "
                   "default %(default)s")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log level of the control plane and of `up` itself; default %(default)s")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext everywhere: no certificates, no mutual TLS, no authorization (for comparison; "
                   "default: mutual TLS between sidecars, certificates from the control plane's CA)")
    p.add_argument("--cert-ttl", default=DEFAULT_CERT_TTL,
                   help="lifetime of workload certificates, e.g. 20s, 90m, 24h (renewed at half-life); default %(default)s")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                   help="seconds to wait for every component to answer before warning; default %(default)s")
    p.add_argument("--dashboard", default=os.environ.get(ENV_DASHBOARD, DEFAULT_DASHBOARD), metavar="[HOST:]PORT",
                   help=f"where `sidemesh dashboard` serves its page (a bare port is on 127.0.0.1; 0 or off: no "
                   f"dashboard); a port already taken is a warning and the mesh starts without it; env "
                   f"{ENV_DASHBOARD}; default %(default)s")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard (same as --dashboard 0)")
    args = p.parse_args(argv)
    try:
        mesh = load_mesh(args.file) if args.file else demo_mesh()
        problem = missing_program(mesh)
        if problem:
            raise MeshFileError(problem)
    except MeshFileError as exc:
        # one line, no usage: the command line was fine, the file is not
        p.exit(2, f"sidemesh up: {exc}\n")
    publish = args.publish or (f"127.0.0.1:{mesh.publish.port}" if mesh.publish else DEFAULT_PUBLISH)
    try:
        dashboard = None if args.no_dashboard else parse_dashboard(args.dashboard)
        layout = MeshLayout(subnet=args.subnet, publish=parse_hostport(publish), zone=args.zone,
                            dns_ttl=args.dns_ttl, log_level=args.log_level, insecure=args.insecure,
                            cert_ttl=args.cert_ttl, mesh=mesh)
        replicas = parse_replicas(args.replicas, max_replicas=layout.max_replicas, mesh=mesh)
        control = parse_hostport(args.control) if args.control else layout.default_control
    except LayoutError as exc:
        p.error(str(exc))
    if args.dns_ttl <= 0:
        p.error("--dns-ttl must be positive")
    return UpConfig(layout, replicas, control, Path(args.log_dir) if args.log_dir else None,
                    args.console, args.ready_timeout, dashboard)


def missing_program(mesh: MeshSpec) -> str | None:
    """Why a service's program cannot be run (not on PATH, not executable), or None."""
    for spec in mesh.services:
        if runs_sidemesh(spec.command):
            continue
        program = spec.command[0]
        if os.sep in program:
            found = os.access(os.path.join(mesh.directory, program), os.X_OK)
        else:
            found = shutil.which(program) is not None
        if not found:
            return (f"{mesh.source}: services.{spec.name}.command: program {program!r} not found "
                    f"({'relative to ' + mesh.directory if os.sep in program else 'on PATH'}) or not executable")
    return None


def busy_sockets(sockets: Sequence[tuple[str, str, int]]) -> list[str]:
    """Which (proto, host, port) cannot be bound, each with the reason ('in use', 'not available')."""
    problems = []
    for proto, host, port in sockets:
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                problems.append(f"{host}:{port}/{proto}: {why}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    t0 = time.monotonic()
    config = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s level=%(levelname)s component=up %(message)s")
    ports = dataclasses.replace(config.layout, insecure=True)  # the same sockets, no identity paths needed yet
    socks = [("tcp", config.control.host, config.control.port), *ports.listen_sockets(config.replicas)]
    if not config.layout.insecure:
        socks.append(("tcp", config.layout.controlplane_address, IDENTITY_PORT))
    problems = busy_sockets(socks)
    if problems:
        print("sidemesh up: cannot start, addresses busy:\n  " + "\n  ".join(problems)
              + "\n(is another `sidemesh up` running? stop it, or use other --subnet/--publish/--control)",
              file=sys.stderr)
        return 1
    why = dashboard_problem(config)
    if why:
        print(f"sidemesh up: warning: not starting the dashboard: {why}; the mesh starts without it "
              f"(pick another with --dashboard [HOST:]PORT, or --no-dashboard)", file=sys.stderr, flush=True)
        config = dataclasses.replace(config, dashboard=None)
    log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="sidemesh-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if not config.layout.insecure:
        try:
            config = prepare_identity(config, log_dir / "identity")
        except (OSError, IdentityError) as exc:
            print(f"sidemesh up: cannot prepare the mesh's identity in {log_dir / 'identity'}: {exc}", file=sys.stderr)
            return 1
    return uvloop.run(run(config, log_dir, started=t0))


def dashboard_problem(config: UpConfig) -> str | None:
    """Why the dashboard cannot listen where asked, or None. Checked before anything starts; the
    mesh never depends on the answer."""
    at = config.dashboard
    if at is None:
        return None
    if at == config.layout.publish:
        return f"{at} is also the published address (--publish)"
    if at == config.control:
        return f"{at} is also the control API (--control)"
    busy = busy_sockets([("tcp", at.host, at.port)])
    return busy[0] + " (another `sidemesh up` or `sidemesh dashboard`?)" if busy else None


def prepare_identity(config: UpConfig, state_dir: Path) -> UpConfig:
    """The mesh's CA and one join token per service, made before anything starts (the sidecars
    check the control plane against the CA from their first contact). Blocking: runs before the loop."""
    layout = dataclasses.replace(config.layout, state_dir=str(state_dir))
    paths = layout.identity_paths()
    load_or_create_ca(Path(paths.ca_dir), DEFAULT_TRUST_DOMAIN, time.time())
    ensure_tokens(Path(paths.tokens_dir), list(layout.mesh.names))
    return dataclasses.replace(config, layout=layout)


async def run(config: UpConfig, log_dir: Path, *, started: float) -> int:
    """Run the mesh until SIGINT/SIGTERM; returns the exit status."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    sup = Supervisor(config.layout, log_dir)
    runner = web.AppRunner(make_app(sup, config.control), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.control.host, config.control.port).start()
    except OSError as exc:
        await runner.cleanup()
        print(f"sidemesh up: cannot listen on {config.control}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"sidemesh up: logs in {log_dir}", flush=True)
    await sup.open()
    tailer = LogTailer(lambda: {p.log_path: f"{u.spec.name}{'' if r == 'main' else '/' + r}"
                                for u in sup.units.values() for r, p in u.procs.items()}, mode=config.console)
    tail_task = asyncio.create_task(tailer.run(), name="log-tail")
    dash_task: asyncio.Task[None] | None = None
    try:
        await sup.start_all(config.layout.initial_units(config.replicas))
        ready = asyncio.create_task(sup.wait_ready(timeout=config.ready_timeout))
        stop_wait = asyncio.create_task(stopping.wait())
        await asyncio.wait({ready, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            _announce(config, sup, ready.result(), time.monotonic() - started)
            if config.dashboard is not None:
                await sup.start_all([config.layout.dashboard(config.dashboard, config.control)])
                dash_task = asyncio.create_task(_watch_dashboard(config, sup), name="dashboard-ready")
        else:
            ready.cancel()
        await stop_wait
        print("sidemesh up: stopping every process...", flush=True)
    finally:
        if dash_task is not None:
            dash_task.cancel()
        await sup.close()
        await tailer.poll()
        tail_task.cancel()
        await runner.cleanup()
    left = sup.child_pids()
    print("sidemesh up: stopped" + (f" (still alive: {left})" if left else ""), flush=True)
    return 0


async def _watch_dashboard(config: UpConfig, sup: Supervisor) -> None:
    """Print the dashboard's URL once it answers; when it never does (its port taken after all, a
    crash), say so: a warning only."""
    assert config.dashboard is not None
    url = http_url(config.dashboard)
    answered = (await sup.wait_ready([DASHBOARD], timeout=config.ready_timeout))[DASHBOARD]
    if answered is not None:
        log.info("event=dashboard_ready url=%s after_s=%.2f", url, answered)
        print(f"dashboard: {url}", flush=True)
        return
    unit = sup.units[DASHBOARD]
    logs = ", ".join(str(p.log_path) for p in unit.procs.values())
    print(f"sidemesh up: warning: the dashboard ({url}) is {unit.state} and did not "
          f"answer within {config.ready_timeout:g} s; the mesh runs without it (its log: {logs})", flush=True)


def _announce(config: UpConfig, sup: Supervisor, ready: dict[str, float | None], elapsed: float) -> None:
    print("\n" + mesh_table(sup.describe()) + "\n", flush=True)
    late = [name for name, t in ready.items() if t is None]
    if late:
        print(f"sidemesh up: NOT ready after {config.ready_timeout:g} s: {', '.join(late)} "
              f"(see their logs in {sup.log_dir})", flush=True)
    else:
        log.info("event=ready after_s=%.2f units=%d", elapsed, len(ready))
        print(f"mesh ready in {elapsed:.2f} s", flush=True)
    hint = "" if config.control == config.layout.default_control and config.layout.subnet == DEFAULT_SUBNET \
        else f" --control {config.control}"
    mesh = config.layout.mesh
    curl = f"  curl {config.layout.publish}{mesh.publish.path}\n" if mesh.publish else ""
    print(f"\n{curl}"
          f"  sidemesh status{hint}\n"
          f"  sidemesh scale{hint} {mesh.names[0]}=2 | sidemesh kill{hint} controlplane | "
          f"sidemesh start{hint} controlplane\n"
          f"  Ctrl-C stops the mesh\n", flush=True)
