"""Results of the data plane benchmark: per-path figures, ratios, table, JSON, plot.

Pure functions over plain data, so the arithmetic and the table's last line are tested
without running anything. That line compares sidemesh with Envoy in each TLS mode that
ran: ``sidemesh/envoy throughput=X.XX p99=Y.YY`` (plaintext, which issue 5 checks) and
``sidemesh/envoy mtls throughput=X.XX p99=Y.YY handshakes=Z.ZZ`` (mutual TLS on the A -> B
hop; ``handshakes`` compares fresh mutual-TLS connections per second at B's inbound),
joined by ``; `` when both ran.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.handshake import HandshakeResult
from benchmarks.loadtools import FixedRateResult, WrkResult

PATH_ORDER = ("direct", "sidemesh", "envoy", "sidemesh-mtls", "envoy-mtls", "envoy-mtls-fresh")
PLAIN, MTLS = "plain", "mtls"
# the (sidemesh, Envoy) pair of paths compared in each TLS mode
MODES: dict[str, tuple[str, str]] = {PLAIN: ("sidemesh", "envoy"), MTLS: ("sidemesh-mtls", "envoy-mtls")}


@dataclass(frozen=True, slots=True)
class ProxyUsage:
    """CPU and memory of one proxy process over a path's runs."""

    name: str
    pid: int
    cpu_s_saturation: float
    cpu_s_fixed_rate: float
    idle_rss_mb: float
    peak_rss_mb: float  # VmHWM


@dataclass(frozen=True, slots=True)
class PathResult:
    """Everything measured on one path (direct, sidemesh or envoy)."""

    name: str
    saturation: WrkResult
    fixed_rate: FixedRateResult
    proxies: list[ProxyUsage] = field(default_factory=list)
    loadavg: float | None = None  # 1-minute load average when the path's runs started
    rounds_rps: list[float] = field(default_factory=list)  # saturation rate of each round
    # mutual TLS: handshakes B accepted during the saturation rounds (a pooled hop makes a few
    # per connection of the load; the fresh-connection path one per request), of them resumed
    hop_handshakes: int | None = None
    hop_resumed: int | None = None

    @property
    def rps(self) -> float:
        return self.saturation.rps

    @property
    def cpu_s_per_10k(self) -> float | None:
        """CPU seconds of all the path's proxies per 10k requests at saturation."""
        return per_10k(sum(p.cpu_s_saturation for p in self.proxies), self.saturation.requests) \
            if self.proxies else None

    @property
    def cpu_s_per_10k_fixed_rate(self) -> float | None:
        """The same at the fixed rate (idle-ish: wakeups cost more per request)."""
        return per_10k(sum(p.cpu_s_fixed_rate for p in self.proxies), self.fixed_rate.requests) \
            if self.proxies else None

    @property
    def peak_rss_mb(self) -> float | None:
        """The largest peak RSS among the path's proxies."""
        return max(p.peak_rss_mb for p in self.proxies) if self.proxies else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "saturation": {**asdict(self.saturation), "rps": round(self.rps, 1)},
            "fixed_rate": {**asdict(self.fixed_rate), "sustained": self.fixed_rate.sustained},
            "proxies": [asdict(p) for p in self.proxies],
            "cpu_s_per_10k": self.cpu_s_per_10k,
            "cpu_s_per_10k_fixed_rate": self.cpu_s_per_10k_fixed_rate,
            "peak_rss_mb": self.peak_rss_mb,
            "loadavg": self.loadavg,
            "rounds_rps": self.rounds_rps,
            "hop_handshakes": self.hop_handshakes,
            "hop_resumed": self.hop_resumed,
        }


@dataclass(frozen=True, slots=True)
class HandshakeRun:
    """The fresh-connection run (``benchmarks/handshake.py``) against one path's B."""

    name: str  # the path whose B was driven
    proxy: str  # B's process name
    result: HandshakeResult
    server_cpu_s: float  # B's CPU seconds over the run
    loadavg: float | None = None

    @property
    def rate(self) -> float:
        return self.result.rate

    @property
    def server_cpu_ms_per_conn(self) -> float:
        return per_connection_ms(self.server_cpu_s, self.result.connections)

    @property
    def client_cpu_ms_per_conn(self) -> float:
        return per_connection_ms(self.result.client_cpu_s, self.result.connections)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "proxy": self.proxy, **asdict(self.result), "rate": round(self.rate, 1),
                "server_cpu_s": self.server_cpu_s, "server_cpu_ms_per_conn": self.server_cpu_ms_per_conn,
                "client_cpu_ms_per_conn": self.client_cpu_ms_per_conn, "loadavg": self.loadavg}


