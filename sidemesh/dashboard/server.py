"""The dashboard server: a poller that asks the mesh every round, and an aiohttp app that serves the
page and pushes each round to every open page as a server-sent event.

- ``GET /`` the page; ``GET /static/...`` its script, style and the vendored uPlot
- ``GET /events`` ``text/event-stream``: first ``history`` (the timeline so far and the current
  view), then a ``tick`` per round (the view, the round's timeline point, new events). The
  browser's EventSource reconnects by itself (``retry: 1000``) and gets the history again.
- ``GET /api/view`` the same as one JSON document, for scripts
- ``GET /healthz`` 200 while rounds complete, 503 when none did for ``STALE_ROUNDS`` intervals

Each round is serialized once, whatever the number of pages. A page that cannot keep up (its
queue is full) is dropped and reconnects to a fresh history, rather than holding memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from sidemesh.dashboard.config import DashboardConfig
from sidemesh.dashboard.graph import CLIENTS, SidecarCalls, build_graph
from sidemesh.dashboard.rates import Counts, SidecarWindow
from sidemesh.dashboard.scrape import Round, Scraper
from sidemesh.dashboard.timeline import Timeline
from sidemesh.dashboard.view import controlplane_view, mode_counts, sidecars_view

log = logging.getLogger("sidemesh.dashboard")

STATIC = Path(__file__).parent / "static"
# the timeline's rate per round: short enough that a one-second dip shows
TIMELINE_WINDOW_S = 2.0
QUEUE_PER_PAGE = 16
STALE_ROUNDS = 10


class Dashboard:
    """The state behind the page: rate windows per sidecar, the timeline, the last view."""

    def __init__(self, config: DashboardConfig, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._monotonic = monotonic
        self.timeline = Timeline(config.history_s)
        self.windows: dict[str, SidecarWindow] = {}
        self.view: dict[str, Any] | None = None
        self.last_cp: tuple[float, dict[str, Any]] | None = None
        self.edges_seen: dict[tuple[str, str], float] = {}  # (from, to) -> wall time it last carried calls
        self.rounds = 0
        self.last_round_at: float | None = None  # monotonic
        self.last_round_s = 0.0
        self._pages: set[asyncio.Queue[bytes | None]] = set()

    # ----- one round (no I/O) -----

    def apply(self, rnd: Round) -> dict[str, Any]:
        """Fold a round into the state; the ``tick`` message for the pages."""
        answers = rnd.answers
        keep = max(self.config.window_s, TIMELINE_WINDOW_S) + 2 * self.config.interval_s
        for admin, (at, sample) in rnd.metrics.items():
            self.windows.setdefault(admin, SidecarWindow(keep)).add(at, sample)
        asked = {t.admin for t, _, _ in answers.sidecars} if answers else set()
        for gone in set(self.windows) - asked:  # scaled away or no longer listed
            del self.windows[gone]
        now = self._monotonic()
        report = answers.report() if answers else None
        states = {t.admin: s for t, s, _ in answers.sidecars if s is not None} if answers else {}
        if answers and answers.controlplane is not None:
            self.last_cp = (rnd.wall, answers.controlplane)
        sidecars = sidecars_view(report, states)
        # a sidecar with only its baseline scrape would make its calls look like outside clients
        settled = all(w.ready for admin, w in self.windows.items() if admin in rnd.metrics)
        graph = build_graph(self._calls(rnd, now, self.config.window_s), self._known_edges(rnd.wall), clients=settled)
        for e in graph["edges"]:
            if e["rps"] > 0:
                self.edges_seen[(e["from"], e["to"])] = rnd.wall
        called = {e["to"] for e in graph["edges"] if e["from"] != CLIENTS}
        for frm, to in list(self.edges_seen):  # outside calls to a service the mesh calls were counting noise
            if frm == CLIENTS and to in called and not any(e["id"] == f"{frm}->{to}" and e["rps"] > 0 for e in graph["edges"]):
                del self.edges_seen[(frm, to)]
        recent = build_graph(self._calls(rnd, now, TIMELINE_WINDOW_S), clients=settled)
        spans = [s for w in self.windows.values() if (s := w.span(now, self.config.window_s))]
        self.view = {
            "at": rnd.wall, "source": report["source"] if report else None, "window_s": self.config.window_s,
            # the wall-clock time the graph's rates cover (the window's scrapes, each sidecar's own)
            "window_from": round(rnd.wall + min(s[0] for s in spans) - rnd.mono, 3) if spans else None,
            "window_to": round(rnd.wall + max(s[1] for s in spans) - rnd.mono, 3) if spans else None,
            "interval_s": self.config.interval_s, "round_ms": round(rnd.took_s * 1000, 1),
            "controlplane": controlplane_view(answers, self.last_cp, report),
            "sidecars": sidecars, "graph": graph,
        }
        by_instance = {str(s.get("instance") or admin): s for admin, s in states.items()}
        events = self.timeline.observe(rnd.wall, answers.controlplane if answers else None, by_instance,
                                       answers.pods if answers else None)
        services = {n["id"]: (n["rps"], n["errors_rps"]) for n in recent["nodes"] if n["kind"] == "service"}
        cp_up = None if answers is None else answers.controlplane is not None
        point = self.timeline.record(rnd.wall, services, cp_up, mode_counts(sidecars))
        self.rounds += 1
        self.last_round_at, self.last_round_s = now, rnd.took_s
        return {"view": self.view, "point": point, "events": events}

    def _calls(self, rnd: Round, now: float, window_s: float) -> list[SidecarCalls]:
        out = []
        for target, state, _ in rnd.answers.sidecars if rnd.answers else []:
            st = state or {}
            window = self.windows.get(target.admin)
            out.append(SidecarCalls(
                service=str(st.get("service") or target.service or "?"),
                instance=str(st.get("instance") or target.instance or target.admin),
                mode=st.get("mode") if state is not None else None,
                counts=window.counts(now, window_s) if window else Counts(),
                routes={name: str((e or {}).get("source")) for name, e in (st.get("services") or {}).items()},
            ))
        return out

    def _known_edges(self, wall: float) -> list[tuple[str, str]]:
        for key, seen in list(self.edges_seen.items()):
            if seen < wall - self.config.history_s:
                del self.edges_seen[key]
        return list(self.edges_seen)

    def history(self) -> dict[str, Any]:
        return {"view": self.view, **self.timeline.history()}

    # ----- pages -----

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_PER_PAGE)
        self._pages.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[bytes | None]) -> None:
        self._pages.discard(q)

    @property
    def pages(self) -> int:
        return len(self._pages)

    def publish(self, message: bytes) -> None:
        for q in list(self._pages):
            try:
                q.put_nowait(message)
            except asyncio.QueueFull:
                self._close_page(q)

    def close_pages(self) -> None:
        for q in list(self._pages):
            self._close_page(q)

    def _close_page(self, q: asyncio.Queue[bytes | None]) -> None:
        self._pages.discard(q)
        while not q.empty():
            q.get_nowait()
        q.put_nowait(None)

    # ----- the poller -----

    async def run(self, scraper: Scraper) -> None:
        """A round every ``interval_s`` (a late round is not made up for) until cancelled."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            rnd = await scraper.round()
            try:
                tick = self.apply(rnd)
            except Exception:  # an answer we did not foresee must not stop the page for good
                log.exception("event=round_failed")
            else:
                self.publish(sse("tick", tick))
            next_at = max(next_at + self.config.interval_s, loop.time())
            await asyncio.sleep(next_at - loop.time())


