"""The admin API on :15000 (aiohttp): /ready, /state (JSON), /metrics (Prometheus)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sidecar.metrics import MetricsExporter
from sidecar.routing import RouteBook


def build_admin_app(
    book: RouteBook,
    exporter: MetricsExporter,
    describe: Callable[[], dict[str, Any]],
) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        if book.failover.settled:
            return web.json_response({"ready": True, "mode": book.mode.value})
        return web.json_response({"ready": False, "mode": book.mode.value, "reason": "waiting for the first snapshot"}, status=503)

    async def state(_: web.Request) -> web.Response:
        return web.json_response({**describe(), **book.state(), "now": time.time()})

    async def metrics(_: web.Request) -> web.Response:
        body, content_type = exporter.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/state", state)
    app.router.add_get("/metrics", metrics)
    return app