def per_connection_ms(cpu_s: float, connections: int) -> float:
    """CPU milliseconds per connection."""
    return cpu_s / connections * 1000 if connections > 0 else float("nan")


def per_10k(cpu_s: float, requests: int) -> float:
    """CPU seconds per 10 000 requests."""
    return cpu_s / requests * 10_000 if requests > 0 else float("nan")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def ratios(paths: dict[str, PathResult], mode: str = PLAIN) -> dict[str, float | None]:
    """sidemesh over Envoy for each headline figure of ``mode`` (None when a path was not run)."""
    sidemesh, envoy = MODES[mode]
    s, e = paths.get(sidemesh), paths.get(envoy)

    def of(get: Any) -> float | None:
        return ratio(get(s), get(e)) if s is not None and e is not None else None

    return {
        "throughput": of(lambda r: r.rps),
        "p50": of(lambda r: r.fixed_rate.latency_ms["p50"]),
        "p99": of(lambda r: r.fixed_rate.latency_ms["p99"]),
        "p99.9": of(lambda r: r.fixed_rate.latency_ms["p99.9"]),
        "cpu_per_10k": of(lambda r: r.cpu_s_per_10k),
        "peak_rss": of(lambda r: r.peak_rss_mb),
    }


def handshake_ratios(runs: dict[str, HandshakeRun]) -> dict[str, float | None]:
    """sidemesh over Envoy for the fresh-connection run: connections/s (higher is better)
    and B's CPU per connection (lower is better)."""
    sidemesh, envoy = MODES[MTLS]
    s, e = runs.get(sidemesh), runs.get(envoy)
    if s is None or e is None:
        return {"handshakes": None, "cpu_per_handshake": None}
    return {"handshakes": ratio(s.rate, e.rate),
            "cpu_per_handshake": ratio(s.server_cpu_ms_per_conn, e.server_cpu_ms_per_conn)}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)  # NaN: nothing measured


def ratio_line(r: dict[str, float | None], mode: str = PLAIN, handshakes: dict[str, float | None] | None = None) -> str:
    """One mode's part of the table's last line (the plaintext one exactly as issue 5 asks)."""
    label = "sidemesh/envoy" if mode == PLAIN else f"sidemesh/envoy {mode}"
    line = f"{label} throughput={_fmt(r['throughput'], '.2f')} p99={_fmt(r['p99'], '.2f')}"
    if handshakes is not None:
        line += f" handshakes={_fmt(handshakes['handshakes'], '.2f')}"
    return line


def modes_run(paths: dict[str, PathResult], runs: dict[str, HandshakeRun] | None = None) -> list[str]:
    """The TLS modes of which at least one compared path (or handshake run) has results;
    plaintext when none, so that the last line always says something."""
    found = [m for m, pair in MODES.items() if any(p in paths or p in (runs or {}) for p in pair)]
    return found or [PLAIN]


def summary_line(paths: dict[str, PathResult], runs: dict[str, HandshakeRun] | None = None) -> str:
    """The table's last line: ``ratio_line`` of every mode that ran, joined by ``; ``."""
    parts = []
    for mode in modes_run(paths, runs):
        hs = handshake_ratios(runs or {}) if mode == MTLS and runs is not None else None
        parts.append(ratio_line(ratios(paths, mode), mode, hs))
    return "; ".join(parts)


