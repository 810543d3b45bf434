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

Hostile clients meet the named limits of ``sidecar/limits.py``: the request target and
the header block are counted as httptools hands them over, and parsing stops at the limit
(414, 431); one timer per connection holds its head and idle deadlines; at the connection
limit the oldest connection with no request in progress makes room; a client that
pipelines past ``max_pipelined`` is not read until its queue drains. A refused request is
answered once, after the answers to the requests before it, and the connection closes.

Failure handling, in order of preference:
* a connect failure, or a connection that dies before a whole response head arrived,
  on a request we can send again -> retry on another endpoint when ``sidecar/retry.py``
  says so (the failed one is ejected for a few seconds when it refused the connection);
* nothing sent to the client yet -> a JSON error with the status of the SidecarError
  (400, 502, 503, 504) and the route header;
* response already started -> the client connection is aborted, so the client sees a
  truncated response instead of a wrong one (Envoy does the same).

``ProxyContext.drain()`` prepares a listener for shutdown: every later answer says
``Connection: close`` and its connection closes after it, idle connections close at once,
and exchanges in flight finish.

Mutual TLS (``sidecar/mtls.py``, DESIGN.md "Identity") when the context has a workload
identity: an outbound exchange fails closed (503) while our certificate is unusable, opens
upstream connections with a handshake and a check of the peer's identity, and reuses pooled
connections only for the service they were verified as; a connection of the mesh listener
(``DownstreamConnection(ctx, mtls=True)``) is TLS from its first byte, and each of its
requests is authorized against our service's policy before it is routed.
"""

from __future__ import annotations

import asyncio
import time
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
    Forbidden,
    HeadTimeout,
    HeadTooLarge,
    MalformedRequest,
    PeerNotVerified,
    RequestRejected,
    SidecarError,
    UpgradeRefused,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
    UrlTooLong,
)
from sidecar.http1 import Framing
from sidecar.limits import DEFAULT_LIMITS, Limits
from sidecar.metrics import INBOUND, OUTBOUND, SidecarMetrics
from sidecar.model import Endpoint
from sidecar.mtls import Authorizations, InboundTls, OutboundTls, replay
from sidecar.retry import Failure, should_retry
from sidecar.upstream import UpstreamConnection, UpstreamPool

if TYPE_CHECKING:
    from sidecar.routing import RouteBook
    from sidecar.workload import WorkloadIdentity

__all__ = ["INBOUND", "OUTBOUND", "DownstreamConnection", "Exchange", "ProxyContext"]

log = logging.getLogger("sidemesh.sidecar.proxy")
_REPLAY_LIMIT = 64 * 1024  # request bodies up to this size are kept for a retry
_BUFFER_LIMIT = 1024 * 1024  # buffered request body before we stop reading the client
_ROUTE_DROP = frozenset({http1.ROUTE_HEADER})

# What the one timer of a client connection is waiting for (see sidecar/limits.py)
_FIRST = 0  # a fresh connection: its first head is due head_timeout_s after the accept
_HEAD = 1  # a later head has begun: due head_timeout_s after its first byte
_IDLE = 2  # between exchanges: the next request must begin within idle_timeout_s
_BUSY = 3  # an exchange is in progress (its own route timeout applies); a stalled reader is cut
_CLOSING = 4  # answered and closing or lingering: gone within linger_s, or aborted


# refusals of a client that is likely still sending its head: read and drop it for a while
_LINGER_AFTER = (UrlTooLong, HeadTooLarge)


class _PipelineFull(Exception):
    """Raised from a parser callback to stop parsing: the queue of pipelined requests is full."""


class _Stopped(Exception):
    """Raised from a parser callback to stop parsing: the connection takes no more requests."""


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
        limits: Limits = DEFAULT_LIMITS,
        identity: WorkloadIdentity | None = None,
        authorizations: Authorizations | None = None,
    ) -> None:
        """``identity``: mutual TLS between sidecars; None (``--insecure``) keeps every hop plaintext.

        ``authorizations`` (inbound with an identity): where our service's policy is read per request.
        """
        if direction == OUTBOUND and book is None:
            raise ValueError("the outbound listener needs a route book")
        if direction == INBOUND and app_route is None:
            raise ValueError("the inbound listener needs the app's route")
        self.direction = direction
        self.pool = pool
        self.metrics = metrics
        self.book = book
        self.app_route = app_route
        self.limits = limits
        self.identity = identity
        # mTLS: the caller side for hops to other sidecars (the hop to our own app stays plaintext),
        # the callee side for the mesh listener
        self.outbound_tls: OutboundTls | None = None
        self.inbound_tls: InboundTls | None = None
        if identity is not None and direction == OUTBOUND:
            self.outbound_tls = OutboundTls(identity, metrics)
        elif identity is not None:
            if authorizations is None:
                raise ValueError("an inbound listener with an identity needs the authorizations to enforce")
            self.inbound_tls = InboundTls(identity, authorizations, metrics, handshake_timeout_s=limits.head_timeout_s,
                                          shutdown_timeout_s=limits.linger_s)
        self.draining = False
        self.connections: dict[DownstreamConnection, None] = {}
        # those that may be closed to make room (see ``admit``), oldest first: O(1) under a flood
        self.evictable: dict[DownstreamConnection, None] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.evicted = 0
        self.refused = 0
        self._limit_logged_at = float("-inf")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run the slow path (routing through DNS, opening a connection) as a task we can cancel on shutdown."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def admit(self, conn: DownstreamConnection, now: float) -> bool:
        """Make room for ``conn`` under ``max_connections``; False when none can give way.

        The one to give way is the oldest connection that has not sent a whole request head
        yet (a slow or silent client) or that is lingering after a refusal. A connection that
        has sent a request, busy or kept alive between requests, is never closed for room.
        """
        conns = self.connections
        if len(conns) >= self.limits.max_connections:
            victim = next(iter(self.evictable), None)
            if victim is None:
                self.refused += 1
                self._log_limit(now)
                return False
            self.evicted += 1
            self._log_limit(now)
            victim.evict()
        conns[conn] = None
        self.evictable[conn] = None
        return True

    def drain(self) -> None:
        """From now on every answer says ``Connection: close``; idle connections close at once."""
        self.draining = True
        for conn in list(self.connections):
            conn.drain()
        log.info("event=listener_draining direction=%s connections=%d", self.direction, len(self.connections))

    def _log_limit(self, now: float) -> None:
        if now - self._limit_logged_at >= 1.0:  # at most once a second under a flood
            self._limit_logged_at = now
            log.warning("event=connection_limit direction=%s limit=%d evicted_total=%d refused_total=%d",
                        self.direction, self.limits.max_connections, self.evicted, self.refused)


class DownstreamConnection(asyncio.Protocol):
    """A client connection: parses requests, runs their exchanges one after another.

    ``mtls``: a connection of the mesh listener, TLS from its first byte: the handshake runs
    within the first head deadline, and the verified caller's service (``caller``) is kept
    for the authorization of each request.
    """

    def __init__(self, ctx: ProxyContext, *, mtls: bool = False) -> None:
        if mtls and ctx.inbound_tls is None:
            raise ValueError("an mTLS connection needs an inbound context with an identity")
        self.ctx = ctx
        self.mtls = mtls
        self.caller: str | None = None  # the service the client proved it is (mTLS), once the handshake is done
        self._tls_raw: list[bytes] | None = None  # the client's first TLS bytes, read before TLS took over
        self._tls_early: list[bytes] | None = None  # bytes decrypted before the handshake task resumed
        self.limits = ctx.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.receiving: Exchange | None = None  # the request being parsed
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.closing = False
        self.half_closed = False  # the client sent EOF: answer what is in flight, then close
        self.stopped = False  # no more requests are read: input is dropped
        self._lingering = False  # half-closed by us after a refusal: reading and dropping input
        self._refusal: bytes | None = None  # the answer owed once the exchanges before it are done
        self._linger_at_end = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # header bytes of the head being parsed, as the callbacks see them
        self._head_raw = 0  # bytes read while that head was incomplete (Limits.head_guard_bytes)
        self._in_head = False
        self._proven = False  # a whole request head arrived on it at least once
        self._paused = 0
        self._pipeline_paused = False
        self.writing_paused = False  # the client reads slower than we write
        self._writing_paused_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._kind = _FIRST
        self._deadline = 0.0

    # ----- asyncio.Protocol -----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        if not self.ctx.admit(self, now):
            self.closing = self.stopped = True
            transport.close()
            return
        self._deadline = now + self.limits.head_timeout_s
        self._timer = loop.call_at(self._deadline, self._tick)
        if self.mtls:
            # no request is read until the handshake is done; its bytes belong to TLS
            self.stopped = True
            self._tls_raw = []
            self._tls_early = []
            self.ctx.spawn(self._accept_tls(transport))  # type: ignore[arg-type]

    async def _accept_tls(self, raw: asyncio.Transport) -> None:
        # the loop may read the ClientHello before start_tls puts TLS in our place (uvloop starts
        # reading right after connection_made): handed over once TLS holds the transport, before it reads
        asyncio.get_running_loop().call_soon(self._tls_took_over, raw)
        try:
            tls, caller = await self.ctx.inbound_tls.accept(raw, self)  # type: ignore[union-attr]
        except ConnectionError:
            self.connection_lost(None)  # counted and logged by InboundTls; the app saw nothing
            return
        except asyncio.CancelledError:
            self.connection_lost(None)
            raise
        early, self._tls_early = self._tls_early, None
        if self.closing:  # evicted or past the head deadline as the handshake finished
            tls.abort()
            self.connection_lost(None)
            return
        self.transport = tls
        self.caller = caller
        self.stopped = False
        for data in early or ():
            self.data_received(data)

    def _tls_took_over(self, raw: asyncio.Transport) -> None:
        chunks, self._tls_raw = self._tls_raw, None
        if chunks and not self.closing:
            replay(raw.get_protocol(), chunks)

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            if self._tls_raw is not None:  # TLS has not taken the transport over yet
                self._tls_raw.append(data)
                self.transport.pause_reading()  # type: ignore[union-attr]  # start_tls resumes it
            elif self._tls_early is not None:
                self._tls_early.append(data)  # the handshake completed; its task has not resumed yet
            return  # closing, lingering, or a refusal is owed: the client's input is dropped
        if self._in_head:
            self._head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(UpgradeRefused("CONNECT and protocol upgrades are not supported; sidemesh proxies plain HTTP/1.1"))
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RequestRejected):
                self._refuse(cause)
            elif isinstance(cause, _PipelineFull):
                self._pipeline_overflow()
            elif cause is None or isinstance(cause, httptools.HttpParserError):
                self._refuse(MalformedRequest(f"malformed HTTP request: {cause or exc}"))
            elif not isinstance(cause, _Stopped):
                log.error("event=proxy_bug direction=%s reason=%r", self.ctx.direction, cause, exc_info=cause)
                self._refuse(MalformedRequest(f"request could not be handled: {cause!r}"))
        except httptools.HttpParserError as exc:
            self._refuse(MalformedRequest(f"malformed HTTP request: {exc}"))
        else:
            if self._in_head and self._head_raw > self.limits.head_guard_bytes:
                self._refuse(HeadTooLarge(f"request head larger than {self.limits.head_guard_bytes} bytes"))
        ex = self.active
        if ex is not None:
            ex.flush()

    def eof_received(self) -> bool:
        if self._lingering or self._tls_early is not None:  # (gone before the TLS handshake finished)
            return False
        if self._in_head:  # a partial head: that request can never complete
            self._in_head = False
            self.stopped = True
        broken = self.receiving
        if broken is not None:
            # the client stopped mid-body: that exchange is aborted and its upstream closed
            log.info("event=client_closed_mid_request direction=%s service=%s", self.ctx.direction, broken.service or "-")
            self.receiving = None
            self.stopped = True
            if broken is self.active:
                return False  # closes the transport; connection_lost aborts the exchange
            self.queue.remove(broken)
            broken.abort("client closed mid-request")
        if self.active is None:
            return False
        self.half_closed = True
        # asyncio's TLS cannot stay half-open: it closes, and the exchange in flight with it
        return not self.mtls

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = self.stopped = True
        self.ctx.connections.pop(self, None)
        self.ctx.evictable.pop(self, None)
        self._loop = None  # no deadline matters any more
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ex in [self.active, *self.queue]:
            if ex is not None:
                ex.abort("client went away")
        self.queue.clear()
        self.active = None
        self.receiving = None

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self._loop is not None:
            self._writing_paused_at = self._loop.time()
        if self.active is not None and self.active.upstream is not None:
            self.active.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.active is not None and self.active.upstream is not None:
            self.active.upstream.resume_reading()

    # ----- httptools callbacks -----

    def on_message_begin(self) -> None:
        if self.stopped:
            raise _Stopped
        if len(self.queue) >= self.limits.max_pipelined:
            raise _PipelineFull
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._head_raw = 0
        self._in_head = True
        if self._kind != _FIRST:  # the first head keeps the deadline counted from the accept
            self._deadline = self._loop.time() + self.limits.head_timeout_s  # type: ignore[union-attr]
        self._kind = _HEAD

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_url_bytes:
            raise UrlTooLong(f"request target longer than {self.limits.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > self.limits.max_header_bytes:
            raise HeadTooLarge(f"header block larger than {self.limits.max_header_bytes} bytes")
        if len(headers) > self.limits.max_headers:
            raise HeadTooLarge(f"more than {self.limits.max_headers} header fields", reason="too_many_headers")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._kind = _BUSY
        if not self._proven:  # a whole head: never closed for room from now on
            self._proven = True
            self.ctx.evictable.pop(self, None)
        p = self.parser
        if p.should_upgrade():
            # refused when httptools raises HttpParserUpgrade right after this callback; no
            # exchange, so not a byte of it reaches an upstream
            return
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
            if len(self.queue) >= self.limits.max_pipelined and not self._pipeline_paused:
                # read no more until the queue drains: TCP flow control then holds the client back
                self._pipeline_paused = True
                self.pause_reading()

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
        if not keep_alive or self.closing or self.ctx.draining or (self.half_closed and not self.queue):
            # a body still arriving is read and dropped for a while, so the client sees the answer
            self._end(linger=self._linger_at_end or (self.receiving is ex and ex.req_framing != Framing.NONE))
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt
            if not self._in_head:
                self._kind = _BUSY
            if self._pipeline_paused and len(self.queue) < self.limits.max_pipelined and not self.stopped:
                self._pipeline_paused = False
                self.resume_reading()
            nxt.start()
            nxt.flush()
        elif self._refusal is not None:
            self._answer_refusal()
        elif not self._in_head and self.receiving is None:
            self._kind = _IDLE
            self._deadline = self._loop.time() + self.limits.idle_timeout_s  # type: ignore[union-attr]

    def awaiting_body(self) -> None:
        """The answer is out but the request body is not all in: it must come within the idle timeout."""
        self._kind = _IDLE
        self._deadline = self._loop.time() + self.limits.idle_timeout_s  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        if not self.closing and not self._lingering and self.transport is not None:
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
            self.closing = self.stopped = True
            self.ctx.evictable.pop(self, None)
            if self.transport is not None:
                self.transport.close()
            # a client that reads nothing would keep a closing transport (and its buffer) for good
            self._expect(_CLOSING, self.limits.linger_s)

    def abort(self) -> None:
        self.closing = self.stopped = True
        self.ctx.evictable.pop(self, None)
        if self.transport is not None:
            self.transport.abort()

    def evict(self) -> None:
        """Make room under the connection limit (ProxyContext.admit)."""
        self.ctx.connections.pop(self, None)
        log.debug("event=connection_evicted direction=%s in_head=%s", self.ctx.direction, self._in_head)
        self.close()

    @property
    def unproven(self) -> bool:
        """Open, and no request has come on it yet: a TLS handshake still running, or a client that
        just connected and is about to send its first request. A leaving sidecar waits for that
        request rather than close under it (the caller could not tell whether an app saw it)."""
        return not self._proven and not self.closing

    def drain(self) -> None:
        """Idle between requests: close now (a client reusing it retries elsewhere). A connection that
        never carried a request stays until its first one is answered with ``Connection: close``."""
        if self.active is None and not self._in_head and self.receiving is None and self._proven:
            self.close()

    # ----- refusals and deadlines -----

    def _refuse(self, err: RequestRejected) -> None:
        """The request stream cannot go on: answer ``err`` once, after the answers owed before it, then close."""
        log.info("event=request_rejected direction=%s status=%d reason=%s detail=%r",
                 self.ctx.direction, err.status, err.reason, err.message)
        self.ctx.metrics.count(self.ctx.direction, "-", err.status)
        self.stopped = True
        self._in_head = False
        self._linger_at_end = isinstance(err, _LINGER_AFTER)
        broken, self.receiving = self.receiving, None
        if broken is not None and broken is not self.active:
            self.queue.remove(broken)  # its body was unparseable: it is the one refused
            broken.abort("client sent a malformed request")
        elif broken is not None:
            if broken.response_started:
                broken.abort("client sent a malformed request")
                self.abort()  # an answer is under way: cutting it is the only honest signal
                return
            broken.abort("client sent a malformed request")
            self.active = None
        self._refusal = http1.error_response(err.status, http1.json_error(err.status, err.message), route=b"error", close=True)
        if self.active is None:
            self._answer_refusal()
        else:
            self._kind = _BUSY
            self.pause_reading()  # nothing more is parsed; the answers before the refusal go on

    def _answer_refusal(self) -> None:
        data, self._refusal = self._refusal, None
        if data is not None:
            self.write(data)
        self._end(linger=self._linger_at_end)

    def _pipeline_overflow(self) -> None:
        # more requests arrived in one read than may queue; httptools cannot stop in the middle
        # of a read and say where, so the rest of it is dropped: the last queued answer says
        # Connection: close and the client retries the unanswered ones (RFC 9112 9.3.2)
        log.info("event=pipeline_limit direction=%s queued=%d action=close_after_queue", self.ctx.direction, len(self.queue))
        self.stopped = True
        self._in_head = False
        self._linger_at_end = True
        self.queue[-1].keep_alive = False

    def _end(self, *, linger: bool) -> None:
        for ex in self.queue:
            ex.abort("connection closing")
        self.queue.clear()
        transport = self.transport
        if not linger or transport is None or self.closing or not transport.can_write_eof():
            self.close()
            return
        # RFC 9112 9.6: close only the sending side and keep reading (and dropping) what the
        # client still sends, so that our answer is not lost to a reset
        self.stopped = self._lingering = True
        self.ctx.evictable[self] = None  # it may make room for a new client
        transport.write_eof()
        if self._paused:
            self._paused = 0
            transport.resume_reading()
        self._expect(_CLOSING, self.limits.linger_s)

    def _expect(self, kind: int, within_s: float) -> None:
        """Set a deadline sooner than the timer's next look (only on the rare closing paths)."""
        loop = self._loop
        if loop is None:
            return
        self._kind = kind
        self._deadline = loop.time() + within_s
        timer = self._timer
        if timer is None or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(self._deadline, self._tick)

    def _tick(self) -> None:
        # One timer per connection, never cancelled on the hot path: it wakes at least every
        # Limits.tick_s, which is no later than any head or idle deadline set since it was armed,
        # so changing the deadline per request costs two attribute writes, not a new timer.
        self._timer = None
        loop = self._loop
        if loop is None or self.transport is None:
            return
        now = loop.time()
        kind = self._kind
        if kind == _BUSY:
            if self.writing_paused and now - self._writing_paused_at >= self.limits.idle_timeout_s:
                log.info("event=client_stalled direction=%s reason=not_reading_answers", self.ctx.direction)
                self.abort()
                return
            self._timer = loop.call_at(now + self.limits.tick_s, self._tick)
            return
        if now < self._deadline:
            self._timer = loop.call_at(min(self._deadline, now + self.limits.tick_s), self._tick)
            return
        if kind == _HEAD:
            self._refuse(HeadTimeout(f"request head not received within {self.limits.head_timeout_s:g}s"))
            if self._timer is None and self._loop is not None:
                self._timer = loop.call_at(now + self.limits.tick_s, self._tick)  # answers before the 408 go on
        elif kind == _CLOSING:
            self.abort()
        else:  # _FIRST with not a byte received, or _IDLE: nothing to answer
            log.debug("event=connection_idle_closed direction=%s first=%s", self.ctx.direction, kind == _FIRST)
            self.close()


