"""The data path: HTTP/1.1 proxying on raw asyncio Protocols, parsed by httptools.

One ``DownstreamConnection`` per client connection (the app on the outbound listener,
other sidecars on the inbound one); one ``Exchange`` per request. An exchange picks an
endpoint (pure decision in ``RouteBook``/``ResolvedRoute``), takes a pooled keep-alive
upstream connection or opens one, and streams the request and the response through
without buffering bodies whole: body chunks go straight to the other transport, and when
one side's write buffer fills, the other side stops reading (``pause_writing`` ->
``pause_reading``), so a 50 MB response costs a few buffers, not 50 MB.

Why not aiohttp here: an aiohttp server + client forwarder does ~5k req/s per core on this
class of machine, a bare Protocol + httptools forwarder 30-40k (issue 5). aiohttp stays
for the admin API and the demo services.

Failure handling, in order of preference:
* a connect failure, or a connection that dies before a whole response head arrived,
  on an idempotent request whose body we still hold -> retry on another endpoint
  (the failed one is ejected for a few seconds when it refused the connection);
* nothing sent to the client yet -> a JSON error with the status of the SidecarError
  (400, 502, 503, 504) and the route header;
* response already started -> the client connection is aborted, so the client sees a
  truncated response instead of a wrong one (Envoy does the same).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import httptools

from sidecar import http1
from sidecar.balancer import ResolvedRoute
from sidecar.errors import (
    AppUnavailable,
    BadRequest,
    SidecarError,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.http1 import Framing
from sidecar.model import Endpoint
from sidecar.upstream import UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from sidecar.metrics import SidecarMetrics
    from sidecar.routing import RouteBook

log = logging.getLogger("sidemesh.sidecar.proxy")

OUTBOUND = "outbound"
INBOUND = "inbound"
_REPLAY_LIMIT = 64 * 1024  # request bodies up to this size are kept for a retry
_BUFFER_LIMIT = 1024 * 1024  # buffered request body before we stop reading the client
_MAX_ATTEMPTS = 3
_ROUTE_DROP = frozenset({http1.ROUTE_HEADER})


class ProxyContext:
    """What every connection of one listener shares."""

    def __init__(
        self,
        direction: str,
        *,
        pool: UpstreamPool,
        metrics: SidecarMetrics,
        book: RouteBook | None = None,
        app_route: ResolvedRoute | None = None,
        idle_timeout_s: float = 300.0,
    ) -> None:
        if direction == OUTBOUND and book is None:
            raise ValueError("the outbound listener needs a route book")
        if direction == INBOUND and app_route is None:
            raise ValueError("the inbound listener needs the app's route")
        self.direction = direction
        self.pool = pool
        self.metrics = metrics
        self.book = book
        self.app_route = app_route
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[DownstreamConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run the slow path (routing through DNS, opening a connection) as a task we can cancel on shutdown."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class DownstreamConnection(asyncio.Protocol):
    """A client connection: parses requests, runs their exchanges one after another."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.receiving: Exchange | None = None  # the request being parsed
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.closing = False
        self.half_closed = False  # the client sent EOF: answer what is in flight, then close
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._paused = 0
        self.writing_paused = False  # the client reads slower than we write
        self._idle_timer: asyncio.TimerHandle | None = None

    # ----- asyncio.Protocol -----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error(405, "CONNECT and protocol upgrades are not supported; sidemesh proxies plain HTTP/1.1")
        except httptools.HttpParserError as exc:
            self._protocol_error(400, f"malformed HTTP request: {exc}")
        else:
            ex = self.active
            if ex is not None:
                ex.flush()

    def eof_received(self) -> bool:
        # the client half-closed: finish what is in flight, then close
        if self.active is None and self.receiving is None:
            return False
        self.half_closed = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.ctx.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for ex in [self.active, *self.queue]:
            if ex is not None:
                ex.abort("client went away")
        self.queue.clear()
        self.active = None

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.active is not None and self.active.upstream is not None:
            self.active.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.active is not None and self.active.upstream is not None:
            self.active.upstream.resume_reading()

    # ----- httptools callbacks -----

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        ex = Exchange(
            self,
            p.get_method(),
            self._url,
            self._headers,
            keep_alive=p.should_keep_alive(),
            http10=p.get_http_version() == "1.0",
        )
        self.receiving = ex
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            self.queue.append(ex)

    def on_body(self, body: bytes) -> None:
        if self.receiving is not None:
            self.receiving.on_request_body(body)

    def on_message_complete(self) -> None:
        ex = self.receiving
        self.receiving = None
        if ex is not None:
            ex.on_request_complete()

    # ----- called by exchanges -----

    def exchange_done(self, ex: Exchange, *, keep_alive: bool) -> None:
        if ex is not self.active:
            return
        self.active = None
        if not keep_alive or self.closing or (self.half_closed and not self.queue):
            self.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt
            nxt.start()
            nxt.flush()
        elif self.receiving is None:
            self._arm_idle()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def pause_reading(self) -> None:
        self._paused += 1
        if self._paused == 1 and self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused == 0:
            return
        self._paused -= 1
        if self._paused == 0 and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def _protocol_error(self, status: int, message: str) -> None:
        """The request stream is unparseable: answer once and close (the parser is lost)."""
        log.info("event=bad_request direction=%s status=%d reason=%r", self.ctx.direction, status, message)
        self.ctx.metrics.count(self.ctx.direction, "-", status)
        if self.active is None or not self.active.response_started:
            if self.active is not None:
                self.active.abort("client sent a malformed request")
                self.active = None
            body = http1.json_error(status, message)
            self.write(http1.error_response(status, body, route=b"error", close=True))
        self.close()

    def _arm_idle(self) -> None:
        loop = asyncio.get_running_loop() if self.transport is not None else None
        if loop is not None and self.ctx.idle_timeout_s:
            self._idle_timer = loop.call_later(self.ctx.idle_timeout_s, self._idle_expired)

    def _idle_expired(self) -> None:
        if self.active is None and self.receiving is None and not self.queue:
            self.close()


