"""The control plane's HTTP API (aiohttp), port 15014 by default.

- ``GET /healthz`` -> 200 ``ok``
- ``GET /status`` -> JSON: version, warming_up, faults, every connected sidecar
  with its ACKed version and synced/behind/nacked (``ControlPlane.status``)
- ``GET /metrics`` -> Prometheus text from the control plane's own registry
- ``GET /faults`` -> the current fault set; ``POST /faults`` with
  ``{"fault": "empty-snapshot"}``, ``{"fault": "drop-service", "service": "artist"}``
  or ``{"fault": "clear"}`` -> 200 and the new fault set, 400 on a bad body.

``POST /faults`` changes what every sidecar receives, so it passes the admin
policy first (``adminauth.py``: an allowed peer address or the bearer token;
otherwise 403 with a JSON body saying how to get in). Reads stay open.
"""

from __future__ import annotations

import json

from aiohttp import web

from controlplane.adminauth import admin_middleware
from controlplane.faults import FaultError
from controlplane.metrics import CONTENT_TYPE
from controlplane.plane import ControlPlane

PLANE_KEY: web.AppKey[ControlPlane] = web.AppKey("plane", ControlPlane)
MAX_BODY = 64 * 1024


def build_app(plane: ControlPlane) -> web.Application:
    """The aiohttp application serving ``plane``."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[admin_middleware(plane.config.admin)])
    app[PLANE_KEY] = plane
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/faults", get_faults)
    app.router.add_post("/faults", post_faults)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[PLANE_KEY].status())


async def metrics(request: web.Request) -> web.Response:
    body = request.app[PLANE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[PLANE_KEY].publisher.faults.as_json())


async def post_faults(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _bad_request("body must be JSON")
    try:
        faults = request.app[PLANE_KEY].apply_fault(body)
    except FaultError as exc:
        return _bad_request(str(exc))
    return web.json_response(faults.as_json())


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message, "status": 400}, status=400)
