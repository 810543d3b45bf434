"""HTTP/1.1 framing helpers for the proxy: pure functions on bytes, no I/O.

Parsing is httptools' job (llhttp); this module only *writes* heads and chunk frames and
decides which headers cross a hop (RFC 9110 section 7.6.1: hop-by-hop fields and the ones
a Connection header names are not forwarded).

How a message is framed is read from *every* header it arrived with, the way llhttp
framed it, never from what is left after filtering: a proxy that drops a Content-Length
(say, because Connection named it) but forwards the body lets the next hop read that body
as another request (request smuggling, RFC 9112 11.2). A request whose Connection header
names a field the proxy frames or routes by is refused outright.
"""

from __future__ import annotations

import http
import json

from sidecar.errors import UntrustedFraming

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# fields a request's Connection header may not name: the proxy frames (RFC 9112 6) and
# routes (RFC 9112 3.2) by them, so they are never hop-by-hop here
PROTECTED = frozenset({b"content-length", b"transfer-encoding", b"host"})
ROUTE_HEADER = b"x-sidemesh-route"
# An inbound sidecar whose app refuses connections answers 503 with this header; the calling
# sidecar treats it like a connect failure and retries elsewhere (a pod whose app stopped
# first, or has not started yet, must not fail calls that another replica can serve).
ERROR_HEADER = b"x-sidemesh-error"
APP_UNAVAILABLE = b"app-unavailable"
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
LAST_CHUNK = b"0\r\n\r\n"

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Framing:
    """How a message body is delimited."""

    NONE = 0  # no body
    LENGTH = 1  # Content-Length
    CHUNKED = 2  # Transfer-Encoding: chunked
    CLOSE = 3  # until the connection closes (responses only)


def filter_headers(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset(), *, request: bool = False
) -> tuple[list[bytes], int, bool]:
    """Return (header lines to forward, framing, connection_close) for a message's headers.

    Lines are ``b"Name: value\\r\\n"``; Content-Length is kept, Transfer-Encoding is
    dropped here (the writer re-frames), and so is every hop-by-hop header. The framing
    comes from all of ``headers``, before anything is dropped. With ``request=True`` a
    Connection header naming a ``PROTECTED`` field, or more than one Host (RFC 9112 3.2),
    raises ``UntrustedFraming``.
    """
    framing = Framing.NONE
    close = False
    transfer_encoding = False
    hosts = 0
    named: set[bytes] = set()
    for name, value in headers:
        lname = name.lower()
        if lname == b"connection":
            for token in value.lower().split(b","):
                token = token.strip()
                if token == b"close":
                    close = True
                elif token:
                    named.add(token)
        elif lname == b"transfer-encoding":
            transfer_encoding = True
            if b"chunked" in value.lower():
                framing = Framing.CHUNKED
        elif lname == b"content-length":
            if not transfer_encoding:
                framing = Framing.LENGTH
        elif lname == b"host":
            hosts += 1
    if transfer_encoding and framing != Framing.CHUNKED:
        # RFC 9112 6.3: Transfer-Encoding without a final chunked (llhttp refuses it in a
        # request; a response then runs to the close) overrides any Content-Length
        framing = Framing.NONE
    if request and (hosts > 1 or named & PROTECTED):
        if hosts > 1:
            reason = "more than one Host header"
        else:
            reason = "Connection names " + ", ".join(sorted(t.decode("latin-1") for t in named & PROTECTED))
        raise UntrustedFraming(f"{reason}: the request's framing or routing cannot be trusted")
    named -= PROTECTED
    lines: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in named or lname in drop:
            continue
        if lname == b"content-length" and framing != Framing.LENGTH:
            # RFC 9112 6.3: with Transfer-Encoding, Content-Length must go
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    return lines, framing, close


def error_response(status: int, body: bytes, *, route: bytes, close: bool, extra: bytes = b"") -> bytes:
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason(status)),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-sidemesh-route: %s\r\n" % route,
        extra,
    ]
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


def json_error(status: int, message: str, **extra: object) -> bytes:
    return json.dumps({"error": message, "status": status, **extra}).encode()
