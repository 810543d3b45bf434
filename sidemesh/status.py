"""``sidemesh status``: the control plane and every sidecar, asked directly.

It asks the sidecars themselves (their admin ``/state``), so it keeps working
while the control plane is down. Which sidecars: those of the running
``sidemesh up`` (its control API's ``/pods``) if one answers; otherwise (compose:
``docker compose exec song-sidecar sidemesh status``) the local sidecar's admin
(``--admin``) and every endpoint its ``/state`` knows. All queries run at once
with short timeouts; a sidecar that does not answer is shown as unreachable.

``--watch`` asks again every ``--interval`` seconds over one keep-alive session and
redraws the table in place (cursor home, each line cleared to its end, the rest of
the screen cleared: no flicker, and the last table stays on screen after Ctrl-C).
When stdout is not a terminal it appends the tables instead, and ``--json --watch``
prints one JSON document per line, so the output can be piped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import uvloop

from sidemesh.ctl import DEFAULT_CONTROL, ENV_CONTROL
from sidemesh.statusreport import (
    Target,
    build_report,
    controlplane_http_from_target,
    render_table,
    targets_from_pods,
    dns_names,
    targets_from_seed,
)

ENV_ADMIN = "SIDEMESH_ADMIN"
DEFAULT_ADMIN = "127.0.0.1:15000"
QUERY_TIMEOUT_S = 1.0
WATCH_INTERVAL_S = 1.0
# ECMA-48 control sequences for redrawing in place
HOME, CLEAR_LINE_END, CLEAR_SCREEN_END = "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def add_mesh_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where a reader of the mesh (`status`, `dashboard`) finds it: ``--control``, ``--admin``,
    ``--controlplane-http``, with their environment variables."""
    p.add_argument("--control", default=os.environ.get(ENV_CONTROL, DEFAULT_CONTROL), metavar="ADDR:PORT",
                   help=f"control API of a running `sidemesh up`, asked first; env {ENV_CONTROL}; default %(default)s")
    p.add_argument("--admin", default=os.environ.get(ENV_ADMIN, DEFAULT_ADMIN), metavar="HOST:PORT",
                   help=f"a sidecar's admin address to start from when no `sidemesh up` answers (compose: this "
                   f"container's sidecar, or another pod's, e.g. song:15000); env {ENV_ADMIN}; default %(default)s")
    p.add_argument("--controlplane-http", metavar="HOST:PORT",
                   help="the control plane's HTTP address (compose: controlplane:15014); default: from `sidemesh "
                   "up`, else from the sidecar's /state (its gRPC target's host, port 15014)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sidemesh status",
        description="Show the control plane and every sidecar: mode, route version, when the mode last changed, "
        "age of the last update. Asks the sidecars directly, so it works while the control plane is down.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_mesh_source_arguments(p)
    p.add_argument("--timeout", type=float, default=QUERY_TIMEOUT_S,
                   help="seconds to wait for each answer; default %(default)s")
    p.add_argument("--watch", "-w", action="store_true",
                   help="keep asking and redraw the table in place until Ctrl-C (with --json: one document per line)")
    p.add_argument("--interval", "-n", type=float, default=WATCH_INTERVAL_S, metavar="SECONDS",
                   help="seconds between two rounds with --watch; default %(default)s")
    args = p.parse_args(argv)
    if args.interval <= 0 or args.timeout <= 0:
        p.error("--interval and --timeout must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.watch:
        try:
            return uvloop.run(watch(args, sys.stdout))
        except KeyboardInterrupt:
            return 0
    report = uvloop.run(collect(args.control, args.admin, controlplane_http=args.controlplane_http,
                                timeout=args.timeout))
    if report is None:
        print(_nobody(args), file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2) if args.json else render_table(report, now=time.time())
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _silence_stdout()
    return 0


def _nobody(args: argparse.Namespace) -> str:
    return (f"sidemesh status: no running `sidemesh up` at {args.control} and no sidecar admin at {args.admin}; "
            "start the mesh with `sidemesh up` (or pass --control / --admin)")


def _silence_stdout() -> None:
    # `sidemesh status | head`: the reader left; not an error of ours (Python docs, SIGPIPE note)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def frame(report: dict[str, Any] | None, args: argparse.Namespace, *, now: float, tty: bool) -> str:
    """One round of ``--watch`` as text to write: a redraw in place on a terminal, else a block to append."""
    if args.json:
        return json.dumps({"at": now, "report": report}) + "\n"
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    head = f"Every {args.interval:g}s: sidemesh status    {stamp}    (Ctrl-C to stop)"
    body = _nobody(args) if report is None else render_table(report, now=now)
    if not tty:
        return f"{head}\n\n{body}\n\n"
    lines = [head, "", *body.splitlines()]
    return HOME + "".join(line + CLEAR_LINE_END + "\n" for line in lines) + CLEAR_SCREEN_END


async def watch(args: argparse.Namespace, out: Any) -> int:
    """Ask every ``args.interval`` seconds and write a frame, until cancelled (Ctrl-C) or the reader leaves."""
    tty = out.isatty() and not args.json
    loop = asyncio.get_running_loop()
    if tty:
        out.write(HIDE_CURSOR + HOME + "\x1b[2J")
    try:
        async with aiohttp.ClientSession(timeout=client_timeout(args.timeout)) as session:
            while True:
                started = loop.time()
                report = await collect(args.control, args.admin, controlplane_http=args.controlplane_http,
                                       timeout=args.timeout, session=session)
                try:
                    out.write(frame(report, args, now=time.time(), tty=tty))
                    out.flush()
                except BrokenPipeError:
                    _silence_stdout()
                    return 0
                await asyncio.sleep(max(0.0, started + args.interval - loop.time()))
    finally:
        if tty:
            out.write(SHOW_CURSOR)
            out.flush()


async def _get_json(session: aiohttp.ClientSession, url: str) -> tuple[Any, str | None]:
    """(body, None) on a 200 JSON answer, else (None, why)."""
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None, f"HTTP {resp.status}"
            return await resp.json(content_type=None), None
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def collect(
    control: str,
    admin: str,
    *,
    controlplane_http: str | None = None,
    timeout: float = QUERY_TIMEOUT_S,
    session: aiohttp.ClientSession | None = None,
) -> dict[str, Any] | None:
    """The status report, or None when neither a `sidemesh up` nor the seed sidecar answers.

    ``session``: reuse one (keep-alive) across calls, as ``--watch`` and the dashboard do;
    its own timeouts then apply."""
    if session is None:
        async with aiohttp.ClientSession(timeout=client_timeout(timeout)) as own:
            answers = await ask_all(own, control, admin, controlplane_http=controlplane_http, timeout=timeout)
    else:
        answers = await ask_all(session, control, admin, controlplane_http=controlplane_http, timeout=timeout)
    return None if answers is None else answers.report()


def client_timeout(timeout: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 0.5))


@dataclass(frozen=True, slots=True)
class Answers:
    """Everything one round of questions brought back, before it is reduced to a report."""

    source: str
    controlplane_http: str | None
    controlplane: dict[str, Any] | None  # the control plane's /status, None when it did not answer
    controlplane_error: str | None
    sidecars: list[tuple[Target, dict[str, Any] | None, str | None]]  # (target, its /state or None, why not)
    pods: list[dict[str, Any]] | None  # the control API's /pods of a `sidemesh up`, None without one

    def report(self) -> dict[str, Any]:
        return build_report(self.controlplane_http, self.controlplane, self.controlplane_error, self.sidecars,
                            source=self.source)


async def ask_all(
    session: aiohttp.ClientSession,
    control: str,
    admin: str,
    *,
    controlplane_http: str | None = None,
    timeout: float = QUERY_TIMEOUT_S,
) -> Answers | None:
    """Ask the `sidemesh up` (or the seed sidecar), then every sidecar and the control plane, at once.
    None when neither a `sidemesh up` nor the seed sidecar answers."""
    (pods, _), (mesh, _), (seed, _) = await asyncio.gather(
        _get_json(session, f"http://{control}/pods"),
        _get_json(session, f"http://{control}/mesh"),
        _get_json(session, f"http://{admin}/state"),
    )
    targets: list[Target]
    if isinstance(pods, list):
        source = f"sidemesh up at {control}"
        targets = targets_from_pods(pods)
        cp_http = controlplane_http or (mesh or {}).get("controlplane", {}).get("http")
        known: dict[str, Any] = {}
    elif isinstance(seed, dict):
        source = f"sidecar admin at {admin}"
        targets = targets_from_seed(admin, seed, await _resolve_all(dns_names(seed), timeout))
        cp_http = controlplane_http or controlplane_http_from_target((seed.get("controlplane") or {}).get("target"))
        known = {admin: seed}
    else:
        return None

    async def ask(t: Target) -> tuple[Target, Any, str | None]:
        if t.admin in known:
            return t, known[t.admin], None
        state, err = await _get_json(session, f"http://{t.admin}/state")
        return t, state if isinstance(state, dict) else None, err

    cp_task = _get_json(session, f"http://{cp_http}/status") if cp_http else _none()
    (cp_status, cp_err), *answers = await asyncio.gather(cp_task, *(ask(t) for t in targets))
    return Answers(source, cp_http, cp_status if isinstance(cp_status, dict) else None, cp_err, answers,
                   pods if isinstance(pods, list) else None)


async def _resolve_all(names: dict[str, str], timeout: float) -> dict[str, list[str]]:
    """service -> addresses, through the system resolver (off the event loop); failures are just empty."""
    loop = asyncio.get_running_loop()

    async def one(name: str) -> list[str]:
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), timeout)
        except (OSError, TimeoutError):
            return []
        return sorted({str(info[4][0]) for info in infos})

    found = await asyncio.gather(*(one(name) for name in names.values()))
    return dict(zip(names, found, strict=True))


async def _none() -> tuple[None, str]:
    return None, "address unknown"