class Exchange:
    """One request/response through the proxy."""

    __slots__ = (
        "down", "ctx", "method", "target", "service", "headers", "keep_alive", "http10",
        "req_lines", "req_framing", "req_done", "req_pending", "req_pending_size", "replay", "replay_size",
        "route", "endpoint", "upstream", "attempts", "reused", "sent_any",
        "response_started", "resp_framing_out", "resp_done", "resp_status", "resp_until_close", "far_retry",
        "timer", "out", "finished", "head_request", "_down_paused", "_up_paused",
    )

    def __init__(
        self,
        down: DownstreamConnection,
        method: bytes,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        keep_alive: bool,
        http10: bool,
    ) -> None:
        self.down = down
        self.ctx = down.ctx
        self.method = method
        self.headers = headers
        self.keep_alive = keep_alive
        self.http10 = http10
        self.target = url
        self.service = ""
        self.req_lines: list[bytes] = []
        self.req_framing = Framing.NONE
        self.req_done = False
        self.req_pending: list[bytes] = []
        self.req_pending_size = 0
        self.replay: list[bytes] | None = [] if method in http1.IDEMPOTENT else None
        self.replay_size = 0
        self.route: ResolvedRoute | None = None
        self.endpoint: Endpoint | None = None
        self.upstream: UpstreamConnection | None = None
        self.attempts = 0
        self.reused = False
        self.sent_any = False
        self.response_started = False
        self.resp_framing_out = Framing.NONE
        self.resp_done = False
        self.resp_status = 0
        self.resp_until_close = False
        self.far_retry = False
        self.timer: asyncio.TimerHandle | None = None
        self.out: list[bytes] = []
        self.finished = False
        self.head_request = method == b"HEAD"
        self._down_paused = False  # we stopped reading the client: too much body buffered
        self._up_paused = False  # we stopped reading the client: the upstream's write buffer is full

    # ----- request side -----

    def start(self) -> None:
        try:
            self._prepare()
        except SidecarError as exc:
            self.fail(exc)
            return
        if self.ctx.direction == INBOUND:
            route = self.ctx.app_route
        else:
            route = self.ctx.book.route(self.service)  # type: ignore[union-attr]
        if route is None:
            self.ctx.spawn(self._route_slow())
            return
        self._dispatch(route)

    def _prepare(self) -> None:
        lines, framing, _ = http1.filter_headers(
            self.headers, drop=_ROUTE_DROP if self.ctx.direction == OUTBOUND else frozenset()
        )
        self.req_framing = framing
        if self.ctx.direction == INBOUND:
            if self.http10 and not _has_host(self.headers):
                # we speak HTTP/1.1 upstream, where Host is mandatory (RFC 9112 3.2)
                ep = self.ctx.app_route.endpoints[0]  # type: ignore[union-attr]
                lines.append(b"host: %s:%d\r\n" % (ep.address.encode(), ep.port))
            self.req_lines = lines
            return
        target = self.target
        host = b""
        if not target.startswith(b"/"):
            if target == b"*":
                raise BadRequest("OPTIONS * is not routable through the mesh")
            try:
                url = httptools.parse_url(target)
            except httptools.HttpParserInvalidURLError:
                raise BadRequest(f"malformed request target {target[:200]!r}") from None
            if url.schema not in (b"http", None):
                raise BadRequest(f"only http:// targets are proxied, not {url.schema!r}")
            host = url.host or b""
            path = url.path or b"/"
            self.target = path + (b"?" + url.query if url.query else b"")
        if not host:
            for name, value in self.headers:
                if name.lower() == b"host":
                    host = value
                    break
        host = host.strip().lower()
        if host.startswith(b"["):
            raise BadRequest("IPv6 literals are not service names")
        service = host.split(b":", 1)[0].decode("ascii", "replace")
        if not service:
            raise BadRequest("request names no service: use an absolute URL (http://SERVICE/...) or a Host header")
        # the mesh routes by service name; drop any domain the app added (artist.mesh.local -> artist)
        self.service = service.split(".", 1)[0]
        if self.http10 and not _has_host(self.headers):
            lines.append(b"host: %s\r\n" % host)  # mandatory in the HTTP/1.1 we send (RFC 9112 3.2)
        self.req_lines = lines

    async def _route_slow(self) -> None:
        try:
            route = await self.ctx.book.route_slow(self.service)  # type: ignore[union-attr]
        except SidecarError as exc:
            self.fail(exc)
            self.flush()
            return
        if not self.finished:
            self._dispatch(route)
            self.flush()

    def _dispatch(self, route: ResolvedRoute, exclude: Endpoint | None = None) -> None:
        self.route = route
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(route.policy.timeout_s, self._timed_out)
        endpoint = route.pick(exclude)
        self.endpoint = endpoint
        self.attempts += 1
        conn = self.ctx.pool.take_idle(endpoint.key)
        if conn is not None:
            self._attach(conn, reused=True)
        else:
            self.ctx.spawn(self._connect(endpoint))

    async def _connect(self, endpoint: Endpoint) -> None:
        try:
            conn = await self.ctx.pool.connect(endpoint.key)
        except UpstreamConnectError as exc:
            if self.finished:
                return
            self.ctx.book.health.eject(endpoint.key) if self.ctx.book is not None else None
            log.info("event=upstream_connect_failed service=%s endpoint=%s:%d reason=%r",
                     self.service or "app", endpoint.address, endpoint.port, exc.message)
            self._retry_or_fail(exc, retry_allowed=True, nothing_processed=True)
            self.flush()
            return
        if self.finished:
            self.ctx.pool.release(conn)
            return
        self._attach(conn, reused=False)
        self.flush()

    def _attach(self, conn: UpstreamConnection, *, reused: bool) -> None:
        self.upstream = conn
        self.reused = reused
        conn.exchange = self
        if self.down.writing_paused:
            # the client is still behind on an earlier (pipelined) response: do not read faster
            conn.pause_reading()
        if self.ctx.book is not None:
            self.ctx.book.health.started(conn.key)
        head = [b"%s %s HTTP/1.1\r\n" % (self.method, self.target), *self.req_lines]
        if self.req_framing == Framing.CHUNKED:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        body = self.replay if (self.attempts > 1 and self.replay is not None) else self.req_pending
        data = b"".join(head)
        if body:
            data += b"".join(http1.chunk(c) for c in body) if self.req_framing == Framing.CHUNKED else b"".join(body)
        if self.req_done and self.req_framing == Framing.CHUNKED:
            data += http1.LAST_CHUNK
        self.req_pending = []
        self.req_pending_size = 0
        if self._down_paused:
            self._down_paused = False
            self.down.resume_reading()
        self.sent_any = True
        conn.write(data)

    def on_request_body(self, body: bytes) -> None:
        if self.finished:
            return  # answered early (error, or upstream replied first): discard the rest
        if self.replay is not None:
            self.replay_size += len(body)
            if self.replay_size <= _REPLAY_LIMIT:
                self.replay.append(body)
            else:
                self.replay = None
        conn = self.upstream
        if conn is not None and self.down.active is self:
            conn.write(http1.chunk(body) if self.req_framing == Framing.CHUNKED else body)
            return
        self.req_pending.append(body)
        self.req_pending_size += len(body)
        if self.req_pending_size > _BUFFER_LIMIT and not self._down_paused:
            self._down_paused = True
            self.down.pause_reading()

    def on_request_complete(self) -> None:
        self.req_done = True
        if self.finished:
            self._maybe_done()
            return
        if self.upstream is not None and self.req_framing == Framing.CHUNKED:
            self.upstream.write(http1.LAST_CHUNK)

    # ----- response side (called by UpstreamConnection) -----

    def on_response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bool:
        """Forward the head; return True when no body follows (a response to HEAD)."""
        if 100 <= status < 200:
            if status != 101:
                self.out.append(b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason or http1.reason(status)))
            return False
        if (status == 503 and self.ctx.direction == OUTBOUND and self._far_app_unavailable(headers)
                and self._can_retry(nothing_processed=True)):
            # the far sidecar's app is down: read this answer to its end, then retry elsewhere
            self.far_retry = True
            return False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.response_started = True
        self.resp_status = status
        if self.ctx.direction == OUTBOUND:
            # we say how the call was routed, whatever the far side claimed
            lines, framing, _ = http1.filter_headers(headers, drop=_ROUTE_DROP)
            lines.append(b"x-sidemesh-route: %s\r\n" % self._route_value())
        else:
            lines, framing, _ = http1.filter_headers(headers)
            if not any(name.lower() == http1.ROUTE_HEADER for name, _ in headers):
                lines.append(b"x-sidemesh-route: inbound\r\n")
        no_body = self.head_request or status in (204, 304)
        self.resp_until_close = framing == Framing.NONE and not no_body
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason or http1.reason(status)), *lines]
        if no_body:
            self.resp_framing_out = Framing.NONE
        elif framing == Framing.LENGTH:
            self.resp_framing_out = Framing.LENGTH
        elif self.http10:
            self.resp_framing_out = Framing.CLOSE
            self.keep_alive = False
        else:
            # chunked, or close-delimited upstream: re-frame as chunked for the client
            self.resp_framing_out = Framing.CHUNKED
            out.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        self.out.append(b"".join(out))
        if not keep_alive and self.upstream is not None:
            self.upstream.closed = True  # never return it to the pool
        return self.head_request

    def on_response_body(self, body: bytes) -> None:
        if self.far_retry:
            return
        if self.resp_framing_out == Framing.CHUNKED:
            self.out.append(http1.chunk(body))
        elif self.resp_framing_out != Framing.NONE:
            self.out.append(body)
        if len(self.out) > 16:
            self.flush()

    def on_response_complete(self) -> None:
        if self.far_retry:
            self.far_retry = False
            conn = self.upstream
            self.upstream = None
            if conn is not None:
                self._release(conn, reusable=self.req_done)
            if self.endpoint is not None and self.ctx.book is not None:
                self.ctx.book.health.eject(self.endpoint.key)
            log.info("event=far_app_unavailable service=%s endpoint=%s retrying=true", self.service, self._where())
            self._retry_or_fail(UpstreamConnectError(f"{self._where()}: its app is unavailable", service=self.service),
                                retry_allowed=True, nothing_processed=True)
            self.flush()
            return
        if not self.response_started:
            return  # end of an interim (1xx) response
        if self.resp_framing_out == Framing.CHUNKED:
            self.out.append(http1.LAST_CHUNK)
        self.resp_done = True
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            self._release(conn, reusable=self.req_done)
        self._finish()

    def on_upstream_lost(self, exc: Exception | None) -> None:
        conn_key = self.endpoint.key if self.endpoint else None
        self.upstream = None
        if conn_key is not None and self.ctx.book is not None:
            self.ctx.book.health.finished(conn_key)
        if self.finished:
            return
        if self.response_started and self.resp_until_close and exc is None:
            # a response without Content-Length or chunking ends when the connection does
            self.resp_done = True
            if self.resp_framing_out == Framing.CHUNKED:
                self.out.append(http1.LAST_CHUNK)
            self._finish()
        elif not self.response_started:
            what = f"{exc}" if exc else "closed"
            err = UpstreamReset(
                f"upstream {self._where()} closed the connection before a response ({what})", service=self.service or None
            )
            # a pooled connection the peer had already closed is the classic keep-alive race: retry it
            self._retry_or_fail(err, retry_allowed=True)
        else:
            log.info("event=upstream_reset_mid_response service=%s endpoint=%s", self.service or "app", self._where())
            self.flush()
            self.finished = True
            self._count(502)
            self.down.abort()
        self.flush()

    def on_upstream_garbage(self, message: str) -> None:
        self.upstream = None
        if self.endpoint is not None and self.ctx.book is not None:
            self.ctx.book.health.finished(self.endpoint.key)
        if self.finished:
            return
        if not self.response_started:
            self.fail(UpstreamReset(f"{message} ({self._where()})", service=self.service or None))
        else:
            self.finished = True
            self._count(502)
            self.down.abort()

    # ----- completion and failure -----

    def _can_retry(self, *, nothing_processed: bool = False) -> bool:
        route = self.route
        if (
            route is None
            or self.response_started
            or self.replay is None
            or not (self.req_done or not self.sent_any)
            or self.attempts >= _MAX_ATTEMPTS
        ):
            return False
        if self.attempts <= route.policy.retries:
            return True
        if nothing_processed and self.attempts < len(route.endpoints):
            # a refused connection (or a far app that is down) processed nothing: trying each
            # endpoint once is safe, and is what keeps a scale-down from failing calls
            return True
        return self.reused and self.attempts == 1  # the keep-alive race on a pooled connection

    @staticmethod
    def _far_app_unavailable(headers: list[tuple[bytes, bytes]]) -> bool:
        return any(n.lower() == http1.ERROR_HEADER and v == http1.APP_UNAVAILABLE for n, v in headers)

    def _retry_or_fail(self, err: SidecarError, *, retry_allowed: bool, nothing_processed: bool = False) -> None:
        route = self.route
        if retry_allowed and self._can_retry(nothing_processed=nothing_processed):
            assert route is not None
            self.ctx.metrics.retries += 1
            failed = self.endpoint
            self.upstream = None
            self.resume_downstream_reading()  # the old upstream's full buffer no longer matters
            self._dispatch(route, exclude=failed if len(route.endpoints) > 1 else None)
            return
        self.fail(err)

    def fail(self, err: SidecarError) -> None:
        if self.finished:
            return
        self._drop_upstream()
        if self.response_started:
            self.finished = True
            self._count(err.status)
            self.down.abort()
            return
        extra = b""
        if self.ctx.direction == INBOUND and isinstance(err, UpstreamConnectError):
            err = AppUnavailable(f"the local app is not accepting connections ({err.message})")
            extra = b"%s: %s\r\n" % (http1.ERROR_HEADER, http1.APP_UNAVAILABLE)
        log.info("event=request_failed direction=%s service=%s status=%d reason=%r",
                 self.ctx.direction, self.service or "app", err.status, err.message)
        self.response_started = True
        self.resp_status = err.status
        close = not self.keep_alive or not self.req_done and self.req_framing != Framing.NONE and self.http10
        route = self._route_value() if self.route else self._mode_value()
        self.out.append(http1.error_response(err.status, err.to_json(), route=route, close=close, extra=extra))
        self.keep_alive = self.keep_alive and not close
        self._finish()

    def _timed_out(self) -> None:
        self.timer = None
        if self.finished or self.response_started:
            return
        timeout = self.route.policy.timeout_s if self.route else 0
        self.fail(UpstreamTimeout(f"no response from {self._where()} within {timeout:g}s", service=self.service or None))
        self.flush()

    def _finish(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._count(self.resp_status)
        # the upstream is detached and can no longer resume the client; the rest of the body
        # must still be read (and dropped) for the connection to go on
        self.resume_downstream_reading()
        self._maybe_done()

    def _maybe_done(self) -> None:
        # the client connection moves on once the response is written and the request read
        if self.req_done:
            self.flush()
            self.down.exchange_done(self, keep_alive=self.keep_alive)
        elif self._down_paused:
            self._down_paused = False
            self.down.resume_reading()

    def _release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        if self.ctx.book is not None:
            self.ctx.book.health.finished(conn.key)
        if reusable and not conn.closed:
            self.ctx.pool.release(conn)
        else:
            conn.exchange = None
            conn.close()

    def abort(self, why: str) -> None:
        """The client is gone: drop the upstream side without reusing it."""
        self.finished = True
        self._drop_upstream()

    def _drop_upstream(self) -> None:
        """Stop the timer and close the upstream connection (mid-exchange, so never pooled)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            if self.ctx.book is not None:
                self.ctx.book.health.finished(conn.key)  # else least-request sees it busy forever
            conn.exchange = None
            conn.close()

    def flush(self) -> None:
        if self.out:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out = []
            self.down.write(data)

    def pause_downstream_reading(self) -> None:
        if not self._up_paused:
            self._up_paused = True
            self.down.pause_reading()

    def resume_downstream_reading(self) -> None:
        if self._up_paused:
            self._up_paused = False
            self.down.resume_reading()

    # ----- small helpers -----

    def _mode_value(self) -> bytes:
        """For answers no endpoint gave: the source that was consulted (the current mode)."""
        if self.ctx.book is None:
            return b"inbound"
        return self.ctx.book.mode.value.encode()

    def _route_value(self) -> bytes:
        if self.ctx.direction == INBOUND:
            return b"inbound"
        return self.route.source.value.encode() if self.route else b"error"

    def _where(self) -> str:
        ep = self.endpoint
        name = self.service or "app"
        return f"{name} at {ep.address}:{ep.port}" if ep else name

    def _count(self, status: int) -> None:
        self.ctx.metrics.count(self.ctx.direction, self.service or "-", status)


def _has_host(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"host" for name, _ in headers)
