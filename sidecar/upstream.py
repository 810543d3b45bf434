"""Upstream connections and their pool.

``UpstreamConnection`` is an asyncio Protocol parsing responses with httptools; it hands
every event to the exchange currently attached to it. ``UpstreamPool`` keeps idle
keep-alive connections per endpoint (LIFO, so the warm ones are reused), closes ones idle
too long, and opens new ones with a connect timeout, converting OSError into
``UpstreamConnectError`` at this boundary.

With mutual TLS (``sidecar/mtls.py``) a new connection is made in two steps, each within
the connect timeout: TCP, then the TLS handshake (``loop.start_tls``), so that a refused
connection (``UpstreamConnectError``) and a peer that cannot prove an identity
(``HandshakeFailed``) stay apart. A connection remembers the service whose identity it
verified (``peer``) and is taken from the pool only for that service, so the handshake and
the identity check happen once per connection, not per request.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

import httptools

from sidecar.errors import HandshakeFailed, UpstreamConnectError

if TYPE_CHECKING:
    from sidecar.proxy import Exchange

Key = tuple[str, int]

# Linux tcp_states.h, for logs
_TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
               7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool", "key", "transport", "parser", "exchange", "closed", "idle_since",
        "_status_reason", "_headers", "_head_only", "reading_paused", "responded", "peer",
    )

    def __init__(self, pool: UpstreamPool, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0
        self._status_reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_only = False
        self.reading_paused = False
        # a byte of a response arrived since the exchange attached (else a death is the keep-alive race)
        self.responded = False
        # mTLS: the service whose identity the peer proved on this connection; None in plaintext
        self.peer: str | None = None

    # ----- asyncio.Protocol -----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # an idle keep-alive connection must not talk; drop it
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.parser = httptools.HttpResponseParser(self)
            self.close()
            ex.on_upstream_garbage(f"malformed response from upstream: {exc}")
            return
        if self._head_only:
            # a response to HEAD has no body whatever its Content-Length says; llhttp cannot
            # know that, so start a fresh parser for the next response on this connection
            self._head_only = False
            self.parser = httptools.HttpResponseParser(self)
            if self.exchange is not None:
                self.exchange.on_response_complete()
        if self.exchange is not None:
            self.exchange.flush()
        elif ex is not None:
            ex.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            if ex.upstream is self:
                ex.on_upstream_lost(exc, responded=self.responded)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_downstream_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.resume_downstream_reading()

    # ----- httptools callbacks -----

    def on_message_begin(self) -> None:
        self.responded = True
        self._headers = []
        self._status_reason = b""

    def on_status(self, status: bytes) -> None:
        self._status_reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        status = self.parser.get_status_code()
        head_only = ex.on_response_head(status, self._status_reason, self._headers, self.parser.should_keep_alive())
        if head_only:
            self._head_only = True

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is not None and not self._head_only:
            ex.on_response_complete()

    # ----- helpers -----

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def describe(self) -> str:
        """What a log line needs to tell a dead connection from a slow peer (TCP state from the kernel)."""
        t = self.transport
        tcp = "-"
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is not None:
            try:
                tcp = _TCP_STATES.get(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0], "?")
            except OSError:
                tcp = "?"
        return (f"closed={self.closed} closing={t is None or t.is_closing()} reading_paused={self.reading_paused} "
                f"responded={self.responded} tcp={tcp}")

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once (no TLS close_notify exchange): for a peer we will not talk to."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()


class UpstreamPool:
    """Idle keep-alive connections per endpoint."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 1.0,
        idle_timeout_s: float = 30.0,
        max_idle_per_endpoint: int = 256,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_idle = max_idle_per_endpoint
        self._loop = loop
        self.idle: dict[Key, list[UpstreamConnection]] = {}
        self.connects = 0
        self.connect_failures = 0
        self._sweeper: asyncio.Task[None] | None = None

    def take_idle(self, key: Key, peer: str | None = None) -> UpstreamConnection | None:
        """An idle connection to ``key`` whose peer proved ``peer`` (None: plaintext ones)."""
        conns = self.idle.get(key)
        if not conns:
            return None
        i = len(conns) - 1
        while i >= 0:
            conn = conns[i]
            # the top one in all but odd cases; one verified as another service (an address
            # listed under two names) stays for that service
            if conn.peer == peer:
                del conns[i]
                if conn.usable:
                    return conn
            i -= 1
        return None

    async def connect(self, key: Key, *, tls: ssl.SSLContext | None = None) -> UpstreamConnection:
        """A new connection to ``key``; with ``tls``, after a TLS handshake (its peer not yet checked)."""
        loop = self._loop or asyncio.get_running_loop()
        self.connects += 1
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self, key), key[0], key[1]),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            self.connect_failures += 1
            what = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: {what}") from exc
        if conn.closed or transport.is_closing():
            # the peer accepted and closed (a pod stopping, a full listener) before this task resumed:
            # nothing was sent, so it is a refused connect, not a request lost on the way
            self.connect_failures += 1
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: closed by the peer as soon as it was accepted")
        if tls is None:
            return conn
        cause: BaseException | None = None
        try:
            # start_tls on a transport already lost never completes on its own (its handshake timeout
            # cannot abort a closed transport): checked above in this same step, and bounded here too
            async with asyncio.timeout(self.connect_timeout_s + 0.5):
                secured = await loop.start_tls(transport, conn, tls, ssl_handshake_timeout=self.connect_timeout_s,
                                               ssl_shutdown_timeout=self.connect_timeout_s)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            transport.abort()
            secured, cause = None, exc
        if secured is None or secured.is_closing():
            # (a peer that closes cleanly mid-handshake ends it without an exception)
            transport.close()
            self.connect_failures += 1
            reason = handshake_failure(cause, self.connect_timeout_s)
            raise HandshakeFailed(f"TLS handshake with {key[0]}:{key[1]} failed: {reason}", reason=reason) from cause
        conn.transport = secured
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        conn.exchange = None
        if not conn.usable:
            return
        if conn.reading_paused:
            # paused for a slow client, and the response completed within that same read: a
            # pooled connection that does not read would never see its next response (504)
            conn.resume_reading()
        conns = self.idle.setdefault(conn.key, [])
        if len(conns) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    def forget(self, conn: UpstreamConnection) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.idle_timeout_s / 4))
            cutoff = time.monotonic() - self.idle_timeout_s
            for key, conns in list(self.idle.items()):
                for conn in [c for c in conns if c.idle_since < cutoff]:
                    conns.remove(conn)
                    conn.close()
                if not conns:
                    del self.idle[key]

    def stats(self) -> dict[str, Any]:
        return {
            "idle": sum(len(c) for c in self.idle.values()),
            "connects": self.connects,
            "connect_failures": self.connect_failures,
        }

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()


def handshake_failure(exc: BaseException | None, timeout_s: float) -> str:
    """What a failed handshake says about the peer, for a log line and a 503 (None: it closed cleanly)."""
    if exc is None:
        return "no TLS: the connection closed during the handshake"
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake within {timeout_s:g}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        # e.g. "unable to get local issuer certificate": signed by another CA (RFC 5280 6.1)
        return f"a certificate the mesh CA does not vouch for ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)  # OpenSSL's name for it (absent on hand-made errors)
        if reason in _NOT_TLS:
            return f"no TLS: the peer does not speak TLS ({reason})"
        return f"no acceptable TLS ({reason or exc})"
    if isinstance(exc, OSError):
        # reset or closed mid-handshake: a plaintext server giving up on a ClientHello, or a
        # TLS server refusing our certificate
        return f"no TLS: the connection closed during the handshake ({exc.strerror or repr(exc)})"
    return f"no TLS ({exc!r})"


# OpenSSL's reasons for bytes that are not a TLS record at all
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                      "UNEXPECTED_EOF_WHILE_READING"})
