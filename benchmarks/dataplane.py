"""The data plane benchmark of issue 5: direct vs. sidemesh vs. Envoy, plaintext and mTLS.

    python -m benchmarks.dataplane            # about 4 minutes on a 2-core machine
    python -m benchmarks.dataplane --tls plain   # the plaintext paths only (about 2 minutes)

Paths, driven by the same tools with the same settings:

1. direct:        wrk -> nginx
2. sidemesh:      wrk -> sidecar A outbound (:15001, ``Host: upstream``)
                      -> sidecar B inbound (:15006) -> nginx; a real control plane;
                      ``--insecure`` (plaintext everywhere)
3. envoy:         wrk -> Envoy A (:15001) -> Envoy B (:15006) -> nginx,
                  ``--concurrency 1``, static config, plaintext
4. sidemesh-mtls: as 2, in the sidecars' default secure mode: certificates from the control
                  plane's CA, mutual TLS 1.3 on A -> B, pooled keep-alive connections
5. envoy-mtls:    as 3, with mutual TLS 1.3 on A -> B (benchmarks/envoyconfig.py)
6. envoy-mtls-fresh: Envoy A' -> the same Envoy B, one request per upstream connection,
                  so each request pays a TLS handshake (sidemesh has no such setting)

All are started up front (idle proxies cost next to nothing) and measured in
interleaved rounds (direct, sidemesh, envoy, ..., direct, ...), one load at a time,
so that whatever else runs on the machine hits every path alike.

Per path: a warm-up, throughput at saturation (wrk), latency at a fixed rate
(h2load, one connection), CPU seconds per 10k requests of the path's proxies
(utime+stime from /proc), idle and peak RSS (VmRSS, VmHWM). Then, for the mTLS
paths, the handshake cost at B's inbound: fresh mutual-TLS connections per second
(``benchmarks/handshake.py``) and B's CPU per connection, again in interleaved rounds.
The table's last line is ``sidemesh/envoy throughput=X.XX p99=Y.YY`` and, with mTLS,
``; sidemesh/envoy mtls throughput=X.XX p99=Y.YY handshakes=Z.ZZ``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.loadtools import WRK_DONE_LUA
from benchmarks.memory import format_soak, soak
from benchmarks.meshcerts import MeshCa, init_mesh_ca, issue_files
from benchmarks.procs import BenchError, Children, exit_on_sigterm, memory_mb, run_main
from benchmarks.report import HandshakeRun, PathResult, format_table, write_json, write_plot
from benchmarks.rounds import (
    HandshakeTarget, Target, envoy_hop_counter, fixed_rate_round, handshake_round, prepare, saturation_round,
    sidemesh_hop_counter,
)
from benchmarks.servers import (
    APP_PORT, CLIENT_SERVICE, OUTBOUND_PORT, REPO, UPSTREAM_SERVICE, Layout, start_envoy_mtls_path,
    start_envoy_path, start_nginx, start_sidemesh_path,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dataplane.json"
TOOLS = ("wrk", "h2load", "nginx")
# on 2 cores, a 1-minute load average above this means something else competes
BUSY_LOADAVG = 1.5
TLS_MODES = {"both": ("plain", "mtls"), "plain": ("plain",), "mtls": ("mtls",)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dataplane",
        description="Two-hop data plane benchmark: direct (wrk -> nginx), sidemesh (two sidecars + control "
                    "plane) and Envoy (two Envoys, --concurrency 1), plaintext and with mutual TLS on the "
                    "A -> B hop. Prints a table ending with 'sidemesh/envoy throughput=X.XX p99=Y.YY' "
                    "(and '; sidemesh/envoy mtls throughput=X.XX p99=Y.YY handshakes=Z.ZZ') and writes JSON.")
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
    parser.add_argument("--tls", choices=sorted(TLS_MODES), default="both",
                        help="plaintext paths (sidemesh --insecure, Envoy without TLS), mutual-TLS paths (the "
                             "sidecars' default, Envoy with TLS 1.3 contexts on A -> B), or both (default)")
    parser.add_argument("--handshake-duration", type=int, default=9,
                        help="seconds of fresh mutual-TLS connections to each mTLS path's B, split over --rounds "
                             "(0 = skip; default 9)")
    parser.add_argument("--handshake-clients", type=int, default=2,
                        help="client processes of the fresh-connection run (default 2)")
    parser.add_argument("--skip-fresh", action="store_true",
                        help="do not measure envoy-mtls-fresh (Envoy A with one request per upstream connection)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG of the latency percentiles (default: next to --out, if matplotlib is installed)")
    parser.add_argument("--skip-direct", action="store_true", help="do not measure the direct path")
    parser.add_argument("--skip-sidemesh", action="store_true", help="do not measure the sidemesh paths")
    parser.add_argument("--skip-envoy", action="store_true", help="do not measure the Envoy paths")
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


def start_paths(args: argparse.Namespace, workdir: Path, layout: Layout, children: Children,
                extra: dict[str, Any]) -> tuple[list[Target], list[HandshakeTarget]]:
    """Start every path the flags ask for (nginx is up already), plaintext first."""
    modes = TLS_MODES[args.tls]
    targets: list[Target] = []
    handshakes: list[HandshakeTarget] = []
    if not args.skip_direct:
        targets.append(Target("direct", f"http://{layout.upstream}:{APP_PORT}/", [], children))
    with_sidemesh = not args.skip_sidemesh and sidemesh_available()
    if not args.skip_sidemesh and not with_sidemesh:
        note = "sidemesh paths skipped: `python -m sidemesh sidecar/controlplane --help` does not work yet"
        print(note, flush=True)
        extra["notes"].append(note)
    if "plain" in modes:
        if with_sidemesh:
            proxies = start_sidemesh_path(children, layout, workers=args.workers)
            targets.append(Target("sidemesh", f"http://{layout.pod_a}:{OUTBOUND_PORT}/", proxies, children))
        if not args.skip_envoy:
            proxies = start_envoy_path(children, workdir, layout)
            targets.append(Target("envoy", f"http://{layout.envoy_a}:{OUTBOUND_PORT}/", proxies, children))
    if "mtls" in modes and (with_sidemesh or not args.skip_envoy):
        ca: MeshCa = init_mesh_ca(workdir / "mesh-ca", (CLIENT_SERVICE, UPSTREAM_SERVICE), repo=REPO)
        client = issue_files(ca, CLIENT_SERVICE, workdir / "handshake-client")
        if with_sidemesh:
            proxies = start_sidemesh_path(children, layout, workers=args.workers, ca=ca)
            targets.append(Target("sidemesh-mtls", f"http://{layout.pod_a_mtls}:{OUTBOUND_PORT}/", proxies,
                                  children, hop_counter=sidemesh_hop_counter(layout.pod_b_mtls)))
            handshakes.append(HandshakeTarget("sidemesh-mtls", proxies[1], layout.pod_b_mtls, client, children))
        if not args.skip_envoy:
            pooled, fresh = start_envoy_mtls_path(children, workdir, layout, ca, fresh=not args.skip_fresh)
            counter = envoy_hop_counter(layout.envoy_b_mtls)
            targets.append(Target("envoy-mtls", f"http://{layout.envoy_a_mtls}:{OUTBOUND_PORT}/", pooled,
                                  children, hop_counter=counter))
            if fresh is not None:
                targets.append(Target("envoy-mtls-fresh", f"http://{layout.envoy_a_fresh}:{OUTBOUND_PORT}/",
                                      fresh, children, hop_counter=counter))
            handshakes.append(HandshakeTarget("envoy-mtls", pooled[1], layout.envoy_b_mtls, client, children))
        if with_sidemesh and not args.skip_envoy and not args.skip_fresh:
            extra["notes"].append(
                "sidemesh has no setting for one request per upstream connection, so there is no "
                "sidemesh-mtls-fresh path; the handshake cost of both is compared at B's inbound instead")
    if args.handshake_duration == 0:
        handshakes = []
    return targets, handshakes


def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, PathResult], dict[str, HandshakeRun],
                                                          dict[str, Any]]:
    """Start every path, measure them round by round, interleaved. Returns results and extras."""
    layout = Layout(args.subnet)
    layout.check_free()
    script = workdir / "done.lua"
    script.write_text(WRK_DONE_LUA)
    extra: dict[str, Any] = {"notes": []}
    with Children(workdir) as children:
        nginx = start_nginx(children, workdir, layout.upstream)
        targets, handshakes = start_paths(args, workdir, layout, children, extra)
        load = os.getloadavg()[0]
        # the 1-minute load average as each phase starts: on 2 shared cores it says how noisy
        # the figures of that phase are
        extra["loadavg"] = {"start": round(load, 2)}
        if load > BUSY_LOADAVG:
            print(f"warning: the machine is busy (load average {load:.2f} on {os.cpu_count()} cores): figures "
                  "will be noisy; rounds are interleaved so every path sees the same noise", flush=True)
        for t in targets:
            prepare(t, args, script)
        extra["loadavg"]["saturation"] = round(os.getloadavg()[0], 2)
        print(f"saturation: {args.rounds} rounds of wrk -t1 -c{args.connections} "
              f"{args.duration / args.rounds:g}s per path", flush=True)
        for n in range(1, args.rounds + 1):
            for t in targets:
                saturation_round(t, args, script, n)
        time.sleep(0.5)
        extra["loadavg"]["fixed_rate"] = round(os.getloadavg()[0], 2)
        print(f"fixed rate: {args.rounds} rounds of h2load --h1 -c1 --rps {args.rate} "
              f"{args.latency_duration / args.rounds:g}s per path", flush=True)
        for n in range(1, args.rounds + 1):
            for t in targets:
                fixed_rate_round(t, args, workdir, n)
        if handshakes:
            extra["loadavg"]["handshakes"] = round(os.getloadavg()[0], 2)
            print(f"fresh mutual-TLS connections: {args.rounds} rounds of {args.handshake_clients} clients "
                  f"{args.handshake_duration / args.rounds:g}s per B", flush=True)
            for h in handshakes:
                h.loadavg = os.getloadavg()[0]
            for n in range(1, args.rounds + 1):
                for h in handshakes:
                    handshake_round(h, args, n)
        results = {t.name: t.result(args.rate) for t in targets}
        runs = {h.name: h.result() for h in handshakes}
        mesh = next((t for t in targets if t.name == "sidemesh"), None)
        if args.soak > 0 and mesh is not None:
            print(f"[sidemesh] soak {args.soak}s, sampling the sidecars' RSS every second", flush=True)
            extra["soak"] = soak(children, mesh.proxies, url=mesh.url, host=UPSTREAM_SERVICE, seconds=args.soak,
                                 connections=args.connections, script=str(script))
        extra["upstream"] = {"name": "nginx", "peak_rss_mb": round(memory_mb(nginx.pid, "VmHWM"), 2)}
        extra["loadavg"]["end"] = round(os.getloadavg()[0], 2)
    return results, runs, extra


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
    if not 0 <= args.handshake_duration <= 120 or not 1 <= args.handshake_clients <= 16:
        parser.error("--handshake-duration must be within 0..120 seconds and --handshake-clients within 1..16")


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
        paths, runs, extra = run(args, workdir)
    except BenchError as exc:
        # keep the logs of a failed run: they say why
        print(f"benchmark failed: {exc}\nlogs: {workdir}", file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.out, paths, settings, extra, runs)
    plot = args.plot or args.out.with_suffix(".png")
    plotted = bool(paths) and write_plot(plot, paths)
    if "soak" in extra:
        print(format_soak(extra["soak"]))
    print(f"results: {args.out}" + (f", plot: {plot}" if plotted else "")
          + (f", logs: {workdir}" if args.keep_logs else ""))
    print("load average (1 min) as each phase started: "
          + ", ".join(f"{phase} {value:.2f}" for phase, value in extra["loadavg"].items()))
    for note in extra["notes"]:
        print(f"note: {note}")
    print(format_table(paths, settings, runs))
    return 0


if __name__ == "__main__":
    run_main(main)
