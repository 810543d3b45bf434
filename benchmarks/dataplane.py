"""The data plane benchmark of issue 5: direct vs. sidemesh vs. Envoy, in one run.

    python -m benchmarks.dataplane            # about 2 minutes on a 2-core machine

Three paths, driven by the same tools with the same settings:

1. direct:   wrk -> nginx
2. sidemesh: wrk -> sidecar A outbound (:15001, ``Host: upstream``)
                 -> sidecar B inbound (:15006) -> nginx; a real control plane
3. envoy:    wrk -> Envoy A (:15001) -> Envoy B (:15006) -> nginx,
             ``--concurrency 1``, static config

All three are started up front (idle proxies cost next to nothing) and measured
in interleaved rounds (direct, sidemesh, envoy, direct, ...), one load at a time,
so that whatever else runs on the machine hits every path alike.

Per path: a warm-up, throughput at saturation (wrk), latency at a fixed rate
(h2load, one connection), CPU seconds per 10k requests of the path's proxies
(utime+stime from /proc), idle and peak RSS (VmRSS, VmHWM). The table's last
line is ``sidemesh/envoy throughput=X.XX p99=Y.YY``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadtools import (
    WRK_DONE_LUA, WrkResult, fixed_rate_result, h2load_command, merge_wrk, parse_wrk, wrk_command,
)
from benchmarks.memory import format_soak, soak
from benchmarks.procs import BenchError, Child, Children, cpu_seconds, exit_on_sigterm, memory_mb, run_main
from benchmarks.report import (
    PathResult, ProxyUsage, format_table, write_json, write_plot,
)
from benchmarks.servers import (
    APP_PORT, BODY, OUTBOUND_PORT, REPO, UPSTREAM_SERVICE, Layout, start_envoy_path, start_nginx,
    start_sidemesh_path,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dataplane.json"
TOOLS = ("wrk", "h2load", "nginx")
# on 2 cores, a 1-minute load average above this means something else competes
BUSY_LOADAVG = 1.5
# beyond the run's own length, for start-up and summary
RUN_TIMEOUT_S = 60


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dataplane",
        description="Two-hop data plane benchmark: direct (wrk -> nginx), sidemesh (two sidecars + control "
                    "plane) and Envoy (two Envoys, --concurrency 1). Prints a table ending with "
                    "'sidemesh/envoy throughput=X.XX p99=Y.YY' and writes JSON.")
    parser.add_argument("--duration", type=int, default=15,
                        help="seconds of saturation load per path, split over --rounds (wrk; default 15)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per measurement; paths take turns each round so that background noise "
                             "hits them alike (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up load per path (default 2)")
    parser.add_argument("--connections", type=int, default=50,
                        help="wrk connections at saturation (default 50; one wrk thread)")
    parser.add_argument("--rate", type=int, default=1000,
                        help="requests/s of the fixed-rate latency run, one that every path sustains "
                             "(default 1000)")
    parser.add_argument("--latency-duration", type=int, default=15,
                        help="seconds of the fixed-rate latency run per path, split over --rounds "
                             "(h2load, one connection; default 15)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG of the latency percentiles (default: next to --out, if matplotlib is installed)")
    parser.add_argument("--skip-direct", action="store_true", help="do not measure the direct path")
    parser.add_argument("--skip-sidemesh", action="store_true", help="do not measure the sidemesh path")
    parser.add_argument("--skip-envoy", action="store_true", help="do not measure the Envoy path")
    parser.add_argument("--workers", type=int, default=1, help="sidecar --workers (default 1, as issue 5 asks)")
    parser.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                        help="after the measurements, load the sidemesh path this long sampling the sidecars' "
                             "RSS every second (issue 5 point 4; e.g. 60; default 0 = off)")
    parser.add_argument("--subnet", default="127.77",
                        help="loopback prefix for this run's addresses (default 127.77 -> 127.77.x.y)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temp dir with every process's log (its path is printed)")
    return parser


def sidemesh_available() -> bool:
    """True when ``sidemesh sidecar`` and ``sidemesh controlplane`` exist (their --help works)."""
    for sub in ("sidecar", "controlplane"):
        try:
            done = subprocess.run([sys.executable, "-m", "sidemesh", sub, "--help"], cwd=REPO,
                                  capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            return False
        if done.returncode != 0:
            return False
    return True


def check_path(url: str, host: str) -> dict[str, str]:
    """One request through the path: it must be nginx's 12-byte 200. Returns the response headers."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers={"Host": host}), timeout=5) as resp:
            body, status, headers = resp.read(), resp.status, dict(resp.headers)
    except OSError as exc:
        raise BenchError(f"GET {url} (Host: {host}) failed: {exc}") from exc
    if status != 200 or body != BODY.encode():
        raise BenchError(f"GET {url} (Host: {host}) answered {status} {body[:200]!r}")
    return headers


