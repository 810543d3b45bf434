"""The proxy's protocols driven by hand: fake transports collect the bytes, the test plays both
the client and the upstream. No sockets, no sleeping (uvicorn's tests/protocols style)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.balancer import EndpointHealth, ResolvedRoute
from sidecar.limits import DEFAULT_LIMITS, Limits
from sidecar.metrics import SidecarMetrics
from sidecar.model import Endpoint, Policy, RouteTable, ServiceEntry, Source
from sidecar.proxy import INBOUND, OUTBOUND, DownstreamConnection, ProxyContext
from sidecar.routing import RouteBook
from sidecar.upstream import UpstreamConnection, UpstreamPool

EP = Endpoint("127.0.0.9", 8080, "artist-1")


class FakeTransport:
    """Collects written bytes; calls pause_writing/resume_writing around ``high_water``."""

    def __init__(self, protocol: Any = None, *, high_water: int | None = None) -> None:
        self.protocol = protocol
        self.high_water = high_water
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.eof_written = False  # half-closed by the protocol (write_eof)
        self.reading_paused = False
        self.writing_paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        assert not self.eof_written, "write after write_eof"
        self.data += data
        if self.high_water is not None and len(self.data) > self.high_water and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()

    def drain(self) -> bytes:
        """The peer read everything: hand it over and let the protocol write again."""
        out = bytes(self.data)
        self.data.clear()
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()
        return out

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeResolver:
    def peek(self, service: str) -> None:
        return None

    async def resolve(self, service: str) -> Any:
        raise AssertionError("no DNS in protocol tests")

    def watch(self, services: Any) -> None:
        pass

    def unwatch(self, services: Any = None) -> None:
        pass

    def on_change(self, callback: Any) -> None:
        pass


class Rig:
    """One client connection of a sidecar, with pre-opened fake upstream connections in the pool."""

    def __init__(self, direction: str, *, policy: Policy = Policy(timeout_s=5.0, retries=1), upstreams: int = 1,
                 down_high_water: int | None = None, up_high_water: int | None = None,
                 endpoints: tuple[Endpoint, ...] = (EP,), limits: Limits = DEFAULT_LIMITS) -> None:
        self.pool = UpstreamPool()
        self.metrics = SidecarMetrics()
        self.health = EndpointHealth()
        self.others: list[DownstreamConnection] = []
        if direction == OUTBOUND:
            self.book: RouteBook | None = RouteBook(resolver=FakeResolver(), health=self.health)
            from types import MappingProxyType

            entry = ServiceEntry("artist", endpoints, policy)
            self.book.on_config_update(RouteTable("v1", "n1", MappingProxyType({"artist": entry})))
            self.ctx = ProxyContext(OUTBOUND, pool=self.pool, metrics=self.metrics, book=self.book, limits=limits)
        else:
            self.book = None
            route = ResolvedRoute("app", endpoints, Source.CONTROLPLANE, self.health, policy)
            self.ctx = ProxyContext(INBOUND, pool=self.pool, metrics=self.metrics, app_route=route, limits=limits)
        # ``upstreams`` pooled connections to each endpoint; ups[k * upstreams + i] is endpoint k's i-th
        self.ups: list[UpstreamConnection] = []
        for ep in endpoints:
            mine = []
            for _ in range(upstreams):
                conn = UpstreamConnection(self.pool, ep.key)
                conn.connection_made(FakeTransport(conn, high_water=up_high_water))  # type: ignore[arg-type]
                mine.append(conn)
            self.pool.idle[ep.key] = list(reversed(mine))  # LIFO: the first of them is taken first
            self.ups += mine
        self.down = DownstreamConnection(self.ctx)
        self.client = FakeTransport(self.down, high_water=down_high_water)
        self.down.connection_made(self.client)  # type: ignore[arg-type]

    def connect(self) -> tuple[DownstreamConnection, FakeTransport]:
        """Another client connection to the same listener."""
        down = DownstreamConnection(self.ctx)
        client = FakeTransport(down)
        down.connection_made(client)  # type: ignore[arg-type]
        self.others.append(down)
        return down, client

    def up(self, i: int = 0) -> FakeTransport:
        return self.ups[i].transport  # type: ignore[return-value]

    def close(self) -> None:
        self.down.connection_lost(None)
        for down in self.others:
            down.connection_lost(None)


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def _rig(rigs: list[Rig], direction: str = INBOUND, **kw: Any) -> Rig:
    rig = Rig(direction, **kw)
    rigs.append(rig)
    return rig


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_malformed_request_gets_400_and_the_connection_closes(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET / HTTP/1.1\r\nHost artist\r\n\r\n")
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close\r\n" in out
    assert json.loads(out.partition(b"\r\n\r\n")[2])["status"] == 400
    assert rig.client.closed
    assert rig.up().data == b""  # nothing reached the upstream
    assert rig.metrics.requests == {(INBOUND, "-", 400): 1}


async def test_upgrade_request_is_refused_with_405(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert rig.client.data.startswith(b"HTTP/1.1 405 ")
    assert rig.client.closed


async def test_inbound_request_is_forwarded_and_the_response_gets_the_route_header(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET /a?b=1 HTTP/1.1\r\nHost: song\r\nConnection: keep-alive\r\nX-Id: 7\r\n\r\n")
    sent = bytes(rig.up().data)
    assert sent.startswith(b"GET /a?b=1 HTTP/1.1\r\n")
    assert b"X-Id: 7\r\n" in sent and b"Connection" not in sent
    rig.ups[0].data_received(OK)
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nok")
    assert b"x-sidemesh-route: inbound\r\n" in out
    assert not rig.client.closed
    assert rig.pool.idle[EP.key] == [rig.ups[0]]  # back in the pool for the next request


async def test_pipelined_requests_are_answered_in_order(rigs: list[Rig]) -> None:
    rig = _rig(rigs, upstreams=1)
    rig.down.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    # only the first is sent until it is answered
    assert bytes(rig.up().data).count(b"HTTP/1.1\r\n") == 1 and b"GET /1 " in rig.up().data
    rig.up().drain()
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
    assert bytes(rig.up().data).startswith(b"GET /2 HTTP/1.1\r\n")
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    out = bytes(rig.client.data)
    assert out.index(b"first") < out.index(b"second")
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert not rig.client.closed


async def test_close_delimited_response_is_rechunked_and_ends_at_eof(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello ")
    rig.ups[0].data_received(b"world")
    rig.ups[0].connection_lost(None)
    out = bytes(rig.client.data)
    assert b"transfer-encoding: chunked\r\n" in out
    assert out.endswith(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
    assert not rig.client.aborted


async def test_reset_after_the_head_aborts_the_client_connection(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    rig.ups[0].connection_lost(ConnectionResetError(104, "reset"))
    assert rig.client.aborted
    assert rig.metrics.requests == {(INBOUND, "-", 502): 1}


async def test_stale_pooled_connection_is_retried_on_a_fresh_one(rigs: list[Rig]) -> None:
    rig = _rig(rigs, upstreams=2)
    rig.down.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"GET /x" in rig.up(0).data
    rig.ups[0].connection_lost(None)  # the keep-alive race: the peer had closed it
    assert b"GET /x" in rig.up(1).data
    rig.ups[1].data_received(OK)
    assert bytes(rig.client.data).startswith(b"HTTP/1.1 200 OK\r\n")
    assert rig.metrics.retries == 1


async def test_head_response_with_content_length_completes_without_a_body(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"HEAD /blob HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"Content-Length: 1234\r\nx-sidemesh-route: inbound\r\n\r\n")
    rig.client.drain()
    rig.up().drain()
    # the same client and upstream connections carry the next request
    rig.down.data_received(b"GET /blob HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rig.up().data.startswith(b"GET /blob")
    rig.ups[0].data_received(OK)
    assert rig.client.data.endswith(b"\r\n\r\nok")


async def test_outbound_timeout_answers_504_and_leaves_no_request_counted_in_flight(rigs: list[Rig]) -> None:
    rig = _rig(rigs, OUTBOUND, policy=Policy(timeout_s=0.0, retries=0, lb="least_request"))
    rig.down.data_received(b"GET http://artist/slow HTTP/1.1\r\nHost: artist\r\n\r\n")
    assert rig.health.active == {EP.key: 1}
    for _ in range(3):
        await asyncio.sleep(0)  # a few loop turns, no waiting: the 0 s timer fires
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b"x-sidemesh-route: controlplane\r\n" in out
    assert rig.up().closed  # never reused: a late response must not answer the next request
    # least-request must not believe the endpoint is still busy
    assert rig.health.active == {}


async def test_upstream_connection_paused_by_a_slow_client_is_not_pooled_paused(rigs: list[Rig]) -> None:
    rig = _rig(rigs, down_high_water=64)
    rig.down.data_received(b"GET /many HTTP/1.1\r\nHost: a\r\n\r\n")
    chunks = b"".join(b"4\r\nxxxx\r\n" for _ in range(40))
    # many small chunks in one read: the proxy flushes mid-read, the client's buffer fills,
    # the upstream is paused, and the response completes within the same read
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    assert rig.client.data.endswith(b"0\r\n\r\n")
    rig.client.drain()
    assert rig.pool.idle[EP.key] == [rig.ups[0]]
    # a pooled connection left paused would never read the next response (a 504 later)
    assert not rig.up().reading_paused


async def test_client_is_read_again_when_the_upstream_answers_before_taking_the_whole_body(rigs: list[Rig]) -> None:
    rig = _rig(rigs, up_high_water=16, upstreams=2)
    rig.down.data_received(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n" + b"b" * 100)
    assert rig.client.reading_paused  # the upstream's buffer is full: stop reading the client
    rig.ups[0].data_received(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert rig.client.data.startswith(b"HTTP/1.1 413 ")
    # the rest of the body must still be read (and dropped) so the connection can go on
    assert not rig.client.reading_paused
    rig.down.data_received(b"b" * 900)
    rig.down.data_received(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rig.up(0).closed  # it said Connection: close
    assert rig.up(1).data.startswith(b"GET /next HTTP/1.1\r\n")


async def test_request_body_is_buffered_until_the_upstream_is_attached(rigs: list[Rig]) -> None:
    rig = _rig(rigs, upstreams=1)
    rig.down.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPUT /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    rig.down.data_received(b"0\r\n\r\n")
    rig.up().drain()
    rig.ups[0].data_received(OK)
    sent = bytes(rig.up().data)
    assert sent.startswith(b"PUT /2 HTTP/1.1\r\n")
    assert sent.endswith(b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")


async def test_client_going_away_closes_the_upstream_instead_of_pooling_it(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.down.connection_lost(ConnectionResetError())
    assert rig.up().closed
    assert rig.pool.idle[EP.key] == []


async def test_upstream_of_a_pipelined_request_is_not_read_while_the_client_is_behind(rigs: list[Rig]) -> None:
    rig = _rig(rigs, down_high_water=64, upstreams=1)
    rig.down.data_received(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.up().drain()
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + b"z" * 200)
    # the first response is complete but still unread by the client; the second starts now
    assert rig.up().data.startswith(b"GET /next")
    assert rig.up().reading_paused  # else a slow pipelining client lets the sidecar buffer without bound
    rig.client.drain()
    assert not rig.up().reading_paused
    rig.ups[0].data_received(OK)
    assert rig.client.data.endswith(b"\r\n\r\nok")


async def test_http10_request_without_host_gets_one_upstream(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET /x HTTP/1.0\r\n\r\n")
    sent = bytes(rig.up().data)
    assert sent.startswith(b"GET /x HTTP/1.1\r\n") and b"host: 127.0.0.9:8080\r\n" in sent
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    out = bytes(rig.client.data)
    # an HTTP/1.0 client cannot read chunked: the body ends when the connection does
    assert b"transfer-encoding" not in out.lower() and out.endswith(b"\r\n\r\nok")
    assert rig.client.closed


# ----- hostile clients meet the limits of sidecar/limits.py; framing is never trusted blindly -----

SMUGGLED = b"GET /songs/2 HTTP/1.1\r\nHost: song\r\n\r\n"


@pytest.mark.parametrize("direction", [INBOUND, OUTBOUND])
async def test_connection_header_naming_content_length_gets_400_and_nothing_reaches_the_upstream(
    rigs: list[Rig], direction: str
) -> None:
    rig = _rig(rigs, direction)
    target = b"/songs/1" if direction == INBOUND else b"http://artist/songs/1"
    rig.down.data_received(
        b"POST %s HTTP/1.1\r\nHost: artist\r\nConnection: content-length\r\nContent-Length: %d\r\n\r\n%s"
        % (target, len(SMUGGLED), SMUGGLED)
    )
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert out.count(b"HTTP/1.1 ") == 1  # the smuggled request in the body is never answered
    assert b"connection: close\r\n" in out
    assert "Content-Length" in json.loads(out.partition(b"\r\n\r\n")[2])["error"].title()
    assert rig.up().data == b""  # not a byte reached the pooled upstream connection
    assert rig.client.closed
    assert rig.metrics.requests == {(direction, "-", 400): 1}


@pytest.mark.parametrize("named", [b"transfer-encoding", b"Host", b"keep-alive, Content-Length"])
async def test_connection_header_naming_any_framing_or_routing_header_gets_400(rigs: list[Rig], named: bytes) -> None:
    rig = _rig(rigs)
    rig.down.data_received(
        b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: %s\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % named
    )
    assert rig.client.data.startswith(b"HTTP/1.1 400 ")
    assert rig.up().data == b""
    assert rig.client.closed


async def test_two_host_headers_get_400(rigs: list[Rig]) -> None:
    rig = _rig(rigs, OUTBOUND)
    rig.down.data_received(b"GET /x HTTP/1.1\r\nHost: artist\r\nHost: billing\r\n\r\n")
    assert rig.client.data.startswith(b"HTTP/1.1 400 ")
    assert rig.up().data == b""


async def test_upgrade_request_head_never_reaches_a_pooled_upstream(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 405 ") and out.count(b"HTTP/1.1 ") == 1
    assert rig.up().data == b""
    assert rig.pool.idle[EP.key] == [rig.ups[0]]  # untouched, still pooled


async def test_connect_on_the_outbound_listener_is_answered_once(rigs: list[Rig]) -> None:
    rig = _rig(rigs, OUTBOUND)
    rig.down.data_received(b"CONNECT artist:443 HTTP/1.1\r\nHost: artist:443\r\n\r\n\x16\x03\x01")
    out = bytes(rig.client.data)
    assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 405 ")
    assert rig.client.closed
    assert rig.up().data == b""


async def test_request_target_over_the_limit_gets_414_and_the_client_is_read_and_ignored(rigs: list[Rig]) -> None:
    rig = _rig(rigs, limits=Limits(max_url_bytes=100))
    rig.down.data_received(b"GET /" + b"a" * 60)
    assert rig.client.data == b""
    rig.down.data_received(b"a" * 60)  # the target is counted across reads
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 414 ") and b"connection: close" in out
    # RFC 9112 9.6: half-closed, so the client still sending its URL gets the answer, not a reset
    assert rig.client.eof_written and not rig.client.closed
    rig.down.data_received(b"a" * 100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")  # dropped
    assert rig.client.data == out
    assert rig.up().data == b""
    assert rig.down.eof_received() is False  # the client is done: close


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"".join(b"X-%d: %s\r\n" % (i, b"v" * 200) for i in range(8)), "header block"),
        (b"".join(b"X-%d: v\r\n" % i for i in range(11)), "header fields"),
    ],
)
async def test_header_block_over_the_limits_gets_431(rigs: list[Rig], headers: bytes, reason: str) -> None:
    rig = _rig(rigs, limits=Limits(max_header_bytes=1000, max_headers=10))
    rig.down.data_received(b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert reason in json.loads(out.partition(b"\r\n\r\n")[2])["error"]
    assert rig.up().data == b""
    assert rig.metrics.requests == {(INBOUND, "-", 431): 1}


async def test_one_endless_header_line_is_refused_before_it_is_whole(rigs: list[Rig]) -> None:
    # httptools hands a header over only once it ends; the raw bytes of an unfinished head are counted
    limits = Limits(max_url_bytes=1000, max_header_bytes=4000)
    rig = _rig(rigs, limits=limits)
    rig.down.data_received(b"GET / HTTP/1.1\r\nX-Endless: ")
    fed = 0
    while not rig.client.data and fed < 1_000_000:
        rig.down.data_received(b"e" * 1000)
        fed += 1000
    assert rig.client.data.startswith(b"HTTP/1.1 431 ")
    assert fed <= limits.head_guard_bytes + 1000


async def test_well_sized_head_spread_over_many_reads_is_served(rigs: list[Rig]) -> None:
    rig = _rig(rigs, limits=Limits(max_url_bytes=1000, max_header_bytes=4000))
    head = b"GET /x HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 30) for i in range(50)) + b"\r\n"
    assert len(head) > 1000
    for i in range(0, len(head), 7):
        rig.down.data_received(head[i:i + 7])
    assert rig.up().data.startswith(b"GET /x HTTP/1.1\r\n")


async def test_pipelining_up_to_the_limit_pauses_the_client_until_the_queue_drains(rigs: list[Rig]) -> None:
    rig = _rig(rigs, limits=Limits(max_pipelined=2))
    rig.down.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3)))
    assert len(rig.down.queue) == 2
    assert rig.client.reading_paused
    rig.up().drain()
    rig.ups[0].data_received(OK)  # /0 answered, /1 starts: one queued
    assert not rig.client.reading_paused
    for _ in range(2):
        rig.up().drain()
        rig.ups[0].data_received(OK)
    out = bytes(rig.client.data)
    assert out.count(b"HTTP/1.1 200 OK") == 3 and b"connection: close" not in out
    assert not rig.client.closed


async def test_more_pipelined_requests_in_one_read_than_may_queue_are_left_for_the_client_to_retry(rigs: list[Rig]) -> None:
    rig = _rig(rigs, limits=Limits(max_pipelined=2))
    rig.down.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(50)))
    assert len(rig.down.queue) == 2  # /0 active, /1 and /2 queued; /3 on were not parsed
    sent = []
    for _ in range(3):
        sent.append(bytes(rig.up().drain()).split(b" ")[1])
        rig.ups[0].data_received(OK)
    assert sent == [b"/0", b"/1", b"/2"]
    out = bytes(rig.client.data)
    answers = out.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(answers) == 3
    # the last answer says close; the client retries the rest (RFC 9112 9.3.2)
    assert [b"connection: close" in a for a in answers] == [False, False, True]
    assert rig.client.eof_written
    assert rig.up().data == b""


async def test_refused_pipelined_request_is_answered_after_the_requests_before_it(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost a\r\n\r\n")
    assert rig.client.data == b""  # the 400 for /2 must not answer /1
    assert rig.up().data.startswith(b"GET /1 ")
    rig.ups[0].data_received(OK)
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.index(b"HTTP/1.1 200 OK") < out.index(b"HTTP/1.1 400 ")
    assert rig.client.closed
    assert rig.up().data.count(b"GET ") == 1


async def test_client_closing_mid_body_aborts_the_exchange_and_closes_both_sides(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    assert rig.up().data.endswith(b"x" * 10)
    keep_open = rig.down.eof_received()
    assert keep_open is False  # the transport closes: no socket left in CLOSE_WAIT
    rig.down.connection_lost(None)
    assert rig.up().closed  # the app saw part of a body: that connection is never reused
    assert rig.pool.idle[EP.key] == []


async def test_client_closing_mid_head_is_closed(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Half")
    assert rig.down.eof_received() is False
    assert rig.up().data == b""


async def test_client_half_closing_after_a_whole_request_still_gets_its_answer(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert rig.down.eof_received() is True
    rig.ups[0].data_received(OK)
    assert rig.client.data.endswith(b"\r\n\r\nok")
    assert rig.client.closed


async def test_drain_closes_idle_connections_and_closes_busy_ones_after_their_answer(rigs: list[Rig]) -> None:
    rig = _rig(rigs, upstreams=2)
    rig.down.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.ups[0].data_received(OK)
    assert not rig.client.closed  # kept alive, now idle
    busy, busy_client = rig.connect()
    busy.data_received(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    [slow_up] = [c for c in rig.ups if c.exchange is not None]
    rig.ctx.drain()
    assert rig.client.closed  # idle: closed at once
    assert not busy_client.closed  # in flight: it finishes
    slow_up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
    out = bytes(busy_client.data)
    assert out.endswith(b"\r\n\r\nslow") and b"connection: close\r\n" in out
    assert busy_client.closed
    late, late_client = rig.connect()
    late.data_received(b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n")
    [late_up] = [c for c in rig.ups if c.exchange is not None]
    late_up.data_received(OK)
    assert b"connection: close\r\n" in late_client.data and late_client.closed


async def test_drain_closes_a_connection_whose_keep_alive_answer_was_under_way(rigs: list[Rig]) -> None:
    rig = _rig(rigs)
    rig.down.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.ups[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nha")
    rig.ctx.drain()
    rig.ups[0].data_received(b"lf")
    assert rig.client.data.endswith(b"half")
    assert rig.client.closed


async def test_dead_pooled_connections_are_retried_across_endpoints(rigs: list[Rig]) -> None:
    eps = tuple(Endpoint(f"127.0.0.{i}", 8080, f"artist-{i}") for i in (1, 2, 3))
    rig = _rig(rigs, OUTBOUND, endpoints=eps, policy=Policy(timeout_s=5.0, retries=0))
    rig.down.data_received(b"GET http://artist/x HTTP/1.1\r\nHost: artist\r\n\r\n")
    tried = []
    for _ in range(2):
        [conn] = [c for c in rig.ups if c.exchange is not None]
        tried.append(conn.key)
        assert conn.transport.data.startswith(b"GET /x ")  # type: ignore[union-attr]
        conn.connection_lost(None)  # closed by the peer before a byte of answer: the keep-alive race
    [last] = [c for c in rig.ups if c.exchange is not None]
    tried.append(last.key)
    last.data_received(OK)
    assert rig.client.data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert sorted(tried) == sorted(ep.key for ep in eps)  # each endpoint once
    assert rig.metrics.retries == 2


async def test_connection_dying_after_answer_bytes_is_not_retried_beyond_the_policy(rigs: list[Rig]) -> None:
    eps = tuple(Endpoint(f"127.0.0.{i}", 8080, f"artist-{i}") for i in (1, 2))
    rig = _rig(rigs, OUTBOUND, endpoints=eps, policy=Policy(timeout_s=5.0, retries=0))
    rig.down.data_received(b"GET http://artist/x HTTP/1.1\r\nHost: artist\r\n\r\n")
    [conn] = [c for c in rig.ups if c.exchange is not None]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Le")
    conn.connection_lost(None)  # it answered something: the request was processed
    assert rig.client.data.startswith(b"HTTP/1.1 502 ")
    assert rig.metrics.retries == 0


async def test_connection_limit_makes_room_by_closing_the_oldest_client_that_sent_no_whole_request(
    rigs: list[Rig]
) -> None:
    rig = _rig(rigs, limits=Limits(max_connections=3), upstreams=2)
    rig.down.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    [up] = [c for c in rig.ups if c.exchange is not None]
    up.data_received(OK)  # rig.down: kept alive, idle between requests
    busy, busy_client = rig.connect()
    busy.data_received(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")  # being answered
    slow, slow_client = rig.connect()
    slow.data_received(b"GET /slowloris HTTP/1.1\r\nX-")  # a head that never ends
    newest, newest_client = rig.connect()
    assert slow_client.closed  # the slow one made room
    assert not rig.client.closed and not busy_client.closed and not newest_client.closed
    third, third_client = rig.connect()
    assert newest_client.closed and not third_client.closed  # a silent one makes room too, oldest first
    third.data_received(b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n")
    _, refused_client = rig.connect()
    assert refused_client.closed  # every connection sent a request: the new one is closed
    assert not rig.client.closed and not busy_client.closed and not third_client.closed
    assert rig.ctx.evicted == 2 and rig.ctx.refused == 1
