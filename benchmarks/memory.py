"""A sidecar's memory: idle RSS, and RSS sampled every second under load (issue 5, point 4).

``python -m benchmarks.memory --seconds 60`` starts nginx, a control plane and
the two sidecars of the data plane benchmark, records each sidecar's idle RSS,
then keeps wrk on the two-hop path for ``--seconds`` while sampling VmRSS once
a second. It reports start/end/max and the least-squares slope (MB per minute)
of each sidecar's RSS, skipping the first ``--settle`` seconds (allocator and
connection pools warm up there). ``python -m benchmarks.dataplane --soak N``
runs the same sampling on the sidemesh path of its own run.

Goals (issue 5): idle < 60 MB; under load flat -- here "flat" means the slope
after the settle period stays under ``FLAT_MB_PER_MIN`` and the end is within
``FLAT_END_GROWTH_MB`` of the post-settle start.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.loadtools import WRK_DONE_LUA, parse_wrk, wrk_command
from benchmarks.procs import BenchError, Child, Children, exit_on_sigterm, memory_mb, run_main
from benchmarks.servers import (
    OUTBOUND_PORT, UPSTREAM_SERVICE, Layout, start_nginx, start_sidemesh_path,
)

IDLE_GOAL_MB = 60.0
FLAT_MB_PER_MIN = 1.0
FLAT_END_GROWTH_MB = 3.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "memory.json"


@dataclass(frozen=True, slots=True)
class RssTrend:
    """RSS samples of one process under load, summarised."""

    name: str
    samples_mb: list[float]
    settle: int

    @property
    def steady(self) -> list[float]:
        return self.samples_mb[self.settle:] or self.samples_mb

    @property
    def slope_mb_per_min(self) -> float:
        return slope_per_minute(self.steady)

    @property
    def flat(self) -> bool:
        s = self.steady
        return self.slope_mb_per_min < FLAT_MB_PER_MIN and s[-1] - s[0] < FLAT_END_GROWTH_MB

    def summary(self) -> dict[str, Any]:
        s = self.samples_mb
        return {"name": self.name, "start_mb": s[0], "end_mb": s[-1], "max_mb": max(s),
                "settle_s": self.settle, "steady_start_mb": self.steady[0],
                "slope_mb_per_min": round(self.slope_mb_per_min, 3), "flat": self.flat,
                "samples_mb": [round(x, 2) for x in s]}


def slope_per_minute(samples: Sequence[float], interval_s: float = 1.0) -> float:
    """Least-squares slope of equally spaced samples, in units per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(samples) / n
    num = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(samples))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den / interval_s * 60


def soak(children: Children, proxies: Sequence[Child], *, url: str, host: str | None, seconds: int,
         connections: int, script: str, settle: int = 5) -> dict[str, Any]:
    """Load ``url`` with wrk for ``seconds`` and sample every proxy's RSS once a second."""
    wrk = children.start("wrk-soak", wrk_command(url, connections=connections, duration_s=seconds,
                                                 script=script, host=host))
    samples: dict[str, list[float]] = {p.name: [] for p in proxies}
    start = time.monotonic()
    for tick in range(seconds):
        for p in proxies:
            if not p.alive:
                raise BenchError(f"{p.name} died during the soak:\n{p.log_tail()}")
            samples[p.name].append(memory_mb(p.pid, "VmRSS"))
        time.sleep(max(0.0, start + tick + 1 - time.monotonic()))
    try:
        wrk.popen.wait(timeout=30)
    finally:
        children.stop(wrk)
    result = parse_wrk(wrk.log_path.read_text(errors="replace"))
    trends = [RssTrend(name, s, min(settle, max(0, len(s) - 2))) for name, s in samples.items()]
    return {"seconds": seconds, "connections": connections, "requests": result.requests,
            "rps": round(result.rps, 1), "errors": result.errors,
            "proxies": [t.summary() for t in trends], "flat": all(t.flat for t in trends)}


def format_soak(report: dict[str, Any]) -> str:
    lines = [f"soak: {report['seconds']}s, {report['rps']:.0f} req/s, errors {sum(report['errors'].values())}"]
    for p in report["proxies"]:
        lines.append(f"  {p['name']}: rss start {p['start_mb']:.1f} MB, end {p['end_mb']:.1f} MB, "
                     f"max {p['max_mb']:.1f} MB, slope after {p['settle_s']}s "
                     f"{p['slope_mb_per_min']:+.2f} MB/min -> {'flat' if p['flat'] else 'GROWING'}")
    return "\n".join(lines)


def idle_rss(proxies: Sequence[Child]) -> dict[str, float]:
    """VmRSS (MB) of each proxy right now."""
    return {p.name: round(memory_mb(p.pid, "VmRSS"), 2) for p in proxies}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description="Idle RSS of a sidecar and its RSS over time under load on the two-hop path.")
    parser.add_argument("--seconds", type=int, default=60, help="length of the loaded run (default 60)")
    parser.add_argument("--settle", type=int, default=5,
                        help="seconds at the start not used for the slope (default 5)")
    parser.add_argument("--idle-wait", type=float, default=3.0,
                        help="seconds to let the sidecars settle before the idle reading (default 3)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--subnet", default="127.78", help="loopback prefix of the pods (default 127.78)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless idle RSS < 60 MB and RSS is flat under load")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds < 3 or args.seconds > 3600:
        build_parser().error("--seconds must be within 3..3600")
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} not found: run scripts/bench-deps", file=sys.stderr)
            return 2
    exit_on_sigterm()
    layout = Layout(args.subnet)
    with tempfile.TemporaryDirectory(prefix="sidemesh-bench-") as tmp, Children(Path(tmp)) as children:
        try:
            layout.check_free()
            script = Path(tmp) / "done.lua"
            script.write_text(WRK_DONE_LUA)
            start_nginx(children, Path(tmp), layout.upstream)
            proxies = start_sidemesh_path(children, layout)
            time.sleep(args.idle_wait)
            idle = idle_rss(proxies)
            report = soak(children, proxies, url=f"http://{layout.pod_a}:{OUTBOUND_PORT}/",
                          host=UPSTREAM_SERVICE, seconds=args.seconds, connections=args.connections,
                          script=str(script), settle=args.settle)
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    report = {"idle_rss_mb": idle, "idle_ok": all(v < IDLE_GOAL_MB for v in idle.values()), **report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("idle rss: " + ", ".join(f"{k} {v:.1f} MB" for k, v in idle.items()) + f" (goal < {IDLE_GOAL_MB:.0f} MB)")
    print(format_soak(report))
    print(f"results: {args.out}")
    if args.check and not (report["idle_ok"] and report["flat"]):
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
