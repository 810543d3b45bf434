"""Snapshot building, versions, faults, the registry and per-stream ACK state."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.faults import FaultError, apply_fault
from controlplane.model import AckMessage, Faults, Hello, Instance, PreparedSnapshot, ServicePolicy, Snapshot
from controlplane.push import build_services, next_version
from controlplane.registry import Registry
from controlplane.session import AckKind, Fanout, Session, sync_status

POLICIES = {"song": ServicePolicy(2000, 0, "least_request")}


def policy_for(name: str) -> ServicePolicy:
    return POLICIES.get(name, ServicePolicy())


INSTANCES = [
    Instance("song-1", "song", "127.10.2.1", 15006),
    Instance("artist-2", "artist", "127.10.1.2", 15006),
    Instance("artist-1", "artist", "127.10.1.1", 15006),
]


def test_services_are_sorted_with_their_endpoints_and_policies() -> None:
    services = build_services(INSTANCES, policy_for)
    assert [s.name for s in services] == ["artist", "song"]
    assert [e.instance for e in services[0].endpoints] == ["artist-1", "artist-2"]
    assert services[0].policy == ServicePolicy(5000, 1, "round_robin")
    assert services[1].policy == ServicePolicy(2000, 0, "least_request")


def test_faults_empty_or_drop_services() -> None:
    assert build_services(INSTANCES, policy_for, Faults(empty_snapshot=True)) == ()
    dropped = build_services(INSTANCES, policy_for, Faults(dropped_services=frozenset({"artist"})))
    assert [s.name for s in dropped] == ["song"]


def test_fault_requests_accumulate_and_clear() -> None:
    f = apply_fault(Faults(), {"fault": "drop-service", "service": "artist"})
    f = apply_fault(f, {"fault": "drop-service", "service": "image"})
    f = apply_fault(f, {"fault": "empty-snapshot"})
    assert f == Faults(True, frozenset({"artist", "image"}))
    assert apply_fault(f, {"fault": "clear"}) == Faults()
    for bad in ({"fault": "nope"}, {"fault": "drop-service"}, ["clear"], {"fault": "drop-service", "service": "A"}):
        with pytest.raises(FaultError):
            apply_fault(f, bad)


def test_version_follows_the_wall_clock_and_always_increases() -> None:
    assert next_version(None, 1700000000.123) == "1700000000123"
    assert next_version("1700000000123", 1700000000.123) == "1700000000124"  # same ms
    assert next_version("1800000000000", 1700000000.0) == "1800000000001"  # clock went back
    assert next_version(None, 1700000000.0, floor=1900000000000) == "1900000000001"
    assert next_version("opaque-v7", 1.0) == "1000"


def test_newest_lease_replaces_and_old_lease_cannot_unregister_it() -> None:
    reg: Registry[str] = Registry()
    assert reg.register(INSTANCES[0], "old") is None
    assert reg.register(INSTANCES[0], "new") == "old"
    assert reg.unregister("song-1", "old") is None
    assert "song-1" in reg
    assert reg.unregister("song-1", "new") == INSTANCES[0]
    assert len(reg) == 0 and reg.has_registered("song-1")


def prepared(version: str) -> PreparedSnapshot:
    return PreparedSnapshot(Snapshot(version, ()), b"")


def session() -> Session:
    return Session(Hello("artist-1", "artist", "127.0.0.1", 15006), connected_at=0.0)


async def test_slow_stream_skips_to_the_latest_version_and_fanout_counts_the_skip() -> None:
    s = session()
    f1, f2 = Fanout(1), Fanout(1)
    s.offer(prepared("1"), f1)
    s.offer(prepared("2"), f2)
    assert f1.remaining == 0  # skipped
    push = await s.next_push()
    assert push is not None and push.prepared.version == "2"
    assert f2.remaining == 1
    push.done()
    assert await f2.wait(0.01)


async def test_ack_nack_and_unknown_nonce_change_only_what_they_should() -> None:
    s = session()
    n1 = s.record_sent("1", now=10.0)
    n2 = s.record_sent("2", now=11.0)
    out = s.on_ack(AckMessage("1", n1, True), now=10.25)
    assert (out.kind, out.latency_s) == (AckKind.ACK, 0.25)
    assert s.acked_version == "1"
    assert s.on_ack(AckMessage("2", "bogus", True), now=11.0).kind is AckKind.UNKNOWN_NONCE
    assert s.on_ack(AckMessage("3", n2, True), now=11.0).kind is AckKind.VERSION_MISMATCH
    assert s.acked_version == "1"
    out = s.on_ack(AckMessage("2", n2, False, "no endpoints"), now=11.1)
    assert out.kind is AckKind.NACK
    assert (s.acked_version, s.last_nack.version, s.last_nack.reason) == ("1", "2", "no endpoints")  # type: ignore[union-attr]
    assert s.status("2") == "nacked"
    assert s.on_ack(AckMessage("2", n2, True), now=12.0).kind is AckKind.STALE_NONCE  # answered already


def test_sync_status_names_the_three_states() -> None:
    from controlplane.model import Nack
    assert sync_status("5", None, "5") == "synced"
    assert sync_status("4", Nack("5", "x"), "5") == "nacked"
    assert sync_status("4", Nack("3", "x"), "5") == "behind"
    assert sync_status(None, None, None) == "behind"


async def test_closing_a_session_ends_its_writer_and_releases_the_fanout() -> None:
    from controlplane.session import CloseReason
    s = session()
    f = Fanout(1)
    s.offer(prepared("1"), f)
    s.close(CloseReason("shutdown", "UNAVAILABLE", "bye"))
    assert f.remaining == 0
    assert await asyncio.wait_for(s.next_push(), 0.1) is None


async def test_a_stream_stuck_in_a_write_does_not_hold_back_the_next_version() -> None:
    from controlplane.metrics import Metrics
    from controlplane.push import Publisher
    from controlplane.warmup import WarmupGate

    reg: Registry[Session] = Registry()
    stuck, fine = session(), Session(Hello("song-1", "song", "127.0.0.2", 15006), connected_at=0.0)
    for s in (stuck, fine):
        reg.register(Instance.from_hello(s.hello), s)
    publisher = Publisher(reg, WarmupGate(0.0), Metrics(), policy_for=policy_for, coalesce_s=0.0, clock=lambda: 1.0)
    stuck.writing = True
    first = publisher.publish_now()
    assert first.version == "1000" and stuck.offered_version == fine.offered_version == "1000"
    push = await fine.next_push()
    assert push is not None
    push.done()
    assert await publisher._fanout.wait(0.01)  # drained without the stuck stream
    # an unchanged table keeps its version and is not offered again
    assert publisher.publish_now() is first


async def test_a_table_over_the_snapshot_budget_is_never_offered_and_the_current_one_stays(
        caplog: pytest.LogCaptureFixture) -> None:
    # the server refuses such registrations first (budget.py); this is the last line behind it
    from controlplane import convert
    from controlplane.metrics import Metrics
    from controlplane.push import Publisher
    from controlplane.warmup import WarmupGate

    reg: Registry[Session] = Registry()
    a = Session(Hello("artist-1", "artist", "127.0.0.1", 15006), connected_at=0.0)
    reg.register(Instance.from_hello(a.hello), a)
    publisher = Publisher(reg, WarmupGate(0.0), Metrics(), policy_for=policy_for, coalesce_s=0.0,
                          max_snapshot_bytes=1000, clock=lambda: 1.0)
    first = publisher.publish_now()
    assert first is not None and a.offered_version == first.version
    big = Session(Hello("song-1", "song", "127.0.0.2", 15006, labels=(("blob", "x" * 1000),)), connected_at=0.0)
    reg.register(Instance.from_hello(big.hello), big)
    assert publisher.publish_now() is first
    assert publisher.current is first
    assert big.offered_version == first.version  # the newcomer gets the table everybody has
    assert len(first.wire) + convert.MAX_NONCE_FIELD_BYTES <= 1000
    assert "event=snapshot_over_budget" in caplog.text and "budget=1000" in caplog.text

    empty: Registry[Session] = Registry()
    alone = Session(big.hello, connected_at=0.0)
    empty.register(Instance.from_hello(alone.hello), alone)
    nothing = Publisher(empty, WarmupGate(0.0), Metrics(), policy_for=policy_for, coalesce_s=0.0,
                        max_snapshot_bytes=1000, clock=lambda: 1.0)
    assert nothing.publish_now() is None and alone.offered_version is None
