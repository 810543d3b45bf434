"""Issue 2, "What it must show" point 4, against an in-process sidecar on real loopback sockets:
bad input gets a clear answer and harms nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import uvloop
from aiohttp import web

from tests.integration.sidecar_harness import (
    RunningSidecar,
    TestControlPlane,
    raw_request,
    read_head,
    reset,
    snapshot,
    start_app,
    start_raw,
    start_sidecar,
)
from tests.support import loopback_address

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops: the sidecar runs on uvloop, whose transports differ in detail."""
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


async def _hello(_: web.Request) -> web.Response:
    return web.json_response({"hello": "artist"})


@pytest.fixture
async def cp() -> AsyncIterator[TestControlPlane]:
    plane = await TestControlPlane(loopback_address()).start()
    yield plane
    await plane.stop()


@pytest.fixture
async def artist() -> AsyncIterator[tuple[str, int]]:
    app = web.Application()
    app.router.add_get("/artists/{id}", _hello)
    async with start_app(app) as where:
        yield where


@pytest.fixture
async def sc(cp: TestControlPlane, artist: tuple[str, int]) -> AsyncIterator[RunningSidecar]:
    await cp.push(snapshot("v1", {"artist": [artist]}))
    async with start_sidecar(cp) as running:
        yield running


async def test_malformed_request_gets_400_and_the_next_connection_is_served(sc: RunningSidecar) -> None:
    reply = await raw_request(sc.address, sc.outbound_port, b"GET /x HTTP/1.1\r\nHost artist\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["status"] == 400
    status, headers, body = await sc.get("http://artist/artists/1")
    assert status == 200 and json.loads(body) == {"hello": "artist"}
    assert headers["x-sidemesh-route"] == "controlplane"


async def test_garbage_bytes_on_the_inbound_listener_get_400(sc: RunningSidecar) -> None:
    reply = await raw_request(sc.address, sc.inbound_port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_unknown_service_gets_503_json_naming_it(sc: RunningSidecar) -> None:
    status, headers, body = await sc.get("http://nosuchservice/x")
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["service"] == "nosuchservice" and doc["status"] == 503
    assert "nosuchservice" in doc["error"]
    assert headers["x-sidemesh-route"] == "controlplane"  # the source that was consulted and said no
    # the connection and the sidecar stay fine
    status, _, _ = await sc.get("http://artist/artists/1")
    assert status == 200


async def test_upstream_reset_before_a_whole_head_gives_502_and_the_sidecar_keeps_serving(cp: TestControlPlane, artist: tuple[str, int]) -> None:
    async def partial_head_then_rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)

    async with start_raw(partial_head_then_rst) as broken:
        await cp.push(snapshot("v1", {"broken": [broken], "artist": [artist]}, retries=0))
        async with start_sidecar(cp) as sc:
            status, headers, body = await sc.get("http://broken/x", method="POST", data=b"once")
            assert status == 502
            doc = json.loads(body)
            assert doc["service"] == "broken" and doc["status"] == 502
            assert headers["x-sidemesh-route"] == "controlplane"
            status, _, _ = await sc.get("http://artist/artists/1")
            assert status == 200


async def test_upstream_reset_after_the_head_aborts_the_client_connection_and_the_sidecar_keeps_serving(
    cp: TestControlPlane, artist: tuple[str, int]
) -> None:
    async def head_then_rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.1)
        reset(writer)

    async with start_raw(head_then_rst) as broken:
        await cp.push(snapshot("v1", {"broken": [broken], "artist": [artist]}))
        async with start_sidecar(cp) as sc:
            reply = await raw_request(sc.address, sc.outbound_port, b"GET http://broken/x HTTP/1.1\r\nHost: broken\r\n\r\n")
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert 0 < len(body) < 100000  # truncated: the client can tell
            status, _, _ = await sc.get("http://artist/artists/1")
            assert status == 200
            text = await sc.metrics_text()
            assert 'sidemesh_requests_total{code="502",direction="outbound",service="broken"} 1.0' in text
