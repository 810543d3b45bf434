"""ServiceResolver against real DNS servers on loopback: the mesh's own server, and misbehaving ones.

Real UDP/TCP sockets and real time throughout; TTLs are kept at one second so
the whole module runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from dnsfallback import CachedLookup, DnsConfig, DnsLookupError, DnspythonBackend, ServiceResolver
from sidemesh.dnsserver import MeshDnsServer
from tests.support import free_port, loopback_address

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def mesh_dns() -> AsyncIterator[MeshDnsServer]:
    server = MeshDnsServer("mesh.local", 1)
    await server.start(loopback_address(), 0)
    yield server
    await server.close()


def server_config(server: MeshDnsServer, **overrides: Any) -> DnsConfig:
    assert server.port is not None
    host = server_host(server)
    fields: dict[str, Any] = {
        "nameservers": ((host, server.port),),
        "template": "{service}.mesh.local",
        "timeout_s": 0.3,
        "negative_ttl_s": 0.3,
        **overrides,
    }
    return DnsConfig(**fields)


def server_host(server: MeshDnsServer) -> str:
    assert server._udp is not None  # noqa: SLF001 - the test wants the bound address
    return str(server._udp.get_extra_info("sockname")[0])  # noqa: SLF001


@pytest.fixture
async def resolvers() -> AsyncIterator[Callable[[DnsConfig], ServiceResolver]]:
    made: list[ServiceResolver] = []

    def make(config: DnsConfig) -> ServiceResolver:
        made.append(ServiceResolver(config))
        return made[-1]

    yield make
    for resolver in made:
        await resolver.close()


async def test_several_records_become_several_endpoints(mesh_dns, resolvers) -> None:
    mesh_dns.set_records({"artist": ["127.10.1.1", "127.10.1.2", "127.10.1.3", "::1"]})
    resolver = resolvers(server_config(mesh_dns, port=15006))

    answer = await resolver.resolve("artist")

    assert answer.addresses == ("127.10.1.1", "127.10.1.2", "127.10.1.3", "::1")
    assert answer.endpoints == tuple((a, 15006) for a in answer.addresses)
    assert answer.ttl_s == 1.0 and answer.name == "artist.mesh.local"


async def test_an_ipv4_only_service_resolves_although_aaaa_has_no_records(mesh_dns, resolvers) -> None:
    mesh_dns.set_records({"song": ["127.10.2.1"]})
    assert (await resolvers(server_config(mesh_dns)).resolve("song")).addresses == ("127.10.2.1",)


async def test_record_changes_are_seen_once_the_ttl_has_passed(mesh_dns, resolvers) -> None:
    mesh_dns.set_records({"artist": ["127.10.1.1"]})
    resolver = resolvers(server_config(mesh_dns))
    assert (await resolver.resolve("artist")).addresses == ("127.10.1.1",)

    mesh_dns.set_records({"artist": ["127.10.1.1", "127.10.1.2"]})
    assert (await resolver.resolve("artist")).addresses == ("127.10.1.1",)  # cached for its TTL
    await asyncio.sleep(1.05)
    assert (await resolver.resolve("artist")).addresses == ("127.10.1.1", "127.10.1.2")


async def test_a_watched_name_follows_the_records_without_being_asked(mesh_dns, resolvers) -> None:
    mesh_dns.set_records({"artist": ["127.10.1.1"]})
    resolver = resolvers(server_config(mesh_dns))
    changed = asyncio.Event()
    seen: list[tuple[str, ...]] = []

    def on_change(_service: str, lookup: CachedLookup) -> None:
        if lookup.answer is not None:
            seen.append(lookup.answer.addresses)
            if len(seen) == 2:
                changed.set()

    resolver.on_change(on_change)
    resolver.watch(["artist"])
    await asyncio.sleep(0.2)
    mesh_dns.set_records({"artist": ["127.10.1.2", "127.10.1.3"]})
    started = time.monotonic()
    await asyncio.wait_for(changed.wait(), 3)

    assert time.monotonic() - started < 1.0 + 0.3  # within the TTL (refresh at 0.8 of it)
    assert seen == [("127.10.1.1",), ("127.10.1.2", "127.10.1.3")]
    cached = resolver.peek("artist")
    assert cached is not None and cached.fresh


async def test_unknown_service_is_nxdomain_and_another_zone_is_a_server_failure(mesh_dns, resolvers) -> None:
    resolver = resolvers(server_config(mesh_dns))
    with pytest.raises(DnsLookupError) as err:
        await resolver.resolve("ghost")
    assert err.value.reason == "nxdomain" and err.value.__cause__ is not None

    elsewhere = resolvers(server_config(mesh_dns, template="{service}.example.com"))
    with pytest.raises(DnsLookupError) as refused:
        await elsewhere.resolve("artist")
    assert refused.value.reason == "servfail"  # REFUSED: the server has no authority there


async def test_when_the_server_dies_the_answer_serves_stale_then_fails(mesh_dns, resolvers) -> None:
    mesh_dns.set_records({"artist": ["127.10.1.1", "127.10.1.2"]})
    resolver = resolvers(server_config(mesh_dns, stale_max_s=1.5))
    fresh = await resolver.resolve("artist")
    await mesh_dns.close()
    await asyncio.sleep(1.05)

    started = time.monotonic()
    stale = await resolver.resolve("artist")
    assert time.monotonic() - started < 1.0
    assert stale.addresses == fresh.addresses and stale.expires_at < time.monotonic()
    cached = resolver.peek("artist")
    assert cached is not None and not cached.fresh and cached.error is not None
    assert cached.error.reason == "timeout"

    await asyncio.sleep(1.6)  # past expiry + stale_max
    with pytest.raises(DnsLookupError, match="timeout"):
        await resolver.resolve("artist")


async def test_resolution_recovers_when_the_server_comes_back(resolvers) -> None:
    host, port = loopback_address(), free_port()
    server = MeshDnsServer("mesh.local", 1)
    config = DnsConfig(nameservers=((host, port),), template="{service}.mesh.local", timeout_s=0.3, negative_ttl_s=0.2)
    resolver = resolvers(config)
    with pytest.raises(DnsLookupError, match="timeout"):
        await resolver.resolve("artist")

    server.set_records({"artist": ["127.10.1.9"]})
    await server.start(host, port)
    try:
        await asyncio.sleep(0.25)
        assert (await resolver.resolve("artist")).addresses == ("127.10.1.9",)
    finally:
        await server.close()


async def test_relative_names_use_the_system_search_list(mesh_dns, resolvers) -> None:
    """With no nameservers configured, resolv.conf's servers and search list apply (read off the loop)."""
    mesh_dns.set_records({"artist": ["127.10.1.4"]})

    def fake_resolv_conf() -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [server_host(mesh_dns)]
        resolver.port = mesh_dns.port or 53
        resolver.search = [dns.name.from_text("mesh.local")]
        return resolver

    backend = DnspythonBackend((), timeout_s=0.5, read_system_config=fake_resolv_conf)
    resolver = ServiceResolver(DnsConfig(template="{service}"), backend=backend)
    try:
        assert (await resolver.resolve("artist")).addresses == ("127.10.1.4",)
    finally:
        await resolver.close()


