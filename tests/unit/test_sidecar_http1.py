"""Which headers cross a hop, and how bodies are framed (RFC 9110 7.6.1, RFC 9112 6)."""

from __future__ import annotations

import json

import pytest

from sidecar import http1
from sidecar.errors import UntrustedFraming
from sidecar.http1 import Framing


def test_hop_by_hop_headers_are_not_forwarded() -> None:
    lines, framing, close = http1.filter_headers(
        [
            (b"Host", b"artist"),
            (b"Connection", b"keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Trailer", b"x-sum"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic eA=="),
            (b"Accept", b"*/*"),
        ]
    )
    assert lines == [b"Host: artist\r\n", b"Accept: */*\r\n"]
    assert framing == Framing.NONE
    assert close is False


def test_headers_named_by_connection_are_dropped_and_close_is_reported() -> None:
    lines, _, close = http1.filter_headers(
        [(b"connection", b"close, X-Secret ,x-other"), (b"X-Secret", b"1"), (b"X-Other", b"2"), (b"X-Kept", b"3")]
    )
    assert lines == [b"X-Kept: 3\r\n"]
    assert close is True


def test_content_length_framing_keeps_the_length() -> None:
    lines, framing, _ = http1.filter_headers([(b"Content-Length", b"12")])
    assert (lines, framing) == ([b"Content-Length: 12\r\n"], Framing.LENGTH)


def test_chunked_wins_over_content_length_whichever_comes_first() -> None:
    for headers in (
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"gzip, Chunked"), (b"Content-Length", b"5")],
    ):
        lines, framing, _ = http1.filter_headers(headers + [(b"x-a", b"1")])
        assert framing == Framing.CHUNKED
        # the writer adds its own transfer-encoding; no content-length may survive
        assert lines == [b"x-a: 1\r\n"]


def test_extra_dropped_headers_are_removed() -> None:
    lines, _, _ = http1.filter_headers([(b"X-Sidemesh-Route", b"dns"), (b"x-b", b"2")], drop=frozenset({http1.ROUTE_HEADER}))
    assert lines == [b"x-b: 2\r\n"]


def test_chunk_frames_with_hex_length() -> None:
    assert http1.chunk(b"a" * 26) == b"1a\r\n" + b"a" * 26 + b"\r\n"


def test_error_response_is_a_complete_json_message() -> None:
    body = http1.json_error(503, "unknown service 'x'", service="x")
    raw = http1.error_response(503, body, route=b"controlplane", close=True)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"content-length: %d" % len(body) in head
    assert b"x-sidemesh-route: controlplane" in head
    assert b"connection: close" in head
    assert json.loads(rest) == {"error": "unknown service 'x'", "status": 503, "service": "x"}
    assert b"connection: close" not in http1.error_response(400, b"{}", route=b"error", close=False)


def test_only_safe_methods_and_put_delete_are_idempotent() -> None:
    assert {b"GET", b"HEAD", b"PUT", b"DELETE"} <= http1.IDEMPOTENT
    assert b"POST" not in http1.IDEMPOTENT and b"PATCH" not in http1.IDEMPOTENT


def test_framing_comes_from_every_header_even_one_the_connection_header_names() -> None:
    # a response (not refused): Content-Length stays, and so does the framing read from it
    lines, framing, _ = http1.filter_headers([(b"Connection", b"content-length"), (b"Content-Length", b"36")])
    assert (lines, framing) == ([b"Content-Length: 36\r\n"], Framing.LENGTH)
    _, framing, _ = http1.filter_headers([(b"Connection", b"transfer-encoding"), (b"Transfer-Encoding", b"chunked")])
    assert framing == Framing.CHUNKED
    _, framing, _ = http1.filter_headers([(b"Content-Length", b"5")], drop=frozenset({b"content-length"}))
    assert framing == Framing.LENGTH


@pytest.mark.parametrize("named", [b"content-length", b"Transfer-Encoding", b"HOST", b"keep-alive, content-length"])
def test_request_whose_connection_header_names_a_framing_or_routing_header_is_refused(named: bytes) -> None:
    headers = [(b"Host", b"song"), (b"Connection", named), (b"Content-Length", b"36")]
    with pytest.raises(UntrustedFraming) as exc:
        http1.filter_headers(headers, request=True)
    assert exc.value.status == 400
    http1.filter_headers([(b"Connection", b"x-trace, close"), (b"x-trace", b"1")], request=True)  # others are fine


def test_request_with_two_host_headers_is_refused() -> None:
    with pytest.raises(UntrustedFraming, match="Host"):
        http1.filter_headers([(b"Host", b"artist"), (b"host", b"billing")], request=True)


def test_transfer_encoding_without_final_chunked_overrides_content_length() -> None:
    # RFC 9112 6.3: a response then runs until the connection closes; its Content-Length goes
    lines, framing, _ = http1.filter_headers([(b"Transfer-Encoding", b"gzip"), (b"Content-Length", b"5"), (b"x", b"1")])
    assert (lines, framing) == ([b"x: 1\r\n"], Framing.NONE)
