"""The control plane's discovery stream, against a real grpc.aio server on loopback.

Clients are real grpc.aio streams speaking sidemesh.v1 (``FakeSidecar`` below),
not the project's sidecar: the proto is the only contract between the two.

Every test here runs twice: against a secure control plane (the default: mutual
TLS, each FakeSidecar holding a real certificate for the service its Hello names,
issued by the CA in the test's temporary ``--ca-dir``) and against ``--insecure``
(plaintext, as before identities). The registry and push behaviour must not
depend on the transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from controlplane.app import RunningControlPlane, start
from controlplane.config import ControlPlaneConfig
from controlplane.model import ServicePolicy
from identity.certs import CertificateAuthority, PrivateKey, cert_to_pem, generate_key, key_to_pem, make_csr
from identity.spiffe import SpiffeId
from identity.store import CA_CERT_FILE, CA_KEY_FILE
from meshpb.v1 import discovery_pb2, discovery_pb2_grpc
from tests.support import loopback_address

SECURE, INSECURE = "mutual-tls", "insecure"
MODES = [SECURE, INSECURE]
# what sidecars verify in the control plane's certificate, whatever address they dial
SERVER_NAME_OVERRIDE = ("grpc.ssl_target_name_override", "controlplane")

# for tests elsewhere that use ``make_cp`` (secure by default) and should run in both modes
in_both_modes = pytest.mark.parametrize("make_cp", MODES, indirect=True)

pytestmark = [pytest.mark.timeout(60), in_both_modes]

# what a real sidecar configures (issue 3): ping every second, even without data
SIDECAR_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class CpTarget:
    """Where a test's control plane listens, and its CA (None: plaintext, --insecure)."""

    address: str
    ca: CertificateAuthority | None = None
    identity_address: str | None = None

    def __str__(self) -> str:
        return self.address


def load_ca(ca_dir: Path) -> CertificateAuthority:
    """The mesh CA as the control plane left it in its --ca-dir."""
    return CertificateAuthority.load((ca_dir / CA_CERT_FILE).read_bytes(), (ca_dir / CA_KEY_FILE).read_bytes())


def workload_credentials(ca: CertificateAuthority, service: str, *, key: PrivateKey | None = None,
                         node_id: str = "test", ttl_s: float = 3600) -> grpc.ChannelCredentials:
    """Client credentials of a sidecar of ``service``: its own key, a certificate from the mesh CA."""
    key = key or generate_key()
    identity = SpiffeId(ca.trust_domain, service)
    cert = ca.issue_workload(make_csr(key, identity, node_id), identity, ttl_s=ttl_s, now=time.time())
    return grpc.ssl_channel_credentials(root_certificates=ca.bundle_pem, private_key=key_to_pem(key),
                                        certificate_chain=cert_to_pem(cert))


