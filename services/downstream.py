"""song's calls to artist and image, through the outbound proxy (its sidecar).

Errors: every failure of a downstream call leaves this module as one
``DownstreamError`` naming the service, carrying the HTTP status song should
answer with and, when the sidecar or the service answered at all, that answer's
status. aiohttp's exceptions, timeouts and JSON errors are converted here, at
the boundary, so handlers never see them:

    DownstreamError(service, status, reason, upstream_status)
        status 503  the sidecar (or service) answered 503: nothing to route to
        status 502  refused/reset connection, timeout, other non-200 answer,
                    a body that is not a JSON object

One ``DownstreamClient`` per process wraps one pooled ``aiohttp.ClientSession``
created at startup; per request it passes ``proxy=`` so aiohttp sends the
absolute-form request (``GET http://artist/artists/7``) a sidecar routes by.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

ROUTE_HEADER = "x-sidemesh-route"
# a downstream document larger than this is not one of ours
MAX_BODY_BYTES = 1 << 20


class DownstreamError(Exception):
    """A call to ``service`` failed; ``status`` is what the caller should answer."""

    def __init__(self, service: str, status: int, reason: str, upstream_status: int | None = None) -> None:
        super().__init__(f"{service} unavailable: {reason}")
        self.service = service
        self.status = status
        self.reason = reason
        self.upstream_status = upstream_status

    def to_dict(self) -> dict[str, Any]:
        """The JSON error document song answers with."""
        return {
            "error": str(self),
            "service": self.service,
            "status": self.status,
            "upstream_status": self.upstream_status,
        }


@dataclass(frozen=True, slots=True)
class DownstreamResponse:
    """A successful downstream answer: its JSON object and how the mesh routed it."""

    body: dict[str, Any]
    route: str | None


def failure_status(upstream_status: int | None) -> int:
    """The status to answer when a downstream call failed with ``upstream_status`` (None: no answer).

    503 passes through (the sidecar says there is nothing to route to, which a
    client may retry later); every other failure is a bad gateway.
    """
    return 503 if upstream_status == 503 else 502


def _error_detail(raw: bytes) -> str | None:
    """The ``error`` field of a JSON error body (a sidecar's or a service's), if there is one."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return None


def interpret(service: str, status: int, raw: bytes, route: str | None) -> DownstreamResponse:
    """Turn a downstream HTTP answer into a response or a DownstreamError (pure)."""
    if status != 200:
        detail = _error_detail(raw)
        reason = f"HTTP {status}" + (f": {detail}" if detail else "")
        raise DownstreamError(service, failure_status(status), reason, upstream_status=status)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise DownstreamError(service, 502, f"invalid JSON in response: {exc}", upstream_status=status) from exc
    if not isinstance(doc, dict):
        raise DownstreamError(service, 502, "response is not a JSON object", upstream_status=status)
    return DownstreamResponse(doc, route)


class DownstreamClient:
    """GETs JSON documents from other services over one shared, pooled session."""

    def __init__(self, session: aiohttp.ClientSession, *, proxy: str | None, timeout_s: float) -> None:
        self._session = session
        self._proxy = proxy
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def get_json(self, service: str, url: str) -> DownstreamResponse:
        """GET ``url`` (a document of ``service``); raises DownstreamError on any failure."""
        try:
            async with self._session.get(
                url, proxy=self._proxy, timeout=self._timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                raw = await _read_limited(resp.content, MAX_BODY_BYTES + 1)
                route = resp.headers.get(ROUTE_HEADER)
        except asyncio.TimeoutError as exc:
            raise DownstreamError(service, 502, f"timed out after {self._timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise DownstreamError(service, 502, f"{type(exc).__name__}: {exc}") from exc
        if len(raw) > MAX_BODY_BYTES:
            raise DownstreamError(service, 502, f"response larger than {MAX_BODY_BYTES} bytes",
                                  upstream_status=status)
        return interpret(service, status, raw, route)


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit``-ish bytes when it is longer (so a huge body cannot eat memory)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.readany()
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def new_session(*, pool_size: int) -> aiohttp.ClientSession:
    """The process's one outbound session: keep-alive pool, no env proxy magic (proxy is explicit)."""
    connector = aiohttp.TCPConnector(limit=pool_size, limit_per_host=0)
    return aiohttp.ClientSession(connector=connector, trust_env=False, raise_for_status=False)
