"""The resolver proven against an independent DNS server: dnsmasq from Debian (package dnsmasq-base).

The fixture runs dnsmasq in the foreground on a free loopback port with no
upstream servers, the mesh.test zone answered locally (NXDOMAIN for unknown
names), fixed host records, one SRV record, and a hosts file it re-reads on SIGHUP so tests
can change records. TTLs are fixed by --local-ttl. If dnsmasq is not
installed the tests FAIL (the project's test setup installs it), they do not skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dnsfallback import CachedLookup, DnsConfig, DnsLookupError, ServiceResolver
from tests.support import free_port, wait_for_port

pytestmark = pytest.mark.timeout(60)

LOCAL_TTL = 1
HOST = "127.0.0.1"


def dnsmasq_binary() -> str:
    found = shutil.which("dnsmasq") or next(
        (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail(
            "dnsmasq is not installed: these tests prove the resolver against an independent DNS server. "
            "Install it with `apt-get install -y dnsmasq-base` (the project's test setup does this).",
            pytrace=False,
        )
    return found


@dataclass
class Dnsmasq:
    popen: subprocess.Popen[bytes]
    port: int
    hosts_file: Path
    log_path: Path

    def set_hosts(self, lines: list[str]) -> None:
        """Rewrite the extra hosts file and make dnsmasq re-read it (SIGHUP)."""
        self.hosts_file.write_text("".join(f"{line}\n" for line in lines))
        self.hosts_file.chmod(0o644)
        self.popen.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=5)

    def config(self, **overrides: object) -> DnsConfig:
        fields: dict[str, object] = {
            "nameservers": ((HOST, self.port),),
            "template": "{service}.mesh.test",
            "timeout_s": 0.3,
            "negative_ttl_s": 0.3,
            **overrides,
        }
        return DnsConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
def dnsmasq(request: pytest.FixtureRequest) -> Iterator[Dnsmasq]:
    binary = dnsmasq_binary()
    workdir = Path(tempfile.mkdtemp(prefix="sidemesh-dnsmasq-"))
    workdir.chmod(0o755)  # dnsmasq drops root privileges to 'nobody' and re-reads the hosts file as that user
    hosts_file = workdir / "hosts"
    hosts_file.write_text("127.0.0.31 image.mesh.test\n")
    hosts_file.chmod(0o644)
    log_path = workdir / "dnsmasq.log"
    last_error = ""
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port(HOST)
        args = [
            binary,
            "--no-daemon",  # foreground, logs to stderr; never the system service
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--pid-file=",
            f"--listen-address={HOST}",
            "--bind-interfaces",
            f"--port={port}",
            "--local=/mesh.test/",  # authoritative-ish: unknown names in mesh.test are NXDOMAIN, never forwarded
            f"--local-ttl={LOCAL_TTL}",
            f"--addn-hosts={hosts_file}",
            "--host-record=artist.mesh.test,127.0.0.21",
            "--host-record=artist.mesh.test,127.0.0.22,::21",
            "--host-record=song.mesh.test,127.0.0.23",
            "--txt-record=txtonly.mesh.test,no-addresses-here",
            # lyrics' one pod listens on an inbound port of its own, and says so in SRV (RFC 2782)
            "--srv-host=_mesh-inbound._tcp.lyrics.mesh.test,lyrics-1.mesh.test,15106,0,1",
            "--host-record=lyrics.mesh.test,127.0.0.41",
            "--host-record=lyrics-1.mesh.test,127.0.0.41",
        ]
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(HOST, port, timeout=5)
        except TimeoutError:
            popen.kill()
            popen.wait(timeout=5)
            last_error = log_path.read_text(errors="replace")
            continue
        server = Dnsmasq(popen, port, hosts_file, log_path)
        yield server
        server.kill()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"----- dnsmasq -----\n{log_path.read_text(errors='replace')}")
        shutil.rmtree(workdir, ignore_errors=True)
        return
    pytest.fail(f"dnsmasq did not start:\n{last_error}")


@pytest.fixture
async def resolver(dnsmasq: Dnsmasq) -> AsyncIterator[ServiceResolver]:
    r = ServiceResolver(dnsmasq.config())
    yield r
    await r.close()


async def test_several_host_records_become_several_endpoints_with_dnsmasqs_ttl(resolver: ServiceResolver) -> None:
    answer = await resolver.resolve("artist")

    assert answer.addresses == ("127.0.0.21", "127.0.0.22", "::21")
    assert answer.endpoints == (("127.0.0.21", 15006), ("127.0.0.22", 15006), ("::21", 15006))
    assert answer.ttl_s == LOCAL_TTL
    assert (await resolver.resolve("song")).addresses == ("127.0.0.23",)


async def test_an_srv_record_of_another_dns_server_gives_the_peer_its_own_port(dnsmasq: Dnsmasq) -> None:
    resolver = ServiceResolver(dnsmasq.config(srv=True, port=15006))
    try:
        answer = await resolver.resolve("lyrics")
        assert answer.via == "srv" and answer.endpoints == (("127.0.0.41", 15106),)
        # no SRV name for artist in that zone: its A/AAAA records serve, on our own inbound port
        artist = await resolver.resolve("artist")
        assert artist.via == "a" and artist.endpoints == (("127.0.0.21", 15006), ("127.0.0.22", 15006), ("::21", 15006))
    finally:
        await resolver.close()


async def test_unknown_names_are_nxdomain_and_names_without_addresses_are_no_answer(resolver: ServiceResolver) -> None:
    with pytest.raises(DnsLookupError) as missing:
        await resolver.resolve("ghost")
    assert missing.value.reason == "nxdomain" and missing.value.service == "ghost"

    with pytest.raises(DnsLookupError) as empty:
        await resolver.resolve("txtonly")
    assert empty.value.reason == "no_answer"


async def test_changed_records_are_seen_by_a_watcher_within_the_ttl(
    dnsmasq: Dnsmasq, resolver: ServiceResolver
) -> None:
    changed = asyncio.Event()
    seen: list[tuple[str, ...]] = []

    def on_change(_service: str, lookup: CachedLookup) -> None:
        if lookup.answer is not None:
            seen.append(lookup.answer.addresses)
            if lookup.answer.addresses == ("127.0.0.31", "127.0.0.32"):
                changed.set()

    resolver.on_change(on_change)
    resolver.watch(["image"])
    await asyncio.sleep(0.3)
    assert seen == [("127.0.0.31",)]

    dnsmasq.set_hosts(["127.0.0.31 image.mesh.test", "127.0.0.32 image.mesh.test"])
    started = time.monotonic()
    await asyncio.wait_for(changed.wait(), 5)
    assert time.monotonic() - started < LOCAL_TTL + 1.0


async def test_when_dnsmasq_dies_the_last_answer_serves_stale_then_expires(dnsmasq: Dnsmasq) -> None:
    resolver = ServiceResolver(dnsmasq.config(stale_max_s=1.0))
    try:
        fresh = await resolver.resolve("artist")
        dnsmasq.kill()
        await asyncio.sleep(LOCAL_TTL + 0.05)

        stale = await resolver.resolve("artist")
        assert stale.addresses == fresh.addresses and stale.expires_at < time.monotonic()
        cached = resolver.peek("artist")
        assert cached is not None and not cached.fresh and cached.error is not None
        assert cached.error.is_transport_failure

        await asyncio.sleep(1.1)
        with pytest.raises(DnsLookupError) as err:
            await resolver.resolve("artist")
        assert err.value.is_transport_failure
    finally:
        await resolver.close()


async def test_concurrent_resolves_against_dnsmasq_share_one_query(resolver: ServiceResolver) -> None:
    answers = await asyncio.gather(*(resolver.resolve("artist") for _ in range(20)))
    assert len({id(a) for a in answers}) == 1
