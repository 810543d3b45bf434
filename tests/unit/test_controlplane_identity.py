"""The control plane's identity decisions without the network: flags, authorization rules, what a
stream may claim, join tokens, the Issue rules, and how authorization rides in the snapshot."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from controlplane import convert
from controlplane.authn import (
    ADDRESS_MISMATCH,
    NO_CERTIFICATE,
    NODE_ID_HELD,
    NOT_A_SERVICE,
    SERVICE_MISMATCH,
    PeerCertificate,
    Refusal,
    address_matches,
    check_stream_claims,
    peer_address,
    peer_certificate,
)
from controlplane.authz import AuthorizationRules, RuleError, parse_allow
from controlplane.config import ConfigError, ControlPlaneConfig, parse_args, parse_duration
from controlplane.issuer import (
    BAD_TOKEN,
    IDENTITY_MISMATCH,
    JOIN_TOKENS_OFF,
    NO_TOKEN,
    TOKEN_FOR_OTHER_SERVICE,
    WRONG_TRUST_DOMAIN,
    IssueRefusal,
    Issuer,
)
from controlplane.model import Authorization, Hello, IssueRequest, ServicePolicy, ServiceRoutes, Snapshot
from controlplane.tokens import JoinTokens, bearer_token
from identity.certs import CertificateAuthority, cert_from_pem, cert_to_pem, generate_key, make_csr, spiffe_id_of
from identity.spiffe import SpiffeId
from identity.store import ensure_tokens, read_token
from meshpb.v1 import discovery_pb2

NOW = 1_800_000_000.0
TD = "sidemesh.local"
ARTIST, IMAGE = SpiffeId(TD, "artist"), SpiffeId(TD, "image")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD, NOW)


# --- flags -----------------------------------------------------------------------------------

def test_the_control_plane_is_secure_by_default_with_the_documented_defaults() -> None:
    cfg = parse_args([], env={})
    assert cfg.insecure is False
    assert (cfg.ca_dir, cfg.trust_domain, cfg.cert_ttl_s) == (Path("/var/lib/sidemesh/ca"), "sidemesh.local", 86400)
    assert (cfg.join_tokens, cfg.identity_port, cfg.allow.enforced) == (None, 15012, False)
    assert cfg.server_names[:2] == ("controlplane", "localhost")
    assert cfg.serving_ips == ()  # 0.0.0.0 names no address


def test_identity_flags_reach_the_config_and_env_vars_are_their_fallbacks(tmp_path: Path) -> None:
    env = {"SIDEMESH_CP_INSECURE": "1", "SIDEMESH_CP_CA_DIR": str(tmp_path), "SIDEMESH_CP_TRUST_DOMAIN": "corp.example",
           "SIDEMESH_CP_CERT_TTL": "90m", "SIDEMESH_CP_JOIN_TOKENS": str(tmp_path / "t"),
           "SIDEMESH_CP_IDENTITY_PORT": "16012", "SIDEMESH_CP_SERVER_NAMES": "cp.corp.example, CP2"}
    cfg = parse_args([], env=env)
    assert (cfg.insecure, cfg.ca_dir, cfg.trust_domain, cfg.cert_ttl_s) == (True, tmp_path, "corp.example", 5400)
    assert (cfg.join_tokens, cfg.identity_port, cfg.server_names) == (tmp_path / "t", 16012, ("cp.corp.example", "cp2"))
    cfg = parse_args(["--cert-ttl", "20s", "--server-name", "cp.example", "--listen", "127.0.0.7", "--allow",
                      "song->artist,song->image", "--allow", "artist->image"], env={"SIDEMESH_CP_ALLOW": "x->y"})
    assert cfg.cert_ttl_s == 20 and cfg.serving_dns_names == ("controlplane", "cp.example")
    assert cfg.serving_ips == ("127.0.0.7",)
    assert cfg.allow.texts() == ["artist->image", "song->artist", "song->image"]
    assert parse_args([], env={"SIDEMESH_CP_ALLOW": "song->artist"}).allow.texts() == ["song->artist"]


@pytest.mark.parametrize(("text", "seconds"), [("20s", 20), ("90m", 5400), ("24h", 86400), ("3600", 3600),
                                               ("1.5h", 5400), ("7d", 604800)])
def test_cert_ttl_accepts_seconds_minutes_hours_days_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("argv", [
    ["--cert-ttl", "0"], ["--cert-ttl", "soon"], ["--cert-ttl", "-5m"], ["--trust-domain", "Not A Domain"],
    ["--server-name", "bad name"], ["--allow", "song"], ["--allow", "song->Artist"], ["--allow", "->artist"],
    ["--insecure", "--allow", "song->artist"], ["--identity-port", "15010"], ["--identity-port", "99999"],
])
def test_bad_identity_flags_exit_2_with_the_reason(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv, env={})
    assert info.value.code == 2
    assert "sidemesh controlplane: error:" in capsys.readouterr().err


def test_an_insecure_env_value_that_is_not_a_boolean_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args([], env={"SIDEMESH_CP_INSECURE": "maybe"})
    assert "SIDEMESH_CP_INSECURE" in capsys.readouterr().err


def test_a_config_that_would_enforce_rules_without_identities_cannot_be_built() -> None:
    with pytest.raises(ConfigError, match="cannot be combined with --insecure"):
        ControlPlaneConfig(insecure=True, allow=parse_allow(["song->artist"]))


# --- authorization rules ---------------------------------------------------------------------------

def test_rules_make_every_service_deny_by_default_and_name_its_callers() -> None:
    rules = parse_allow(["song->artist,song->image", " artist->image "])
    assert rules.for_service("artist") == Authorization(True, ("song",))
    assert rules.for_service("image") == Authorization(True, ("artist", "song"))
    assert rules.for_service("song") == Authorization(True, ())
    assert rules.for_service("newcomer") == Authorization(True, ())
    assert rules.as_json() == {"enforced": True, "rules": ["artist->image", "song->artist", "song->image"]}


def test_no_rules_enforce_nothing_and_leave_the_policy_as_it_was() -> None:
    assert AuthorizationRules().for_service("artist") == Authorization(False, ())
    cfg = ControlPlaneConfig(policies={"artist": ServicePolicy(timeout_ms=9)})
    assert cfg.policy_for("artist") == ServicePolicy(timeout_ms=9)


def test_rules_are_added_to_the_configured_policies() -> None:
    cfg = ControlPlaneConfig(policies={"artist": ServicePolicy(timeout_ms=9)}, allow=parse_allow(["song->artist"]))
    assert cfg.policy_for("artist") == ServicePolicy(timeout_ms=9, authorization=Authorization(True, ("song",)))
    assert cfg.policy_for("song").authorization == Authorization(True, ())


@pytest.mark.parametrize("bad", ["song", "song->", "Song->artist", "song=>artist", "song->artist->image"])
def test_a_rule_that_is_not_two_service_names_is_refused(bad: str) -> None:
    with pytest.raises(RuleError, match="--allow"):
        parse_allow([bad])


def test_authorization_rides_in_the_snapshot_and_in_the_budget_and_is_absent_when_not_enforced() -> None:
    open_policy, closed = ServicePolicy(), ServicePolicy(authorization=Authorization(True, ("image", "song")))
    snap = Snapshot("1", (ServiceRoutes("artist", (), closed), ServiceRoutes("song", (), open_policy)))
    wire = discovery_pb2.Snapshot.FromString(convert.encode_snapshot(snap))
    artist, song = wire.services
    assert (artist.policy.authorization.enforced, list(artist.policy.authorization.allowed_callers)) == (
        True, ["image", "song"])
    assert not song.policy.HasField("authorization")  # encodes exactly as before identities
    frame_open = convert.service_frame_bytes("artist", open_policy)
    assert convert.service_frame_bytes("artist", closed) >= frame_open + len("imagesong")


# --- what a stream may claim -----------------------------------------------------------------------

def _peer(ca: CertificateAuthority, identity: SpiffeId) -> tuple[PeerCertificate, bytes]:
    cert = ca.issue_workload(make_csr(generate_key(), identity, "n"), identity, ttl_s=600, now=NOW)
    pem = cert_to_pem(cert)
    return peer_certificate({"x509_pem_cert": [pem]}, TD), pem


def _hello(service: str = "artist", address: str = "127.0.0.1", node_id: str = "artist-1") -> Hello:
    return Hello(node_id=node_id, service=service, address=address, port=15006)


def test_the_peer_certificate_gives_the_service_key_fingerprint_and_expiry(ca: CertificateAuthority) -> None:
    peer, pem = _peer(ca, ARTIST)
    assert peer.identity == ARTIST and len(peer.fingerprint) == 64
    assert peer.not_after == pytest.approx(NOW + 600, abs=1)
    assert _peer(ca, ARTIST)[0].fingerprint != peer.fingerprint  # another key, another fingerprint


def test_a_call_without_a_service_certificate_is_unauthenticated(ca: CertificateAuthority) -> None:
    with pytest.raises(Refusal) as info:
        peer_certificate({}, TD)
    assert (info.value.code, info.value.reason) == ("UNAUTHENTICATED", NO_CERTIFICATE)
    server = ca.issue_server(generate_key(), dns_names=["controlplane"], ips=[], ttl_s=60, now=NOW)
    with pytest.raises(Refusal) as info:
        peer_certificate({"x509_pem_cert": [cert_to_pem(server)]}, TD)
    assert (info.value.code, info.value.reason) == ("UNAUTHENTICATED", NOT_A_SERVICE)
    _, pem = _peer(ca, ARTIST)
    with pytest.raises(Refusal, match="outside trust domain other.td"):
        peer_certificate({"x509_pem_cert": [pem]}, "other.td")


@pytest.mark.parametrize(("peer", "want"), [
    ("ipv4:10.0.0.5:4242", "10.0.0.5"), ("ipv6:[::1]:4242", "::1"), ("ipv6:[::ffff:10.0.0.5]:1", "10.0.0.5"),
    ("ipv6:[fe80::1%eth0]:1", "fe80::1"), ("unix:/tmp/sock", None), ("ipv4:nonsense", None),
])
def test_the_peer_string_gives_the_source_address(peer: str, want: str | None) -> None:
    got = peer_address(peer)
    assert (None if got is None else str(got)) == want


@pytest.mark.parametrize(("advertised", "source", "ok"), [
    ("10.0.0.5", "10.0.0.5", True), ("10.0.0.6", "10.0.0.5", False), ("127.10.1.1", "127.0.0.1", True),
    ("::1", "127.0.0.1", True), ("10.0.0.5", "127.0.0.1", False), ("127.0.0.1", "10.0.0.5", False),
])
def test_a_stream_advertises_its_own_address_or_any_loopback_one_from_loopback(
        advertised: str, source: str, ok: bool) -> None:
    assert address_matches(advertised, ipaddress.ip_address(source)) is ok


def test_a_hello_may_claim_only_what_its_certificate_proves(ca: CertificateAuthority) -> None:
    artist, _ = _peer(ca, ARTIST)
    loopback = ipaddress.ip_address("127.0.0.1")
    check_stream_claims(artist, _hello(), loopback, None)
    check_stream_claims(artist, _hello(), loopback, artist)  # the same key takes its node back
    cases = [
        (_hello(service="image"), loopback, None, SERVICE_MISMATCH, "certificate names service artist, hello claims image"),
        (_hello(address="10.9.8.7"), loopback, None, ADDRESS_MISMATCH, "advertises address 10.9.8.7"),
        (_hello(), loopback, _peer(ca, ARTIST)[0], NODE_ID_HELD, "node_id artist-1 is held"),
    ]
    for hello, source, holder, reason, detail in cases:
        with pytest.raises(Refusal) as info:
            check_stream_claims(artist, hello, source, holder)
        assert (info.value.code, info.value.reason) == ("PERMISSION_DENIED", reason)
        assert detail in info.value.detail


# --- join tokens and the Issue rules -------------------------------------------------------------------

@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer   abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("", None), (None, None),
])
def test_a_bearer_token_is_read_from_an_authorization_value(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_token_files_are_read_on_each_request_and_only_service_named_files_count(tmp_path: Path) -> None:
    tokens = JoinTokens(tmp_path)
    assert tokens.services_for("x") == frozenset()
    paths = ensure_tokens(tmp_path, ["artist"])
    artist = read_token(paths["artist"])
    assert tokens.services_for(artist) == {"artist"}
    (tmp_path / ".artist.swp").write_text("stolen\n")
    (tmp_path / "empty").write_text("\n")
    assert tokens.services_for("stolen") == frozenset() and tokens.services_for("") == frozenset()
    ensure_tokens(tmp_path, ["image"])  # added while running
    assert tokens.services_for(read_token(tmp_path / "image")) == {"image"}
    assert JoinTokens(tmp_path / "missing").services_for(artist) == frozenset()


def _issuer(ca: CertificateAuthority, tmp_path: Path) -> tuple[Issuer, dict[str, str]]:
    paths = ensure_tokens(tmp_path, ["artist", "image"])
    return Issuer(ca, JoinTokens(tmp_path), ttl_s=90, clock=lambda: NOW), {s: read_token(p) for s, p in paths.items()}


def test_a_token_for_the_service_the_csr_names_gets_a_certificate_for_it(
        ca: CertificateAuthority, tmp_path: Path) -> None:
    issuer, tokens = _issuer(ca, tmp_path)
    key = generate_key()
    issued = issuer.issue_with_token(IssueRequest(make_csr(key, ARTIST, "artist-1"), "artist-1"),
                                     f"Bearer {tokens['artist']}")
    cert = cert_from_pem(issued.cert_pem)
    assert spiffe_id_of(cert) == issued.identity == ARTIST
    assert cert.public_key() == key.public_key()
    assert issued.not_after == pytest.approx(NOW + 90, abs=1) and issued.bundle_pem == ca.bundle_pem


@pytest.mark.parametrize(("case", "code", "reason"), [
    ("no token", "UNAUTHENTICATED", NO_TOKEN),
    ("wrong token", "UNAUTHENTICATED", BAD_TOKEN),
    ("artist token, image CSR", "PERMISSION_DENIED", TOKEN_FOR_OTHER_SERVICE),
    ("other trust domain", "INVALID_ARGUMENT", WRONG_TRUST_DOMAIN),
])
def test_each_token_refusal_has_its_status_and_reason(
        case: str, code: str, reason: str, ca: CertificateAuthority, tmp_path: Path) -> None:
    issuer, tokens = _issuer(ca, tmp_path)
    identity = {"artist token, image CSR": IMAGE, "other trust domain": SpiffeId("other.td", "artist")}.get(case, ARTIST)
    header = {"no token": None, "wrong token": "Bearer guess"}.get(case, f"Bearer {tokens['artist']}")
    with pytest.raises(IssueRefusal) as info:
        issuer.issue_with_token(IssueRequest(make_csr(generate_key(), identity, "n")), header)
    assert (info.value.code, info.value.reason) == (code, reason)


def test_without_a_token_directory_first_contact_is_refused_saying_how_to_enable_it(
        ca: CertificateAuthority) -> None:
    issuer = Issuer(ca, JoinTokens(None), ttl_s=90, clock=lambda: NOW)
    with pytest.raises(IssueRefusal) as info:
        issuer.issue_with_token(IssueRequest(make_csr(generate_key(), ARTIST, "n")), "Bearer x")
    assert (info.value.code, info.value.reason) == ("UNAUTHENTICATED", JOIN_TOKENS_OFF)
    assert "--join-tokens" in info.value.detail


def test_a_certificate_renews_only_its_own_identity(ca: CertificateAuthority, tmp_path: Path) -> None:
    issuer, _ = _issuer(ca, tmp_path)
    artist, _ = _peer(ca, ARTIST)
    renewed = issuer.issue_with_certificate(IssueRequest(make_csr(generate_key(), ARTIST, "a")), artist)
    assert renewed.identity == ARTIST
    with pytest.raises(IssueRefusal) as info:
        issuer.issue_with_certificate(IssueRequest(make_csr(generate_key(), IMAGE, "a")), artist)
    assert (info.value.code, info.value.reason) == ("PERMISSION_DENIED", IDENTITY_MISMATCH)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"csr_pem": ""}, "csr_pem is empty"),
    ({"node_id": "a\nb"}, "whitespace or control characters"),
    ({"node_id": "n" * 254}, "longer than 253 bytes"),
])
def test_an_issue_request_with_an_empty_csr_or_an_unloggable_node_id_is_invalid(
        fields: dict[str, str], reason: str) -> None:
    msg = discovery_pb2.IssueRequest(**{"csr_pem": "x", "node_id": "artist-1", **fields})
    with pytest.raises(convert.ProtocolError, match=reason):
        convert.decode_issue_request(msg)
    assert convert.decode_issue_request(discovery_pb2.IssueRequest(csr_pem="x")) == IssueRequest(b"x", "")