def format_table(paths: dict[str, PathResult], settings: dict[str, Any],
                 runs: dict[str, HandshakeRun] | None = None) -> str:
    """A short fixed-width table; its last line is ``summary_line``."""
    rate = settings.get("rate")
    width = max([9, *(len(n) for n in paths)])
    header = (f"{'path':<{width}} {'req/s':>8} {'errors':>6} | @{rate}/s: {'p50ms':>6} {'p99ms':>6} "
              f"{'p99.9ms':>7} {'ok':>3} | {'cpu_s/10k':>9} {'peak_rss_mb':>11}")
    lines = [
        f"two-hop data plane, {settings.get('rounds', 1)} interleaved rounds per path: wrk -t1 "
        f"-c{settings.get('connections')} {settings.get('duration')}s in all (saturation), "
        f"h2load --h1 -c1 --rps {rate} {settings.get('latency_duration')}s in all (latency)",
        header,
        "-" * len(header),
    ]
    ordered = [n for n in PATH_ORDER if n in paths]
    for name in ordered:
        r = paths[name]
        lat = r.fixed_rate.latency_ms
        errors = r.saturation.error_count + r.fixed_rate.failed
        lines.append(
            f"{name:<{width}} {r.rps:>8.0f} {errors:>6} | {'':>{len(str(rate)) + 4}}{lat['p50']:>6.3f} "
            f"{lat['p99']:>6.3f} {lat['p99.9']:>7.3f} {'yes' if r.fixed_rate.sustained else 'NO':>3} | "
            f"{_fmt(r.cpu_s_per_10k, '.3f'):>9} {_fmt(r.peak_rss_mb, '.1f'):>11}"
        )
    for name in ordered:
        for p in paths[name].proxies:
            lines.append(f"  {name}/{p.name}: cpu {p.cpu_s_saturation:.2f}s at saturation, "
                         f"idle rss {p.idle_rss_mb:.1f} MB, peak rss {p.peak_rss_mb:.1f} MB")
    for name in ordered:
        r = paths[name]
        if r.hop_handshakes is not None:
            resumed = "" if r.hop_resumed is None else f" ({r.hop_resumed} resumed)"
            lines.append(f"  {name}: B accepted {r.hop_handshakes} TLS handshakes{resumed} "
                         f"during {r.saturation.requests} requests at saturation")
    if runs:
        lines += handshake_lines(runs, settings)
    modes = modes_run(paths, runs)
    for mode in modes:
        rs = ratios(paths, mode)
        label = "ratios:" if mode == PLAIN else f"{mode} ratios:"
        extra = ""
        if mode == MTLS and runs:
            extra = f" cpu/handshake={_fmt(handshake_ratios(runs)['cpu_per_handshake'], '.2f')}"
        lines.append(f"{label} p50={_fmt(rs['p50'], '.2f')} p99.9={_fmt(rs['p99.9'], '.2f')} "
                     f"cpu/10k={_fmt(rs['cpu_per_10k'], '.2f')} peak_rss={_fmt(rs['peak_rss'], '.2f')}{extra}")
    lines.append(summary_line(paths, runs))
    return "\n".join(lines)


def handshake_lines(runs: dict[str, HandshakeRun], settings: dict[str, Any]) -> list[str]:
    """The fresh-connection section of the table."""
    clients = next(iter(runs.values())).result.clients
    width = max(9, *(len(n) for n in runs))
    header = (f"{'B of path':<{width}} {'conn/s':>7} {'errors':>6} | {'p50ms':>6} {'p99ms':>6} | "
              f"{'B cpu ms/conn':>13} {'client cpu ms/conn':>18}")
    lines = [f"fresh mutual-TLS connections to B's inbound ({clients} client processes, each: TCP + TLS 1.3 "
             f"full handshake + GET + close), {settings.get('rounds', 1)} interleaved rounds, "
             f"{settings.get('handshake_duration')}s in all:", header, "-" * len(header)]
    for name in [n for n in PATH_ORDER if n in runs]:
        run = runs[name]
        lat = run.result.latency_ms
        lines.append(f"{name:<{width}} {run.rate:>7.0f} {run.result.error_count:>6} | "
                     f"{_fmt(lat.get('p50'), '.3f'):>6} {_fmt(lat.get('p99'), '.3f'):>6} | "
                     f"{_fmt(run.server_cpu_ms_per_conn, '.3f'):>13} {_fmt(run.client_cpu_ms_per_conn, '.3f'):>18}")
    return lines


def write_json(path: Path, paths: dict[str, PathResult], settings: dict[str, Any],
               extra: dict[str, Any] | None = None, runs: dict[str, HandshakeRun] | None = None) -> None:
    """All figures, the settings they were taken with, and the ratios."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "settings": settings,
        "paths": {name: r.to_json() for name, r in paths.items()},
        "handshakes": {name: run.to_json() for name, run in (runs or {}).items()},
        "ratios_sidemesh_over_envoy": ratios(paths, PLAIN),
        "ratios_sidemesh_over_envoy_mtls": {**ratios(paths, MTLS), **handshake_ratios(runs or {})},
        "summary": summary_line(paths, runs),
        **(extra or {}),
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write_plot(path: Path, paths: dict[str, PathResult]) -> bool:
    """A PNG of the latency percentiles per path, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = ["p50", "p90", "p99", "p99.9"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in [n for n in PATH_ORDER if n in paths]:
        lat = paths[name].fixed_rate.latency_ms
        ax.plot(keys, [lat[k] for k in keys], marker="o", label=name)
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"latency at {next(iter(paths.values())).fixed_rate.target_rps:.0f} req/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
