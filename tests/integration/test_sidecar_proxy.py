"""The sidecar's data path on real loopback sockets: an in-process sidecar, a test-fed control
plane, and aiohttp or raw asyncio upstreams."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.sidecar_harness import (
    MeshCa,
    RunningSidecar,
    TestControlPlane,
    closed_port,
    raw_request,
    read_head,
    read_response,
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


def _upstream_app(name: str) -> web.Application:
    """An upstream that says who it is and echoes what it got."""
    async def whoami(request: web.Request) -> web.Response:
        return web.json_response(
            {"name": name, "path": request.path_qs, "host": request.host, "route_in": request.headers.get("x-sidemesh-route")},
            headers={"x-sidemesh-route": "forged"},
        )

    async def upload(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"received": size, "chunked": request.headers.get("Transfer-Encoding")})

    async def head_target(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1234)

    async def no_content(_: web.Request) -> web.Response:
        return web.Response(status=204)

    async def not_modified(_: web.Request) -> web.Response:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="late")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/who", whoami)
    app.router.add_post("/upload", upload)
    app.router.add_get("/blob", head_target)  # aiohttp answers HEAD from GET handlers
    app.router.add_get("/empty", no_content)
    app.router.add_get("/cached", not_modified)
    app.router.add_get("/slow", slow)
    return app


@pytest.fixture
async def cp() -> AsyncIterator[TestControlPlane]:
    plane = await TestControlPlane(loopback_address()).start()
    yield plane
    await plane.stop()


@dataclass
class Security:
    """How the sidecars of a test talk: plaintext (``--insecure``), or mutual TLS with one test CA."""

    ca: MeshCa | None

    def identity(self, service: str) -> Path | None:
        return None if self.ca is None else self.ca.mint(service)

    def client(self) -> ssl.SSLContext | None:
        """What a calling sidecar presents to an inbound listener (a mesh certificate, or nothing)."""
        return None if self.ca is None else MeshCa.client_tls(self.ca.mint("web"))


@pytest.fixture(params=["insecure", "mtls"])
def security(request: pytest.FixtureRequest, tmp_path: Path) -> Security:
    return Security(MeshCa(tmp_path / "ca") if request.param == "mtls" else None)


@pytest.fixture
async def secure_cp(security: Security) -> AsyncIterator[TestControlPlane]:
    """A control plane the sidecars of ``security`` can talk to."""
    plane = await TestControlPlane(loopback_address(), ca=security.ca).start()
    yield plane
    await plane.stop()


@pytest.fixture
async def artist() -> AsyncIterator[tuple[str, int]]:
    async with start_app(_upstream_app("artist-1")) as where:
        yield where


@pytest.fixture
async def sc(cp: TestControlPlane, artist: tuple[str, int]) -> AsyncIterator[RunningSidecar]:
    await cp.push(snapshot("v1", {"artist": [artist]}))
    async with start_sidecar(cp, app=artist, service="song") as running:
        yield running


async def test_keep_alive_client_connection_reuses_few_upstream_connections(sc: RunningSidecar) -> None:
    before = (await sc.state())["pool"]["connects"]
    reader, writer = await asyncio.open_connection(sc.address, sc.outbound_port)
    try:
        for i in range(50):
            writer.write(b"GET http://artist/who?i=%d HTTP/1.1\r\nHost: artist\r\n\r\n" % i)
            status, headers, body = await read_response(reader)
            assert status == 200 and json.loads(body)["path"] == f"/who?i={i}"
    finally:
        writer.close()
    state = await sc.state()
    assert state["pool"]["connects"] - before <= 2
    assert state["counters"]["outbound"] >= 50


async def test_pipelined_requests_are_answered_in_order(sc: RunningSidecar) -> None:
    reader, writer = await asyncio.open_connection(sc.address, sc.outbound_port)
    try:
        writer.write(b"".join(b"GET /who?n=%d HTTP/1.1\r\nHost: artist\r\n\r\n" % i for i in range(5)))
        paths = [json.loads((await read_response(reader))[2])["path"] for _ in range(5)]
    finally:
        writer.close()
    assert paths == [f"/who?n={i}" for i in range(5)]


async def test_outbound_responses_say_controlplane_whatever_the_far_side_claimed(sc: RunningSidecar) -> None:
    status, headers, body = await sc.get("http://artist/who", headers={"x-sidemesh-route": "spoofed"})
    assert status == 200
    assert headers["x-sidemesh-route"] == "controlplane"
    doc = json.loads(body)
    assert doc["host"] == "artist" and doc["route_in"] is None  # the app's own route header is not forwarded


async def test_inbound_responses_say_inbound_unless_the_app_set_one(cp: TestControlPlane) -> None:
    async def plain(_: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/plain", plain)
    async with start_app(app) as where, start_sidecar(cp, app=where) as sc:
        async with sc.session.get(f"http://{sc.address}:{sc.inbound_port}/plain") as resp:
            assert resp.status == 200 and await resp.text() == "hi"
            assert resp.headers["x-sidemesh-route"] == "inbound"
    async with start_app(_upstream_app("song")) as where, start_sidecar(cp, app=where) as sc:
        async with sc.session.get(f"http://{sc.address}:{sc.inbound_port}/who") as resp:
            assert resp.headers["x-sidemesh-route"] == "forged"  # the app's own value wins inbound


async def test_large_chunked_upload_streams_through(sc: RunningSidecar) -> None:
    size = 8 * 1024 * 1024

    async def body() -> AsyncIterator[bytes]:
        piece = b"u" * 65536
        for _ in range(size // len(piece)):
            yield piece

    status, _, raw = await sc.get("http://artist/upload", method="POST", data=body())
    assert status == 200
    doc = json.loads(raw)
    assert doc == {"received": size, "chunked": "chunked"}


async def test_head_with_content_length_keeps_the_connection_usable(sc: RunningSidecar) -> None:
    reader, writer = await asyncio.open_connection(sc.address, sc.outbound_port)
    try:
        for _ in range(3):
            writer.write(b"HEAD /blob HTTP/1.1\r\nHost: artist\r\n\r\n")
            status, headers, _ = await read_response(reader, head_request=True)
            assert status == 200 and headers["content-length"] == "1234"
            writer.write(b"GET /blob HTTP/1.1\r\nHost: artist\r\n\r\n")
            status, _, body = await read_response(reader)
            assert status == 200 and body == b"x" * 1234
    finally:
        writer.close()


async def test_204_and_304_pass_without_a_body_and_the_connection_stays_usable(sc: RunningSidecar) -> None:
    reader, writer = await asyncio.open_connection(sc.address, sc.outbound_port)
    try:
        for path, code in ((b"/empty", 204), (b"/cached", 304), (b"/empty", 204)):
            writer.write(b"GET %s HTTP/1.1\r\nHost: artist\r\n\r\n" % path)
            status, headers, _ = await read_response(reader)
            assert status == code
            assert "transfer-encoding" not in headers
        writer.write(b"GET /who HTTP/1.1\r\nHost: artist\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["name"] == "artist-1"
    finally:
        writer.close()


async def test_connect_failure_is_retried_on_the_other_endpoint_and_the_dead_one_ejected(
    cp: TestControlPlane, artist: tuple[str, int]
) -> None:
    dead = closed_port()
    await cp.push(snapshot("v1", {"artist": [(dead[0], dead[1], "artist-dead"), (artist[0], artist[1], "artist-1")]}, retries=1))
    async with start_sidecar(cp) as sc:
        results = [await sc.get(f"http://artist/who?i={i}") for i in range(20)]
        assert [r[0] for r in results] == [200] * 20
        state = await sc.state()
        eps = {ep["instance"]: ep for ep in state["services"]["artist"]["endpoints"]}
        assert eps["artist-dead"]["ejected"] is True
        assert eps["artist-1"]["ejected"] is False
        assert state["pool"]["connect_failures"] == 1  # ejected after the first refusal, not tried again


async def test_post_is_not_retried_after_it_was_sent(cp: TestControlPlane, artist: tuple[str, int]) -> None:
    got: list[bytes] = []

    async def swallow_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        got.append(head)
        await reader.readexactly(5)
        writer.close()  # dies after reading the request: the POST may have had effects

    async with start_raw(swallow_then_close) as flaky:
        await cp.push(snapshot("v1", {"orders": [flaky, artist]}, retries=2, lb="round_robin"))
        async with start_sidecar(cp) as sc:
            # whichever endpoint round robin starts at, walk it onto the flaky one
            for _ in range(2):
                status, _, body = await sc.get("http://orders/who", method="POST", data=b"order")
                if status != 200:
                    break
            assert status == 502
            assert json.loads(body)["service"] == "orders"
            assert len(got) == 1  # sent once, never replayed


async def test_get_on_a_connection_closed_before_the_response_is_retried(cp: TestControlPlane, artist: tuple[str, int]) -> None:
    async def swallow_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.close()

    async with start_raw(swallow_then_close) as flaky:
        await cp.push(snapshot("v1", {"artist": [flaky, artist]}, retries=1))
        async with start_sidecar(cp) as sc:
            statuses = [(await sc.get("http://artist/who"))[0] for _ in range(6)]
            assert statuses == [200] * 6


async def test_slow_upstream_gets_504_json_after_the_route_timeout(cp: TestControlPlane, artist: tuple[str, int]) -> None:
    await cp.push(snapshot("v1", {"artist": [artist]}, timeout_ms=300))
    async with start_sidecar(cp) as sc:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        status, headers, body = await sc.get("http://artist/slow")
        took = loop.time() - t0
        assert status == 504
        assert 0.25 < took < 2.0
        doc = json.loads(body)
        assert doc["status"] == 504 and doc["service"] == "artist" and "0.3s" in doc["error"]
        assert headers["x-sidemesh-route"] == "controlplane"
        status, _, _ = await sc.get("http://artist/who")
        assert status == 200


async def test_metrics_parse_and_count_inbound_and_outbound(sc: RunningSidecar) -> None:
    for _ in range(3):
        assert (await sc.get("http://artist/who"))[0] == 200
    assert (await sc.get("http://nosuch/who"))[0] == 503
    async with sc.session.get(f"http://{sc.address}:{sc.inbound_port}/who") as resp:
        assert resp.status == 200
    families = {f.name: f for f in text_string_to_metric_families(await sc.metrics_text())}
    samples = {
        (s.labels["direction"], s.labels["service"], s.labels["code"]): s.value
        for s in families["sidemesh_requests"].samples
        if s.name == "sidemesh_requests_total"
    }
    assert samples[("outbound", "artist", "200")] == 3
    assert samples[("outbound", "nosuch", "503")] == 1
    assert samples[("inbound", "-", "200")] == 1
    modes = {s.labels["mode"]: s.value for s in families["sidemesh_mode"].samples}
    assert modes == {"connecting": 0.0, "controlplane": 1.0, "dns": 0.0}
    transitions = [s.labels for s in families["sidemesh_mode_transitions"].samples if s.name.endswith("_total")]
    assert {"from": "connecting", "to": "controlplane", "reason": "snapshot_applied"} in transitions


async def test_state_has_the_documented_shape(sc: RunningSidecar, artist: tuple[str, int]) -> None:
    state = await sc.state()
    assert {"service", "instance", "address", "admin_port", "mode", "mode_since", "route_version", "applied_at",
            "last_update_age_s", "controlplane", "transitions", "services", "rejected", "counters"} <= set(state)
    assert (state["service"], state["instance"], state["address"], state["mode"]) == ("song", "song-test", sc.address, "controlplane")
    assert state["route_version"] == "v1"
    assert isinstance(state["applied_at"], float) and isinstance(state["mode_since"], float)
    assert state["controlplane"]["connected"] is True and state["controlplane"]["last_error"] is None
    assert state["transitions"][-1]["from"] == "connecting" and state["transitions"][-1]["to"] == "controlplane"
    artist_state = state["services"]["artist"]
    assert artist_state["source"] == "controlplane" and artist_state["guard"] is None
    assert artist_state["endpoints"] == [
        {"address": artist[0], "port": artist[1], "instance": "artist-1", "source": "controlplane", "ejected": False}
    ]
    assert state["rejected"] == []
    assert set(state["counters"]) >= {"inbound", "outbound"}


async def test_valid_snapshot_is_acked_and_an_invalid_one_nacked_keeping_the_old_table(
    cp: TestControlPlane, sc: RunningSidecar, artist: tuple[str, int]
) -> None:
    ack = await cp.wait_ack("v1")
    assert ack.accepted and ack.nonce == cp.current.nonce  # type: ignore[union-attr]
    hello = cp.streams[-1].hello
    assert (hello.service, hello.node_id, hello.address, hello.port) == ("song", "song-test", sc.address, sc.inbound_port)

    await cp.push(snapshot("v2", {"artist": [("not-an-ip", 15006)]}))
    nack = await cp.wait_ack("v2")
    assert not nack.accepted and "not-an-ip" in nack.error_detail
    state = await sc.state()
    assert state["route_version"] == "v1"
    assert state["rejected"][-1]["version"] == "v2" and "not-an-ip" in state["rejected"][-1]["reason"]
    assert (await sc.get("http://artist/who"))[0] == 200

    second = start_app(_upstream_app("artist-2"))
    async with second as artist2:
        await cp.push(snapshot("v3", {"artist": [artist2]}))
        assert (await cp.wait_ack("v3")).accepted
        await sc.wait_for(lambda s: s["route_version"] == "v3")
        status, _, body = await sc.get("http://artist/who")
        assert status == 200 and json.loads(body)["name"] == "artist-2"


async def test_client_going_away_mid_request_harms_nothing(sc: RunningSidecar) -> None:
    reader, writer = await asyncio.open_connection(sc.address, sc.outbound_port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: artist\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()
    status, _, _ = await sc.get("http://artist/who")
    assert status == 200


async def test_many_concurrent_clients_all_succeed(sc: RunningSidecar) -> None:
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> int:
            async with session.get(f"http://artist/who?i={i}", proxy=sc.proxy) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(400)))
    assert statuses == [200] * 400


async def test_http10_client_gets_a_close_delimited_answer(sc: RunningSidecar) -> None:
    reader, writer = await asyncio.open_connection(sc.address, sc.outbound_port)
    try:
        writer.write(b"GET http://artist/who HTTP/1.0\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(-1), 5)  # the sidecar closes after answering
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert json.loads(body)["name"] == "artist-1"


async def test_expect_100_continue_upload_goes_through(sc: RunningSidecar) -> None:
    status, _, raw = await sc.get("http://artist/upload", method="POST", data=b"e" * 100_000, expect100=True)
    assert status == 200 and json.loads(raw)["received"] == 100_000


async def test_unknown_service_error_still_carries_a_route_header(sc: RunningSidecar) -> None:
    status, headers, _ = await sc.get("http://nosuch/x")
    assert status == 503
    assert "x-sidemesh-route" in headers


async def test_drain_closes_idle_keep_alive_connections_and_lets_the_answer_in_flight_finish(
    secure_cp: TestControlPlane, security: Security
) -> None:
    identity, tls = security.identity("song"), security.client()
    async with start_app(_upstream_app("song")) as where, start_sidecar(secure_cp, app=where, identity=identity) as sc:
        idle_r, idle_w = await asyncio.open_connection(sc.address, sc.inbound_port, ssl=tls)
        busy_r, busy_w = await asyncio.open_connection(sc.address, sc.inbound_port, ssl=tls)
        try:
            for writer, reader in ((idle_w, idle_r), (busy_w, busy_r)):  # both pooled keep-alive connections
                writer.write(b"GET /who HTTP/1.1\r\nHost: song\r\n\r\n")
                status, headers, _ = await read_response(reader)
                assert status == 200 and "connection" not in headers
            busy_w.write(b"GET /slow HTTP/1.1\r\nHost: song\r\n\r\n")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not any(conn.active is not None for conn in sc.sidecar.inbound.connections):
                assert loop.time() < deadline, "the slow request never reached the sidecar"
                await asyncio.sleep(0.01)

            sc.sidecar.inbound.drain()
            assert await asyncio.wait_for(idle_r.read(-1), 2) == b""  # idle: closed at once
            status, headers, body = await asyncio.wait_for(read_response(busy_r), 5)
            assert (status, body, headers["connection"]) == (200, b"late", "close")  # in flight: finished
            assert await asyncio.wait_for(busy_r.read(-1), 2) == b""
            reply = await raw_request(sc.address, sc.inbound_port, b"GET /who HTTP/1.1\r\nHost: song\r\n\r\n", tls=tls)
            assert reply.startswith(b"HTTP/1.1 200 ") and b"connection: close\r\n" in reply.lower()
        finally:
            idle_w.close()
            busy_w.close()


async def test_callers_of_a_draining_sidecar_fail_no_request(secure_cp: TestControlPlane, security: Security) -> None:
    cp = secure_cp
    async with start_app(_upstream_app("song")) as where, \
            start_sidecar(cp, app=where, identity=security.identity("song")) as callee:
        await cp.push(snapshot("v2", {"song": [(callee.address, callee.inbound_port)]}, retries=0))
        async with start_sidecar(cp, service="web", identity=security.identity("web")) as caller:
            for _ in range(3):
                assert (await caller.get("http://song/who"))[0] == 200  # the caller pools a connection
            before = (await caller.state())["pool"]["connects"]
            callee.sidecar.inbound.drain()
            results = [await caller.get(f"http://song/who?i={i}") for i in range(20)]
            assert [status for status, _, _ in results] == [200] * 20
            # every answer said close, so the caller opened a fresh connection each time
            assert (await caller.state())["pool"]["connects"] - before >= 20


async def test_dead_pooled_connections_are_retried_across_endpoints(cp: TestControlPlane) -> None:
    """Pods a and b close their kept-alive connections as the next request arrives (pods draining
    for shutdown); pod c is the only one left. With no retries in the policy, no call fails."""
    draining: set[str] = set()
    dropped: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}

    def pod(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served = 0
            while True:
                head = await read_head(reader)
                if served and name in draining:
                    dropped[name].append(head.split(b" ")[1])
                    writer.close()  # not a byte of answer: the caller's pooled connection is dead
                    return
                await asyncio.sleep(0.1 if name not in draining else 0)  # the warm-up calls overlap
                body = json.dumps({"name": name}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                served += 1

        return serve

    c_at = closed_port()  # c refuses at first: ejected, it is picked only once a and b were tried
    async with start_raw(pod("a")) as a, start_raw(pod("b")) as b:
        await cp.push(snapshot("v1", {"artist": [(*a, "a"), (*b, "b"), (*c_at, "c")]}, retries=0))
        async with start_sidecar(cp, extra=["--eject", "60"]) as sc:
            for i in range(10):
                assert (await sc.get(f"http://artist/refused{i}"))[0] == 200  # a refused connect is retried
                endpoints = (await sc.state())["services"]["artist"]["endpoints"]
                if any(ep["instance"] == "c" and ep["ejected"] for ep in endpoints):
                    break
            else:
                raise AssertionError("round robin never picked c")
            idle = sc.sidecar.pool.idle
            for i in range(10):  # until a and b each hold two pooled connections
                if len(idle.get(a, [])) >= 2 and len(idle.get(b, [])) >= 2:
                    break
                warm = await asyncio.gather(*(sc.get(f"http://artist/w{i}-{j}") for j in range(4)))
                assert {json.loads(body)["name"] for _, _, body in warm} <= {"a", "b"}  # c is ejected
            else:
                raise AssertionError(f"no two pooled connections to a and to b: {idle}")
            async with start_raw(pod("c"), host=c_at[0], port=c_at[1]):
                draining.update({"a", "b"})
                retries = (await sc.state())["counters"]["retries"]
                for i in range(2):
                    status, _, body = await sc.get(f"http://artist/x{i}")
                    assert status == 200, body
                    assert json.loads(body)["name"] == "c"
                # each call met a's and b's dead pooled connections in a row, then went to c
                assert dropped["a"] == dropped["b"] == [b"/x0", b"/x1"]
                assert (await sc.state())["counters"]["retries"] - retries == 4
