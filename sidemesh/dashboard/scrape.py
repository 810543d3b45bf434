"""One round of questions: ``sidemesh status``'s (every sidecar's ``/state``, the control plane's
``/status``, a ``sidemesh up``'s ``/pods``), then every answering sidecar's ``/metrics``, all at once.

The only I/O of the dashboard besides serving the page. One keep-alive session serves every
round, so a round costs each sidecar two requests on an open connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from sidemesh.dashboard.config import DashboardConfig
from sidemesh.dashboard.rates import MetricsSample, parse
from sidemesh.status import Answers, ask_all, client_timeout


@dataclass(frozen=True, slots=True)
class Round:
    """What one round brought back."""

    wall: float  # time.time() at its start, for the page
    mono: float  # the monotonic clock at its start: scrape times convert to wall time through it
    answers: Answers | None  # None: neither a `sidemesh up` nor the seed sidecar answered
    metrics: dict[str, tuple[float, MetricsSample]] = field(default_factory=dict)  # admin -> (monotonic, sample)
    took_s: float = 0.0


class Scraper:
    def __init__(self, config: DashboardConfig, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._monotonic = monotonic
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Scraper:
        # keep-alive to every sidecar; a connection per sidecar is enough, rounds never overlap
        connector = aiohttp.TCPConnector(limit_per_host=2, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector, timeout=client_timeout(self.config.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def round(self) -> Round:
        assert self._session is not None, "use `async with Scraper(...)`"
        c = self.config
        wall, t0 = self._clock(), self._monotonic()
        answers = await ask_all(self._session, c.control, c.admin, controlplane_http=c.controlplane_http,
                                timeout=c.timeout_s)
        if answers is None:
            return Round(wall, t0, None, took_s=self._monotonic() - t0)
        admins = [t.admin for t, state, _ in answers.sidecars if state is not None]
        samples = await asyncio.gather(*(self._metrics(admin) for admin in admins))
        metrics = {admin: s for admin, s in zip(admins, samples, strict=True) if s is not None}
        return Round(wall, t0, answers, metrics, self._monotonic() - t0)

    async def _metrics(self, admin: str) -> tuple[float, MetricsSample] | None:
        assert self._session is not None
        try:
            async with self._session.get(f"http://{admin}/metrics") as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError):
            return None  # the sidecar is shown from its /state; its rates wait for the next round
        at = self._monotonic()
        try:
            return at, parse(text)
        except ValueError:
            return None
