"""HTTP/1.1 framing helpers for the proxy: pure functions on bytes, no I/O.

Parsing is httptools' job (llhttp); this module only *writes* heads and chunk frames and
decides which headers cross a hop (RFC 9110 section 7.6.1: hop-by-hop fields and the ones
a Connection header names are not forwarded).
"""

from __future__ import annotations

import http
import json

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


def filter_headers(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()) -> tuple[list[bytes], int, bool]:
    """Return (header lines to forward, framing, connection_close) for a message's headers.

    Lines are ``b"Name: value\\r\\n"``; Content-Length is kept, Transfer-Encoding is
    dropped here (the writer re-frames), and so is every hop-by-hop header.
    """
    framing = Framing.NONE
    close = False
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
    lines: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            if b"chunked" in value.lower():
                framing = Framing.CHUNKED
            continue
        if lname in HOP_BY_HOP or lname in named or lname in drop:
            continue
        if lname == b"content-length" and framing != Framing.CHUNKED:
            framing = Framing.LENGTH
        lines.append(b"%s: %s\r\n" % (name, value))
    if framing == Framing.CHUNKED:
        # RFC 9112 6.3: with both, Transfer-Encoding wins and Content-Length must go
        lines = [ln for ln in lines if not ln.lower().startswith(b"content-length:")]
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