@dataclass
class Target:
    """One path under test while the run goes on: its URL, proxies and what was measured so far."""

    name: str
    url: str
    proxies: list[Child]
    children: Children
    loadavg: float = 0.0
    idle_mb: dict[str, float] = field(default_factory=dict)
    saturation: list[WrkResult] = field(default_factory=list)
    cpu_saturation: dict[str, float] = field(default_factory=dict)
    fixed_outputs: list[str] = field(default_factory=list)
    fixed_logs: list[str] = field(default_factory=list)
    cpu_fixed: dict[str, float] = field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        return {p.name: cpu_seconds(p.pid) for p in self.proxies}

    def check_alive(self) -> None:
        for p in self.proxies:
            if not p.alive:
                raise BenchError(f"{p.name} exited {p.popen.returncode} under load:\n{p.log_tail()}")

    def result(self, rate: int) -> PathResult:
        usage = [ProxyUsage(name=p.name, pid=p.pid, cpu_s_saturation=round(self.cpu_saturation[p.name], 3),
                            cpu_s_fixed_rate=round(self.cpu_fixed[p.name], 3),
                            idle_rss_mb=round(self.idle_mb[p.name], 2),
                            peak_rss_mb=round(memory_mb(p.pid, "VmHWM"), 2)) for p in self.proxies]
        return PathResult(name=self.name, saturation=merge_wrk(self.saturation),
                          fixed_rate=fixed_rate_result(self.fixed_outputs, self.fixed_logs, target_rps=rate),
                          proxies=usage, loadavg=round(self.loadavg, 2),
                          rounds_rps=[round(r.rps, 1) for r in self.saturation])


def prepare(target: Target, args: argparse.Namespace, script: Path) -> None:
    """Check the path answers like nginx, read idle RSS, warm it up."""
    headers = check_path(target.url, UPSTREAM_SERVICE)
    target.loadavg = os.getloadavg()[0]
    target.idle_mb = {p.name: memory_mb(p.pid, "VmRSS") for p in target.proxies}
    print(f"[{target.name}] path ok ({headers.get('x-sidemesh-route', 'no x-sidemesh-route')}), "
          f"load average {target.loadavg:.2f}, warm-up {args.warmup}s", flush=True)
    if args.warmup > 0:
        target.children.run(f"wrk-warmup-{target.name}", wrk_command(
            target.url, connections=args.connections, duration_s=args.warmup, script=str(script),
            host=UPSTREAM_SERVICE), timeout=RUN_TIMEOUT_S + args.warmup)


def saturation_round(target: Target, args: argparse.Namespace, script: Path, n: int) -> None:
    """One wrk run at saturation; CPU of the path's proxies around it."""
    before = target.cpu()
    out = target.children.run(f"wrk-{target.name}-{n}", wrk_command(
        target.url, connections=args.connections, duration_s=args.duration / args.rounds, script=str(script),
        host=UPSTREAM_SERVICE), timeout=RUN_TIMEOUT_S + args.duration)
    after = target.cpu()
    for name, cpu in after.items():
        target.cpu_saturation[name] = target.cpu_saturation.get(name, 0.0) + cpu - before[name]
    result = parse_wrk(out)
    target.saturation.append(result)
    target.check_alive()
    print(f"[{target.name}] round {n}: {result.rps:>8.0f} req/s, errors {result.error_count}", flush=True)


def fixed_rate_round(target: Target, args: argparse.Namespace, workdir: Path, n: int) -> None:
    """One h2load run at the fixed rate; its per-request log is kept for the percentiles."""
    log_file = workdir / f"h2load-{target.name}-{n}.requests"
    before = target.cpu()
    out = target.children.run(f"h2load-{target.name}-{n}", h2load_command(
        target.url, rate=args.rate, duration_s=args.latency_duration / args.rounds, log_file=str(log_file),
        host=UPSTREAM_SERVICE), timeout=RUN_TIMEOUT_S + args.latency_duration)
    after = target.cpu()
    for name, cpu in after.items():
        target.cpu_fixed[name] = target.cpu_fixed.get(name, 0.0) + cpu - before[name]
    target.fixed_outputs.append(out)
    target.fixed_logs.append(log_file.read_text())
    one = fixed_rate_result(out, target.fixed_logs[-1], target_rps=args.rate)
    target.check_alive()
    print(f"[{target.name}] round {n}: {one.achieved_rps:>6.0f} req/s, p50 {one.latency_ms['p50']:.3f} ms, "
          f"p99 {one.latency_ms['p99']:.3f} ms, failed {one.failed}", flush=True)


