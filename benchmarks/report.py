"""Results of the data plane benchmark: per-path figures, ratios, table, JSON, plot.

Pure functions over plain data, so the arithmetic and the table's last line
(``sidemesh/envoy throughput=X.XX p99=Y.YY``, which issue 5 checks) are tested
without running anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.loadtools import FixedRateResult, WrkResult

PATH_ORDER = ("direct", "sidemesh", "envoy")


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
        }


def per_10k(cpu_s: float, requests: int) -> float:
    """CPU seconds per 10 000 requests."""
    return cpu_s / requests * 10_000 if requests > 0 else float("nan")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def ratios(paths: dict[str, PathResult]) -> dict[str, float | None]:
    """sidemesh over Envoy for each headline figure (None when a path was not run)."""
    s, e = paths.get("sidemesh"), paths.get("envoy")

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


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio_line(r: dict[str, float | None]) -> str:
    """The table's last line, exactly as issue 5 asks."""
    return f"sidemesh/envoy throughput={_fmt(r['throughput'], '.2f')} p99={_fmt(r['p99'], '.2f')}"


def format_table(paths: dict[str, PathResult], settings: dict[str, Any]) -> str:
    """A short fixed-width table; its last line is ``ratio_line``."""
    rate = settings.get("rate")
    header = (f"{'path':<9} {'req/s':>8} {'errors':>6} | @{rate}/s: {'p50ms':>6} {'p99ms':>6} "
              f"{'p99.9ms':>7} {'ok':>3} | {'cpu_s/10k':>9} {'peak_rss_mb':>11}")
    lines = [
        f"two-hop data plane, {settings.get('rounds', 1)} interleaved rounds per path: wrk -t1 "
        f"-c{settings.get('connections')} {settings.get('duration')}s in all (saturation), "
        f"h2load --h1 -c1 --rps {rate} {settings.get('latency_duration')}s in all (latency)",
        header,
        "-" * len(header),
    ]
    for name in [n for n in PATH_ORDER if n in paths]:
        r = paths[name]
        lat = r.fixed_rate.latency_ms
        errors = r.saturation.error_count + r.fixed_rate.failed
        lines.append(
            f"{name:<9} {r.rps:>8.0f} {errors:>6} | {'':>{len(str(rate)) + 4}}{lat['p50']:>6.3f} {lat['p99']:>6.3f} "
            f"{lat['p99.9']:>7.3f} {'yes' if r.fixed_rate.sustained else 'NO':>3} | "
            f"{_fmt(r.cpu_s_per_10k, '.3f'):>9} {_fmt(r.peak_rss_mb, '.1f'):>11}"
        )
    for name in [n for n in paths if n in PATH_ORDER]:
        for p in paths[name].proxies:
            lines.append(f"  {name}/{p.name}: cpu {p.cpu_s_saturation:.2f}s at saturation, "
                         f"idle rss {p.idle_rss_mb:.1f} MB, peak rss {p.peak_rss_mb:.1f} MB")
    rs = ratios(paths)
    lines.append(f"ratios: p50={_fmt(rs['p50'], '.2f')} p99.9={_fmt(rs['p99.9'], '.2f')} "
                 f"cpu/10k={_fmt(rs['cpu_per_10k'], '.2f')} peak_rss={_fmt(rs['peak_rss'], '.2f')}")
    lines.append(ratio_line(rs))
    return "\n".join(lines)


def write_json(path: Path, paths: dict[str, PathResult], settings: dict[str, Any],
               extra: dict[str, Any] | None = None) -> None:
    """All figures, the settings they were taken with, and the ratios."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "settings": settings,
        "paths": {name: r.to_json() for name, r in paths.items()},
        "ratios_sidemesh_over_envoy": ratios(paths),
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
