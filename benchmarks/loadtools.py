"""The load tools (wrk, h2load): their command lines and the parsing of their output.

- Saturation: ``wrk -t1 -cN -dDs`` with a Lua ``done()`` hook that prints the
  summary as one JSON line (``WRK_JSON {...}``), so nothing depends on wrk's
  human-readable units. wrk is closed-loop: N connections, each sends its next
  request when the previous answer arrived.
- Fixed rate: ``h2load --h1 -c1 --rps R -D Ds --log-file F`` (wrk2 is not in
  Debian). h2load writes one line per request (start time in microseconds,
  status, latency in microseconds); percentiles are computed from that file, so
  p99.9 is exact. h2load paces in ticks (it sends a small burst every ~10 ms),
  and on one connection a burst is sent back-to-back, so the proxy never sees
  more than one request in flight: the latency is the path's own, not queueing.
  Like every closed-loop tool it does not correct coordinated omission; a rate
  that a path does not sustain shows up as ``achieved_rps`` below the target.

Builders and parsers are pure; running them is ``Children.run``'s job.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.procs import BenchError

WRK_JSON_MARK = "WRK_JSON "

# printed by wrk at the end of the run; `errors.status` counts non-2xx/3xx answers
WRK_DONE_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p99.9": %d}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run at saturation."""

    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_ms: dict[str, float]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass(frozen=True, slots=True)
class FixedRateResult:
    """One h2load run at a fixed rate, with its latency distribution."""

    target_rps: float
    achieved_rps: float
    requests: int
    ok: int
    failed: int
    latency_ms: dict[str, float]

    @property
    def sustained(self) -> bool:
        """True when the path kept up: >= 95 % of the target rate, no failures."""
        return self.failed == 0 and self.achieved_rps >= 0.95 * self.target_rps


def wrk_command(url: str, *, connections: int, duration_s: float, script: str,
                host: str | None = None, threads: int = 1, timeout_s: float = 5.0) -> list[str]:
    """wrk at saturation against ``url`` (origin-form, ``Host: host`` if given)."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            f"--timeout={max(1, round(timeout_s))}s", "-s", script]
    if host:
        argv += ["-H", f"Host: {host}"]
    return [*argv, url]


def h2load_command(url: str, *, rate: int, duration_s: float, log_file: str, host: str | None = None,
                   connections: int = 1, warmup_s: float = 1.0) -> list[str]:
    """h2load over HTTP/1.1 at ``rate`` requests/s in total, one line per request to ``log_file``."""
    if rate % connections:
        raise BenchError(f"--rate {rate} must be a multiple of the fixed-rate connections ({connections})")
    argv = ["h2load", "--h1", f"-c{connections}", f"--rps={rate // connections}",
            f"--duration={duration_s:g}", f"--warm-up-time={warmup_s:g}", f"--log-file={log_file}"]
    if host:
        # h2load maps :authority to the HTTP/1.1 Host header ("-H host:" would send two)
        argv += ["-H", f":authority: {host}"]
    return [*argv, url]


def parse_wrk(output: str) -> WrkResult:
    """The ``WRK_JSON`` line printed by ``WRK_DONE_LUA``."""
    for line in output.splitlines():
        if line.startswith(WRK_JSON_MARK):
            try:
                data = json.loads(line[len(WRK_JSON_MARK):])
            except json.JSONDecodeError as exc:
                raise BenchError(f"wrk printed a malformed summary: {line!r}") from exc
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                errors={k: int(v) for k, v in data["errors"].items()},
                latency_ms={k: v / 1000 for k, v in data["latency_us"].items()},
            )
    raise BenchError(f"no wrk summary in its output:\n{output[-1500:]}")


_H2LOAD_FINISHED = re.compile(r"^finished in [\d.]+m?s, ([\d.]+) req/s", re.MULTILINE)


def parse_h2load_rps(output: str) -> float:
    """Requests/s of the measured phase, from h2load's ``finished in 11.00s, 1000.00 req/s`` line.

    (The "finished in" time includes the warm-up; the rate does not.)
    """
    match = _H2LOAD_FINISHED.search(output)
    if not match:
        raise BenchError(f"no 'finished in ... req/s' line in h2load's output:\n{output[-1500:]}")
    return float(match.group(1))


_H2LOAD_REQUESTS = re.compile(r"^requests: .*?(\d+) failed, (\d+) errored, (\d+) timeout", re.MULTILINE)


def parse_h2load_failed(output: str) -> int:
    """Requests h2load counts as failed (connection errors, timeouts, error statuses)."""
    match = _H2LOAD_REQUESTS.search(output)
    if not match:
        raise BenchError(f"no 'requests:' line in h2load's output:\n{output[-1500:]}")
    # "failed" already includes "errored"; timeouts are counted apart
    return int(match.group(1)) + int(match.group(3))


def parse_h2load_log(text: str) -> list[tuple[int, int]]:
    """(status, latency in microseconds) per request of an h2load ``--log-file``."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise BenchError(f"h2load log line {number} is not 'start status latency': {line!r}")
        rows.append((int(parts[1]), int(parts[2])))
    return rows


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (the way wrk and HdrHistogram count)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    # the epsilon keeps float noise (99.9 / 100 * 1000 = 999.0000000000001) from adding a rank
    rank = max(1, math.ceil(p * len(sorted_values) / 100 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def merge_wrk(rounds: Sequence[WrkResult]) -> WrkResult:
    """Several saturation rounds as one: requests, time and errors add up; the
    latency figures are those of the median round (by rate)."""
    if not rounds:
        raise ValueError("no rounds to merge")
    median = sorted(rounds, key=lambda r: r.rps)[(len(rounds) - 1) // 2]
    errors: dict[str, int] = {}
    for r in rounds:
        for key, value in r.errors.items():
            errors[key] = errors.get(key, 0) + value
    return WrkResult(requests=sum(r.requests for r in rounds), duration_s=sum(r.duration_s for r in rounds),
                     errors=errors, latency_ms=dict(median.latency_ms))


def fixed_rate_result(output: str | Sequence[str], log_text: str | Sequence[str], *,
                      target_rps: float) -> FixedRateResult:
    """Combine h2load's summaries (rate, failures) and per-request logs (latencies).

    Several rounds (lists of outputs and logs) pool their latencies; the achieved
    rate is the lowest of the rounds, so ``sustained`` means every round kept up.
    """
    outputs = [output] if isinstance(output, str) else list(output)
    logs = [log_text] if isinstance(log_text, str) else list(log_text)
    rows = [row for text in logs for row in parse_h2load_log(text)]
    if not rows:
        raise BenchError(f"h2load logged no request:\n{outputs[-1][-1500:] if outputs else ''}")
    latencies = sorted(latency for _, latency in rows)
    ok = sum(1 for status, _ in rows if 200 <= status < 400)
    return FixedRateResult(
        target_rps=target_rps,
        achieved_rps=min(parse_h2load_rps(o) for o in outputs),
        requests=len(rows),
        ok=ok,
        failed=max(len(rows) - ok, sum(parse_h2load_failed(o) for o in outputs)),
        latency_ms={_pkey(p): percentile(latencies, p) / 1000 for p in PERCENTILES}
        | {"max": latencies[-1] / 1000, "mean": sum(latencies) / len(latencies) / 1000},
    )


def _pkey(p: float) -> str:
    return f"p{p:g}"
