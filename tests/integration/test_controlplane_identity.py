"""Workload identity at the control plane, over real sockets: Identity.Issue on both ports, the
discovery stream's authentication, authorization in the snapshot, the serving certificate and CA.

Servers are real grpc.aio control planes on loopback (``make_cp``, secure by default, its CA in
the test's temporary --ca-dir); clients are real grpcio channels with real TLS credentials. A
sidecar's key never leaves it: clients send only a CSR.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import stat
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from controlplane.app import RunningControlPlane, StartupError
from controlplane.authz import parse_allow
from identity.certs import (
    CertificateAuthority,
    PrivateKey,
    cert_from_der,
    cert_from_pem,
    cert_info,
    cert_to_pem,
    generate_key,
    key_to_pem,
    make_csr,
    spiffe_id_of,
    verify_issued_by,
)
from identity.spiffe import SpiffeId
from identity.store import CA_CERT_FILE, CA_KEY_FILE, ensure_tokens, read_token
from meshpb.v1 import discovery_pb2, discovery_pb2_grpc
from tests.integration.test_controlplane_stream import (  # noqa: F401 - fixtures
    INSECURE,
    SERVER_NAME_OVERRIDE,
    CpFactory,
    FakeSidecar,
    get_status,
    instances,
    load_ca,
    make_cp,
    sidecar_entry,
    target,
    wait_status,
    workload_credentials,
)
from tests.support import ProcessGroup, free_port, loopback_address, wait_for_http

pytestmark = pytest.mark.timeout(60)

TD = "sidemesh.local"
ARTIST, IMAGE, SONG = SpiffeId(TD, "artist"), SpiffeId(TD, "image"), SpiffeId(TD, "song")


# --- helpers ---------------------------------------------------------------------------------

def sample(cp: RunningControlPlane, name: str, **labels: str) -> float:
    value = cp.plane.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def tokens_of(cp: RunningControlPlane, *services: str) -> dict[str, str]:
    assert cp.plane.config.join_tokens is not None
    paths = ensure_tokens(cp.plane.config.join_tokens, list(services))
    return {service: read_token(path) for service, path in paths.items()}


def server_only_tls(ca: CertificateAuthority) -> grpc.ChannelCredentials:
    """What a sidecar without a certificate has: the CA certificate it was given, to check the server."""
    return grpc.ssl_channel_credentials(root_certificates=ca.bundle_pem)


async def issue(address: str, credentials: grpc.ChannelCredentials, csr_pem: bytes, node_id: str = "artist-1",
                metadata: Sequence[tuple[str, str]] = ()) -> discovery_pb2.IssueResponse:
    async with grpc.aio.secure_channel(address, credentials, options=[SERVER_NAME_OVERRIDE]) as channel:
        request = discovery_pb2.IssueRequest(csr_pem=csr_pem.decode(), node_id=node_id)
        reply: discovery_pb2.IssueResponse = await discovery_pb2_grpc.IdentityStub(channel).Issue(
            request, metadata=tuple(metadata), timeout=5)
        return reply


async def issue_error(address: str, credentials: grpc.ChannelCredentials, csr_pem: bytes,
                      metadata: Sequence[tuple[str, str]] = ()) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await issue(address, credentials, csr_pem, metadata=metadata)
    return info.value


def identity_address(cp: RunningControlPlane) -> str:
    return f"{cp.plane.config.listen}:{cp.identity_port}"


def grpc_address(cp: RunningControlPlane) -> str:
    return f"{cp.plane.config.listen}:{cp.grpc_port}"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def credentials_from(key: PrivateKey, reply: discovery_pb2.IssueResponse) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=reply.bundle_pem.encode(), private_key=key_to_pem(key),
                                        certificate_chain=reply.cert_pem.encode())


async def synced(cp: RunningControlPlane, node_id: str = "artist-1", service: str = "artist",
                 **kw: Any) -> tuple[FakeSidecar, dict[str, Any]]:
    """A connected sidecar whose first snapshot is ACKed, and the /status sidecars then."""
    sc = await FakeSidecar(target(cp), node_id, service, **kw).send_hello()
    await sc.ack(await sc.next_snapshot())
    status = await wait_status(cp, lambda st: sidecar_entry(st, node_id)["synced"])
    return sc, status


async def assert_nothing_changed(cp: RunningControlPlane, watcher: FakeSidecar, before: dict[str, Any]) -> None:
    """No push went out, the registry is as it was, and the watcher is still connected."""
    with pytest.raises(TimeoutError):
        await watcher.next_snapshot(timeout=0.3)
    after = await get_status(cp)
    assert after["sidecars"] == before["sidecars"] and after["version"] == before["version"]
    assert not watcher.call.done()


# --- Identity.Issue with a join token (identity port) ----------------------------------------------

async def test_a_sidecar_trades_its_join_token_and_a_csr_for_a_certificate_and_registers_with_it(
        make_cp: CpFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.issuer")
    cp = await make_cp(cert_ttl_s=20.0)
    ca = load_ca(cp.plane.config.ca_dir)
    token = tokens_of(cp, "artist")["artist"]
    key = generate_key()
    csr = make_csr(key, ARTIST, "artist-1")
    # what goes over the wire is a CSR and a node id: the IssueRequest has no room for a key
    assert {f.name for f in discovery_pb2.IssueRequest.DESCRIPTOR.fields} == {"csr_pem", "node_id"}
    assert b"PRIVATE KEY" not in csr
    before = time.time()
    reply = await issue(identity_address(cp), server_only_tls(ca), csr, metadata=bearer(token))
    cert = cert_from_pem(reply.cert_pem.encode())
    assert spiffe_id_of(cert) == ARTIST
    assert cert.public_key() == key.public_key()
    assert before + 20 - 1 <= cert_info(cert).not_after <= time.time() + 20 + 1  # --cert-ttl 20s
    assert reply.bundle_pem.encode() == (cp.plane.config.ca_dir / CA_CERT_FILE).read_bytes()
    verify_issued_by(cert, ca.cert, time.time())
    assert sample(cp, "sidemesh_controlplane_certificates_issued_total", via="token") == 1
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{cp.plane.config.listen}:{cp.http_port}/metrics") as resp:
            assert 'sidemesh_controlplane_certificates_issued_total{via="token"} 1.0' in await resp.text()
    assert any("event=certificate_issued service=artist node=artist-1 not_after=" in r.getMessage()
               and "via=token" in r.getMessage() for r in caplog.records)
    # the certificate is what the discovery port asks for
    sc = await FakeSidecar(target(cp), "artist-1", "artist", credentials=credentials_from(key, reply)).send_hello()
    try:
        assert instances(await sc.next_snapshot()) == {"artist": {"artist-1"}}
    finally:
        await sc.close()


async def test_a_sidecar_renews_over_mutual_tls_with_its_current_certificate_and_no_token(
        make_cp: CpFactory) -> None:
    cp = await make_cp()
    ca = load_ca(cp.plane.config.ca_dir)
    key = generate_key()
    first = await issue(identity_address(cp), server_only_tls(ca), make_csr(key, ARTIST, "artist-1"),
                        metadata=bearer(tokens_of(cp, "artist")["artist"]))
    new_key = generate_key()  # renewal may rotate the key
    renewed = await issue(grpc_address(cp), credentials_from(key, first), make_csr(new_key, ARTIST, "artist-1"))
    cert = cert_from_pem(renewed.cert_pem.encode())
    assert spiffe_id_of(cert) == ARTIST and cert.public_key() == new_key.public_key()
    assert cert.serial_number != cert_from_pem(first.cert_pem.encode()).serial_number
    assert sample(cp, "sidemesh_controlplane_certificates_issued_total", via="certificate") == 1


async def test_a_certificate_cannot_renew_into_another_service(make_cp: CpFactory) -> None:
    cp = await make_cp()
    ca = load_ca(cp.plane.config.ca_dir)
    err = await issue_error(grpc_address(cp), workload_credentials(ca, "artist"), make_csr(generate_key(), IMAGE, "x"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate names service artist, the CSR asks for image" in (err.details() or "")
    assert sample(cp, "sidemesh_controlplane_issue_refusals_total", reason="identity_mismatch") == 1
    assert sample(cp, "sidemesh_controlplane_certificates_issued_total", via="certificate") == 0


@pytest.mark.parametrize(("case", "code", "reason", "says"), [
    ("no token", grpc.StatusCode.UNAUTHENTICATED, "no_token", "authorization: Bearer <token>"),
    ("wrong token", grpc.StatusCode.UNAUTHENTICATED, "bad_token", "matches no service's token"),
    ("basic scheme", grpc.StatusCode.UNAUTHENTICATED, "no_token", "authorization: Bearer <token>"),
    ("artist's token, image's CSR", grpc.StatusCode.PERMISSION_DENIED, "token_for_other_service",
     "the join token is for service artist, the CSR asks for image"),
])
async def test_a_token_request_without_the_right_token_is_refused_with_its_status(
        case: str, code: grpc.StatusCode, reason: str, says: str, make_cp: CpFactory) -> None:
    cp = await make_cp()
    ca = load_ca(cp.plane.config.ca_dir)
    tokens = tokens_of(cp, "artist", "image")
    metadata = {"no token": [], "wrong token": bearer("guess" * 8),
                "basic scheme": [("authorization", f"Basic {tokens['artist']}")]}.get(case, bearer(tokens["artist"]))
    identity = IMAGE if case.endswith("image's CSR") else ARTIST
    err = await issue_error(identity_address(cp), server_only_tls(ca), make_csr(generate_key(), identity, "x"),
                            metadata=metadata)
    assert err.code() == code
    assert says in (err.details() or "")
    assert sample(cp, "sidemesh_controlplane_issue_refusals_total", reason=reason) == 1
    assert sample(cp, "sidemesh_controlplane_certificates_issued_total", via="token") == 0


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


def _csr_with_uris(uris: list[str]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _bad_signature() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(make_csr(generate_key(), ARTIST, "a")).public_bytes(
        serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature
    return _pem(bytes(der))


BAD_CSRS = {
    "garbage": (lambda: b"hello, I am artist", "not a PEM certificate signing request"),
    "bad signature": (_bad_signature, "signature does not verify"),
    "weak key": (lambda: make_csr(rsa.generate_private_key(65537, 1024), ARTIST, "a"), "RSA key of 1024 bits"),
    "no URI SAN": (lambda: _csr_with_uris([]), "exactly one URI SAN (a SPIFFE ID); it carries 0"),
    "two URI SANs": (lambda: _csr_with_uris([ARTIST.uri, IMAGE.uri]), "it carries 2"),
    "another trust domain": (lambda: make_csr(generate_key(), SpiffeId("evil.example", "artist"), "a"),
                             "outside this mesh's trust domain sidemesh.local"),
}


@pytest.mark.parametrize("case", list(BAD_CSRS))
async def test_a_csr_no_ca_should_sign_is_invalid_argument_with_the_reason(case: str, make_cp: CpFactory) -> None:
    cp = await make_cp()
    ca = load_ca(cp.plane.config.ca_dir)
    build, says = BAD_CSRS[case]
    err = await issue_error(identity_address(cp), server_only_tls(ca), build(),
                            metadata=bearer(tokens_of(cp, "artist")["artist"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (err.details() or ""), err.details()
    assert sample(cp, "sidemesh_controlplane_certificates_issued_total", via="token") == 0


async def test_an_oversized_issue_request_is_refused_before_it_is_parsed(make_cp: CpFactory) -> None:
    cp = await make_cp()
    ca = load_ca(cp.plane.config.ca_dir)
    err = await issue_error(identity_address(cp), server_only_tls(ca), b"A" * 100_000,
                            metadata=bearer(tokens_of(cp, "artist")["artist"]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sample(cp, "sidemesh_controlplane_certificates_issued_total", via="token") == 0


async def refusal(stream: FakeSidecar) -> tuple[grpc.StatusCode, str | None]:
    """Send the stream's Hello; the status and details it is refused with, whether the refusal
    comes back on the write itself (a busy machine: the server was quicker) or on the call."""
    try:
        await stream.send_hello()
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return await stream.status_code(), await stream.call.details()


async def test_the_identity_port_takes_tokens_only_and_refuses_discovery_streams(make_cp: CpFactory) -> None:
    cp = await make_cp()
    ca = load_ca(cp.plane.config.ca_dir)
    artist_cert = workload_credentials(ca, "artist")
    # a client certificate is no proof here (none is even asked for): only a token is
    err = await issue_error(identity_address(cp), artist_cert, make_csr(generate_key(), ARTIST, "a"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    stream = FakeSidecar(identity_address(cp), "artist-1", "artist", credentials=server_only_tls(ca))
    try:
        code, details = await refusal(stream)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "use the mutual-TLS port with a workload certificate" in (details or "")
    finally:
        await stream.close()
    assert sample(cp, "sidemesh_controlplane_stream_auth_refusals_total", reason="no_certificate") == 1
    assert (await get_status(cp))["sidecars"] == []


# --- who may register what (the discovery port) --------------------------------------------------------

@pytest.mark.parametrize("impostor", ["no client certificate", "a certificate from another CA"])
async def test_a_stream_without_a_mesh_certificate_never_gets_past_the_handshake(
        impostor: str, make_cp: CpFactory) -> None:
    cp = await make_cp()
    ca = load_ca(cp.plane.config.ca_dir)
    watcher, before = await synced(cp)
    if impostor == "no client certificate":
        credentials = server_only_tls(ca)
    else:
        rogue = CertificateAuthority.create(TD, time.time())
        key = generate_key()
        cert = rogue.issue_workload(make_csr(key, ARTIST, "x"), ARTIST, ttl_s=600, now=time.time())
        credentials = grpc.ssl_channel_credentials(ca.bundle_pem, key_to_pem(key), cert_to_pem(cert))
    thief = FakeSidecar(target(cp).address, "artist-1", "artist", address="127.66.0.1", credentials=credentials)
    try:
        await thief.send_hello()
    except grpc.aio.AioRpcError:
        pass  # the write itself may already see the failed handshake
    try:
        assert await thief.status_code(timeout=5) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await thief.close()
    await assert_nothing_changed(cp, watcher, before)
    await watcher.close()


HIJACKS: dict[str, tuple[dict[str, Any], str, str]] = {
    # (FakeSidecar keyword arguments, the refusal's reason, what the stream is told)
    "artist's certificate, a Hello for image": (
        {"node_id": "image-1", "service": "image", "cert_service": "artist"}, "service_mismatch",
        "certificate names service artist, hello claims image"),
    "another key taking artist-1's node id": (
        {"node_id": "artist-1", "service": "artist", "address": "127.66.0.1"}, "node_id_held",
        "node_id artist-1 is held by a connected sidecar with another key"),
    "an address that is not the peer's own": (
        {"node_id": "artist-2", "service": "artist", "address": "10.9.8.7"}, "address_mismatch",
        "hello advertises address 10.9.8.7, but the stream comes from 127."),
}


@pytest.mark.parametrize("hijack", list(HIJACKS))
async def test_a_stream_claiming_more_than_its_certificate_proves_is_refused_and_changes_nothing(
        hijack: str, make_cp: CpFactory) -> None:
    cp = await make_cp()
    watcher, before = await synced(cp, "artist-1", "artist", address="127.10.1.1")
    kwargs, reason, says = HIJACKS[hijack]
    thief = FakeSidecar(target(cp), **kwargs)
    try:
        code, details = await refusal(thief)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert says in (details or "")
    finally:
        await thief.close()
    assert sample(cp, "sidemesh_controlplane_stream_auth_refusals_total", reason=reason) == 1
    await assert_nothing_changed(cp, watcher, before)
    assert sidecar_entry(before, "artist-1")["address"] == "127.10.1.1"
    await watcher.close()


async def test_status_shows_each_sidecars_identity_and_when_its_certificate_expires(make_cp: CpFactory) -> None:
    cp = await make_cp()
    ca = load_ca(cp.plane.config.ca_dir)
    key = generate_key()
    cert = ca.issue_workload(make_csr(key, SONG, "song-1"), SONG, ttl_s=1234, now=time.time())
    credentials = grpc.ssl_channel_credentials(ca.bundle_pem, key_to_pem(key), cert_to_pem(cert))
    sc, status = await synced(cp, "song-1", "song", credentials=credentials)
    try:
        entry = sidecar_entry(status, "song-1")
        assert entry["identity"] == "spiffe://sidemesh.local/service/song"
        assert entry["cert_expires_at"] == cert_info(cert).not_after
        assert status["security"]["mode"] == "mutual_tls" and status["security"]["trust_domain"] == TD
    finally:
        await sc.close()


# --- authorization in the snapshot -----------------------------------------------------------------------

async def test_allow_rules_make_every_service_deny_by_default_in_the_pushed_policies(make_cp: CpFactory) -> None:
    cp = await make_cp(allow=parse_allow(["song->artist,song->image"]))
    streams = [await FakeSidecar(target(cp), f"{s}-1", s).send_hello() for s in ("artist", "image", "song")]
    try:
        snap = await streams[2].snapshot_where(lambda x: len(x.services) == 3)
        policies = {s.name: (s.policy.authorization.enforced, list(s.policy.authorization.allowed_callers))
                    for s in snap.services}
        assert policies == {"artist": (True, ["song"]), "image": (True, ["song"]), "song": (True, [])}
        assert (await get_status(cp))["authorization"] == {"enforced": True, "rules": ["song->artist", "song->image"]}
    finally:
        for stream in streams:
            await stream.close()


async def test_without_allow_rules_nothing_is_enforced(make_cp: CpFactory) -> None:
    cp = await make_cp()
    sc = await FakeSidecar(target(cp), "artist-1").send_hello()
    try:
        [svc] = (await sc.next_snapshot()).services
        assert (svc.policy.authorization.enforced, list(svc.policy.authorization.allowed_callers)) == (False, [])
        assert (await get_status(cp))["authorization"] == {"enforced": False, "rules": []}
    finally:
        await sc.close()


# --- the control plane's own certificate and CA ------------------------------------------------------------

def _served_certificate(host: str, port: int, ca: CertificateAuthority) -> x509.Certificate:
    """The certificate the identity port presents, verified as a sidecar would (name 'controlplane')."""
    ctx = ssl.create_default_context(cadata=ca.bundle_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="controlplane") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return cert_from_der(der)


async def test_the_serving_certificate_names_the_control_plane_and_is_renewed_at_half_life(
        make_cp: CpFactory) -> None:
    cp = await make_cp(cert_ttl_s=2.0, server_names=("cp.example",))
    ca = load_ca(cp.plane.config.ca_dir)
    host = cp.plane.config.listen
    first = await asyncio.to_thread(_served_certificate, host, cp.identity_port or 0, ca)
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"controlplane", "cp.example"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [host]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://sidemesh.local/controlplane"]
    deadline = time.monotonic() + 5
    while True:
        served = await asyncio.to_thread(_served_certificate, host, cp.identity_port or 0, ca)
        if served.serial_number != first.serial_number:
            break
        assert time.monotonic() < deadline, "the serving certificate was not renewed at half-life"
        await asyncio.sleep(0.1)
    # once the first certificate has expired, new mutual-TLS handshakes still succeed
    while time.time() < cert_info(first).not_after + 0.5:
        await asyncio.sleep(0.1)
    sc = await FakeSidecar(target(cp), "artist-1").send_hello()
    try:
        assert instances(await sc.next_snapshot()) == {"artist": {"artist-1"}}
    finally:
        await sc.close()
    assert sample(cp, "sidemesh_controlplane_serving_certificate_not_after_seconds") >= cert_info(served).not_after


async def test_an_operators_own_ca_in_the_ca_dir_is_the_one_that_signs(
        make_cp: CpFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca_dir = tmp_path / "operator-ca"
    ca_dir.mkdir()
    own = CertificateAuthority.create(TD, time.time())
    (ca_dir / CA_CERT_FILE).write_bytes(own.bundle_pem)
    (ca_dir / CA_KEY_FILE).write_bytes(key_to_pem(own.key))
    os.chmod(ca_dir / CA_KEY_FILE, 0o640)
    caplog.set_level(logging.WARNING, logger="controlplane.ca")
    cp = await make_cp(ca_dir=ca_dir)
    # used, and the operator is told that a group-readable CA key lets others mint identities
    assert any("event=ca_key_exposed" in r.getMessage() and "mode=640" in r.getMessage() for r in caplog.records)
    reply = await issue(identity_address(cp), server_only_tls(own), make_csr(generate_key(), ARTIST, "a"),
                        metadata=bearer(tokens_of(cp, "artist")["artist"]))
    assert reply.bundle_pem.encode() == own.bundle_pem
    verify_issued_by(cert_from_pem(reply.cert_pem.encode()), own.cert, time.time())


async def test_a_ca_dir_that_cannot_be_used_stops_the_start_with_the_reason(make_cp: CpFactory, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StartupError, match=f"cannot read or create the CA in {not_a_dir}"):
        await make_cp(ca_dir=not_a_dir)
    half = tmp_path / "half"
    half.mkdir()
    (half / CA_CERT_FILE).write_bytes(CertificateAuthority.create(TD, time.time()).bundle_pem)
    with pytest.raises(StartupError, match="holds only one of ca.pem and ca-key.pem"):
        await make_cp(ca_dir=half)


@pytest.mark.parametrize("make_cp", [INSECURE], indirect=True)
async def test_insecure_mode_serves_no_identity_at_all(make_cp: CpFactory) -> None:
    cp = await make_cp()
    assert cp.identity_port is None and cp.plane.identity is None
    assert not (cp.plane.config.ca_dir / CA_CERT_FILE).exists()  # no CA was even created
    async with grpc.aio.insecure_channel(grpc_address(cp)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await discovery_pb2_grpc.IdentityStub(channel).Issue(discovery_pb2.IssueRequest(csr_pem="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (await get_status(cp))["security"] == {"mode": "insecure"}


def test_the_control_plane_process_is_secure_by_default_and_keeps_its_ca_key_private(
        procs: ProcessGroup, tmp_path: Path) -> None:
    host = loopback_address()
    grpc_port, http_port, identity_port = free_port(host), free_port(host), free_port(host)
    ca_dir, token_dir = tmp_path / "ca", tmp_path / "tokens"
    token = read_token(ensure_tokens(token_dir, ["artist"])["artist"])
    proc = procs.start("controlplane", "controlplane", "--listen", host, "--grpc-port", str(grpc_port),
                       "--http-port", str(http_port), "--identity-port", str(identity_port),
                       "--ca-dir", str(ca_dir), "--join-tokens", str(token_dir), "--cert-ttl", "90m")
    wait_for_http(f"http://{host}:{http_port}/healthz")
    assert stat.S_IMODE((ca_dir / CA_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    with urllib.request.urlopen(f"http://{host}:{http_port}/status", timeout=2) as resp:
        security = json.load(resp)["security"]
    assert (security["mode"], security["cert_ttl_s"]) == ("mutual_tls", 5400)
    ca = load_ca(ca_dir)
    reply = asyncio.run(issue(f"{host}:{identity_port}", server_only_tls(ca), make_csr(generate_key(), ARTIST, "a"),
                              metadata=bearer(token)))
    assert spiffe_id_of(cert_from_pem(reply.cert_pem.encode())) == ARTIST
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=10) == 0
    log = proc.log()
    assert "event=started mode=mutual_tls" in log and "event=certificate_issued service=artist" in log
