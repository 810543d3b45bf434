"""Hostile clients against a real ``sidemesh sidecar`` process (uvloop, as deployed).

Each test sends the hostile input, checks the answer the limits of ``sidecar/limits.py``
promise, and then shows the sidecar whole: the next good request on each listener is served
with its own body, the process is alive, and its memory is back near where it was.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tests.integration.sidecar_harness import (
    SidecarProcess,
    TestControlPlane,
    raw_request,
    read_response,
    snapshot,
    start_app,
    start_sidecar_process,
    wait_ready,
)
from tests.support import ProcessGroup, loopback_address

pytestmark = pytest.mark.timeout(120)

RSS_GROWTH_MB = 20  # what a hostile input may leave behind in the sidecar's memory


@dataclass
class SongApp:
    """The app behind the sidecar: every answer names the request it answers."""

    seen: list[str] = field(default_factory=list)
    uploads_started: int = 0
    uploads_cut: int = 0

    def build(self) -> web.Application:
        async def song(request: web.Request) -> web.Response:
            self.seen.append(f"{request.method} {request.path_qs}")
            body = await request.read()
            return web.json_response({"song": int(request.match_info["id"]), "method": request.method,
                                      "path": request.path_qs, "received": len(body)})

        async def upload(request: web.Request) -> web.Response:
            self.uploads_started += 1
            got = 0
            try:
                async for chunk in request.content.iter_any():
                    got += len(chunk)
            finally:
                if got < (request.content_length or 0):
                    self.uploads_cut += 1  # the sidecar closed our side mid-body
            return web.json_response({"received": got})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/songs/{id}", song)
        app.router.add_post("/upload", upload)
        return app


@pytest.fixture
async def cp() -> AsyncIterator[TestControlPlane]:
    plane = await TestControlPlane(loopback_address()).start()
    yield plane
    await plane.stop()


@pytest.fixture
async def song_app() -> AsyncIterator[tuple[SongApp, tuple[str, int]]]:
    app = SongApp()
    async with start_app(app.build()) as where:
        yield app, where


async def launch(procs: ProcessGroup, cp: TestControlPlane, app_at: tuple[str, int], *extra: str,
                 open_files: int | None = None) -> SidecarProcess:
    """A sidecar process whose outbound routes ``song`` to the app, and whose inbound serves it."""
    await cp.push(snapshot("v1", {"song": [app_at]}))
    sp = start_sidecar_process(procs, cp, app=app_at, extra=extra, open_files=open_files)
    await wait_ready(sp)
    return sp


async def fetch(sp: SidecarProcess, listener: str, song: int, *, keep_alive: bool = False) -> tuple[int, dict[str, str], bytes]:
    """GET one song through the inbound (origin-form) or outbound (absolute-form) listener."""
    port, target = (sp.inbound_port, b"/songs/%d" % song) if listener == "inbound" else \
        (sp.outbound_port, b"http://song/songs/%d" % song)
    reader, writer = await asyncio.open_connection(sp.address, port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: song\r\n%s\r\n" % (target, b"" if keep_alive else b"Connection: close\r\n"))
        return await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()


async def assert_whole(sp: SidecarProcess, baseline_kb: int) -> None:
    """The next good request on each listener gets its own answer; the process lives; memory is back."""
    for listener, song in (("inbound", 41), ("outbound", 42)):
        status, _, body = await fetch(sp, listener, song)
        assert status == 200 and json.loads(body)["song"] == song, (listener, status, body[:200])
    assert sp.alive
    growth_mb = (sp.status_kb("VmRSS") - baseline_kb) / 1024
    print(f"rss_growth_after_mb={growth_mb:.1f}")
    assert growth_mb < RSS_GROWTH_MB


async def warm(sp: SidecarProcess) -> int:
    """A few requests through both listeners, then the RSS to compare against (kB)."""
    for i in range(20):
        await fetch(sp, "inbound" if i % 2 else "outbound", i)
    return sp.status_kb("VmRSS")


def responses_in(reply: bytes) -> list[int]:
    """Status codes of the responses in a raw reply (answers of this test carry no nested heads)."""
    return [int(part[:3]) for part in reply.split(b"HTTP/1.1 ")[1:]]


# ----- request smuggling: framing comes from what was parsed -----

SMUGGLED = b"GET /songs/2 HTTP/1.1\r\nHost: song\r\n\r\n"


def smuggling_attacks(listener: str) -> list[bytes]:
    target = b"/songs/1" if listener == "inbound" else b"http://song/songs/1"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    return [
        b"POST %s HTTP/1.1\r\nHost: song\r\nConnection: content-length\r\nContent-Length: %d\r\n\r\n%s"
        % (target, len(SMUGGLED), SMUGGLED),
        b"POST %s HTTP/1.1\r\nHost: song\r\nConnection: keep-alive, Transfer-Encoding\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%s" % (target, chunked),
    ]


@pytest.mark.parametrize("listener", ["inbound", "outbound"])
async def test_connection_header_naming_the_framing_gets_400_and_every_victim_gets_its_own_response(
    cp: TestControlPlane, song_app: tuple[SongApp, tuple[str, int]], procs: ProcessGroup, listener: str
) -> None:
    app, app_at = song_app
    sp = await launch(procs, cp, app_at)
    baseline = await warm(sp)
    app.seen.clear()
    port = sp.inbound_port if listener == "inbound" else sp.outbound_port

    async def attack(payload: bytes) -> list[int]:
        return responses_in(await raw_request(sp.address, port, payload, timeout=10))

    for payload in smuggling_attacks(listener):
        assert await attack(payload) == [400]  # answered once, then closed
    # once more, with 20 victims on the pooled upstream connections at the same time
    victims = [fetch(sp, listener, 100 + i, keep_alive=True) for i in range(20)]
    attacks = [attack(p) for p in smuggling_attacks(listener) * 5]
    results = await asyncio.gather(*victims, *attacks)
    for i, (status, _, body) in enumerate(results[:20]):
        doc = json.loads(body)
        assert status == 200 and (doc["song"], doc["path"]) == (100 + i, f"/songs/{100 + i}"), (i, doc)
    assert all(codes == [400] for codes in results[20:])
    status, _, body = await fetch(sp, listener, 3)  # the plain request after the attack: song 3, not 2
    assert status == 200 and json.loads(body)["song"] == 3
    assert not [r for r in app.seen if r in ("GET /songs/2", "POST /songs/1")]  # nothing smuggled reached the app
    await assert_whole(sp, baseline)
    assert "event=request_rejected" in sp.proc.log() and "reason=untrusted_framing" in sp.proc.log()


# ----- CONNECT and Upgrade: one answer, nothing upstream -----

async def test_connect_and_upgrade_get_exactly_one_answer_and_nothing_reaches_the_app(
    cp: TestControlPlane, song_app: tuple[SongApp, tuple[str, int]], procs: ProcessGroup
) -> None:
    app, app_at = song_app
    sp = await launch(procs, cp, app_at)
    baseline = await warm(sp)
    app.seen.clear()
    connect = b"CONNECT song:443 HTTP/1.1\r\nHost: song:443\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    upgrade = b"GET %s HTTP/1.1\r\nHost: song\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    for port, payload in ((sp.outbound_port, connect), (sp.outbound_port, upgrade % b"http://song/songs/5"),
                          (sp.inbound_port, connect), (sp.inbound_port, upgrade % b"/songs/5")):
        reply = await raw_request(sp.address, port, payload, timeout=10)
        assert responses_in(reply) == [405], reply[:300]
    status, _, body = await fetch(sp, "outbound", 6, keep_alive=True)
    assert status == 200 and json.loads(body)["song"] == 6
    assert [r for r in app.seen if "/songs/5" in r] == []
    await assert_whole(sp, baseline)


# ----- oversized heads and pipelining floods: bounded memory -----

async def send_unread(sp: SidecarProcess, port: int, payload: bytes) -> bytes:
    """Write all of ``payload`` without reading, then read until the sidecar closes."""
    reader, writer = await asyncio.open_connection(sp.address, port)

    async def send() -> None:
        try:
            for i in range(0, len(payload), 256 * 1024):
                writer.write(payload[i:i + 256 * 1024])
                await writer.drain()
        except ConnectionError:
            pass  # the sidecar stopped reading and closed: what it answered is still readable

    sender = asyncio.create_task(send())
    try:
        await asyncio.wait_for(asyncio.shield(sender), 20)
        return await asyncio.wait_for(reader.read(-1), 20)
    except ConnectionError:
        return b""
    finally:
        sender.cancel()
        writer.close()


def head_with_headers(total: int) -> bytes:
    line = b"X-Pad-%06d: " + b"h" * 80 + b"\r\n"
    count = total // len(line % 0)
    return b"GET /songs/1 HTTP/1.1\r\nHost: song\r\n" + b"".join(line % i for i in range(count)) + b"\r\n"


@pytest.mark.parametrize(
    ("what", "payload", "status"),
    [
        ("16 MB of headers", head_with_headers(16 * 1024 * 1024), 431),
        ("one 16 MB header", b"GET /songs/1 HTTP/1.1\r\nHost: song\r\nX-Big: " + b"b" * (16 * 1024 * 1024) + b"\r\n\r\n", 431),
        ("a 16 MB URL", b"GET /songs/1?" + b"u" * (16 * 1024 * 1024) + b" HTTP/1.1\r\nHost: song\r\n\r\n", 414),
    ],
)
async def test_oversized_head_is_refused_without_the_sidecar_growing(
    cp: TestControlPlane, song_app: tuple[SongApp, tuple[str, int]], procs: ProcessGroup,
    what: str, payload: bytes, status: int,
) -> None:
    _, app_at = song_app
    sp = await launch(procs, cp, app_at)
    baseline = await warm(sp)
    reply = await send_unread(sp, sp.inbound_port, payload)
    assert responses_in(reply) == [status], reply[:300]
    assert b"connection: close" in reply
    peak_mb = (sp.status_kb("VmHWM") - baseline) / 1024
    print(f"\n{what}: status={status} rss_peak_growth_mb={peak_mb:.1f} (limit {RSS_GROWTH_MB})")
    assert peak_mb < RSS_GROWTH_MB
    await assert_whole(sp, baseline)


async def test_pipelining_without_reading_is_bounded_by_the_queue_limit(
    cp: TestControlPlane, song_app: tuple[SongApp, tuple[str, int]], procs: ProcessGroup
) -> None:
    app, app_at = song_app
    sp = await launch(procs, cp, app_at)
    baseline = await warm(sp)
    app.seen.clear()
    request = b"GET /songs/7 HTTP/1.1\r\nHost: song\r\n\r\n"
    payload = request * (2 * 1024 * 1024 // len(request))
    reply = await send_unread(sp, sp.inbound_port, payload)
    codes = responses_in(reply)
    peak_mb = (sp.status_kb("VmHWM") - baseline) / 1024
    print(f"\npipelined={len(payload) // len(request)} answered={len(codes)} rss_peak_growth_mb={peak_mb:.1f}")
    # one answered, 32 queued (--max-pipelined default); the rest is left for the client to retry
    assert codes == [200] * len(codes) and 1 <= len(codes) <= 33
    assert len(app.seen) == len(codes)
    assert b"connection: close" in reply.rsplit(b"HTTP/1.1 ", 1)[1].partition(b"\r\n\r\n")[0]
    assert peak_mb < RSS_GROWTH_MB
    await assert_whole(sp, baseline)


# ----- clients that stop mid-body -----

async def test_clients_closing_mid_body_leave_no_socket_in_close_wait(
    cp: TestControlPlane, song_app: tuple[SongApp, tuple[str, int]], procs: ProcessGroup
) -> None:
    app, app_at = song_app
    sp = await launch(procs, cp, app_at)
    baseline = await warm(sp)
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection(sp.address, sp.inbound_port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: song\r\nContent-Length: 1000000\r\n\r\n" + b"p" * 10_000)
        clients.append((reader, writer))
    deadline = loop.time() + 10
    while app.uploads_started < 50:  # every upload is mid-body at the app
        assert loop.time() < deadline, f"only {app.uploads_started} uploads reached the app"
        await asyncio.sleep(0.02)
    for i, (_, writer) in enumerate(clients):
        if i % 2:
            writer.transport.abort()  # gone at once
        else:
            writer.write_eof()  # half-closed: it will send no more, it still reads
    t0 = loop.time()
    deadline = t0 + 5
    while (states := sp.tcp_states())["CLOSE_WAIT"] or app.uploads_cut < 50:
        assert loop.time() < deadline, f"after 5 s: sidecar sockets {dict(states)}, uploads cut {app.uploads_cut}/50"
        await asyncio.sleep(0.05)
    print(f"\nclosed_mid_body=50 close_wait=0 after {loop.time() - t0:.2f}s; sidecar sockets {dict(states)}")
    for reader, writer in clients[::2]:
        assert await asyncio.wait_for(reader.read(-1), 5) == b""  # the half-closed ones were closed too
        writer.close()
    await assert_whole(sp, baseline)


# ----- deadlines -----

async def test_head_deadline_counts_from_each_requests_first_byte_and_idle_from_the_last_exchange(
    cp: TestControlPlane, song_app: tuple[SongApp, tuple[str, int]], procs: ProcessGroup
) -> None:
    _, app_at = song_app
    head_s, idle_s = 1.0, 2.0
    sp = await launch(procs, cp, app_at, "--head-timeout", str(head_s), "--idle-timeout", str(idle_s))
    baseline = await warm(sp)
    loop = asyncio.get_running_loop()
    margin = 1.5  # a busy 2-core machine

    # keep-alive: gaps longer than the head timeout are fine; the idle timer restarts each time
    reader, writer = await asyncio.open_connection(sp.address, sp.inbound_port)
    for i in range(3):
        if i:
            await asyncio.sleep(head_s * 1.3)  # the client's pace, longer than the head timeout
        writer.write(b"GET /songs/%d HTTP/1.1\r\nHost: song\r\n\r\n" % i)
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200 and json.loads(body)["song"] == i
    last = loop.time()
    assert await asyncio.wait_for(reader.read(-1), idle_s + 5) == b""
    idle_closed = loop.time() - last
    writer.close()

    # a later head dribbled in: 408 one head timeout after its first byte, not after the idle gap
    reader, writer = await asyncio.open_connection(sp.address, sp.inbound_port)
    writer.write(b"GET /songs/1 HTTP/1.1\r\nHost: song\r\n\r\n")
    await asyncio.wait_for(read_response(reader), 5)
    await asyncio.sleep(head_s * 1.5)
    first_byte = loop.time()

    async def dribble() -> None:
        for b in b"GET /songs/2 HTTP/1.1\r\nX-Slow: " + b"s" * 100:
            writer.write(bytes([b]))
            await asyncio.sleep(0.2)

    dribbler = asyncio.create_task(dribble())
    try:
        status, headers, body = await asyncio.wait_for(read_response(reader), head_s + 5)
        late_head = loop.time() - first_byte
        assert await asyncio.wait_for(reader.read(-1), 5) == b""
    finally:
        dribbler.cancel()
        writer.close()
    print(f"\nidle_closed_after_s={idle_closed:.2f} (idle {idle_s}) 408_after_first_byte_s={late_head:.2f} (head {head_s})")
    assert idle_s - 0.1 <= idle_closed <= idle_s + margin
    assert status == 408 and headers["connection"] == "close" and json.loads(body)["status"] == 408
    assert head_s - 0.1 <= late_head <= head_s + margin
    await assert_whole(sp, baseline)


# ----- connection floods under a small open-file limit -----

@pytest.fixture
def many_files() -> Iterator[None]:
    """This test process opens a few thousand sockets; the sidecar under test does not get to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 16384)
    if want < 5000:
        pytest.fail(f"the test needs ~5000 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Attacker:
    slow: bool
    connected_at: float = 0.0
    closed_after: float | None = None  # seconds from connect to the sidecar closing it
    got: bytes = b""


async def attack(sp: SidecarProcess, who: Attacker, gate: asyncio.Semaphore, give_up_s: float) -> None:
    loop = asyncio.get_running_loop()
    async with gate:
        try:
            reader, writer = await asyncio.open_connection(sp.address, sp.inbound_port)
        except OSError:
            who.closed_after = 0.0  # refused outright counts as closed
            return
    who.connected_at = loop.time()

    async def dribble() -> None:
        for b in b"GET /songs/1 HTTP/1.1\r\nHost: song\r\nX-Slowloris: " + b"z" * 1000:
            writer.write(bytes([b]))
            await asyncio.sleep(1.0)

    dribbler = asyncio.create_task(dribble()) if who.slow else None
    try:
        who.got = await asyncio.wait_for(reader.read(-1), give_up_s)
        who.closed_after = loop.time() - who.connected_at
    except ConnectionError:
        who.closed_after = loop.time() - who.connected_at
    except TimeoutError:
        pass  # never closed: the assertion below reports it
    finally:
        if dribbler is not None:
            dribbler.cancel()
        writer.transport.abort()


async def test_slowloris_and_idle_floods_under_1024_open_files_do_not_stop_good_requests(
    cp: TestControlPlane, song_app: tuple[SongApp, tuple[str, int]], procs: ProcessGroup, many_files: None
) -> None:
    _, app_at = song_app
    head_s = 2.0
    sp = await launch(procs, cp, app_at, "--head-timeout", str(head_s), open_files=1024)
    baseline = await warm(sp)
    loop = asyncio.get_running_loop()
    give_up_s = head_s + 15
    gate = asyncio.Semaphore(200)
    # a client kept alive from before the flood: it must keep working through it
    kept_r, kept_w = await asyncio.open_connection(sp.address, sp.inbound_port)
    kept_w.write(b"GET /songs/999 HTTP/1.1\r\nHost: song\r\n\r\n")
    assert (await asyncio.wait_for(read_response(kept_r), 5))[0] == 200
    first = [Attacker(slow=i % 2 == 0) for i in range(2000)]
    flood = [asyncio.create_task(attack(sp, a, gate, give_up_s)) for a in first]
    deadline = loop.time() + 20
    # the first wave is accepted (most of it evicted at once, 224 held until the head deadline)
    while sum(a.closed_after is not None for a in first) < 1500:
        assert loop.time() < deadline, "the sidecar did not work through the connection flood"
        await asyncio.sleep(0.05)

    second = [Attacker(slow=i % 2 == 0) for i in range(300)]

    async def second_wave() -> None:
        for a in second:
            flood.append(asyncio.create_task(attack(sp, a, gate, give_up_s)))
            await asyncio.sleep(0.002)

    async def good_client() -> list[float]:
        took = []
        for i in range(50):
            t0 = loop.time()
            if i % 2:  # a new connection each time
                status, _, body = await fetch(sp, "inbound", 1000 + i)
            else:  # the connection kept alive from before the flood
                kept_w.write(b"GET /songs/%d HTTP/1.1\r\nHost: song\r\n\r\n" % (1000 + i))
                status, _, body = await asyncio.wait_for(read_response(kept_r), 10)
            took.append(loop.time() - t0)
            assert status == 200 and json.loads(body)["song"] == 1000 + i, (i, status, body[:200])
        return took

    waving = asyncio.create_task(second_wave())
    try:
        took = await good_client()
    finally:
        kept_w.close()
    ready = await raw_request(sp.address, sp.admin_port, b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert ready.startswith(b"HTTP/1.1 200 ")  # the admin API answers meanwhile
    fds_during = sp.open_fds()
    await waving
    await asyncio.gather(*flood)

    attackers = first + second
    never = [a for a in attackers if a.closed_after is None]
    closed = sorted(a.closed_after for a in attackers if a.closed_after is not None)
    got_408 = sum(a.got.startswith(b"HTTP/1.1 408 ") for a in attackers if a.slow)
    print(f"\nattackers={len(attackers)} never_closed={len(never)} closed_after_s: median={statistics.median(closed):.2f} "
          f"max={closed[-1]:.2f} (head deadline {head_s}) slow_ones_answered_408={got_408} "
          f"good=50 good_max_s={max(took):.2f} sidecar_fds_during={fds_during}")
    assert not never
    assert closed[-1] <= head_s + 3.0
    assert fds_during < 1024
    assert "Too many open files" not in sp.proc.log()
    await assert_whole(sp, baseline)
