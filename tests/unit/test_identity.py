"""Workload identity without the network: SPIFFE IDs, the CA's issuing rules, what a CSR asks
for, half-life renewal, files on disk, and a real TLS 1.3 handshake between the ``ssl`` contexts
over a socket pair."""

from __future__ import annotations

import base64
import re
import socket
import ssl
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from identity.certs import (
    CertificateAuthority,
    PrivateKey,
    cert_from_pem,
    cert_info,
    cert_to_pem,
    csr_identity,
    generate_key,
    key_to_pem,
    make_csr,
    renewal_time,
    spiffe_id_of,
    verify_issued_by,
)
from identity.spiffe import IdentityError, SpiffeId
from identity.store import IdentityFiles, ensure_tokens, load_or_create_ca, read_token
from identity.tls import client_context, peer_identity, server_context

NOW = 1_800_000_000.0
TD = "sidemesh.local"
ARTIST = SpiffeId(TD, "artist")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD, NOW)


def test_a_spiffe_id_round_trips_and_rejects_what_is_not_a_service_identity() -> None:
    assert ARTIST.uri == "spiffe://sidemesh.local/service/artist"
    assert SpiffeId.parse(ARTIST.uri) == ARTIST
    for bad in ("http://sidemesh.local/service/artist", "spiffe://sidemesh.local/ns/artist",
                "spiffe://sidemesh.local/service/Artist", "spiffe://SIDEMESH/service/artist", "spiffe://x"):
        with pytest.raises(IdentityError):
            SpiffeId.parse(bad)


def test_the_ca_signs_a_csr_for_exactly_the_identity_the_caller_proved(ca: CertificateAuthority) -> None:
    key = generate_key()
    cert = ca.issue_workload(make_csr(key, ARTIST, "artist-1"), ARTIST, ttl_s=86400, now=NOW)
    assert spiffe_id_of(cert) == ARTIST
    info = cert_info(cert)
    assert info.not_after - NOW == pytest.approx(86400, abs=1)
    assert info.renew_at == pytest.approx(NOW + 86400 / 2, abs=1)  # half the life from issue
    verify_issued_by(cert, ca.cert, NOW + 10)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o._name for o in eku} == {"serverAuth", "clientAuth"}


def test_a_csr_claiming_another_service_than_the_proven_one_is_refused(ca: CertificateAuthority) -> None:
    csr = make_csr(generate_key(), SpiffeId(TD, "image"), "x")
    with pytest.raises(IdentityError, match="proved spiffe://sidemesh.local/service/artist"):
        ca.issue_workload(csr, ARTIST, ttl_s=60, now=NOW)
    with pytest.raises(IdentityError, match="trust domain"):
        ca.issue_workload(make_csr(generate_key(), SpiffeId("other.td", "artist"), "x"),
                          SpiffeId("other.td", "artist"), ttl_s=60, now=NOW)
    with pytest.raises(IdentityError, match="not a PEM CSR"):
        ca.issue_workload(b"garbage", ARTIST, ttl_s=60, now=NOW)


