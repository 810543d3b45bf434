"""What the mesh DNS server answers, tested on its pure parts (wire in, wire out, no sockets)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from sidemesh.dnsserver import MeshDnsServer, RecordsError, validate_records


@pytest.fixture
def server() -> MeshDnsServer:
    s = MeshDnsServer("mesh.local", 2)
    s.set_records({"artist": ["127.10.1.1", "127.10.1.2", "::1"], "song": ["127.10.2.1"], "idle": []})
    return s


def ask(server: MeshDnsServer, name: str, rdtype: str = "A", *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    wire = server.handle_wire(query.to_wire(), tcp=tcp)
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert response.id == query.id and query.is_response(response)
    return response


def addresses(response: dns.message.Message) -> set[str]:
    return {rdata.address for rrset in response.answer for rdata in rrset}


def test_a_service_name_answers_authoritatively_with_every_ipv4_address(server: MeshDnsServer) -> None:
    response = ask(server, "artist.mesh.local", "A")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert addresses(response) == {"127.10.1.1", "127.10.1.2"}
    assert all(rrset.ttl == 2 for rrset in response.answer)


def test_aaaa_gets_the_ipv6_addresses_and_names_are_case_insensitive(server: MeshDnsServer) -> None:
    assert addresses(ask(server, "ARTIST.Mesh.Local", "AAAA")) == {"::1"}


def test_unknown_name_in_the_zone_is_nxdomain_with_the_soa_for_negative_caching(server: MeshDnsServer) -> None:
    response = ask(server, "ghost.mesh.local")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name == dns.name.from_text("mesh.local")
    assert soa.ttl == 2 and soa[0].minimum == 2


def test_names_below_a_service_do_not_exist(server: MeshDnsServer) -> None:
    assert ask(server, "x.artist.mesh.local").rcode() == dns.rcode.NXDOMAIN


def test_a_known_name_without_records_of_that_type_is_nodata(server: MeshDnsServer) -> None:
    for name, rdtype in [("song.mesh.local", "AAAA"), ("idle.mesh.local", "A"), ("song.mesh.local", "TXT")]:
        response = ask(server, name, rdtype)
        assert response.rcode() == dns.rcode.NOERROR and not response.answer
        assert response.authority and response.authority[0].rdtype == dns.rdatatype.SOA


def test_names_outside_the_zone_are_refused_without_authority(server: MeshDnsServer) -> None:
    response = ask(server, "example.com")
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA


def test_the_zone_apex_answers_its_soa(server: MeshDnsServer) -> None:
    response = ask(server, "mesh.local", "SOA")
    assert response.answer and response.answer[0].rdtype == dns.rdatatype.SOA


def test_records_updates_change_the_answer_and_bump_the_soa_serial(server: MeshDnsServer) -> None:
    serial_before = ask(server, "ghost.mesh.local").authority[0][0].serial
    server.set_records({"Artist": ["127.10.1.3"]})
    assert server.records() == {"artist": ["127.10.1.3"]}
    assert addresses(ask(server, "artist.mesh.local")) == {"127.10.1.3"}
    assert ask(server, "song.mesh.local").rcode() == dns.rcode.NXDOMAIN
    assert ask(server, "ghost.mesh.local").authority[0][0].serial == serial_before + 1


def test_garbage_and_responses_get_silence_not_an_exception(server: MeshDnsServer) -> None:
    response_wire = dns.message.make_response(dns.message.make_query("artist.mesh.local", "A")).to_wire()
    for junk in [b"", b"\x00", b"\xff" * 12, b"hello world, this is not DNS", bytes(range(256)), response_wire]:
        assert server.handle_wire(junk, tcp=False) is None
    assert server.stats["garbage"] == 6
    assert addresses(ask(server, "song.mesh.local")) == {"127.10.2.1"}


def test_other_opcodes_are_not_implemented(server: MeshDnsServer) -> None:
    query = dns.message.make_query("artist.mesh.local", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    wire = server.handle_wire(query.to_wire(), tcp=False)
    assert wire is not None and dns.message.from_wire(wire).rcode() == dns.rcode.NOTIMP


def test_an_answer_too_big_for_udp_is_truncated_and_complete_over_tcp() -> None:
    server = MeshDnsServer("mesh.local", 2)
    many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(200)]
    server.set_records({"big": many})
    query = dns.message.make_query("big.mesh.local", "A", use_edns=False)

    udp = dns.message.from_wire(server.handle_wire(query.to_wire(), tcp=False) or b"")
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = dns.message.from_wire(server.handle_wire(query.to_wire(), tcp=True) or b"")
    assert not tcp.flags & dns.flags.TC and len(addresses(tcp)) == 200


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (["artist"], "JSON object"),
        ({"bad_name": ["10.0.0.1"]}, "DNS label"),
        ({"-artist": ["10.0.0.1"]}, "DNS label"),
        ({"a" * 64: ["10.0.0.1"]}, "DNS label"),
        ({"artist": "10.0.0.1"}, "list of strings"),
        ({"artist": ["artist-1.local"]}, "IPv4 or IPv6"),
        ({"artist": ["10.0.0.256"]}, "IPv4 or IPv6"),
        ({"artist": ["10.0.0.1"], "ARTIST": ["10.0.0.2"]}, "twice"),
    ],
)
def test_bad_records_are_rejected_with_a_reason(records: object, message: str) -> None:
    with pytest.raises(RecordsError, match=message):
        validate_records(records)


def test_a_rejected_update_leaves_the_served_records_alone(server: MeshDnsServer) -> None:
    before = server.records()
    with pytest.raises(RecordsError):
        server.set_records({"artist": ["nope"]})
    assert server.records() == before


def test_zone_and_ttl_are_validated() -> None:
    with pytest.raises(ValueError, match="ttl"):
        MeshDnsServer("mesh.local", -1)
    with pytest.raises(ValueError, match="root"):
        MeshDnsServer(".", 2)


# ----- SRV: each pod's sidecar inbound port -----------------------------------------------------

PODS = {
    "artist": [{"address": "127.10.1.1", "port": 15006, "instance": "artist-1"},
               {"address": "127.10.1.2", "port": 15106, "instance": "artist-2"},
               {"address": "::2", "port": 15206}],
    "song": ["127.10.2.1"],
}


@pytest.fixture
def pods() -> MeshDnsServer:
    s = MeshDnsServer("mesh.local", 2)
    s.set_records(PODS)
    return s


def srv_records(response: dns.message.Message) -> list[tuple[int, int, int, str]]:
    return sorted((r.priority, r.weight, r.port, r.target.to_text()) for rrset in response.answer for r in rrset)


def test_the_srv_name_of_a_service_gives_one_record_per_pod_with_its_own_port(pods: MeshDnsServer) -> None:
    response = ask(pods, "_mesh-inbound._tcp.artist.mesh.local", "SRV")
    assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.AA
    assert srv_records(response) == [
        (0, 1, 15006, "artist-1.artist.mesh.local."),
        (0, 1, 15106, "artist-2.artist.mesh.local."),
        (0, 1, 15206, "0000-0000-0000-0000-0000-0000-0000-0002.artist.mesh.local."),
    ]
    assert response.answer[0].ttl == 2


def test_the_targets_addresses_come_along_in_the_additional_section(pods: MeshDnsServer) -> None:
    response = ask(pods, "_mesh-inbound._tcp.artist.mesh.local", "SRV")
    extra = {(rrset.name.to_text(), rdata.address) for rrset in response.additional for rdata in rrset
             if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)}
    assert extra == {("artist-1.artist.mesh.local.", "127.10.1.1"), ("artist-2.artist.mesh.local.", "127.10.1.2"),
                     ("0000-0000-0000-0000-0000-0000-0000-0002.artist.mesh.local.", "::2")}


def test_a_pods_name_resolves_to_its_address_and_the_service_name_to_all(pods: MeshDnsServer) -> None:
    assert addresses(ask(pods, "artist-2.artist.mesh.local", "A")) == {"127.10.1.2"}
    assert addresses(ask(pods, "ARTIST-1.artist.mesh.local", "A")) == {"127.10.1.1"}
    assert ask(pods, "artist-2.artist.mesh.local", "AAAA").rcode() == dns.rcode.NOERROR  # NODATA
    assert addresses(ask(pods, "artist.mesh.local", "A")) == {"127.10.1.1", "127.10.1.2"}
    assert ask(pods, "artist-9.artist.mesh.local", "A").rcode() == dns.rcode.NXDOMAIN


def test_a_service_without_ports_has_no_srv_name_so_callers_fall_back_to_its_a_records(pods: MeshDnsServer) -> None:
    response = ask(pods, "_mesh-inbound._tcp.song.mesh.local", "SRV")
    assert response.rcode() == dns.rcode.NXDOMAIN and not response.answer
    assert addresses(ask(pods, "song.mesh.local")) == {"127.10.2.1"}
    assert ask(pods, "_mesh-inbound._tcp.ghost.mesh.local", "SRV").rcode() == dns.rcode.NXDOMAIN


def test_the_names_between_service_and_srv_name_exist_so_minimising_resolvers_find_it(pods: MeshDnsServer) -> None:
    response = ask(pods, "_tcp.artist.mesh.local", "A")
    assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert ask(pods, "_udp.artist.mesh.local", "A").rcode() == dns.rcode.NXDOMAIN
    assert ask(pods, "_other._tcp.artist.mesh.local", "SRV").rcode() == dns.rcode.NXDOMAIN
    nodata = ask(pods, "_mesh-inbound._tcp.artist.mesh.local", "A")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority


def test_pods_are_shown_as_given_with_their_names_filled_in(pods: MeshDnsServer) -> None:
    assert pods.records() == {
        "artist": [{"address": "127.10.1.1", "port": 15006, "instance": "artist-1"},
                   {"address": "127.10.1.2", "port": 15106, "instance": "artist-2"},
                   {"address": "::2", "port": 15206, "instance": "0000-0000-0000-0000-0000-0000-0000-0002"}],
        "song": ["127.10.2.1"],
    }


def test_an_srv_answer_too_big_for_udp_goes_without_its_additional_section_first() -> None:
    server = MeshDnsServer("mesh.local", 2)
    server.set_records({"big": [{"address": f"10.0.0.{i}", "port": 15006, "instance": f"big-{i}"}
                                for i in range(1, 11)]})
    query = dns.message.make_query("_mesh-inbound._tcp.big.mesh.local", "SRV", use_edns=False)
    udp = dns.message.from_wire(server.handle_wire(query.to_wire(), tcp=False) or b"")
    assert not udp.flags & dns.flags.TC and len(srv_records(udp)) == 10 and not udp.additional
    tcp = dns.message.from_wire(server.handle_wire(query.to_wire(), tcp=True) or b"")
    assert len(srv_records(tcp)) == 10 and len(tcp.additional) == 10


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"artist": [{"address": "10.0.0.1"}]}, "address, port"),
        ({"artist": [{"address": "10.0.0.1", "port": 15006, "weight": 3}]}, "address, port"),
        ({"artist": [{"address": "10.0.0.1", "port": 0}]}, "1..65535"),
        ({"artist": [{"address": "10.0.0.1", "port": "15006"}]}, "1..65535"),
        ({"artist": [{"address": "10.0.0.1", "port": True}]}, "1..65535"),
        ({"artist": [{"address": "nope", "port": 15006}]}, "IPv4 or IPv6"),
        ({"artist": [{"address": "10.0.0.1", "port": 15006, "instance": "no_underscores"}]}, "DNS label"),
        ({"artist": [{"address": "10.0.0.1", "port": 15006}, "10.0.0.2"]}, "all give a port or none"),
        ({"artist": [{"address": "10.0.0.1", "port": 15006, "instance": "a"},
                     {"address": "10.0.0.2", "port": 15006, "instance": "a"}]}, "two addresses"),
        ({"artist": [7]}, "list of strings"),
    ],
)
def test_bad_pods_are_rejected_with_a_reason(records: object, message: str) -> None:
    with pytest.raises(RecordsError, match=message):
        validate_records(records)


def test_a_pod_name_too_long_for_the_zone_is_rejected_when_set() -> None:
    server = MeshDnsServer(".".join(["z" * 60] * 3), 2)
    with pytest.raises(RecordsError, match="too long"):
        server.set_records({"s" * 63: [{"address": "10.0.0.1", "port": 15006, "instance": "i" * 63}]})
