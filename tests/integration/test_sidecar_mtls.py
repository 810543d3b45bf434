"""Mutual TLS between sidecars (DESIGN.md, "Identity") on real loopback sockets: certificates
minted by a real ``CertificateAuthority`` in a temp dir, real TLS 1.3 handshakes, in-process
sidecars (one test: a ``sidemesh sidecar`` process) fed by a test control plane that itself
speaks mutual TLS, and a real DNS server for the fallback.

What must hold: a call crosses the mesh over TLS 1.3 and the callee knows who called; an
endpoint that is not the service routed to (another service's certificate, another CA's,
no TLS at all) never receives a request, whatever the route's source; a caller the policy
does not allow gets 403 and the app never sees it, also while the control plane is gone;
a sidecar without a valid certificate fails closed and sends nothing.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from identity.spiffe import SpiffeId
from identity.store import IdentityFiles
from identity.tls import peer_identity
from sidemesh.dnsserver import MeshDnsServer
from tests.integration.sidecar_harness import (
    TRUST_DOMAIN,
    MeshCa,
    RunningSidecar,
    TestControlPlane,
    raw_request,
    read_response,
    snapshot,
    start_app,
    start_sidecar,
    start_sidecar_process,
    wait_ready,
)
from tests.support import ProcessGroup, free_port, loopback_address

pytestmark = pytest.mark.timeout(60)

ARTIST = SpiffeId(TRUST_DOMAIN, "artist")
DNS_TEMPLATE = ["--dns-template", "{service}.mesh.local"]


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops: their TLS implementations (sslproto) differ in detail."""
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


@pytest.fixture
def ca(tmp_path: Path) -> MeshCa:
    return MeshCa(tmp_path / "mesh-ca")


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


@dataclass
class Recorder:
    """An app that records every request it is given and says who it is."""

    name: str
    seen: list[str] = field(default_factory=list)

    def build(self) -> web.Application:
        async def anything(request: web.Request) -> web.Response:
            self.seen.append(f"{request.method} {request.path_qs}")
            body = await request.read()
            return web.json_response({"name": self.name, "path": request.path_qs, "received": len(body)})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app


@dataclass
class Pod:
    app: Recorder
    sc: RunningSidecar

    @property
    def inbound(self) -> tuple[str, int]:
        return self.sc.address, self.sc.inbound_port


async def control_plane(stack: AsyncExitStack, ca: MeshCa) -> TestControlPlane:
    cp = await TestControlPlane(loopback_address(), ca=ca).start()
    stack.push_async_callback(cp.stop)
    return cp


async def pod(stack: AsyncExitStack, service: str, identity: Path, *, cp: TestControlPlane | None = None,
              extra: Iterable[str] = ()) -> Pod:
    """A service's app and its sidecar holding the certificate in ``identity``."""
    rec = Recorder(service)
    where = await stack.enter_async_context(start_app(rec.build()))
    sc = await stack.enter_async_context(start_sidecar(cp, app=where, service=service, identity=identity, extra=extra))
    return Pod(rec, sc)


async def caller(stack: AsyncExitStack, service: str, identity: Path, *, cp: TestControlPlane | None = None,
                 dns: MeshDnsServer | None = None) -> RunningSidecar:
    """A sidecar whose app only calls out (none behind it)."""
    where = None if dns is None else (_dns_host(dns), dns.port or 0)
    return await stack.enter_async_context(
        start_sidecar(cp, service=service, identity=identity, dns=where, extra=DNS_TEMPLATE))


async def dns_server(stack: AsyncExitStack) -> MeshDnsServer:
    server = MeshDnsServer("mesh.local", 1)
    await server.start(loopback_address(), 0)
    stack.push_async_callback(server.close)
    return server


def _dns_host(server: MeshDnsServer) -> str:
    assert server._udp is not None  # noqa: SLF001 - the test wants the bound address
    return str(server._udp.get_extra_info("sockname")[0])  # noqa: SLF001


