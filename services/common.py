"""What every demo service shares: JSON responses, id parsing, errors as JSON.

Every response a service sends is JSON and carries ``x-served-by: <instance>``
(the error middleware below guarantees both, for the router's own 404/405 and
for unexpected exceptions too: a client never sees HTML or a stack trace).
Documents are serialised once at startup where they can be, so a handler is a
dict lookup and a ``web.Response``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

log = logging.getLogger("sidemesh.services")

SERVED_BY_HEADER = "x-served-by"
JSON_CONTENT_TYPE = "application/json"
# longer ids are not ids of ours; refusing them early keeps int() cheap
MAX_ID_DIGITS = 9

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dumps(doc: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of ``doc``."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(body: bytes, status: int = 200) -> web.Response:
    """A response whose body is already serialised JSON."""
    return web.Response(body=body, status=status, content_type=JSON_CONTENT_TYPE, charset="utf-8")


def parse_id(text: str) -> int | None:
    """The record id in a path segment, or None when it is not a plain decimal number."""
    if not text or len(text) > MAX_ID_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def not_found(kind: str, raw_id: str, instance: str) -> web.Response:
    """404 JSON for an id the catalogue does not hold (or that is not a number)."""
    return json_response(
        dumps({"error": f"{kind} {raw_id!r} not found", "status": 404, "kind": kind, "id": raw_id,
               "served_by": instance}),
        status=404,
    )


def precompute(docs: Mapping[int, Mapping[str, Any]], instance: str) -> dict[int, bytes]:
    """id -> serialised document with ``served_by`` added, built once at startup."""
    return {doc_id: dumps({**doc, "served_by": instance}) for doc_id, doc in docs.items()}


def document_handler(kind: str, bodies: Mapping[int, bytes], instance: str) -> Handler:
    """A GET handler serving ``bodies[id]`` for the path's ``{id}``, 404 JSON otherwise."""

    async def handle(request: web.Request) -> web.StreamResponse:
        raw_id = request.match_info["id"]
        body = bodies.get(parse_id(raw_id))  # type: ignore[arg-type]  # None is never a key
        if body is None:
            return not_found(kind, raw_id, instance)
        return json_response(body)

    return handle


def healthz_handler(service: str, instance: str) -> Handler:
    """GET /healthz: 200 JSON as long as the process serves HTTP."""
    body = dumps({"status": "ok", "service": service, "served_by": instance})

    async def handle(request: web.Request) -> web.StreamResponse:
        return json_response(body)

    return handle


def error_middleware(instance: str) -> Middleware:
    """Middleware: stamps ``x-served-by`` and turns every error into a JSON answer."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            # the router's own 404 (unknown path) and 405 (wrong method) land here
            error = (f"no route for {request.method} {request.path}" if exc.status == 404
                     else exc.reason.lower())
            resp = json_response(
                dumps({"error": error, "status": exc.status, "path": request.path, "served_by": instance}),
                status=exc.status,
            )
            if "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the boundary: a bug must still answer JSON, not a trace
            log.exception("event=handler_error method=%s path=%s", request.method, request.path)
            resp = json_response(
                dumps({"error": "internal error", "status": 500, "path": request.path, "served_by": instance}),
                status=500,
            )
        resp.headers[SERVED_BY_HEADER] = instance
        return resp

    return middleware
