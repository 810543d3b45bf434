"""``sidemesh service NAME``: run one demo service (artist, song or image) on aiohttp + uvloop.

    artist  GET /artists/{id}                      -> the artist document
    image   GET /images/{id}                       -> image metadata (url, width, height, alt, kind)
    song    GET /songs/{id}, GET /songs/{id}/details (calls artist and image via the sidecar)
    all     GET /healthz                           -> {"status": "ok", ...}

The services know nothing of the mesh (DESIGN.md, "Who may import whom"): song
reaches the others only as ``http://artist`` / ``http://image`` through the
HTTP proxy it is given. ``build_app()`` makes the application for in-process
tests; ``main()`` serves it until SIGTERM/SIGINT, then stops accepting, lets
in-flight requests finish (``--shutdown-timeout``) and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from services.catalogue import Catalogue, default_catalogue
from services.common import document_handler, error_middleware, healthz_handler, precompute
from services.config import SERVICE_NAMES, ServiceConfig, parse_config
from services.song import add_song_routes

log = logging.getLogger("sidemesh.services")

LOG_FORMAT = "%(asctime)s level=%(levelname)s component={name} %(message)s"


def build_app(name: str, config: ServiceConfig | None = None, *,
              catalogue: Catalogue | None = None) -> web.Application:
    """The aiohttp application of service ``name`` (config defaults to ``ServiceConfig(name)``)."""
    if name not in SERVICE_NAMES:
        raise ValueError(f"unknown service {name!r}; expected one of {', '.join(SERVICE_NAMES)}")
    config = ServiceConfig(name=name) if config is None else config
    catalogue = default_catalogue() if catalogue is None else catalogue
    instance = config.instance
    app = web.Application(middlewares=[error_middleware(instance)])
    app.router.add_get("/healthz", healthz_handler(name, instance))
    if name == "artist":
        bodies = precompute({i: a.to_dict() for i, a in catalogue.artists.items()}, instance)
        app.router.add_get("/artists/{id}", document_handler("artist", bodies, instance))
    elif name == "image":
        bodies = precompute({i: img.to_dict() for i, img in catalogue.images.items()}, instance)
        app.router.add_get("/images/{id}", document_handler("image", bodies, instance))
    else:
        add_song_routes(app, catalogue, config)
    return app


async def serve(config: ServiceConfig, *, stop: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` is set (default: until SIGTERM or SIGINT); returns the exit code."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    app = build_app(config.name, config)
    runner = web.AppRunner(
        app,
        access_log=log if config.access_log else None,
        handle_signals=False,
        shutdown_timeout=config.shutdown_timeout_s,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            log.error("event=service_bind_failed name=%s address=%s:%s error=%r",
                      config.name, config.host, config.port, str(exc))
            return 1
        log.info("event=service_started name=%s instance=%s address=%s:%s proxy=%s",
                 config.name, config.instance, config.host, config.port, config.proxy or "none")
        await stop.wait()
        log.info("event=service_stopping name=%s drain_timeout_s=%s", config.name, config.shutdown_timeout_s)
    finally:
        # stops accepting, waits up to shutdown_timeout for in-flight requests, then runs cleanup_ctx
        await runner.cleanup()
    log.info("event=service_stopped name=%s", config.name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sidemesh service``; usage errors exit 2 (argparse)."""
    config = parse_config(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT.format(name=config.name))
    return uvloop.run(serve(config))
