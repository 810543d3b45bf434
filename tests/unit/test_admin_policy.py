"""The admin policy for state-changing HTTP requests, in both copies (control plane; DNS server and
`sidemesh up`'s control API): an allowed peer address or the bearer token, nothing else."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType

import pytest

import controlplane.adminauth
import sidemesh.adminauth

COPIES = [controlplane.adminauth, sidemesh.adminauth]


@pytest.fixture(params=COPIES, ids=["controlplane", "sidemesh"])
def auth(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def test_loopback_peers_are_allowed_by_default_and_others_are_not(auth: ModuleType) -> None:
    policy = auth.AdminPolicy()
    for peer in ("127.0.0.1", "127.10.0.1", "127.255.255.254", "::1", "::ffff:127.0.0.9"):
        assert policy.denial(peer, None) is None, peer
    outsiders: tuple[str | None, ...] = ("10.0.0.1", "172.17.0.1", "::2", "fe80::1%eth0", "", None, "garbage")
    for outsider in outsiders:
        assert policy.denial(outsider, None) == "no_token_configured", outsider


def test_the_bearer_token_lets_any_peer_in_and_a_wrong_one_does_not(auth: ModuleType) -> None:
    policy = auth.AdminPolicy(auth.parse_networks("127.0.0.1/32"), "s3cret")
    assert policy.denial("127.0.0.9", "Bearer s3cret") is None
    assert policy.denial("10.1.2.3", "bearer s3cret") is None  # the scheme is case-insensitive (RFC 7235 2.1)
    assert policy.denial("10.1.2.3", "BEARER  s3cret ") is None
    assert policy.denial("127.0.0.9", None) == "no_token"
    assert policy.denial("127.0.0.9", "Bearer s3cret2") == "bad_token"
    assert policy.denial("127.0.0.9", "Bearer S3CRET") == "bad_token"  # the token itself is not
    assert policy.denial("127.0.0.9", "Basic s3cret") == "bad_token"
    assert policy.denial("127.0.0.9", "s3cret") == "bad_token"
    assert policy.denial("127.0.0.1", "Bearer wrong") is None  # an allowed address needs no token


def test_without_a_configured_token_no_authorization_header_opens_the_door(auth: ModuleType) -> None:
    policy = auth.AdminPolicy(auth.parse_networks("127.0.0.1/32"), None)
    assert policy.denial("127.0.0.9", "Bearer ") == "no_token_configured"
    assert policy.denial("127.0.0.9", "Bearer None") == "no_token_configured"


def test_an_empty_allow_list_admits_only_the_token(auth: ModuleType) -> None:
    policy = auth.AdminPolicy(auth.parse_networks(""), "t")
    assert policy.denial("127.0.0.1", None) == "no_token"
    assert policy.denial("127.0.0.1", "Bearer t") is None


def test_the_explanation_says_what_was_refused_and_how_to_get_in(auth: ModuleType) -> None:
    policy = auth.AdminPolicy(auth.parse_networks("127.0.0.1/32"), None)
    text = policy.explain("no_token_configured", "PUT", "/records", "127.0.0.9")
    assert "PUT /records" in text and "127.0.0.1/32" in text and "peer 127.0.0.9" in text
    assert "--admin-token-file" in text and "SIDEMESH_ADMIN_TOKEN" in text
    assert "does not match" in auth.AdminPolicy(token="x").explain("bad_token", "POST", "/kill", "10.0.0.1")


@pytest.mark.parametrize("bad", ["localhost", "127.0.0.1/33", "10.0.0.0/8,nope"])
def test_bad_networks_are_refused_with_the_culprit_named(auth: ModuleType, bad: str) -> None:
    with pytest.raises(ValueError, match="not an IP network"):
        auth.parse_networks(bad)


def test_the_token_never_appears_in_the_policys_repr(auth: ModuleType) -> None:
    assert "hunter2" not in repr(auth.AdminPolicy(token="hunter2"))


def test_clients_send_the_token_from_the_environment_when_it_is_set() -> None:
    assert sidemesh.adminauth.client_headers({"SIDEMESH_ADMIN_TOKEN": "t0k"}) == {"Authorization": "Bearer t0k"}
    assert sidemesh.adminauth.client_headers({"SIDEMESH_ADMIN_TOKEN": " "}) == {}
    assert sidemesh.adminauth.client_headers({}) == {}


def test_sidemesh_servers_read_allow_and_token_from_flags_or_env(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    sidemesh.adminauth.add_admin_arguments(parser, {"SIDEMESH_ADMIN_ALLOW": "10.0.0.0/8"}, "PUT /records")
    args = parser.parse_args([])
    policy = sidemesh.adminauth.policy_from_args(args, {"SIDEMESH_ADMIN_TOKEN": "envtok"})
    assert ([str(n) for n in policy.allow], policy.token) == (["10.0.0.0/8"], "envtok")
    token_file = tmp_path / "t"
    token_file.write_text("filetok\n")
    args = parser.parse_args(["--admin-token-file", str(token_file), "--admin-allow", "127.0.0.1"])
    policy = sidemesh.adminauth.policy_from_args(args, {})
    assert ([str(n) for n in policy.allow], policy.token) == (["127.0.0.1/32"], "filetok")
    with pytest.raises(ValueError, match="not both"):
        sidemesh.adminauth.policy_from_args(parser.parse_args(["--admin-token", "a", "--admin-token-file", "f"]), {})
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        sidemesh.adminauth.policy_from_args(parser.parse_args(["--admin-token-file", str(token_file)]), {})
    assert sidemesh.adminauth.policy_from_env({}).allow == sidemesh.adminauth.AdminPolicy().allow
