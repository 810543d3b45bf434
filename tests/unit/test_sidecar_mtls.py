"""mTLS decisions and the proxy's use of them, without the network: the authorization rule, what
a failed handshake says about the peer (real OpenSSL errors from in-memory handshakes), the pool
keeping verified connections per service, and exchanges driven over fake transports."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest

from identity.certs import CertificateAuthority, cert_to_pem, make_csr
from identity.spiffe import SpiffeId
from identity.store import IdentityFiles
from identity.tls import client_context, server_context
from sidecar.balancer import EndpointHealth, ResolvedRoute
from sidecar.errors import Forbidden, PeerNotVerified
from sidecar.metrics import MetricsExporter, SidecarMetrics
from sidecar.model import Authorization, Endpoint, Policy, RouteTable, ServiceEntry, Source
from sidecar.mtls import OutboundTls, denial, peer_mismatch, replay
from sidecar.proxy import INBOUND, OUTBOUND, DownstreamConnection, ProxyContext
from sidecar.routing import RouteBook
from sidecar.upstream import UpstreamConnection, UpstreamPool, handshake_failure
from sidecar.workload import WorkloadIdentity
from tests.unit.test_sidecar_protocol import FakeResolver, FakeTransport

TD = "sidemesh.local"
APP = Endpoint("127.0.0.9", 8080, "app")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# ----- the authorization rule -----

ONLY_ARTIST = Authorization(enforced=True, allowed_callers=frozenset({"artist"}))


@pytest.mark.parametrize(("policy", "caller"), [
    (None, "song"),  # no policy ever pushed: the control plane never said otherwise
    (Authorization(), "song"),  # not enforced
    (ONLY_ARTIST, "artist"),
])
def test_a_caller_is_allowed_without_a_policy_without_enforcement_or_when_named(
    policy: Authorization | None, caller: str
) -> None:
    assert denial(policy, caller, "image") is None


def test_a_caller_an_enforced_policy_does_not_name_is_refused_with_403_naming_who_may_call() -> None:
    refusal = denial(ONLY_ARTIST, "song", "image")
    assert isinstance(refusal, Forbidden) and refusal.status == 403
    assert json.loads(refusal.to_json()) == {
        "error": "caller song is not allowed to call image: allowed callers: artist",
        "status": 403, "service": "image", "caller": "song",
    }
    nobody = Authorization(enforced=True)
    assert denial(nobody, "artist", "image").message.endswith("allowed callers: none")  # type: ignore[union-attr]


def test_a_peer_is_accepted_only_as_the_exact_service_and_trust_domain_routed_to() -> None:
    assert not peer_mismatch(SpiffeId(TD, "artist"), SpiffeId(TD, "artist"))
    assert peer_mismatch(SpiffeId(TD, "image"), SpiffeId(TD, "artist"))
    assert peer_mismatch(SpiffeId("other.local", "artist"), SpiffeId(TD, "artist"))


# ----- what a failed handshake says about the peer: real OpenSSL errors over memory BIOs -----


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, IdentityFiles]:
    now = time.time()
    out = {}
    for name, ca in (("mesh", CertificateAuthority.create(TD, now)), ("other", CertificateAuthority.create(TD, now))):
        files = IdentityFiles(tmp_path_factory.mktemp(name))
        key = files.load_or_create_key()
        spiffe = SpiffeId(TD, "artist")
        cert = ca.issue_workload(make_csr(key, spiffe, "artist-1"), spiffe, ttl_s=3600, now=now)
        files.save(cert_to_pem(cert), ca.bundle_pem)
        out[name] = files
    return out


def _client_error(client: ssl.SSLContext, server_bytes: Iterator[bytes] | None = None,
                  server: ssl.SSLContext | None = None) -> BaseException:
    """Run the client side of a handshake in memory against ``server`` or canned bytes; its error."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = client.wrap_bio(c_in, c_out, server_side=False)
    if server is not None:
        s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        try:
            cli.do_handshake()
            raise AssertionError("the handshake succeeded")
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            return exc
        if server is None:
            c_out.read()
            c_in.write(next(server_bytes))  # type: ignore[arg-type]
            continue
        s_in.write(c_out.read())
        try:
            srv.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass
        c_in.write(s_out.read())
    raise AssertionError("no outcome")


def test_a_certificate_from_another_ca_is_described_as_not_vouched_for(pki: dict[str, IdentityFiles]) -> None:
    mesh, other = pki["mesh"], pki["other"]
    exc = _client_error(client_context(mesh.cert, mesh.key, mesh.bundle),
                        server=server_context(other.cert, other.key, other.bundle))
    # OpenSSL sends the other CA along when it can build the chain from its trust store
    assert handshake_failure(exc, 1.0) in (
        "a certificate the mesh CA does not vouch for (unable to get local issuer certificate)",
        "a certificate the mesh CA does not vouch for (self-signed certificate in certificate chain)",
    )


