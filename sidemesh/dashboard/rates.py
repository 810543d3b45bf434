"""A sidecar's counters: the two metric families the dashboard reads, parsed from Prometheus text,
and what they did over a recent window, with p99 from the buckets.

``sidemesh_requests_total{direction,service,code}`` gives request and error rates;
``sidemesh_request_duration_seconds_bucket{direction,service,source,le}`` gives p99 and the
route source each call used (``sidecar/metrics.py`` writes both). Parsing is
prometheus_client's; ``parse`` only keeps the lines it needs, so a scrape with many other
series costs no more to read.

Each scrape of a sidecar is turned into a delta against its previous scrape, the way
Prometheus' ``increase()`` reads counters: a value lower than the one before means the
sidecar restarted, and the new value is all increase (Prometheus docs, "Counter resets").
The first scrape of a sidecar only sets the baseline. A window's rate is its deltas' sum
divided by the time they span, so a scrape that came late or a sidecar that missed a round
neither loses requests nor counts them twice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "sidemesh_requests"
DURATION = "sidemesh_request_duration_seconds"
_WANTED = (f"{REQUESTS}_total{{", f"{DURATION}_bucket{{")

RequestKey = tuple[str, str, int]  # (direction, service, status code)
DurationKey = tuple[str, str, str]  # (direction, service, route source)
Buckets = Mapping[float, float]  # upper bound (inf for +Inf) -> cumulative count


@dataclass(frozen=True, slots=True)
class MetricsSample:
    """One scrape of one sidecar: its request counters and duration histograms."""

    requests: Mapping[RequestKey, float] = field(default_factory=dict)
    durations: Mapping[DurationKey, Buckets] = field(default_factory=dict)


def parse(text: str) -> MetricsSample:
    """The request counters and duration buckets of a sidecar's ``/metrics`` body."""
    lines = "\n".join(line for line in text.splitlines() if line.startswith(_WANTED))
    requests: dict[RequestKey, float] = {}
    durations: dict[DurationKey, dict[float, float]] = {}
    for family in text_string_to_metric_families(lines + "\n"):
        for s in family.samples:
            labels = s.labels
            if s.name == f"{REQUESTS}_total":
                key = (labels.get("direction", ""), labels.get("service", ""), _code(labels.get("code")))
                requests[key] = requests.get(key, 0.0) + s.value
            elif s.name == f"{DURATION}_bucket":
                dkey = (labels.get("direction", ""), labels.get("service", ""), labels.get("source", ""))
                buckets = durations.setdefault(dkey, {})
                le = float(labels.get("le", "+Inf"))
                buckets[le] = buckets.get(le, 0.0) + s.value  # series differing in other labels add up
    return MetricsSample(requests, durations)


def _code(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class Counts:
    """Increases of one or more sidecars' counters over ``seconds``."""

    seconds: float = 0.0
    requests: Mapping[RequestKey, float] = field(default_factory=dict)
    durations: Mapping[DurationKey, Buckets] = field(default_factory=dict)


def increase(before: MetricsSample, after: MetricsSample) -> tuple[dict[RequestKey, float], dict[DurationKey, dict[float, float]]]:
    """Per-series increase from ``before`` to ``after``, reset-aware; unchanged series are left out."""
    requests = {}
    for key, value in after.requests.items():
        d = _counter_increase(before.requests.get(key, 0.0), value)
        if d:
            requests[key] = d
    durations = {}
    for dkey, buckets in after.durations.items():
        prev = before.durations.get(dkey, {})
        inc = {le: _counter_increase(prev.get(le, 0.0), n) for le, n in buckets.items()}
        if any(inc.values()):
            durations[dkey] = inc
    return requests, durations


def _counter_increase(before: float, after: float) -> float:
    return after - before if after >= before else after


class SidecarWindow:
    """The deltas of one sidecar's scrapes over the last ``keep_s`` seconds (monotonic clock)."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._last: tuple[float, MetricsSample] | None = None
        self._deltas: deque[tuple[float, float, Counts]] = deque()  # (start, end, increases)

    def add(self, t: float, sample: MetricsSample) -> None:
        if self._last is not None and t > self._last[0]:
            requests, durations = increase(self._last[1], sample)
            self._deltas.append((self._last[0], t, Counts(t - self._last[0], requests, durations)))
        self._last = (t, sample)
        while self._deltas and self._deltas[0][1] < t - self.keep_s:
            self._deltas.popleft()

    @property
    def ready(self) -> bool:
        """True once two scrapes gave a delta (the first is only a baseline)."""
        return bool(self._deltas)

    def counts(self, now: float, window_s: float) -> Counts:
        """Increases over the deltas that ended within ``window_s`` before ``now``."""
        chosen = [c for start, end, c in self._deltas if end > now - window_s]
        span = self.span(now, window_s)
        return merge(chosen, seconds=span[1] - span[0]) if chosen and span else Counts()

    def span(self, now: float, window_s: float) -> tuple[float, float] | None:
        """(start, end) of the time ``counts(now, window_s)`` covers; None when it covers none."""
        starts = [start for start, end, _ in self._deltas if end > now - window_s]
        return (starts[0], self._deltas[-1][1]) if starts else None


def merge(parts: Iterable[Counts], *, seconds: float | None = None) -> Counts:
    """The sum of several ``Counts``; ``seconds`` is the longest span unless given."""
    requests: dict[RequestKey, float] = {}
    durations: dict[DurationKey, dict[float, float]] = {}
    span = 0.0
    for c in parts:
        span = max(span, c.seconds)
        for key, n in c.requests.items():
            requests[key] = requests.get(key, 0.0) + n
        for dkey, buckets in c.durations.items():
            into = durations.setdefault(dkey, {})
            for le, n in buckets.items():
                into[le] = into.get(le, 0.0) + n
    return Counts(span if seconds is None else seconds, requests, durations)


def add_buckets(parts: Iterable[Buckets]) -> dict[float, float]:
    out: dict[float, float] = {}
    for buckets in parts:
        for le, n in buckets.items():
            out[le] = out.get(le, 0.0) + n
    return out


def quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile (0..1) of cumulative ``buckets``, interpolated linearly inside the bucket it
    falls in, as Prometheus' ``histogram_quantile`` does; None without observations. A quantile in
    the +Inf bucket is reported as the highest finite bound (the most the buckets can say)."""
    ordered = sorted(buckets.items())
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in ordered:
        if cumulative >= rank:
            if math.isinf(le):
                return lower
            if cumulative == below:
                return le
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower
