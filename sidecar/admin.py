"""The admin API on :15000: ``/ready``, ``/state`` (JSON), ``/metrics`` (Prometheus text).

Three read-only GET endpoints need no web framework: they are served on an asyncio Protocol
with httptools parsing the requests, like the data path. Not importing aiohttp keeps an idle
sidecar about 11 MB smaller (issue 5 holds it to 60 MB RSS). ``AdminApi.handle`` decides the
answer (no I/O); ``AdminConnection`` only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httptools

from sidecar import http1
from sidecar.metrics import MetricsExporter
from sidecar.routing import RouteBook

log = logging.getLogger("sidemesh.sidecar.admin")

JSON = b"application/json"
Answer = tuple[int, bytes, bytes]  # status, content type, body


class AdminApi:
    def __init__(self, book: RouteBook, exporter: MetricsExporter, describe: Callable[[], dict[str, Any]],
                 *, identity_problem: Callable[[], str | None] = lambda: None) -> None:
        self.book = book
        self.exporter = exporter
        self.describe = describe
        # with mutual TLS, a sidecar without a valid certificate cannot serve mesh calls: not ready
        self.identity_problem = identity_problem

    def handle(self, method: bytes, path: bytes) -> Answer:
        if method not in (b"GET", b"HEAD"):
            return _json(405, {"error": f"method {method.decode(errors='replace')} not allowed; the admin API is read-only"})
        route = path.split(b"?", 1)[0]
        if route == b"/ready":
            mode = self.book.mode.value
            if not self.book.failover.settled:
                return _json(503, {"ready": False, "mode": mode, "reason": "waiting for the first snapshot"})
            problem = self.identity_problem()
            if problem is not None:
                return _json(503, {"ready": False, "mode": mode, "reason": problem})
            return _json(200, {"ready": True, "mode": mode})
        if route == b"/state":
            return _json(200, {**self.describe(), **self.book.state(), "now": time.time()})
        if route == b"/metrics":
            body, content_type = self.exporter.render()
            return 200, content_type.encode(), body
        return _json(404, {"error": f"no such admin endpoint {route.decode(errors='replace')!r}",
                           "endpoints": ["/ready", "/state", "/metrics"]})


def _json(status: int, doc: dict[str, Any]) -> Answer:
    return status, JSON, json.dumps(doc).encode()


class AdminConnection(asyncio.Protocol):
    """One admin client connection; keep-alive, requests answered in order."""

    def __init__(self, api: AdminApi) -> None:
        self.api = api
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._write(400, JSON, json.dumps({"error": f"malformed HTTP request: {exc}"}).encode(), close=True)

    def on_message_begin(self) -> None:
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        try:
            status, content_type, body = self.api.handle(method, self._url)
        except Exception:  # an admin bug must not take the sidecar down; say so and log it
            log.exception("event=admin_error path=%r", self._url)
            status, content_type, body = 500, JSON, b'{"error": "internal error in the admin API; see the sidecar log"}'
        self._write(status, content_type, b"" if method == b"HEAD" else body,
                    close=not self.parser.should_keep_alive(), length=len(body))

    def _write(self, status: int, content_type: bytes, body: bytes, *, close: bool, length: int | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
            % (status, http1.reason(status), content_type, len(body) if length is None else length,
               b"connection: close\r\n" if close else b"")
        )
        self.transport.write(head + body)
        if close:
            self.transport.close()
