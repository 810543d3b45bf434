"""DnsConfig validation, nameserver parsing, and how dnspython's failures map to DnsLookupError reasons."""

from __future__ import annotations

import dns.exception
import dns.message
import dns.resolver
import pytest

from dnsfallback import DnsConfig, DnsLookupError, parse_nameserver
from dnsfallback.backend import classify_server_errors, convert_error, merge_outcomes, sort_addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.2", ("10.0.0.2", 53)),
        ("127.10.0.3:15053", ("127.10.0.3", 15053)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        (" 127.0.0.11 ", ("127.0.0.11", 53)),
    ],
)
def test_nameserver_flags_parse_to_address_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["dns.example:53", "10.0.0.2:0", "10.0.0.2:x", "[::1", "[::1]x", "10.0.0.2:70000"])
def test_bad_nameserver_flags_are_rejected_with_the_culprit_named(text: str) -> None:
    with pytest.raises(ValueError, match="DNS server"):
        parse_nameserver(text)


def test_config_rejects_nonsense_early() -> None:
    with pytest.raises(ValueError, match="service"):
        DnsConfig(template="artist.mesh.local")
    with pytest.raises(ValueError, match="timeout_s"):
        DnsConfig(timeout_s=0)
    with pytest.raises(ValueError, match="refresh_ahead"):
        DnsConfig(refresh_ahead=1.5)
    with pytest.raises(ValueError, match="min_ttl_s"):
        DnsConfig(min_ttl_s=10, max_ttl_s=5)
    with pytest.raises(ValueError, match="IP address"):
        DnsConfig(nameservers=(("dns.example", 53),))
    with pytest.raises(ValueError, match="port"):
        DnsConfig(port=0)


def test_config_fills_the_template_and_clamps_ttls() -> None:
    config = DnsConfig(template="{service}.mesh.local", min_ttl_s=1, max_ttl_s=60)
    assert config.name_for("artist") == "artist.mesh.local"
    assert (config.clamp_ttl(0), config.clamp_ttl(30), config.clamp_ttl(3600)) == (1, 30, 60)


def test_addresses_are_deduplicated_and_ordered_ipv4_first() -> None:
    assert sort_addresses(["::1", "10.0.0.10", "10.0.0.9", "10.0.0.10", "fe80::1"]) == (
        "10.0.0.9",
        "10.0.0.10",
        "::1",
        "fe80::1",
    )


def _err(reason: str) -> DnsLookupError:
    return DnsLookupError("", "artist.mesh.local", reason)  # type: ignore[arg-type]


def test_nxdomain_wins_over_a_transport_failure_of_the_other_family() -> None:
    with pytest.raises(DnsLookupError, match="nxdomain"):
        merge_outcomes("artist.mesh.local", [_err("nxdomain"), _err("timeout")])


def test_a_transport_failure_wins_over_an_empty_answer_of_the_other_family() -> None:
    with pytest.raises(DnsLookupError, match="timeout"):
        merge_outcomes("artist.mesh.local", [_err("no_answer"), _err("timeout")])


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        (dns.message.ShortHeader(), "bad_response"),
        (dns.message.Truncated(), "bad_response"),
        ("SERVFAIL", "servfail"),
        ("REFUSED", "servfail"),
        (ConnectionRefusedError(), "unreachable"),
        (dns.exception.Timeout(), "timeout"),
    ],
)
def test_per_server_errors_of_dnspython_map_to_a_reason(problem: object, reason: str) -> None:
    assert classify_server_errors([("Do53:127.0.0.1@53", False, 53, problem, None)], "timeout") == reason


def test_garbage_outranks_a_timeout_in_a_mixed_failure() -> None:
    errors = [
        ("Do53:127.0.0.1@53", False, 53, dns.exception.Timeout(), None),
        ("Do53:127.0.0.2@53", False, 53, dns.message.BadEDNS(), None),
    ]
    assert classify_server_errors(errors, "timeout") == "bad_response"


def test_dnspython_exceptions_are_converted_at_the_boundary() -> None:
    name = "artist.mesh.local"
    assert convert_error(dns.resolver.NXDOMAIN(), name).reason == "nxdomain"
    assert convert_error(dns.resolver.NoAnswer(), name).reason == "no_answer"
    assert convert_error(dns.resolver.LifetimeTimeout(timeout=1.0, errors=[]), name).reason == "timeout"
    assert convert_error(OSError("no route"), name).reason == "unreachable"
    assert convert_error(dns.exception.SyntaxError("odd"), name).reason == "bad_response"
    request = dns.message.make_query(name, "A")
    servfail = dns.resolver.NoNameservers(request=request, errors=[("Do53:10.0.0.1@53", False, 53, "SERVFAIL", None)])
    assert convert_error(servfail, name).reason == "servfail"