def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, PathResult], dict[str, Any]]:
    """Start every path, measure them round by round, interleaved. Returns results and extras."""
    layout = Layout(args.subnet)
    layout.check_free()
    script = workdir / "done.lua"
    script.write_text(WRK_DONE_LUA)
    extra: dict[str, Any] = {"notes": []}
    targets: list[Target] = []
    with Children(workdir) as children:
        nginx = start_nginx(children, workdir, layout.upstream)
        if not args.skip_direct:
            targets.append(Target("direct", f"http://{layout.upstream}:{APP_PORT}/", [], children))
        if not args.skip_sidemesh:
            if sidemesh_available():
                proxies = start_sidemesh_path(children, layout, workers=args.workers)
                targets.append(Target("sidemesh", f"http://{layout.pod_a}:{OUTBOUND_PORT}/", proxies, children))
            else:
                note = "sidemesh path skipped: `python -m sidemesh sidecar/controlplane --help` does not work yet"
                print(note, flush=True)
                extra["notes"].append(note)
        if not args.skip_envoy:
            proxies = start_envoy_path(children, workdir, layout)
            targets.append(Target("envoy", f"http://{layout.envoy_a}:{OUTBOUND_PORT}/", proxies, children))

        load = os.getloadavg()[0]
        if load > BUSY_LOADAVG:
            print(f"warning: the machine is busy (load average {load:.2f} on {os.cpu_count()} cores): figures "
                  "will be noisy; rounds are interleaved so every path sees the same noise", flush=True)
        for t in targets:
            prepare(t, args, script)
        print(f"saturation: {args.rounds} rounds of wrk -t1 -c{args.connections} "
              f"{args.duration / args.rounds:g}s per path", flush=True)
        for n in range(1, args.rounds + 1):
            for t in targets:
                saturation_round(t, args, script, n)
        time.sleep(0.5)
        print(f"fixed rate: {args.rounds} rounds of h2load --h1 -c1 --rps {args.rate} "
              f"{args.latency_duration / args.rounds:g}s per path", flush=True)
        for n in range(1, args.rounds + 1):
            for t in targets:
                fixed_rate_round(t, args, workdir, n)
        results = {t.name: t.result(args.rate) for t in targets}
        mesh = next((t for t in targets if t.name == "sidemesh"), None)
        if args.soak > 0 and mesh is not None:
            print(f"[sidemesh] soak {args.soak}s, sampling the sidecars' RSS every second", flush=True)
            extra["soak"] = soak(children, mesh.proxies, url=mesh.url, host=UPSTREAM_SERVICE, seconds=args.soak,
                                 connections=args.connections, script=str(script))
        extra["upstream"] = {"name": "nginx", "peak_rss_mb": round(memory_mb(nginx.pid, "VmHWM"), 2)}
        extra["loadavg_end"] = round(os.getloadavg()[0], 2)
    return results, extra


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.duration <= 120 or not 1 <= args.latency_duration <= 120:
        parser.error("--duration and --latency-duration must be within 1..120 seconds")
    if not 0 <= args.warmup <= 60 or not 0 <= args.soak <= 3600:
        parser.error("--warmup must be within 0..60 and --soak within 0..3600 seconds")
    if not 1 <= args.connections <= 1000 or not 1 <= args.rate <= 100_000:
        parser.error("--connections must be within 1..1000 and --rate within 1..100000")
    if not 1 <= args.workers <= 64 or not 1 <= args.rounds <= 10:
        parser.error("--workers must be within 1..64 and --rounds within 1..10")
    if args.duration < args.rounds or args.latency_duration < args.rounds:
        parser.error("--duration and --latency-duration must give each round at least 1 second")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    missing = [t for t in TOOLS if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())]
    if missing:
        print(f"missing tools: {', '.join(missing)}; run scripts/bench-deps", file=sys.stderr)
        return 2
    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="sidemesh-bench-"))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    try:
        paths, extra = run(args, workdir)
    except BenchError as exc:
        # keep the logs of a failed run: they say why
        print(f"benchmark failed: {exc}\nlogs: {workdir}", file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.out, paths, settings, extra)
    plot = args.plot or args.out.with_suffix(".png")
    plotted = bool(paths) and write_plot(plot, paths)
    if "soak" in extra:
        print(format_soak(extra["soak"]))
    print(f"results: {args.out}" + (f", plot: {plot}" if plotted else "")
          + (f", logs: {workdir}" if args.keep_logs else ""))
    print(format_table(paths, settings))
    return 0


if __name__ == "__main__":
    run_main(main)
