"""One path under test while the data plane benchmark runs, and one round of each load on it.

``Target`` is a two-hop path (its URL, its proxies, what was measured so far);
``HandshakeTarget`` is an mTLS path's B under fresh mutual-TLS connections. The round
functions run one load tool to completion (bounded in time), read /proc CPU of the path's
proxies around it, and keep the raw results for ``benchmarks/report.py``. The driver
(``benchmarks/dataplane.py``) calls them in interleaved order.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.envoyconfig import TlsFiles, listener_handshakes, parse_envoy_stats
from benchmarks.handshake import HandshakeResult, handshake_command, merge_handshakes, parse_handshake
from benchmarks.loadtools import WrkResult, fixed_rate_result, h2load_command, merge_wrk, parse_wrk, wrk_command
from benchmarks.procs import BenchError, Child, Children, cpu_seconds, http_get, memory_mb
from benchmarks.report import HandshakeRun, PathResult, ProxyUsage
from benchmarks.servers import ADMIN_PORT, BODY, INBOUND_PORT, UPSTREAM_SERVICE, sidemesh_inbound_handshakes

# beyond the run's own length, for start-up and summary
RUN_TIMEOUT_S = 60

# (TLS handshakes B accepted so far, of them resumed sessions or None when not counted)
HopCounter = Callable[[], tuple[int, int | None]]


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
    hop_counter: HopCounter | None = None  # mutual TLS: B's accepted handshakes
    hop_handshakes: int = 0
    hop_resumed: int | None = None

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
                          rounds_rps=[round(r.rps, 1) for r in self.saturation],
                          hop_handshakes=self.hop_handshakes if self.hop_counter is not None else None,
                          hop_resumed=self.hop_resumed)


@dataclass
class HandshakeTarget:
    """One mTLS path's B under the fresh-connection run."""

    name: str
    proxy: Child
    address: str
    client: TlsFiles
    children: Children
    rounds: list[HandshakeResult] = field(default_factory=list)
    cpu_s: float = 0.0
    loadavg: float = 0.0

    def result(self) -> HandshakeRun:
        return HandshakeRun(name=self.name, proxy=self.proxy.name, result=merge_handshakes(self.rounds),
                            server_cpu_s=round(self.cpu_s, 3), loadavg=round(self.loadavg, 2))


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
    """One wrk run at saturation; CPU of the path's proxies (and B's handshakes) around it."""
    hop_before = target.hop_counter() if target.hop_counter is not None else None
    before = target.cpu()
    out = target.children.run(f"wrk-{target.name}-{n}", wrk_command(
        target.url, connections=args.connections, duration_s=args.duration / args.rounds, script=str(script),
        host=UPSTREAM_SERVICE), timeout=RUN_TIMEOUT_S + args.duration)
    after = target.cpu()
    for name, cpu in after.items():
        target.cpu_saturation[name] = target.cpu_saturation.get(name, 0.0) + cpu - before[name]
    if target.hop_counter is not None and hop_before is not None:
        done, resumed = target.hop_counter()
        target.hop_handshakes += done - hop_before[0]
        if resumed is not None and hop_before[1] is not None:
            target.hop_resumed = (target.hop_resumed or 0) + resumed - hop_before[1]
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


def handshake_round(target: HandshakeTarget, args: argparse.Namespace, n: int) -> None:
    """One run of fresh mutual-TLS connections to B's inbound; B's CPU around it."""
    seconds = args.handshake_duration / args.rounds
    before = cpu_seconds(target.proxy.pid)
    out = target.children.run(f"handshake-{target.name}-{n}", handshake_command(
        target.address, INBOUND_PORT, cert=target.client.cert, key=target.client.key, ca=target.client.ca,
        host=UPSTREAM_SERVICE, seconds=seconds, clients=args.handshake_clients),
        timeout=RUN_TIMEOUT_S + seconds)
    target.cpu_s += cpu_seconds(target.proxy.pid) - before
    result = parse_handshake(out)
    target.rounds.append(result)
    if not target.proxy.alive:
        raise BenchError(f"{target.proxy.name} exited under the fresh-connection load:\n{target.proxy.log_tail()}")
    print(f"[{target.name}] handshake round {n}: {result.rate:>6.0f} conn/s, errors {result.error_count}",
          flush=True)


def sidemesh_hop_counter(address: str) -> HopCounter:
    """B's successful inbound mTLS handshakes, from its /metrics (resumption is not counted there)."""
    def count() -> tuple[int, int | None]:
        status, body = http_get(f"http://{address}:{ADMIN_PORT}/metrics")
        if status != 200:
            raise BenchError(f"{address}:{ADMIN_PORT}/metrics answered {status}")
        return sidemesh_inbound_handshakes(body.decode()), None
    return count


def envoy_hop_counter(address: str) -> HopCounter:
    """B's TLS handshakes and resumed sessions, from Envoy's admin /stats."""
    def count() -> tuple[int, int | None]:
        status, body = http_get(f"http://{address}:{ADMIN_PORT}/stats?filter=ssl")
        if status != 200:
            raise BenchError(f"{address}:{ADMIN_PORT}/stats answered {status}")
        return listener_handshakes(parse_envoy_stats(body.decode()))
    return count