def open_channel(target: CpTarget | str, credentials: grpc.ChannelCredentials | None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(str(target), options=list(options))
    return grpc.aio.secure_channel(str(target), credentials, options=[*options, SERVER_NAME_OVERRIDE])


class FakeSidecar:
    """A discovery-stream client: sends a Hello, reads Snapshots, sends Acks.

    Against a secure control plane it holds a certificate for ``cert_service`` (default: the
    service its Hello names) with ``key`` (default: a fresh one), unless ``credentials`` are given.
    """

    def __init__(self, target: CpTarget | str, node_id: str, service: str = "artist", address: str = "127.0.0.1",
                 port: int = 15006, *, known_instances: Sequence[str] = (), last_version: str = "",
                 labels: Mapping[str, str] | None = None, known_endpoints: Sequence[tuple[str, str, int]] = (),
                 channel_options: Sequence[tuple[str, int]] = (), cert_service: str | None = None,
                 key: PrivateKey | None = None, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        self.hello = discovery_pb2.Hello(
            node_id=node_id, service=service, address=address, port=port, known_instances=list(known_instances),
            last_version=last_version, labels=dict(labels or {}),
            known_endpoints=[discovery_pb2.KnownEndpoint(service=s, address=a, port=p) for s, a, p in known_endpoints])
        if credentials is None and isinstance(target, CpTarget) and target.ca is not None:
            credentials = workload_credentials(target.ca, cert_service or service, key=key, node_id=node_id)
        self.channel = open_channel(target, credentials, channel_options)
        self.call: Any = discovery_pb2_grpc.DiscoveryStub(self.channel).Stream()
        self.snapshots: list[discovery_pb2.Snapshot] = []
        # one reader task feeds a queue: timing out a wait must not cancel the RPC
        self._inbox: asyncio.Queue[discovery_pb2.Snapshot | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def _read_all(self) -> None:
        try:
            while True:
                msg = await self.call.read()
                if msg is grpc.aio.EOF:
                    break
                self._inbox.put_nowait(msg)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self._inbox.put_nowait(None)

    async def send_hello(self) -> FakeSidecar:
        await self.call.write(discovery_pb2.DiscoveryRequest(hello=self.hello))
        self._reader = asyncio.ensure_future(self._read_all())
        return self

    async def send(self, request: discovery_pb2.DiscoveryRequest) -> None:
        await self.call.write(request)
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read_all())

    async def next_snapshot(self, timeout: float = 3.0) -> discovery_pb2.Snapshot:
        msg = await asyncio.wait_for(self._inbox.get(), timeout)
        assert msg is not None, "stream ended"
        self.snapshots.append(msg)
        return msg

    async def snapshot_where(self, predicate: Callable[[discovery_pb2.Snapshot], bool],
                             timeout: float = 3.0) -> discovery_pb2.Snapshot:
        deadline = time.monotonic() + timeout
        while True:
            snap = await self.next_snapshot(max(0.01, deadline - time.monotonic()))
            if predicate(snap):
                return snap

    async def ack(self, snap: discovery_pb2.Snapshot, accepted: bool = True, detail: str = "",
                  nonce: str | None = None) -> None:
        await self.call.write(discovery_pb2.DiscoveryRequest(ack=discovery_pb2.Ack(
            version=snap.version, nonce=snap.nonce if nonce is None else nonce,
            accepted=accepted, error_detail=detail)))

    async def status_code(self, timeout: float = 3.0) -> grpc.StatusCode:
        return await asyncio.wait_for(self.call.code(), timeout)

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            await self._reader
        await self.channel.close()


def instances(snap: discovery_pb2.Snapshot) -> dict[str, set[str]]:
    return {s.name: {e.instance for e in s.endpoints} for s in snap.services}


CpFactory = Callable[..., Awaitable[RunningControlPlane]]


@pytest.fixture
async def make_cp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CpFactory]:
    """Starts control planes on a fresh loopback address; secure unless parametrized ``insecure``.

    A secure one keeps its CA in the test's temporary --ca-dir (restarts reuse it, as in life)
    and its join tokens in ``tmp_path / "tokens"``; ``identity_port`` is a free one.
    """
    running: list[RunningControlPlane] = []
    insecure = getattr(request, "param", SECURE) == INSECURE
    (tmp_path / "tokens").mkdir(exist_ok=True)

    async def factory(**overrides: Any) -> RunningControlPlane:
        settings: dict[str, Any] = dict(listen=loopback_address(), grpc_port=0, http_port=0,
                                        coalesce_ms=10.0, warmup_timeout=1.0, grace=0.5, insecure=insecure,
                                        ca_dir=tmp_path / "ca", join_tokens=tmp_path / "tokens", identity_port=0)
        settings.update(overrides)
        cp = await start(ControlPlaneConfig(**settings))
        running.append(cp)
        return cp

    yield factory
    for cp in running:
        await cp.stop(0.5)


@pytest.fixture
async def cp(make_cp: CpFactory) -> RunningControlPlane:
    return await make_cp()


@pytest.fixture
async def sidecars(cp: RunningControlPlane) -> AsyncIterator[Callable[..., Awaitable[FakeSidecar]]]:
    opened: list[FakeSidecar] = []

    async def connect(node_id: str, service: str = "artist", **kw: Any) -> FakeSidecar:
        sc = FakeSidecar(target(cp), node_id, service, **kw)
        opened.append(sc)
        return await sc.send_hello()

    yield connect
    for sc in opened:
        await sc.close()


def target(cp: RunningControlPlane) -> CpTarget:
    """The control plane's discovery port, and its CA (from --ca-dir) when it is secure."""
    host = cp.plane.config.listen
    if cp.plane.ca is None:
        return CpTarget(f"{host}:{cp.grpc_port}")
    return CpTarget(f"{host}:{cp.grpc_port}", load_ca(cp.plane.config.ca_dir), f"{host}:{cp.identity_port}")


async def get_status(cp: RunningControlPlane) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{cp.plane.config.listen}:{cp.http_port}/status") as resp:
            assert resp.status == 200
            return dict(await resp.json())


async def wait_status(cp: RunningControlPlane, predicate: Callable[[dict[str, Any]], bool],
                      timeout: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = await get_status(cp)
        if predicate(status) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.02)


def sidecar_entry(status: dict[str, Any], node_id: str) -> dict[str, Any]:
    [entry] = [s for s in status["sidecars"] if s["node_id"] == node_id]
    return dict(entry)


# --- registration and pushes ------------------------------------------------------------

async def test_sidecar_receives_a_snapshot_holding_itself_after_its_hello(sidecars: Any) -> None:
    a = await sidecars("artist-1", "artist", address="127.10.1.1", port=15006)
    snap = await a.next_snapshot()
    assert snap.version and snap.nonce
    [svc] = snap.services
    assert svc.name == "artist"
    [ep] = svc.endpoints
    assert (ep.address, ep.port, ep.instance) == ("127.10.1.1", 15006, "artist-1")
    assert (svc.policy.timeout_ms, svc.policy.retries, svc.policy.lb) == (5000, 1, "round_robin")


async def test_second_sidecar_joining_pushes_a_new_version_to_both_within_a_second(sidecars: Any) -> None:
    a = await sidecars("artist-1", "artist")
    first = await a.next_snapshot()
    started = time.monotonic()
    b = await sidecars("song-1", "song", address="127.10.2.1")
    want = {"artist": {"artist-1"}, "song": {"song-1"}}
    snap_a = await a.snapshot_where(lambda s: instances(s) == want, timeout=1.0)
    snap_b = await b.snapshot_where(lambda s: instances(s) == want, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert snap_a.version == snap_b.version
    assert int(snap_a.version) > int(first.version)
    assert snap_a.nonce != snap_b.nonce


async def test_sidecar_whose_stream_ends_is_removed_from_the_next_snapshot(sidecars: Any, cp: Any) -> None:
    a = await sidecars("artist-1", "artist")
    b = await sidecars("artist-2", "artist", address="127.10.1.2")
    await a.snapshot_where(lambda s: instances(s) == {"artist": {"artist-1", "artist-2"}})
    await b.close()
    snap = await a.snapshot_where(lambda s: instances(s) == {"artist": {"artist-1"}}, timeout=1.0)
    assert [e.address for e in snap.services[0].endpoints] == ["127.0.0.1"]
    status = await get_status(cp)
    assert [s["node_id"] for s in status["sidecars"]] == ["artist-1"]


async def test_policy_override_from_config_is_sent_with_the_service(make_cp: CpFactory) -> None:
    cp = await make_cp(policies={"song": ServicePolicy(timeout_ms=2000, retries=0, lb="least_request")})
    s = await FakeSidecar(target(cp), "song-1", "song").send_hello()
    a = await FakeSidecar(target(cp), "artist-1", "artist").send_hello()
    try:
        snap = await s.snapshot_where(lambda x: len(x.services) == 2)
        policies = {svc.name: (svc.policy.timeout_ms, svc.policy.retries, svc.policy.lb) for svc in snap.services}
        assert policies == {"song": (2000, 0, "least_request"), "artist": (5000, 1, "round_robin")}
    finally:
        await s.close()
        await a.close()


async def test_newest_stream_for_a_node_id_replaces_the_old_one(sidecars: Any, cp: Any) -> None:
    key = generate_key()  # a reconnecting sidecar keeps its key (secure mode checks that)
    old = await sidecars("artist-1", "artist", address="127.10.1.1", key=key)
    await old.next_snapshot()
    new = await sidecars("artist-1", "artist", address="127.10.1.9", key=key)
    snap = await new.snapshot_where(lambda s: bool(s.services))
    assert [(e.instance, e.address) for e in snap.services[0].endpoints] == [("artist-1", "127.10.1.9")]
    assert await old.status_code() == grpc.StatusCode.ABORTED
    # the old stream's end must not unregister the new one
    await asyncio.sleep(0.1)
    status = await get_status(cp)
    assert [(s["node_id"], s["address"]) for s in status["sidecars"]] == [("artist-1", "127.10.1.9")]


async def test_version_increases_across_a_control_plane_restart(make_cp: CpFactory) -> None:
    cp1 = await make_cp()
    a = await FakeSidecar(target(cp1), "artist-1").send_hello()
    v1 = (await a.next_snapshot()).version
    await a.close()
    await cp1.stop(0.1)
    # a sidecar that reports a last_version in the future still gets a newer one
    future = str(int(v1) + 10_000_000)
    cp2 = await make_cp()
    b = await FakeSidecar(target(cp2), "artist-1", last_version=future).send_hello()
    try:
        v2 = (await b.next_snapshot()).version
        assert int(v2) > int(future) > int(v1)
    finally:
        await b.close()


async def test_burst_of_fifty_joins_is_coalesced_into_far_fewer_pushes(make_cp: CpFactory) -> None:
    cp = await make_cp(coalesce_ms=50.0)
    watcher = await FakeSidecar(target(cp), "watcher", "watch").send_hello()
    await watcher.next_snapshot()
    joiners = [FakeSidecar(target(cp), f"artist-{i}", "artist", port=20000 + i) for i in range(50)]
    try:
        await asyncio.gather(*(j.send_hello() for j in joiners))
        await watcher.snapshot_where(lambda s: len(instances(s).get("artist", ())) == 50, timeout=5.0)
        versions_during_burst = len(watcher.snapshots) - 1
        assert versions_during_burst <= 10, versions_during_burst
        assert cp.plane.metrics.snapshots._value.get() <= 11
    finally:
        await asyncio.gather(*(j.close() for j in joiners))
        await watcher.close()


async def test_sidecar_keepalive_pings_every_second_are_tolerated(make_cp: CpFactory) -> None:
    cp = await make_cp()
    a = FakeSidecar(target(cp), "artist-1", channel_options=SIDECAR_CHANNEL_OPTIONS)
    await a.send_hello()
    try:
        await a.next_snapshot()
        await asyncio.sleep(3.5)  # a strike policy would GOAWAY the channel after ~2 pings
        assert not a.call.done()
        assert [s["node_id"] for s in (await get_status(cp))["sidecars"]] == ["artist-1"]
    finally:
        await a.close()


async def test_shutdown_ends_streams_with_unavailable(make_cp: CpFactory) -> None:
    cp = await make_cp()
    a = await FakeSidecar(target(cp), "artist-1").send_hello()
    await a.next_snapshot()
    started = time.monotonic()
    await cp.stop(2.0)
    assert await a.status_code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.5  # streams were ended, not left to the grace period
    await a.close()


# --- acks -------------------------------------------------------------------------------

async def test_ack_marks_the_sidecar_synced_with_that_version(sidecars: Any, cp: Any) -> None:
    a = await sidecars("artist-1")
    snap = await a.next_snapshot()
    status = await get_status(cp)
    assert sidecar_entry(status, "artist-1")["status"] == "behind"
    await a.ack(snap)
    status = await wait_status(cp, lambda st: sidecar_entry(st, "artist-1")["synced"])
    entry = sidecar_entry(status, "artist-1")
    assert status["version"] == snap.version
    assert (entry["acked_version"], entry["synced"], entry["status"]) == (snap.version, True, "synced")
    assert entry["last_nack"] is None
    assert (entry["service"], entry["address"], entry["port"]) == ("artist", "127.0.0.1", 15006)


async def test_nack_is_shown_with_its_reason_and_changes_nothing_else(sidecars: Any, cp: Any) -> None:
    a = await sidecars("artist-1")
    first = await a.next_snapshot()
    await a.ack(first)
    b = await sidecars("song-1", "song")
    second = await a.snapshot_where(lambda s: len(s.services) == 2)
    await a.ack(second, accepted=False, detail="endpoint 127.0.0.1:15006 fails validation")
    status = await wait_status(cp, lambda st: sidecar_entry(st, "artist-1")["status"] == "nacked")
    entry = sidecar_entry(status, "artist-1")
    assert entry["status"] == "nacked" and entry["synced"] is False
    assert entry["acked_version"] == first.version
    assert entry["last_nack"] == {"version": second.version,
                                  "reason": "endpoint 127.0.0.1:15006 fails validation"}
    # the registry and the version did not move: no new push, both still registered
    assert status["version"] == second.version
    assert {s["node_id"] for s in status["sidecars"]} == {"artist-1", "song-1"}
    with pytest.raises(TimeoutError):
        await a.next_snapshot(timeout=0.3)
    assert b.call.done() is False


async def test_ack_with_unknown_nonce_is_ignored(sidecars: Any, cp: Any) -> None:
    a = await sidecars("artist-1")
    snap = await a.next_snapshot()
    await a.ack(snap, nonce="not-a-nonce-we-sent")
    await asyncio.sleep(0.2)
    entry = sidecar_entry(await get_status(cp), "artist-1")
    assert entry["acked_version"] is None and entry["status"] == "behind"
    assert not a.call.done()
    await a.ack(snap)
    status = await wait_status(cp, lambda st: sidecar_entry(st, "artist-1")["synced"])
    assert sidecar_entry(status, "artist-1")["acked_version"] == snap.version


# --- bad input ----------------------------------------------------------------------------

BAD_FIRST_MESSAGES = {
    "empty service": discovery_pb2.DiscoveryRequest(hello=discovery_pb2.Hello(
        node_id="x-1", service="", address="127.0.0.1", port=15006)),
    "service not a DNS label": discovery_pb2.DiscoveryRequest(hello=discovery_pb2.Hello(
        node_id="x-1", service="Artist_Svc", address="127.0.0.1", port=15006)),
    "empty node_id": discovery_pb2.DiscoveryRequest(hello=discovery_pb2.Hello(
        node_id="", service="artist", address="127.0.0.1", port=15006)),
    "port 0": discovery_pb2.DiscoveryRequest(hello=discovery_pb2.Hello(
        node_id="x-1", service="artist", address="127.0.0.1", port=0)),
    "port 70000": discovery_pb2.DiscoveryRequest(hello=discovery_pb2.Hello(
        node_id="x-1", service="artist", address="127.0.0.1", port=70000)),
    "bad address": discovery_pb2.DiscoveryRequest(hello=discovery_pb2.Hello(
        node_id="x-1", service="artist", address="artist.local", port=15006)),
    "first message an ack": discovery_pb2.DiscoveryRequest(ack=discovery_pb2.Ack(version="1", nonce="1")),
    "empty first message": discovery_pb2.DiscoveryRequest(),
}


@pytest.mark.parametrize("case", list(BAD_FIRST_MESSAGES))
async def test_bad_first_message_is_refused_and_other_sidecars_still_get_pushes(
        case: str, sidecars: Any, cp: Any) -> None:
    good = await sidecars("artist-1")
    await good.next_snapshot()
    bad = FakeSidecar(target(cp), "ignored")
    try:
        await bad.send(BAD_FIRST_MESSAGES[case])
        assert await bad.status_code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid hello" in await bad.call.details()
    finally:
        await bad.close()
    await sidecars("song-1", "song")
    snap = await good.snapshot_where(lambda s: len(s.services) == 2, timeout=1.0)
    assert instances(snap) == {"artist": {"artist-1"}, "song": {"song-1"}}
    assert cp.plane.metrics.rejected_hellos._value.get() == 1


async def test_a_ping_is_answered_with_a_pong_carrying_its_seq_and_no_table(sidecars: Any, cp: Any) -> None:
    sc = await sidecars("artist-1")
    first = await sc.next_snapshot()
    await sc.ack(first)
    await sc.send(discovery_pb2.DiscoveryRequest(ping=discovery_pb2.Ping(seq=7)))
    pong = await sc.next_snapshot(timeout=2.0)
    assert pong.pong == 7 and not pong.services and not pong.version
    await sc.send(discovery_pb2.DiscoveryRequest(ping=discovery_pb2.Ping(seq=8)))
    assert (await sc.next_snapshot(timeout=2.0)).pong == 8
    assert not sc.call.done()
    [entry] = cp.plane.status()["sidecars"]
    assert entry["status"] == "synced"  # a pong is not a push: nothing to ACK


@pytest.mark.parametrize("garbage", ["second hello", "empty message", "ping without seq"])
async def test_garbage_after_hello_aborts_that_stream_only(garbage: str, sidecars: Any, cp: Any) -> None:
    good = await sidecars("artist-1")
    await good.next_snapshot()
    bad = await sidecars("song-1", "song")
    await bad.next_snapshot()
    await good.snapshot_where(lambda s: len(s.services) == 2)
    message = {"second hello": discovery_pb2.DiscoveryRequest(hello=bad.hello),
               "empty message": discovery_pb2.DiscoveryRequest(),
               "ping without seq": discovery_pb2.DiscoveryRequest(ping=discovery_pb2.Ping())}[garbage]
    await bad.send(message)
    assert await bad.status_code() == grpc.StatusCode.INVALID_ARGUMENT
    # the bad one left; the good one is told and stays connected
    snap = await good.snapshot_where(lambda s: len(s.services) == 1, timeout=1.0)
    assert instances(snap) == {"artist": {"artist-1"}}
    assert not good.call.done()


# --- warm-up (restart safety) ---------------------------------------------------------------

async def test_hello_naming_known_instances_holds_pushes_until_they_register(make_cp: CpFactory) -> None:
    cp = await make_cp(warmup_timeout=5.0)
    known = ["artist-1", "song-1", "image-1"]
    a = await FakeSidecar(target(cp), "artist-1", "artist", known_instances=known, last_version="5").send_hello()
    s = await FakeSidecar(target(cp), "song-1", "song", known_instances=known, last_version="5").send_hello()
    try:
        with pytest.raises(TimeoutError):
            await a.next_snapshot(timeout=0.4)
        assert (await get_status(cp))["warming_up"] is True
        i = await FakeSidecar(target(cp), "image-1", "image", known_instances=known).send_hello()
        started = time.monotonic()
        first = await a.next_snapshot(timeout=1.0)
        assert time.monotonic() - started < 0.5
        # the very first snapshot anyone sees already holds every known instance
        assert instances(first) == {"artist": {"artist-1"}, "song": {"song-1"}, "image": {"image-1"}}
        assert instances(await s.next_snapshot()) == instances(first)
        assert instances(await i.next_snapshot()) == instances(first)
        status = await get_status(cp)
        assert status["warming_up"] is False
        assert status["warmup"]["reason"] == "all_known_registered"
        await i.close()
    finally:
        await a.close()
        await s.close()


async def test_warmup_gives_up_waiting_after_its_timeout(make_cp: CpFactory) -> None:
    cp = await make_cp(warmup_timeout=0.6)
    a = await FakeSidecar(target(cp), "artist-1", known_instances=["artist-1", "artist-2"]).send_hello()
    try:
        started = time.monotonic()
        snap = await a.next_snapshot(timeout=3.0)
        waited = time.monotonic() - started
        assert 0.5 <= waited < 1.5, waited
        assert instances(snap) == {"artist": {"artist-1"}}
        status = await get_status(cp)
        assert status["warmup"] == {"ended": True, "reason": "timeout", "missing": ["artist-2"],
                                    "missing_endpoints": [], "timeout_s": 0.6}
    finally:
        await a.close()


async def test_hello_without_known_instances_is_answered_at_once(make_cp: CpFactory) -> None:
    cp = await make_cp(warmup_timeout=5.0)
    a = await FakeSidecar(target(cp), "artist-1").send_hello()
    try:
        started = time.monotonic()
        await a.next_snapshot(timeout=1.0)
        assert time.monotonic() - started < 0.3
        assert (await get_status(cp))["warming_up"] is False
    finally:
        await a.close()


async def test_a_restarted_control_plane_holds_its_first_push_until_the_instance_at_a_known_endpoint_registers(
        make_cp: CpFactory) -> None:
    cp1 = await make_cp(warmup_timeout=5.0)
    song = await FakeSidecar(target(cp1), "song-1", "song", address="127.10.2.1").send_hello()
    artist = await FakeSidecar(target(cp1), "artist-7", "artist", address="127.10.1.7").send_hello()
    await song.snapshot_where(lambda s: instances(s) == {"song": {"song-1"}, "artist": {"artist-7"}})
    await song.close()
    await artist.close()
    await cp1.stop(0.1)

    # song-1 had been routing to artist through DNS (127.10.1.7:15006, no instance id): it says so
    cp2 = await make_cp(warmup_timeout=5.0)
    song = await FakeSidecar(target(cp2), "song-1", "song", address="127.10.2.1", last_version="5",
                             known_endpoints=[("artist", "127.10.1.7", 15006), ("song", "127.10.2.1", 15006)]
                             ).send_hello()
    # an instance of artist elsewhere, or at that address on another port, is not that endpoint
    other = await FakeSidecar(target(cp2), "artist-8", "artist", address="127.10.1.8").send_hello()
    wrong_port = await FakeSidecar(target(cp2), "artist-9", "artist", address="127.10.1.7", port=15007).send_hello()
    try:
        with pytest.raises(TimeoutError):
            await song.next_snapshot(timeout=0.5)
        status = await get_status(cp2)
        assert status["warming_up"] is True
        assert status["warmup"]["missing_endpoints"] == [{"service": "artist", "address": "127.10.1.7", "port": 15006}]
        assert status["warmup"]["missing"] == []
        artist = await FakeSidecar(target(cp2), "artist-7", "artist", address="127.10.1.7").send_hello()
        started = time.monotonic()
        first = await song.next_snapshot(timeout=2.0)
        assert time.monotonic() - started < 0.5
        # the very first snapshot song-1 sees already holds the endpoint it was routing to
        assert instances(first) == {"song": {"song-1"}, "artist": {"artist-7", "artist-8", "artist-9"}}
        assert ("127.10.1.7", 15006) in {(e.address, e.port) for svc in first.services for e in svc.endpoints}
        status = await get_status(cp2)
        assert (status["warming_up"], status["warmup"]["reason"], status["warmup"]["missing_endpoints"]) == (
            False, "all_known_registered", [])
        await artist.close()
    finally:
        for stream in (song, other, wrong_port):
            await stream.close()


async def test_a_hello_whose_known_endpoints_are_all_unmatchable_is_answered_at_once(make_cp: CpFactory) -> None:
    cp = await make_cp(warmup_timeout=5.0)
    a = await FakeSidecar(target(cp), "song-1", "song", known_endpoints=[
        ("artist", "artist.mesh.local", 15006), ("Artist", "127.10.1.7", 15006), ("artist", "127.10.1.7", 0),
    ]).send_hello()
    try:
        started = time.monotonic()
        await a.next_snapshot(timeout=1.0)
        assert time.monotonic() - started < 0.3
        assert cp.plane.metrics.known_endpoints_dropped._value.get() == 3
        assert (await get_status(cp))["warmup"]["missing_endpoints"] == []
    finally:
        await a.close()