# ---- SRV: each peer's own inbound port ---------------------------------------------------------


async def test_pods_that_name_their_inbound_port_are_resolved_through_srv_on_that_port(mesh_dns, resolvers) -> None:
    mesh_dns.set_records({"artist": [{"address": "127.10.1.1", "port": 15006, "instance": "artist-1"},
                                     {"address": "127.10.1.2", "port": 15106, "instance": "artist-2"}]})
    answer = await resolvers(server_config(mesh_dns, srv=True)).resolve("artist")
    assert answer.via == "srv" and answer.name == "_mesh-inbound._tcp.artist.mesh.local"
    assert answer.endpoints == (("127.10.1.1", 15006), ("127.10.1.2", 15106))
    assert answer.ttl_s == 1.0


async def test_a_service_given_by_address_alone_resolves_on_our_own_inbound_port(mesh_dns, resolvers) -> None:
    mesh_dns.set_records({"song": ["127.10.2.1"]})
    answer = await resolvers(server_config(mesh_dns, srv=True, port=15006)).resolve("song")
    assert answer.via == "a" and answer.endpoints == (("127.10.2.1", 15006),)


async def test_srv_targets_left_out_of_a_full_datagram_are_looked_up_one_by_one(mesh_dns, resolvers) -> None:
    # nine pods: their SRV records fill a 512-byte datagram, so the server sends them without the addresses
    pods = [{"address": f"127.10.1.{i}", "port": 15100 + i, "instance": f"artist-{i}"} for i in range(1, 10)]
    mesh_dns.set_records({"artist": pods})
    answer = await resolvers(server_config(mesh_dns, srv=True)).resolve("artist")
    assert answer.endpoints == tuple((f"127.10.1.{i}", 15100 + i) for i in range(1, 10))


