"""The proxy's protocols driven by hand: fake transports collect the bytes, the test plays both
the client and the upstream. No sockets, no sleeping (uvicorn's tests/protocols style)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.balancer import EndpointHealth, ResolvedRoute
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
        self.reading_paused = False
        self.writing_paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
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

    def on_change(self, callback: Any) -> None:
        pass


class Rig:
    """One client connection of a sidecar, with pre-opened fake upstream connections in the pool."""

    def __init__(self, direction: str, *, policy: Policy = Policy(timeout_s=5.0, retries=1), upstreams: int = 1,
                 down_high_water: int | None = None, up_high_water: int | None = None) -> None:
        self.pool = UpstreamPool()
        self.metrics = SidecarMetrics()
        self.health = EndpointHealth()
        if direction == OUTBOUND:
            self.book: RouteBook | None = RouteBook(resolver=FakeResolver(), dns_port=15006, health=self.health)
            from types import MappingProxyType

            self.book.on_config_update(RouteTable("v1", "n1", MappingProxyType({"artist": ServiceEntry("artist", (EP,), policy)})))
            self.ctx = ProxyContext(OUTBOUND, pool=self.pool, metrics=self.metrics, book=self.book)
        else:
            self.book = None
            route = ResolvedRoute("app", (EP,), Source.CONTROLPLANE, self.health, policy)
            self.ctx = ProxyContext(INBOUND, pool=self.pool, metrics=self.metrics, app_route=route)
        self.ups: list[UpstreamConnection] = []
        for _ in range(upstreams):
            conn = UpstreamConnection(self.pool, EP.key)
            conn.connection_made(FakeTransport(conn, high_water=up_high_water))  # type: ignore[arg-type]
            self.ups.append(conn)
        self.pool.idle[EP.key] = list(reversed(self.ups))  # LIFO: ups[0] is taken first
        self.down = DownstreamConnection(self.ctx)
        self.client = FakeTransport(self.down, high_water=down_high_water)
        self.down.connection_made(self.client)  # type: ignore[arg-type]

    def up(self, i: int = 0) -> FakeTransport:
        return self.ups[i].transport  # type: ignore[return-value]

    def close(self) -> None:
        self.down.connection_lost(None)


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
