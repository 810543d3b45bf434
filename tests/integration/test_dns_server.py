"""The mesh DNS server on real loopback sockets: survives garbage and bad peers; `sidemesh dns` as a process."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from sidemesh.dnsserver import MeshDnsServer
from tests.support import ProcessGroup, free_port, loopback_address, wait_for_http

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server() -> AsyncIterator[tuple[MeshDnsServer, str, int]]:
    host = loopback_address()
    s = MeshDnsServer("mesh.local", 2, tcp_idle_timeout_s=1.0)
    s.set_records({"artist": ["127.10.1.1", "127.10.1.2"]})
    await s.start(host, 0)
    assert s.port is not None
    yield s, host, s.port
    await s.close()


def addresses(response: dns.message.Message) -> set[str]:
    return {rdata.address for rrset in response.answer for rdata in rrset}


async def ask_udp(host: str, port: int, name: str = "artist.mesh.local") -> dns.message.Message:
    return await dns.asyncquery.udp(dns.message.make_query(name, "A"), host, port=port, timeout=1.0)


async def ask_tcp(host: str, port: int, name: str = "artist.mesh.local") -> dns.message.Message:
    return await dns.asyncquery.tcp(dns.message.make_query(name, "A"), host, port=port, timeout=1.0)


async def test_it_answers_over_udp_and_tcp_on_one_port(server) -> None:
    _, host, port = server
    for response in (await ask_udp(host, port), await ask_tcp(host, port)):
        assert response.flags & dns.flags.AA
        assert addresses(response) == {"127.10.1.1", "127.10.1.2"}
    assert (await ask_udp(host, port, "ghost.mesh.local")).rcode() == dns.rcode.NXDOMAIN
    assert (await ask_tcp(host, port, "example.org")).rcode() == dns.rcode.REFUSED


async def test_garbage_datagrams_do_not_stop_the_next_answer(server) -> None:
    s, host, port = server
    junk = [b"", b"\x00", b"\xde\xad\xbe\xef" * 3, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 4, b"\x00" * 12]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in junk * 20:
            sock.sendto(datagram, (host, port))
        # a stray response (QR set) must be ignored too, never answered
        sock.sendto(dns.message.make_response(dns.message.make_query("artist.mesh.local", "A")).to_wire(), (host, port))
    await asyncio.sleep(0.05)

    response = await ask_udp(host, port)
    assert addresses(response) == {"127.10.1.1", "127.10.1.2"}
    assert s.stats["garbage"] >= 100


async def test_a_tcp_peer_sending_junk_is_dropped_and_others_are_served(server) -> None:
    _, host, port = server
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x00\x10" + b"not dns at all!!")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 2) == b""  # the server hung up on it
    writer.close()

    assert addresses(await ask_tcp(host, port)) == {"127.10.1.1", "127.10.1.2"}


async def test_a_stalled_tcp_peer_blocks_nobody_and_is_timed_out(server) -> None:
    _, host, port = server
    stalled = []
    for partial in (b"", b"\x00", b"\x00\x40abc"):  # nothing, half a length, half a message
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(partial)
        await writer.drain()
        stalled.append((reader, writer))

    started = time.monotonic()
    assert addresses(await ask_tcp(host, port)) == {"127.10.1.1", "127.10.1.2"}
    assert addresses(await ask_udp(host, port)) == {"127.10.1.1", "127.10.1.2"}
    assert time.monotonic() - started < 0.5

    for reader, writer in stalled:  # idle timeout is 1 s in this fixture
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()


async def test_several_queries_on_one_tcp_connection_are_all_answered(server) -> None:
    _, host, port = server
    reader, writer = await asyncio.open_connection(host, port)
    queries = [dns.message.make_query(n, "A") for n in ("artist.mesh.local", "ghost.mesh.local", "artist.mesh.local")]
    for q in queries:
        wire = q.to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
    await writer.drain()
    rcodes = []
    for q in queries:
        length = int.from_bytes(await reader.readexactly(2), "big")
        response = dns.message.from_wire(await reader.readexactly(length))
        assert q.is_response(response)
        rcodes.append(response.rcode())
    writer.close()
    assert rcodes == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.NOERROR]


async def test_close_drops_open_connections_and_frees_the_port(server) -> None:
    s, host, port = server
    _reader, writer = await asyncio.open_connection(host, port)
    await s.close()
    with pytest.raises(OSError):
        await asyncio.wait_for(ask_tcp(host, port), 2)
    writer.close()
    again = MeshDnsServer("mesh.local", 2)
    await again.start(host, port)
    await again.close()


# ---- `sidemesh dns` as its own process -------------------------------------------------------


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def test_sidemesh_dns_serves_the_records_put_through_its_api(procs: ProcessGroup) -> None:
    host = loopback_address()
    proc = procs.start("dns", "dns", "--listen", host, "--zone", "mesh.local", "--ttl", "3",
                       "--record", "song=127.10.2.1")
    api = f"http://{host}:15054"
    wait_for_http(f"{api}/healthz")

    assert _http("GET", f"{api}/records") == (200, {"song": ["127.10.2.1"]})
    status, body = _http("PUT", f"{api}/records", {"artist": ["127.10.1.1", "127.10.1.2"], "image": ["::1"]})
    assert status == 200 and body == {"artist": ["127.10.1.1", "127.10.1.2"], "image": ["::1"]}

    response = dns.query.udp(dns.message.make_query("artist.mesh.local", "A"), host, port=15053, timeout=2)
    assert addresses(response) == {"127.10.1.1", "127.10.1.2"} and response.answer[0].ttl == 3
    gone = dns.query.tcp(dns.message.make_query("song.mesh.local", "A"), host, port=15053, timeout=2)
    assert gone.rcode() == dns.rcode.NXDOMAIN

    for bad in ({"artist": ["not-an-ip"]}, {"bad name": ["10.0.0.1"]}, ["artist"], b"{not json"):
        status, body = _http("PUT", f"{api}/records", bad)
        assert status == 400 and body["status"] == 400 and body["error"], body
    assert _http("GET", f"{api}/records")[1] == {"artist": ["127.10.1.1", "127.10.1.2"], "image": ["::1"]}

    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=5) == 0
    log = proc.log()
    assert "event=dns_records_updated" in log and "artist=127.10.1.1,127.10.1.2" in log
    assert "component=dns" in log and "Traceback" not in log


def test_sidemesh_dns_serves_each_pods_inbound_port_as_srv(procs: ProcessGroup) -> None:
    host = loopback_address()
    procs.start("dns", "dns", "--listen", host, "--zone", "mesh.local", "--ttl", "3")
    api = f"http://{host}:15054"
    wait_for_http(f"{api}/healthz")
    pods = [{"address": "127.10.1.1", "port": 15006, "instance": "artist-1"},
            {"address": "127.10.1.2", "port": 15106, "instance": "artist-2"}]
    assert _http("PUT", f"{api}/records", {"artist": pods}) == (200, {"artist": pods})

    response = dns.query.udp(dns.message.make_query("_mesh-inbound._tcp.artist.mesh.local", "SRV"), host,
                             port=15053, timeout=2)
    assert sorted((r.port, r.target.to_text()) for r in response.answer[0]) == [
        (15006, "artist-1.artist.mesh.local."), (15106, "artist-2.artist.mesh.local.")]
    assert {(rrset.name.to_text(), rrset[0].address) for rrset in response.additional} == {
        ("artist-1.artist.mesh.local.", "127.10.1.1"), ("artist-2.artist.mesh.local.", "127.10.1.2")}
    status, body = _http("PUT", f"{api}/records", {"artist": [{"address": "127.10.1.1", "port": 99999}]})
    assert status == 400 and "1..65535" in body["error"]


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "http"],
        ["--ttl", "-5"],
        ["--zone", "bad..zone"],
        ["--listen", "localhost"],
        ["--record", "artist"],
        ["--record", "artist=nope"],
        ["--api-port", "70000"],
    ],
)
def test_sidemesh_dns_rejects_bad_options_with_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from sidemesh.dnsserver import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert "usage: sidemesh dns" in capsys.readouterr().err


def test_sidemesh_dns_exits_nonzero_when_its_port_is_taken(procs: ProcessGroup) -> None:
    host = loopback_address()
    port = free_port(host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((host, port))
        proc = procs.start("dns-busy", "dns", "--listen", host, "--port", str(port), "--api-port", str(free_port(host)))
        assert proc.popen.wait(timeout=10) == 1
    assert "event=dns_start_failed" in proc.log()