async def test_srv_garbage_from_a_server_falls_back_to_its_a_records(evil_server, resolvers) -> None:
    def reply(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        if query.question[0].rdtype == dns.rdatatype.SRV:
            return wire[:2] + b"\x85\x80\x00\x01\x00\x01 garbage where the SRV record should be"
        response = dns.message.make_response(query)
        if query.question[0].rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(query.question[0].name, 5, "IN", "A", "127.10.1.7"))
        return response.to_wire()

    config, protocol = await evil_server(reply)
    resolver = resolvers(DnsConfig(nameservers=config.nameservers, template="{service}.mesh.local", srv=True,
                                   port=15006, timeout_s=1.0))
    answer = await resolver.resolve("artist")
    assert answer.via == "a" and answer.endpoints == (("127.10.1.7", 15006),)
    assert protocol.queries >= 2


# ---- servers that misbehave -----------------------------------------------------------------


class _EvilUdp(asyncio.DatagramProtocol):
    def __init__(self, reply: Callable[[bytes], bytes | None]) -> None:
        self.reply = reply
        self.transport: Any = None
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.queries += 1
        out = self.reply(data)
        if out is not None:
            self.transport.sendto(out, addr)


async def _junk_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(2)
    writer.write(b"\x00\x05junk!")
    await writer.drain()
    writer.close()


@pytest.fixture
async def evil_server() -> AsyncIterator[Callable[[Callable[[bytes], bytes | None]], Any]]:
    """A UDP+TCP server on loopback that answers with whatever the test's reply function makes."""
    closers: list[Any] = []

    async def start(reply: Callable[[bytes], bytes | None]) -> tuple[DnsConfig, _EvilUdp]:
        host, port = loopback_address(), free_port()
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(lambda: _EvilUdp(reply), local_addr=(host, port))
        tcp = await asyncio.start_server(_junk_tcp, host, port)
        closers.extend([transport.close, tcp.close])
        config = DnsConfig(nameservers=((host, port),), template="{service}.mesh.local", timeout_s=2.0)
        return config, protocol

    yield start
    for close in closers:
        close()


def _answer_with(mutate: Callable[[dns.message.Message], None]) -> Callable[[bytes], bytes]:
    def reply(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        mutate(response)
        return response.to_wire()

    return reply


def _wrong_id(response: dns.message.Message) -> None:
    response.id = (response.id + 1) % 65536


def _truncated(response: dns.message.Message) -> None:
    response.flags |= dns.flags.TC


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(lambda _wire: b"\x13\x37 this is not a DNS message at all", id="garbage"),
        pytest.param(lambda wire: wire[:2] + b"\x81", id="short-header"),
        pytest.param(_answer_with(_wrong_id), id="wrong-id"),
        pytest.param(_answer_with(_truncated), id="truncated-then-junk-over-tcp"),
    ],
)
async def test_garbage_from_the_server_is_a_bad_response_not_a_hang(evil_server, resolvers, reply) -> None:
    config, protocol = await evil_server(reply)
    resolver = resolvers(config)

    started = time.monotonic()
    with pytest.raises(DnsLookupError) as err:
        await resolver.resolve("artist")

    assert err.value.reason == "bad_response"
    assert time.monotonic() - started < config.timeout_s  # failed fast, did not wait for the time limit
    assert protocol.queries >= 1


async def test_a_silent_server_is_a_timeout_bounded_by_the_configured_limit(evil_server, resolvers) -> None:
    config, _ = await evil_server(lambda _wire: None)
    resolver = resolvers(DnsConfig(nameservers=config.nameservers, timeout_s=0.3))

    started = time.monotonic()
    with pytest.raises(DnsLookupError, match="timeout"):
        await resolver.resolve("artist")
    assert time.monotonic() - started < 1.0