class Exchange:
    """One request/response through the proxy."""

    __slots__ = (
        "down", "ctx", "method", "target", "service", "headers", "keep_alive", "http10",
        "req_lines", "req_framing", "req_done", "req_pending", "req_pending_size", "replay", "replay_size",
        "route", "endpoint", "tried", "upstream", "attempts", "reused", "sent_any",
        "response_started", "resp_framing_out", "resp_done", "resp_status", "resp_until_close", "far_retry",
        "timer", "out", "finished", "head_request", "_down_paused", "_up_paused", "t0",
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
        self.tried: tuple[Endpoint, ...] = ()  # endpoints of earlier attempts, skipped by a retry
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
        self.t0 = time.monotonic()  # for the request-duration histogram
        self._down_paused = False  # we stopped reading the client: too much body buffered
        self._up_paused = False  # we stopped reading the client: the upstream's write buffer is full

    # ----- request side -----

    def start(self) -> None:
        try:
            self._prepare()
        except SidecarError as exc:
            self.fail(exc)
            return
        ctx = self.ctx
        if ctx.direction == INBOUND:
            caller = self.down.caller
            if caller is not None:
                refusal = ctx.inbound_tls.denial(caller)  # type: ignore[union-attr]
                if refusal is not None:
                    self.fail(refusal)  # the app never sees the request
                    return
            route = ctx.app_route
        else:
            if ctx.outbound_tls is not None:
                refusal = ctx.outbound_tls.refusal(self.service)
                if refusal is not None:
                    self.fail(refusal)  # fail closed: never plaintext instead
                    return
            route = ctx.book.route(self.service)  # type: ignore[union-attr]
        if route is None:
            self.ctx.spawn(self._route_slow())
            return
        self._dispatch(route)

    def _prepare(self) -> None:
        # raises UntrustedFraming for a Connection header naming Content-Length & co.
        lines, framing, _ = http1.filter_headers(
            self.headers, drop=_ROUTE_DROP if self.ctx.direction == OUTBOUND else frozenset(), request=True
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

    def _dispatch(self, route: ResolvedRoute) -> None:
        self.route = route
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(route.policy.timeout_s, self._timed_out)
        endpoint = route.pick(self.tried)
        self.endpoint = endpoint
        self.attempts += 1
        # mTLS: only a connection whose peer proved it is this route's service
        conn = self.ctx.pool.take_idle(endpoint.key, route.service if self.ctx.outbound_tls is not None else None)
        if conn is not None:
            self._attach(conn, reused=True)
        else:
            self.ctx.spawn(self._connect(endpoint, route.service))

    async def _connect(self, endpoint: Endpoint, service: str) -> None:
        tls = self.ctx.outbound_tls
        try:
            if tls is None:
                conn = await self.ctx.pool.connect(endpoint.key)
            else:
                conn = await tls.connect(self.ctx.pool, endpoint, service)
        except UpstreamConnectError as exc:
            if self.finished:
                return
            self.ctx.book.health.eject(endpoint.key) if self.ctx.book is not None else None
            if not isinstance(exc, PeerNotVerified):  # that one is logged where it is found out
                log.info("event=upstream_connect_failed service=%s endpoint=%s:%d reason=%r",
                         self.service or "app", endpoint.address, endpoint.port, exc.message)
            # a failed handshake or another identity: nothing was sent, like a refused connect
            self._retry_or_fail(exc, Failure.CONNECT)
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
        conn.responded = False
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
                and self._may_retry(Failure.APP_UNAVAILABLE)):
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
        if not self.keep_alive or self.ctx.draining:
            self.keep_alive = False
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
                                Failure.APP_UNAVAILABLE)
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

    def on_upstream_lost(self, exc: Exception | None, *, responded: bool = True) -> None:
        """The upstream connection closed; ``responded``: a byte of a response had arrived on it."""
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
            # a pooled connection the peer had closed before a byte of answer is the keep-alive race
            dead_pooled = self.reused and not responded
            if dead_pooled:
                log.debug("event=pooled_connection_dead service=%s endpoint=%s", self.service or "app", self._where())
            self._retry_or_fail(err, Failure.DEAD_POOLED if dead_pooled else Failure.RESET)
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

    def _may_retry(self, failure: Failure) -> bool:
        route = self.route
        return route is not None and not self.response_started and should_retry(
            failure,
            attempts=self.attempts,
            endpoints=len(route.endpoints),
            policy_retries=route.policy.retries,
            idempotent=self.method in http1.IDEMPOTENT,
            # nothing sent yet (the body is still in req_pending), or all of it kept for replay
            can_resend=not self.sent_any or (self.replay is not None and self.req_done),
        )

    @staticmethod
    def _far_app_unavailable(headers: list[tuple[bytes, bytes]]) -> bool:
        return any(n.lower() == http1.ERROR_HEADER and v == http1.APP_UNAVAILABLE for n, v in headers)

    def _retry_or_fail(self, err: SidecarError, failure: Failure) -> None:
        route = self.route
        if self._may_retry(failure):
            assert route is not None
            self.ctx.metrics.retries += 1
            if self.endpoint is not None:
                self.tried += (self.endpoint,)
            self.upstream = None
            self.resume_downstream_reading()  # the old upstream's full buffer no longer matters
            self._dispatch(route)
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
        rejected = isinstance(err, RequestRejected)
        if isinstance(err, RequestRejected):
            log.info("event=request_rejected direction=%s status=%d reason=%s detail=%r",
                     self.ctx.direction, err.status, err.reason, err.message)
        elif not isinstance(err, Forbidden):  # logged as event=authorization_denied
            log.info("event=request_failed direction=%s service=%s status=%d reason=%r",
                     self.ctx.direction, self.service or "app", err.status, err.message)
        self.response_started = True
        self.resp_status = err.status
        close = (not self.keep_alive or rejected or self.ctx.draining
                 or not self.req_done and self.req_framing != Framing.NONE and self.http10)
        route = self._route_value() if self.route else self._mode_value()
        self.out.append(http1.error_response(err.status, err.to_json(), route=route, close=close, extra=extra))
        self.keep_alive = self.keep_alive and not close
        self._finish()

    def _timed_out(self) -> None:
        self.timer = None
        if self.finished or self.response_started:
            return
        timeout = self.route.policy.timeout_s if self.route else 0
        conn = self.upstream
        log.warning("event=upstream_timeout direction=%s service=%s endpoint=%s attempts=%d reused=%s sent=%s "
                    "upstream=%s", self.ctx.direction, self.service or "app", self._where(), self.attempts,
                    self.reused, self.sent_any, "none" if conn is None else conn.describe())
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
        if self.req_done or not self.keep_alive:
            # (an answer that said close does not wait for the rest of the body)
            self.flush()
            self.down.exchange_done(self, keep_alive=self.keep_alive and self.req_done)
            return
        if self._down_paused:
            self._down_paused = False
            self.down.resume_reading()
        self.down.awaiting_body()

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
        source = self.route.source.value if self.route is not None and self.ctx.direction == OUTBOUND else (
            "inbound" if self.ctx.direction == INBOUND else "none")
        self.ctx.metrics.count(self.ctx.direction, self.service or "-", status,
                               source=source, seconds=time.monotonic() - self.t0)


def _has_host(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"host" for name, _ in headers)