def sse(event: str, doc: Any) -> bytes:
    """One server-sent event (HTML Living Standard, 9.2): JSON has no raw newlines, so one data line."""
    return b"event: " + event.encode() + b"\ndata: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


DASH_KEY: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)


def build_app(dash: Dashboard, *, scraper: Scraper | None = None) -> web.Application:
    """The aiohttp app; with ``scraper`` it also runs the poller for the app's lifetime."""
    app = web.Application()
    app[DASH_KEY] = dash
    app.router.add_get("/", index)
    app.router.add_get("/events", events)
    app.router.add_get("/api/view", api_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", STATIC)
    if scraper is not None:
        app.cleanup_ctx.append(_poller(dash, scraper))
    app.on_shutdown.append(_close_pages)
    return app


def _poller(dash: Dashboard, scraper: Scraper) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with scraper:
            task = asyncio.create_task(dash.run(scraper))
            yield
            task.cancel()
            # the poller's own CancelledError is collected; ours (if we are cancelled) still propagates
            await asyncio.gather(task, return_exceptions=True)
    return ctx


async def _close_pages(app: web.Application) -> None:
    app[DASH_KEY].close_pages()


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def api_view(request: web.Request) -> web.Response:
    return web.json_response(request.app[DASH_KEY].history())


async def healthz(request: web.Request) -> web.Response:
    dash = request.app[DASH_KEY]
    age = None if dash.last_round_at is None else time.monotonic() - dash.last_round_at
    ok = age is not None and age < STALE_ROUNDS * max(dash.config.interval_s, dash.config.timeout_s)
    return web.json_response({"ok": ok, "rounds": dash.rounds, "last_round_age_s": age,
                              "last_round_ms": round(dash.last_round_s * 1000, 1), "pages": dash.pages},
                             status=200 if ok else 503)


async def events(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASH_KEY]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    q = dash.subscribe()
    try:
        await resp.write(b"retry: 1000\n\n" + sse("history", dash.history()))
        while (message := await q.get()) is not None:
            await resp.write(message)
    except ConnectionResetError:
        pass  # the page went away
    finally:
        dash.unsubscribe(q)
    return resp