def test_a_certificate_from_another_ca_or_out_of_its_lifetime_does_not_verify(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create(TD, NOW)
    cert = other.issue_workload(make_csr(generate_key(), ARTIST, "a"), ARTIST, ttl_s=60, now=NOW)
    with pytest.raises(IdentityError, match="not issued by the mesh CA"):
        verify_issued_by(cert, ca.cert, NOW)
    mine = ca.issue_workload(make_csr(generate_key(), ARTIST, "a"), ARTIST, ttl_s=60, now=NOW)
    with pytest.raises(IdentityError, match="not valid now"):
        verify_issued_by(mine, ca.cert, NOW + 61)


def test_the_ca_is_created_once_on_disk_and_loaded_after(tmp_path: Path) -> None:
    first = load_or_create_ca(tmp_path, TD, NOW)
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    again = load_or_create_ca(tmp_path, TD, NOW + 5)
    assert again.bundle_pem == first.bundle_pem
    with pytest.raises(IdentityError, match="trust domain"):
        load_or_create_ca(tmp_path, "other.td", NOW)


def test_a_sidecar_keeps_its_key_across_restarts_and_caches_cert_and_bundle(tmp_path: Path, ca: CertificateAuthority) -> None:
    files = IdentityFiles(tmp_path / "artist-1")
    key = files.load_or_create_key()
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert key_to_pem(IdentityFiles(tmp_path / "artist-1").load_or_create_key()) == key_to_pem(key)
    cert = ca.issue_workload(make_csr(key, ARTIST, "artist-1"), ARTIST, ttl_s=60, now=NOW)
    files.save(cert_to_pem(cert), ca.bundle_pem)
    assert cert_from_pem(files.load_cert() or b"") == cert and files.load_bundle() == ca.bundle_pem


def test_join_tokens_are_generated_once_per_service_and_kept(tmp_path: Path) -> None:
    paths = ensure_tokens(tmp_path, ["artist", "song"])
    token = read_token(paths["artist"])
    assert len(token) >= 40 and token != read_token(paths["song"])
    assert read_token(ensure_tokens(tmp_path, ["artist"])["artist"]) == token
    assert paths["artist"].stat().st_mode & 0o777 == 0o600


def _issue_files(ca: CertificateAuthority, directory: Path, identity: SpiffeId) -> IdentityFiles:
    files = IdentityFiles(directory)
    key = files.load_or_create_key()
    files.save(cert_to_pem(ca.issue_workload(make_csr(key, identity, identity.service), identity,
                                             ttl_s=3600, now=time.time())), ca.bundle_pem)
    return files


def test_mutual_tls_13_between_two_workloads_names_each_peer(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(TD, time.time())
    song = _issue_files(ca, tmp_path / "song", SpiffeId(TD, "song"))
    artist = _issue_files(ca, tmp_path / "artist", ARTIST)
    server_ctx = server_context(artist.cert, artist.key, artist.bundle)
    client_ctx = client_context(song.cert, song.key, song.bundle)
    a, b = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as tls:
            seen["client"] = peer_identity(tls)
            seen["version"] = tls.version()

    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(b, server_hostname=None) as tls:
        assert peer_identity(tls) == ARTIST
    t.join(5)
    assert seen == {"client": SpiffeId(TD, "song"), "version": "TLSv1.3"}


def test_a_peer_without_a_mesh_certificate_fails_the_handshake(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(TD, time.time())
    impostor_ca = CertificateAuthority.create(TD, time.time())
    artist = _issue_files(ca, tmp_path / "artist", ARTIST)
    impostor = _issue_files(impostor_ca, tmp_path / "impostor", ARTIST)
    server_ctx = server_context(impostor.cert, impostor.key, impostor.bundle)
    client_ctx = client_context(artist.cert, artist.key, artist.bundle)
    a, b = socket.socketpair()

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(ssl.SSLCertVerificationError):
        client_ctx.wrap_socket(b, server_hostname=None)
    t.join(5)


def _pem(der: bytes, label: str) -> bytes:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n".encode()


def _csr_with_uris(key: PrivateKey, uris: list[str]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_csr_identity_names_the_one_service_a_csr_asks_for_in_any_trust_domain() -> None:
    assert csr_identity(make_csr(generate_key(), ARTIST, "artist-1")) == ARTIST
    # the trust domain comes back as asked: refusing a foreign one is the CA holder's decision
    other = SpiffeId("other.td", "artist")
    assert csr_identity(make_csr(generate_key(), other, "a")) == other


def _tampered_csr() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(make_csr(generate_key(), ARTIST, "a")).public_bytes(
        serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    return _pem(bytes(der), "CERTIFICATE REQUEST")


@pytest.mark.parametrize(("case", "reason"), [
    ("garbage", "not a PEM certificate signing request"),
    ("bad signature", "signature does not verify"),
    ("RSA 1024", "RSA key of 1024 bits is too small"),
    ("secp256k1", "EC curve secp256k1 is not accepted"),
    ("no URI SAN", "exactly one URI SAN (a SPIFFE ID); it carries 0"),
    ("two URI SANs", "exactly one URI SAN (a SPIFFE ID); it carries 2"),
    ("not a service identity", "is not a sidemesh service identity"),
])
def test_csr_identity_refuses_what_no_ca_should_sign_and_says_why(case: str, reason: str) -> None:
    csr = {
        "garbage": lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n",
        "bad signature": _tampered_csr,
        "RSA 1024": lambda: make_csr(rsa.generate_private_key(65537, 1024), ARTIST, "a"),
        "secp256k1": lambda: make_csr(ec.generate_private_key(ec.SECP256K1()), ARTIST, "a"),
        "no URI SAN": lambda: _csr_with_uris(generate_key(), []),
        "two URI SANs": lambda: _csr_with_uris(generate_key(), [ARTIST.uri, SpiffeId(TD, "image").uri]),
        "not a service identity": lambda: _csr_with_uris(generate_key(), ["spiffe://sidemesh.local/controlplane"]),
    }[case]()
    with pytest.raises(IdentityError, match=re.escape(reason)):
        csr_identity(csr)


def test_renewal_time_is_half_the_life_left_at_receipt_even_for_a_backdated_short_lived_certificate(
        ca: CertificateAuthority) -> None:
    short = ca.issue_workload(make_csr(generate_key(), ARTIST, "a"), ARTIST, ttl_s=20, now=NOW)
    # not_before is backdated 60 s for clock skew; half-life still counts from the issue time
    assert cert_info(short).renew_at == pytest.approx(NOW + 10, abs=1)
    assert renewal_time(short, NOW) == pytest.approx(NOW + 10, abs=1)
    day = ca.issue_workload(make_csr(generate_key(), ARTIST, "a"), ARTIST, ttl_s=86400, now=NOW)
    assert renewal_time(day, NOW) == pytest.approx(NOW + 43200, abs=1)
    assert renewal_time(short, NOW + 30) == NOW + 30  # already expired: renew now