async def until(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate()`` until it is true, failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


async def refused_reply(host: str, port: int, tls: ssl.SSLContext | None) -> bytes:
    """What a client gets for a request the listener must refuse: whatever it read before the close."""
    try:
        return await raw_request(host, port, b"GET /x HTTP/1.1\r\nHost: image\r\n\r\n", timeout=5, tls=tls)
    except (ConnectionError, ssl.SSLError):
        return b""


def samples(text: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return {tuple(sorted(s.labels.items())): s.value for s in fam.samples if s.name.endswith("_total")}
    raise AssertionError(f"no metric family {family}")


# ----- a call across the mesh -----


async def test_a_call_crosses_the_mesh_over_tls13_and_the_callee_knows_who_called(
    ca: MeshCa, stack: AsyncExitStack
) -> None:
    cp = await control_plane(stack, ca)
    artist = await pod(stack, "artist", ca.mint("artist"), cp=cp)
    await cp.push(snapshot("v1", {"artist": [artist.inbound]}))
    song = await caller(stack, "song", ca.mint("song"), cp=cp)

    status, headers, body = await song.get("http://artist/who")
    assert status == 200 and json.loads(body)["name"] == "artist"
    assert headers["x-sidemesh-route"] == "controlplane"
    assert artist.app.seen == ["GET /who"]
    # the callee: one TLS 1.3 connection whose client proved it is song
    (conn,) = artist.sc.sidecar.inbound.connections
    far = conn.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
    assert (far.version(), far.selected_alpn_protocol()) == ("TLSv1.3", "http/1.1")
    assert peer_identity(far) == SpiffeId(TRUST_DOMAIN, "song") and conn.caller == "song"
    # the caller: the pooled connection proved artist and is kept for artist only
    (pooled,) = song.sidecar.pool.idle[artist.inbound]
    near = pooled.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
    assert near.version() == "TLSv1.3" and peer_identity(near) == ARTIST and pooled.peer == "artist"


async def test_keep_alive_reuse_does_one_handshake_for_many_requests(ca: MeshCa, stack: AsyncExitStack) -> None:
    cp = await control_plane(stack, ca)
    artist = await pod(stack, "artist", ca.mint("artist"), cp=cp)
    await cp.push(snapshot("v1", {"artist": [artist.inbound]}))
    song = await caller(stack, "song", ca.mint("song"), cp=cp)
    reader, writer = await asyncio.open_connection(song.address, song.outbound_port)
    try:
        for i in range(100):
            writer.write(b"GET http://artist/who?i=%d HTTP/1.1\r\nHost: artist\r\n\r\n" % i)
            status, _, body = await read_response(reader)
            assert status == 200 and json.loads(body)["path"] == f"/who?i={i}"
    finally:
        writer.close()
    assert len(artist.app.seen) == 100
    assert song.sidecar.metrics.tls_handshakes == {("outbound", "ok"): 1}
    assert artist.sc.sidecar.metrics.tls_handshakes == {("inbound", "ok"): 1}
    handshakes = samples(await song.metrics_text(), "sidemesh_tls_handshakes")
    assert handshakes == {(("direction", "outbound"), ("outcome", "ok")): 1.0}


async def test_many_concurrent_callers_each_on_a_fresh_tls_connection_all_succeed(
    ca: MeshCa, stack: AsyncExitStack
) -> None:
    cp = await control_plane(stack, ca)
    artist = await pod(stack, "artist", ca.mint("artist"), cp=cp)
    await cp.push(snapshot("v1", {"artist": [artist.inbound]}))
    song = await caller(stack, "song", ca.mint("song"), cp=cp)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> tuple[int, str]:
            async with session.get(f"http://artist/who?i={i}", proxy=song.proxy) as resp:
                return resp.status, json.loads(await resp.read())["path"]

        results = await asyncio.gather(*(one(i) for i in range(300)))
    assert results == [(200, f"/who?i={i}") for i in range(300)]
    handshakes = song.sidecar.metrics.tls_handshakes[("outbound", "ok")]
    print(f"\n300 concurrent calls, {handshakes} TLS handshakes")
    assert artist.sc.sidecar.metrics.tls_handshakes == {("inbound", "ok"): handshakes}
    assert 1 < handshakes <= 100


# ----- impostors: never delivered to, in every routing mode -----


async def impostor(stack: AsyncExitStack, kind: str, ca: MeshCa, tmp_path: Path) -> tuple[Recorder, tuple[str, int]]:
    """Something listening where the route says artist is; returns its app and its address."""
    if kind == "image_certificate":  # a real mesh sidecar, of another service
        p = await pod(stack, "image", ca.mint("image"))
        return p.app, p.inbound
    if kind == "another_ca_certificate":  # names artist, but another CA signed it
        p = await pod(stack, "artist", MeshCa(tmp_path / "other-ca").mint("artist"))
        return p.app, p.inbound
    rec = Recorder("plaintext")  # an HTTP server that speaks no TLS, on the mesh's inbound port
    where = await stack.enter_async_context(start_app(rec.build(), host=loopback_address(), port=15006))
    return rec, where


def presented_ok(kind: str, presented: str) -> bool:
    if kind == "image_certificate":
        return presented == SpiffeId(TRUST_DOMAIN, "image").uri
    if kind == "another_ca_certificate":
        return presented.startswith("a certificate the mesh CA does not vouch for")
    return presented.startswith("no TLS")


@pytest.mark.parametrize("source", ["controlplane", "cache", "dns"])
@pytest.mark.parametrize("kind", ["image_certificate", "another_ca_certificate", "plaintext_listener"])
async def test_an_endpoint_that_cannot_prove_it_is_artist_never_receives_a_call(
    ca: MeshCa, stack: AsyncExitStack, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, source: str
) -> None:
    real = await pod(stack, "artist", ca.mint("artist"))
    fake_app, fake = await impostor(stack, kind, ca, tmp_path)
    # two callers: one whose route names only the impostor, one whose route also has the real artist
    routes = {"alone": [fake], "mixed": [fake, real.inbound]}
    callers: dict[str, RunningSidecar] = {}
    planes: list[TestControlPlane] = []
    for name, endpoints in routes.items():
        cp = await control_plane(stack, ca)
        dns = await dns_server(stack) if source == "dns" else None
        if dns is not None:  # the control plane says the real one; after the outage DNS names the impostor
            await cp.push(snapshot("v1", {"artist": [real.inbound]}, retries=0))
            dns.set_records({"artist": [ep[0] for ep in endpoints]})
        else:
            await cp.push(snapshot("v1", {"artist": endpoints}, retries=0))
        callers[name] = await caller(stack, "song", ca.mint("song"), cp=cp, dns=dns)
        planes.append(cp)
    if source != "controlplane":
        for cp in planes:
            await cp.stop()  # the outage: the callers route from DNS, or from the last table they had
        for sc in callers.values():
            await sc.wait_for(lambda s: s["mode"] == "dns" and s["services"].get("artist", {}).get("source") == source)

    status, headers, body = await callers["alone"].get("http://artist/who")
    doc = json.loads(body)
    print(f"\n{kind} via {source}: {status} {doc['error']}")
    assert status == 503, doc
    assert headers["x-sidemesh-route"] == source
    assert (doc["service"], doc["endpoint"], doc["expected"]) == ("artist", f"{fake[0]}:{fake[1]}", ARTIST.uri)
    assert presented_ok(kind, doc["presented"]), doc
    assert doc["presented"] in doc["error"] and ARTIST.uri in doc["error"]

    results = [await callers["mixed"].get(f"http://artist/who?i={i}") for i in range(10)]
    assert [(status, json.loads(body)["name"]) for status, _, body in results] == [(200, "artist")] * 10
    assert {headers["x-sidemesh-route"] for _, headers, _ in results} == {source}
    assert len(real.app.seen) == 10
    assert fake_app.seen == []  # not one request reached the impostor's app
    state = await callers["mixed"].state()
    eps = {(ep["address"], ep["port"]): ep for ep in state["services"]["artist"]["endpoints"]}
    assert eps[fake]["ejected"] is True and eps[real.inbound]["ejected"] is False

    reason = "mismatch" if kind == "image_certificate" else "unverified"
    event = "peer_identity_mismatch" if kind == "image_certificate" else "peer_identity_unverified"
    for sc in callers.values():
        assert sc.sidecar.metrics.peer_failures == {("outbound", "artist", reason): 1}
    lines = [r.getMessage() for r in caplog.records if f"event={event}" in r.getMessage()]
    assert len(lines) == 2 and all(f"endpoint={fake[0]}:{fake[1]}" in line and f"expected={ARTIST.uri}" in line
                                   for line in lines), lines


async def test_a_connection_verified_as_one_service_is_never_reused_for_another(
    ca: MeshCa, stack: AsyncExitStack
) -> None:
    """One address listed under two names: the connection pooled for image must not carry artist's call."""
    cp = await control_plane(stack, ca)
    image = await pod(stack, "image", ca.mint("image"))
    await cp.push(snapshot("v1", {"image": [image.inbound], "artist": [image.inbound]}, retries=0))
    song = await caller(stack, "song", ca.mint("song"), cp=cp)
    assert (await song.get("http://image/pooled"))[0] == 200
    assert [c.peer for c in song.sidecar.pool.idle[image.inbound]] == ["image"]
    status, _, body = await song.get("http://artist/stolen")
    assert status == 503 and json.loads(body)["presented"] == SpiffeId(TRUST_DOMAIN, "image").uri
    assert image.app.seen == ["GET /pooled"]
    assert (await song.get("http://image/again"))[0] == 200  # image's connection is still there for image
    assert song.sidecar.metrics.tls_handshakes == {("outbound", "ok"): 2}


# ----- authorization -----


async def test_a_caller_the_policy_does_not_allow_gets_403_and_the_app_never_sees_it_also_after_the_outage(
    ca: MeshCa, stack: AsyncExitStack
) -> None:
    cp = await control_plane(stack, ca)
    image = await pod(stack, "image", ca.mint("image"), cp=cp)
    await cp.push(snapshot("v1", {"image": [image.inbound]}, allowed_callers={"image": ["artist"]}))
    await image.sc.wait_for(lambda s: s["route_version"] == "v1")
    song = await caller(stack, "song", ca.mint("song"), cp=cp)
    artist = await caller(stack, "artist", ca.mint("artist"), cp=cp)

    async def calls(route: str) -> None:
        status, headers, body = await song.get("http://image/images/1")
        assert status == 403
        assert json.loads(body) == {"error": "caller song is not allowed to call image: allowed callers: artist",
                                    "status": 403, "service": "image", "caller": "song"}
        assert headers["x-sidemesh-route"] == route
        status, headers, body = await artist.get("http://image/images/2")
        assert status == 200 and json.loads(body)["name"] == "image"
        assert headers["x-sidemesh-route"] == route

    await calls("controlplane")
    assert image.app.seen == ["GET /images/2"]
    await cp.stop()  # the outage: the policy is kept with the last-known-good routes
    for sc in (image.sc, song, artist):
        await sc.wait_for(lambda s: s["mode"] == "dns")
    await calls("cache")
    assert image.app.seen == ["GET /images/2", "GET /images/2"]
    assert image.sc.sidecar.metrics.denials == {("image", "song"): 2}
    denials = samples(await image.sc.metrics_text(), "sidemesh_authorization_denials")
    assert denials == {(("caller", "song"), ("service", "image")): 2.0}


async def test_a_policy_change_takes_effect_on_connections_already_open(ca: MeshCa, stack: AsyncExitStack) -> None:
    cp = await control_plane(stack, ca)
    image = await pod(stack, "image", ca.mint("image"), cp=cp)
    await cp.push(snapshot("v1", {"image": [image.inbound]}, allowed_callers={"image": ["song"]}))
    await image.sc.wait_for(lambda s: s["route_version"] == "v1")
    song = await caller(stack, "song", ca.mint("song"), cp=cp)
    assert (await song.get("http://image/a"))[0] == 200
    await cp.push(snapshot("v2", {"image": [image.inbound]}, allowed_callers={"image": ["artist"]}))
    await image.sc.wait_for(lambda s: s["route_version"] == "v2")
    status, _, body = await song.get("http://image/b")
    assert status == 403 and json.loads(body)["error"].endswith("allowed callers: artist")
    assert image.app.seen == ["GET /a"]
    assert song.sidecar.metrics.tls_handshakes == {("outbound", "ok"): 1}  # the same connection, now refused


async def test_with_no_policy_ever_pushed_any_mesh_caller_is_allowed(ca: MeshCa, stack: AsyncExitStack) -> None:
    cp = await control_plane(stack, ca)
    image = await pod(stack, "image", ca.mint("image"))  # never hears from a control plane
    await cp.push(snapshot("v1", {"image": [image.inbound]}, allowed_callers={"image": ["artist"]}))
    song = await caller(stack, "song", ca.mint("song"), cp=cp)
    status, _, body = await song.get("http://image/x")
    assert status == 200 and json.loads(body)["name"] == "image"
    assert image.sc.sidecar.book.authorization_of("image") is None


async def test_plaintext_ingress_serves_without_identity_and_the_mesh_listener_refuses_whoever_proves_none(
    ca: MeshCa, stack: AsyncExitStack, tmp_path: Path
) -> None:
    cp = await control_plane(stack, ca)
    front = loopback_address()
    front_port = free_port(front)
    image = await pod(stack, "image", ca.mint("image"), cp=cp, extra=["--extra-inbound", f"{front}:{front_port}"])
    await cp.push(snapshot("v1", {"image": [image.inbound]}, allowed_callers={"image": ["artist"]}))
    await image.sc.wait_for(lambda s: s["route_version"] == "v1")

    reply = await raw_request(front, front_port, b"GET /front HTTP/1.1\r\nHost: image\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ")  # ingress: no identity, no mesh authorization
    no_cert = ssl.create_default_context(cafile=str(IdentityFiles(ca.mint("web")).bundle))  # trusts the mesh, shows nothing
    no_cert.check_hostname = False
    clients = {
        "plaintext": None,
        "TLS without a certificate": no_cert,
        "TLS with another CA's certificate": MeshCa.client_tls(MeshCa(tmp_path / "other").mint("artist")),
    }
    for what, tls in clients.items():
        reply = await refused_reply(*image.inbound, tls)
        assert b"HTTP/1.1 200" not in reply, (what, reply[:200])
    assert image.app.seen == ["GET /front"]
    metrics = image.sc.sidecar.metrics
    await until("three refused handshakes counted", lambda: metrics.tls_handshakes == {("inbound", "failed"): 3})
    allowed = await raw_request(*image.inbound, b"GET /mesh HTTP/1.1\r\nHost: image\r\nConnection: close\r\n\r\n",
                                tls=MeshCa.client_tls(ca.mint("artist")))
    assert allowed.startswith(b"HTTP/1.1 200 ") and image.app.seen == ["GET /front", "GET /mesh"]
    assert metrics.tls_handshakes == {("inbound", "failed"): 3, ("inbound", "ok"): 1}


# ----- no valid certificate of our own: fail closed -----


async def test_a_sidecar_without_a_certificate_answers_503_and_sends_nothing(
    ca: MeshCa, stack: AsyncExitStack
) -> None:
    artist = await pod(stack, "artist", ca.mint("artist"))
    dns = await dns_server(stack)
    dns.set_records({"artist": [artist.sc.address]})  # a route exists: DNS knows where artist is
    song = await caller(stack, "song", ca.empty("song"), dns=dns)
    certs = song.sidecar.certs
    assert certs is not None
    await until("the certificate manager gave up once", lambda: certs.failures >= 1)
    status, headers, body = await song.get("http://artist/who")
    doc = json.loads(body)
    why = song.sidecar.identity.unusable_reason()  # type: ignore[union-attr]
    assert status == 503 and why is not None
    assert doc == {"error": f"cannot call artist over mTLS: {why}", "status": 503, "service": "artist"}
    assert "x-sidemesh-route" in headers
    assert song.sidecar.pool.connects == 0  # not even a TCP connection
    assert artist.sc.sidecar.metrics.tls_handshakes == {} and artist.app.seen == []


async def test_a_certificate_that_expires_fails_calls_closed_even_on_a_pooled_connection(
    ca: MeshCa, stack: AsyncExitStack
) -> None:
    cp = await control_plane(stack, ca)
    artist = await pod(stack, "artist", ca.mint("artist"), cp=cp)
    await cp.push(snapshot("v1", {"artist": [artist.inbound]}))
    song = await caller(stack, "song", ca.mint("song", not_after=time.time() + 4), cp=cp)
    assert (await song.get("http://artist/before"))[0] == 200  # valid a few seconds more
    identity = song.sidecar.identity
    assert identity is not None
    await until("the certificate expired", lambda: identity.unusable_reason() is not None)
    status, _, body = await song.get("http://artist/after")
    doc = json.loads(body)
    assert status == 503 and "certificate expired at" in doc["error"] and doc["service"] == "artist"
    assert artist.app.seen == ["GET /before"]  # the pooled connection was not used once expired
    assert len(song.sidecar.pool.idle[artist.inbound]) == 1


# ----- hostile peers on the mesh listener -----


async def test_a_client_stuck_in_the_handshake_meets_the_head_deadline_and_the_connection_limit(
    ca: MeshCa, stack: AsyncExitStack
) -> None:
    image = await pod(stack, "image", ca.mint("image"), extra=["--head-timeout", "1", "--max-connections", "4"])
    loop = asyncio.get_running_loop()
    silent = [await asyncio.open_connection(*image.inbound) for _ in range(4)]  # TCP, never a ClientHello
    t0 = loop.time()
    # at the limit, a mesh client still gets in: the oldest silent connection makes room
    reply = await raw_request(*image.inbound, b"GET /in HTTP/1.1\r\nHost: image\r\nConnection: close\r\n\r\n",
                              tls=MeshCa.client_tls(ca.mint("artist")))
    assert reply.startswith(b"HTTP/1.1 200 ") and image.app.seen == ["GET /in"]
    closed_after = []
    for reader, writer in silent:
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
        closed_after.append(loop.time() - t0)
        writer.close()
    print(f"\nsilent handshakes closed after: {', '.join(f'{t:.2f}s' for t in closed_after)} (head deadline 1s)")
    assert max(closed_after) < 1 + 1.5
    assert image.sc.sidecar.inbound.evicted >= 1
    await until("every silent one counted as a failed handshake",
                lambda: image.sc.sidecar.metrics.tls_handshakes.get(("inbound", "failed"), 0) == 4)
    assert not image.sc.sidecar.inbound.connections  # nothing left behind


SMUGGLED = b"GET /songs/2 HTTP/1.1\r\nHost: song\r\n\r\n"


def smuggling(target: bytes) -> list[bytes]:
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    return [
        b"POST %s HTTP/1.1\r\nHost: song\r\nConnection: content-length\r\nContent-Length: %d\r\n\r\n%s"
        % (target, len(SMUGGLED), SMUGGLED),
        b"POST %s HTTP/1.1\r\nHost: song\r\nConnection: keep-alive, Transfer-Encoding\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%s" % (target, chunked),
    ]


async def test_smuggling_through_an_mtls_sidecar_process_gets_400_and_every_victim_its_own_response(
    ca: MeshCa, stack: AsyncExitStack, procs: ProcessGroup
) -> None:
    """``sidemesh sidecar`` (uvloop, as deployed) whose route to song is its own mTLS inbound listener:
    outbound -> TLS hop -> inbound -> app. Attacks come through the outbound listener and, with a
    mesh certificate, straight at the TLS inbound one; victims share the pooled TLS connections."""
    cp = await control_plane(stack, ca)
    app = Recorder("song")
    app_at = await stack.enter_async_context(start_app(app.build()))
    sp = start_sidecar_process(procs, cp, app=app_at, service="song", identity=ca.mint("song"))
    await cp.push(snapshot("v1", {"song": [(sp.address, sp.inbound_port)]}))
    await wait_ready(sp)
    mesh = MeshCa.client_tls(ca.mint("web"))
    listeners = {"outbound": (sp.outbound_port, b"http://song/songs/1", None),
                 "inbound": (sp.inbound_port, b"/songs/1", mesh)}

    async def fetch(listener: str, n: int) -> tuple[int, bytes]:
        port, _, tls = listeners[listener]
        target = b"http://song/songs/%d" % n if listener == "outbound" else b"/songs/%d" % n
        reader, writer = await asyncio.open_connection(sp.address, port, ssl=tls)
        try:
            writer.write(b"GET %s HTTP/1.1\r\nHost: song\r\n\r\n" % target)
            status, _, body = await asyncio.wait_for(read_response(reader), 10)
            return status, body
        finally:
            writer.close()

    for listener, (port, target, tls) in listeners.items():
        for payload in smuggling(target):
            reply = await raw_request(sp.address, port, payload, timeout=10, tls=tls)
            assert [int(part[:3]) for part in reply.split(b"HTTP/1.1 ")[1:]] == [400], (listener, reply[:300])
        victims = asyncio.gather(*(fetch(listener, 100 + i) for i in range(20)))
        attacks = asyncio.gather(*(raw_request(sp.address, port, p, timeout=10, tls=tls) for p in smuggling(target) * 5))
        answered, refused = await asyncio.gather(victims, attacks)
        for i, (status, body) in enumerate(answered):
            assert status == 200 and json.loads(body)["path"] == f"/songs/{100 + i}", (listener, i, body)
        assert all(r.startswith(b"HTTP/1.1 400 ") for r in refused)
    assert not [r for r in app.seen if r in ("GET /songs/2", "POST /songs/1")]  # nothing smuggled reached the app
    assert sp.alive
    log = sp.proc.log()
    assert "reason=untrusted_framing" in log and "event=peer_identity" not in log


# ----- leaving -----


async def test_a_leaving_sidecar_serves_the_first_request_of_a_connection_it_accepted_before_it_stopped(
    ca: MeshCa, stack: AsyncExitStack
) -> None:
    """A caller that finished its TLS handshake as the callee began to leave sends its request a
    moment later (TLS 1.3: the caller is done before the callee has read its Finished). Closing
    that connection would fail the call with nothing to tell whether the app saw it; the leaving
    sidecar serves it, with ``Connection: close``, and only closes connections that carried a request."""
    cp = await control_plane(stack, ca)
    artist = await pod(stack, "artist", ca.mint("artist"), cp=cp)
    reader, writer = await asyncio.open_connection(*artist.inbound, ssl=MeshCa.client_tls(ca.mint("song")))
    idle_reader, idle_writer = await asyncio.open_connection(*artist.inbound, ssl=MeshCa.client_tls(ca.mint("song")))
    idle_writer.write(b"GET /first HTTP/1.1\r\nHost: artist\r\n\r\n")
    first = await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 200 ")
    length = next(int(line.split(b":")[1]) for line in first.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    await asyncio.wait_for(idle_reader.readexactly(length), 5)
    stopping = asyncio.create_task(artist.sc.sidecar.stop(drain_delay_s=0, drain_s=5))
    await asyncio.sleep(0.2)
    writer.write(b"GET /late HTTP/1.1\r\nHost: artist\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower(), head
    assert artist.app.seen == ["GET /first", "GET /late"]
    # the connection that had carried a request and sat idle was closed at once: its client retries it
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    await asyncio.wait_for(stopping, 10)
    writer.close()
    idle_writer.close()
