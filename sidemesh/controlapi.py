"""The control API of a running ``sidemesh up`` (aiohttp), steered by ``sidemesh scale/kill/stop/start``.

    GET  /pods    every unit: name, kind, service, replica, address, ports, state, ready, pids
    GET  /mesh    where the control plane, DNS server, dashboard, published port and logs are
    POST /scale   {"service": "artist", "replicas": 3}
    POST /kill    {"name": "artist-2"}        SIGKILL (like docker compose kill)
    POST /stop    {"name": "controlplane"}    SIGTERM, wait, SIGKILL stragglers
    POST /start   {"name": "controlplane"}    start again, same address and arguments; waits till ready

Errors are JSON ``{"error": "...", "status": N}``: 400 bad input, 404 unknown name,
403 for a POST from a peer outside the admin policy's networks (loopback by
default, which is where `sidemesh up` and its clients run) without the admin
bearer token (``sidemesh.adminauth``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidemesh.adminauth import AdminPolicy, admin_middleware, policy_from_env
from sidemesh.layout import CP_HTTP_PORT, DASHBOARD, DNS_API_PORT, DNS_PORT, GRPC_PORT, HostPort, http_url
from sidemesh.supervisor import ActionError, Supervisor

SUPERVISOR_KEY: web.AppKey[Supervisor] = web.AppKey("supervisor", Supervisor)
CONTROL_KEY: web.AppKey[HostPort] = web.AppKey("control", HostPort)


def error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def mesh_info(sup: Supervisor, control: HostPort) -> dict[str, Any]:
    """Addresses of the mesh's parts, for `sidemesh status/fault` and people."""
    lay = sup.layout
    dash = sup.units.get(DASHBOARD)
    return {
        "subnet": lay.subnet,
        "control": str(control),
        "controlplane": {"address": lay.controlplane_address, "grpc": f"{lay.controlplane_address}:{GRPC_PORT}",
                         "http": f"{lay.controlplane_address}:{CP_HTTP_PORT}"},
        "dns": {"address": lay.dns_address, "server": f"{lay.dns_address}:{DNS_PORT}",
                "api": f"{lay.dns_address}:{DNS_API_PORT}", "zone": lay.zone, "ttl": lay.dns_ttl},
        "publish": str(lay.publish),
        "dashboard": None if dash is None else http_url(HostPort(dash.spec.address, dash.spec.ports["http"])),
        "mesh_file": lay.mesh.source,
        "services": list(lay.mesh.names),
        "log_dir": str(sup.log_dir),
        "records": sup.records(),
    }


async def _body(request: web.Request, *keys: str) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ActionError(f"request body must be JSON: {exc}") from exc
    if not isinstance(body, dict) or any(k not in body for k in keys):
        raise ActionError(f"request body must be a JSON object with {', '.join(keys)}")
    return body


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ActionError as exc:
            return error(str(exc), exc.status)

    return wrapped


async def pods(request: web.Request) -> web.Response:
    return web.json_response(request.app[SUPERVISOR_KEY].describe())


async def mesh(request: web.Request) -> web.Response:
    return web.json_response(mesh_info(request.app[SUPERVISOR_KEY], request.app[CONTROL_KEY]))


async def scale(request: web.Request) -> web.Response:
    body = await _body(request, "service", "replicas")
    return web.json_response(await request.app[SUPERVISOR_KEY].scale(str(body["service"]), body["replicas"]))


def _action(verb: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        body = await _body(request, "name")
        sup = request.app[SUPERVISOR_KEY]
        results = await getattr(sup, verb)(str(body["name"]))
        return web.json_response({"action": verb, "name": body["name"], "units": results})

    return handler


def make_app(sup: Supervisor, control: HostPort, *, admin: AdminPolicy | None = None) -> web.Application:
    """The aiohttp application of the control API for ``sup``.

    ``admin`` guards the POSTs; without one, ``$SIDEMESH_ADMIN_ALLOW`` and the
    token env vars decide (loopback only and no token when they are unset).
    """
    policy = admin if admin is not None else policy_from_env(os.environ)
    app = web.Application(middlewares=[admin_middleware(policy)])
    app[SUPERVISOR_KEY] = sup
    app[CONTROL_KEY] = control
    app.router.add_get("/pods", _guarded(pods))
    app.router.add_get("/mesh", _guarded(mesh))
    app.router.add_post("/scale", _guarded(scale))
    for verb in ("kill", "stop", "start"):
        app.router.add_post(f"/{verb}", _guarded(_action(verb)))
    return app
