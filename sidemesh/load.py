"""Steady, bounded HTTP load for drills and tests: a fixed request rate, open loop.

Requests start on a fixed schedule (``rate`` per second) whatever the latency, so an
outage shows up as failures or latency instead of silently slowing the load down;
``max_in_flight`` bounds concurrency and ``duration_s`` bounds time, so a run always
ends. Each result records when it started, how long it took, and whether it failed
(anything but a 200 with a JSON object body counts as a failure, and so does a body that
``check`` finds wrong).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True, slots=True)
class Result:
    started: float  # time.time()
    latency_s: float
    status: int  # 0 when no response
    error: str | None
    route: str | None = None  # x-sidemesh-route of the response
    body: dict[str, object] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LoadStats:
    results: list[Result] = field(default_factory=list)

    def add(self, r: Result) -> None:
        self.results.append(r)

    def between(self, start: float, end: float) -> list[Result]:
        return [r for r in self.results if start <= r.started < end]

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.ok]


def song_details_problem(doc: dict[str, object]) -> str | None:
    """What is wrong with a song-details document, or None: it must hold song, artist and image."""
    missing = [k for k in ("song", "artist", "image") if not isinstance(doc.get(k), dict)]
    return f"200 without {missing}: {str(doc)[:200]}" if missing else None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize(results: Sequence[Result]) -> dict[str, float | int]:
    lat = [r.latency_s * 1000 for r in results if r.ok]
    return {
        "requests": len(results),
        "failures": sum(1 for r in results if not r.ok),
        "p50_ms": round(percentile(lat, 50), 2),
        "p99_ms": round(percentile(lat, 99), 2),
    }


class LoadGenerator:
    """GET ``url_for(i)`` at ``rate`` requests/s until stopped or ``duration_s`` passes."""

    def __init__(
        self,
        url_for: Callable[[int], str],
        *,
        rate: float,
        duration_s: float,
        max_in_flight: int = 200,
        timeout_s: float = 10.0,
        keep_bodies: bool = False,
        check: Callable[[dict[str, object]], str | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if rate <= 0 or duration_s <= 0:
            raise ValueError("rate and duration must be > 0")
        self.url_for = url_for
        self.rate = rate
        self.duration_s = duration_s
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.keep_bodies = keep_bodies
        self.check = check
        self.stats = LoadStats()
        self._clock = clock
        self._stop = asyncio.Event()
        self.started_at = 0.0

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> LoadStats:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(self.max_in_flight)
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        tasks: set[asyncio.Task[None]] = set()
        self.started_at = self._clock()
        t0 = loop.time()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for i in itertools.count():
                due = t0 + i / self.rate
                if due - t0 >= self.duration_s or self._stop.is_set():
                    break
                delay = due - loop.time()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                await sem.acquire()
                task = asyncio.create_task(self._one(session, i, sem))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        return self.stats

    async def _one(self, session: aiohttp.ClientSession, i: int, sem: asyncio.Semaphore) -> None:
        started = self._clock()
        t = time.perf_counter()
        status, error, route, body = 0, None, None, None
        try:
            async with session.get(self.url_for(i)) as resp:
                status = resp.status
                route = resp.headers.get("x-sidemesh-route")
                data = await resp.json(content_type=None)
                if status != 200:
                    error = f"HTTP {status}: {str(data)[:200]}"
                elif not isinstance(data, dict):
                    error = "response is not a JSON object"
                else:
                    error = self.check(data) if self.check else None
                    body = data if self.keep_bodies else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            sem.release()
        self.stats.add(Result(started, time.perf_counter() - t, status, error, route, body))