def test_a_plaintext_http_answer_to_a_client_hello_is_described_as_no_tls(pki: dict[str, IdentityFiles]) -> None:
    mesh = pki["mesh"]
    exc = _client_error(client_context(mesh.cert, mesh.key, mesh.bundle),
                        server_bytes=iter([b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"]))
    assert handshake_failure(exc, 1.0).startswith("no TLS: the peer does not speak TLS")


def test_a_timeout_or_a_clean_close_mid_handshake_is_described_as_no_tls() -> None:
    assert handshake_failure(TimeoutError(), 1.5) == "no TLS handshake within 1.5s"
    assert handshake_failure(None, 1.0) == "no TLS: the connection closed during the handshake"
    assert handshake_failure(ConnectionResetError(104, "Connection reset by peer"), 1.0) == (
        "no TLS: the connection closed during the handshake (Connection reset by peer)")


# ----- the pool: verified connections are kept per service -----


def _conn(pool: UpstreamPool, peer: str | None) -> UpstreamConnection:
    conn = UpstreamConnection(pool, APP.key)
    conn.connection_made(FakeTransport(conn))  # type: ignore[arg-type]
    conn.peer = peer
    return conn


async def test_the_pool_hands_out_a_connection_only_for_the_service_its_peer_proved() -> None:
    pool = UpstreamPool()
    image, artist, plain = _conn(pool, "image"), _conn(pool, "artist"), _conn(pool, None)
    pool.idle[APP.key] = [image, plain, artist]  # artist on top
    assert pool.take_idle(APP.key, "image") is image  # found below the others
    assert pool.take_idle(APP.key, "image") is None
    assert pool.take_idle(APP.key, None) is plain  # plaintext only for plaintext
    assert pool.take_idle(APP.key, "artist") is artist
    assert pool.idle[APP.key] == []


# ----- replaying bytes read before TLS took the transport over -----


class _Buffered(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(3)  # smaller than a chunk: the replay must loop
        self.got = b""

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.got += bytes(self.buf[:nbytes])


class _Plain(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = b""

    def data_received(self, data: bytes) -> None:
        self.got += data


def test_bytes_read_before_the_takeover_reach_the_new_protocol_whole_and_in_order() -> None:
    for proto in (_Buffered(), _Plain()):
        replay(proto, [b"\x16\x03\x01", b"hello-part-2"])
        assert proto.got == b"\x16\x03\x01hello-part-2"


# ----- exchanges: authorization inbound, failing closed outbound -----


class _Authz:
    def __init__(self, policy: Authorization | None) -> None:
        self.policy = policy

    def authorization_of(self, service: str) -> Authorization | None:
        return self.policy if service == "image" else None


class _Inbound:
    """An mTLS inbound connection whose handshake proved ``caller`` (set as the handshake would)."""

    def __init__(self, policy: Authorization | None, caller: str) -> None:
        self.pool = UpstreamPool()
        self.metrics = SidecarMetrics()
        route = ResolvedRoute("app", (APP,), Source.CONTROLPLANE, EndpointHealth(), Policy(timeout_s=5.0, retries=1))
        self.ctx = ProxyContext(INBOUND, pool=self.pool, metrics=self.metrics, app_route=route,
                                identity=WorkloadIdentity("image", TD), authorizations=_Authz(policy))
        self.app = _conn(self.pool, None)
        self.pool.idle[APP.key] = [self.app]
        self.down = DownstreamConnection(self.ctx)
        self.client = FakeTransport(self.down)
        self.down.connection_made(self.client)  # type: ignore[arg-type]
        self.down.caller = caller

    def close(self) -> None:
        self.down.connection_lost(None)


@pytest.fixture
def inbounds() -> Iterator[list[_Inbound]]:
    made: list[_Inbound] = []
    yield made
    for rig in made:
        rig.close()


async def test_a_refused_caller_gets_403_on_a_kept_alive_connection_and_the_app_gets_nothing(
    inbounds: list[_Inbound],
) -> None:
    rig = _Inbound(ONLY_ARTIST, "song")
    inbounds.append(rig)
    rig.down.data_received(b"POST /images/1 HTTP/1.1\r\nHost: image\r\nContent-Length: 5\r\n\r\nhello")
    out = bytes(rig.client.data)
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"connection: close" not in out.lower()
    assert json.loads(out.partition(b"\r\n\r\n")[2])["caller"] == "song"
    assert rig.app.transport.data == b""  # type: ignore[union-attr]
    assert rig.metrics.denials == {("image", "song"): 1}
    assert rig.metrics.requests == {(INBOUND, "-", 403): 1}
    rig.client.data.clear()
    rig.down.data_received(b"GET /images/2 HTTP/1.1\r\nHost: image\r\n\r\n")  # the same connection goes on
    assert rig.client.data.startswith(b"HTTP/1.1 403 ") and rig.metrics.denials == {("image", "song"): 2}


@pytest.mark.parametrize(("policy", "caller"), [(ONLY_ARTIST, "artist"), (None, "song")])
async def test_an_allowed_caller_or_one_no_policy_speaks_of_is_forwarded_to_the_app(
    inbounds: list[_Inbound], policy: Authorization | None, caller: str
) -> None:
    rig = _Inbound(policy, caller)
    inbounds.append(rig)
    rig.down.data_received(b"GET /images/1 HTTP/1.1\r\nHost: image\r\n\r\n")
    assert bytes(rig.app.transport.data).startswith(b"GET /images/1 HTTP/1.1\r\n")  # type: ignore[union-attr]
    rig.app.data_received(OK)
    assert rig.client.data.startswith(b"HTTP/1.1 200 OK\r\n") and rig.metrics.denials == {}


async def test_without_a_usable_certificate_an_outbound_call_is_answered_503_before_anything_is_routed() -> None:
    identity = WorkloadIdentity("song", TD)
    identity.note_problem("Identity.Issue failed: UNAVAILABLE")
    book = RouteBook(resolver=FakeResolver())
    book.on_config_update(RouteTable("v1", "n1", MappingProxyType({"artist": ServiceEntry("artist", (APP,))})))
    pool = UpstreamPool()
    ctx = ProxyContext(OUTBOUND, pool=pool, metrics=SidecarMetrics(), book=book, identity=identity)
    down = DownstreamConnection(ctx)
    client = FakeTransport(down)
    down.connection_made(client)  # type: ignore[arg-type]
    try:
        down.data_received(b"GET http://artist/x HTTP/1.1\r\nHost: artist\r\n\r\n")
        out = bytes(client.data)
        assert out.startswith(b"HTTP/1.1 503 ")
        assert json.loads(out.partition(b"\r\n\r\n")[2]) == {
            "error": "cannot call artist over mTLS: Identity.Issue failed: UNAVAILABLE", "status": 503,
            "service": "artist"}
        assert not ctx.tasks and pool.connects == 0  # no connection attempted, plaintext or not
    finally:
        down.connection_lost(None)


async def test_a_service_name_no_identity_can_carry_fails_as_unverified_without_connecting() -> None:
    pool = UpstreamPool()
    with pytest.raises(PeerNotVerified) as caught:
        await OutboundTls(WorkloadIdentity("song", TD), SidecarMetrics()).connect(pool, APP, "under_score")
    assert caught.value.status == 503 and caught.value.endpoint == "127.0.0.9:8080"
    assert pool.connects == 0


def test_the_metrics_show_handshakes_peer_failures_and_denials(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    m = SidecarMetrics()
    m.handshake(OUTBOUND, "ok")
    m.handshake(INBOUND, "failed")
    m.peer_failure(OUTBOUND, "artist", "mismatch")
    m.denied("image", "song")
    exporter = MetricsExporter(m, RouteBook(resolver=FakeResolver()), UpstreamPool(),
                               service="image", instance="image-1")
    families = {f.name: f for f in text_string_to_metric_families(exporter.render()[0].decode())}
    got: dict[str, list[tuple[dict[str, str], float]]] = {
        name: [(s.labels, s.value) for s in families[name].samples if s.name.endswith("_total")]
        for name in ("sidemesh_tls_handshakes", "sidemesh_peer_identity_failures", "sidemesh_authorization_denials")
    }
    assert got == {
        "sidemesh_tls_handshakes": [({"direction": "inbound", "outcome": "failed"}, 1.0),
                                    ({"direction": "outbound", "outcome": "ok"}, 1.0)],
        "sidemesh_peer_identity_failures": [({"direction": "outbound", "service": "artist", "reason": "mismatch"}, 1.0)],
        "sidemesh_authorization_denials": [({"service": "image", "caller": "song"}, 1.0)],
    }
    assert m.mtls_counts() == {"tls_handshakes": {"inbound/failed": 1, "outbound/ok": 1},
                               "peer_identity_failures": {"outbound/artist/mismatch": 1},
                               "authorization_denials": {"image/song": 1}}

