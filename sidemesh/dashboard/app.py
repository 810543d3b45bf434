"""``sidemesh dashboard``: serve the page until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from sidemesh.dashboard.config import DashboardConfig, parse_args
from sidemesh.dashboard.scrape import Scraper
from sidemesh.dashboard.server import Dashboard, build_app

LOG_FORMAT = "%(asctime)s level=%(levelname)s component=dashboard %(message)s"
SHUTDOWN_TIMEOUT_S = 2.0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return uvloop.run(serve(config))


async def serve(config: DashboardConfig, *, stop: asyncio.Event | None = None) -> int:
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    app = build_app(Dashboard(config), scraper=Scraper(config))
    # no access log: a page polls nothing, but health checks would fill it
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        print(f"sidemesh dashboard: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("sidemesh.dashboard").info(
        "event=listening url=%s control=%s admin=%s controlplane_http=%s", config.url, config.control, config.admin,
        config.controlplane_http or "auto")
    print(f"sidemesh dashboard: {config.url}", flush=True)
    await stop.wait()
    await runner.cleanup()
    return 0
