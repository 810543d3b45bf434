"""``sidemesh dashboard`` options, parsed once into a frozen ``DashboardConfig``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from sidemesh.layout import DASHBOARD_PORT, LayoutError, parse_hostport
from sidemesh.status import add_mesh_source_arguments

ENV_LISTEN = "SIDEMESH_DASHBOARD_LISTEN"
DEFAULT_PORT = DASHBOARD_PORT
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
INTERVAL_S = 0.5  # two rounds a second: a mode change reaches the page within about half a second
TIMEOUT_S = 1.0
WINDOW_S = 10.0
HISTORY_S = 300.0


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    host: str
    port: int
    control: str  # control API of a `sidemesh up`, asked first
    admin: str  # a sidecar's admin address to start from without one (compose)
    controlplane_http: str | None
    interval_s: float = INTERVAL_S
    timeout_s: float = TIMEOUT_S
    window_s: float = WINDOW_S
    history_s: float = HISTORY_S

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def parse_args(argv: Sequence[str]) -> DashboardConfig:
    p = argparse.ArgumentParser(
        prog="sidemesh dashboard",
        description="Serve a live web page of the mesh: the graph of calls (rate, errors, p99, route source), every "
        "sidecar's mode, a timeline with mode changes and control-plane kills, the control plane's ACK state. "
        "It asks every sidecar's admin API directly, so it keeps working while the control plane is dead.",
    )
    p.add_argument("--listen", default=os.environ.get(ENV_LISTEN, DEFAULT_LISTEN), metavar="HOST:PORT",
                   help=f"where to serve the page; env {ENV_LISTEN}; default %(default)s "
                   "(compose: 0.0.0.0:15080, published on the host's 127.0.0.1:15080)")
    add_mesh_source_arguments(p)
    p.add_argument("--interval", type=float, default=INTERVAL_S, metavar="SECONDS",
                   help="seconds between two rounds of questions (and page updates); default %(default)s")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, metavar="SECONDS",
                   help="seconds to wait for each answer; default %(default)s")
    p.add_argument("--window", type=float, default=WINDOW_S, metavar="SECONDS",
                   help="rates, error rates and p99 on the graph are over this many seconds; default %(default)s")
    p.add_argument("--history", type=float, default=HISTORY_S, metavar="SECONDS",
                   help="how far back the timeline goes; default %(default)s")
    args = p.parse_args(argv)
    try:
        listen = parse_hostport(args.listen, default_port=DEFAULT_PORT)
    except LayoutError as exc:
        p.error(f"--listen: {exc}")
    if min(args.interval, args.timeout, args.window, args.history) <= 0:
        p.error("--interval, --timeout, --window and --history must be > 0")
    if args.window < 2 * args.interval:
        p.error("--window must hold at least two rounds (2 x --interval)")
    return DashboardConfig(listen.host, listen.port, args.control, args.admin, args.controlplane_http,
                           args.interval, args.timeout, args.window, args.history)
