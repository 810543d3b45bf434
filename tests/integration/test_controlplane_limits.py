"""Hostile Hellos against a real control plane over real gRPC streams: named limits, the request
size gRPC enforces, and the snapshot budget. Whatever a bad Hello does, the others keep their
registration and keep receiving pushes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import grpc
import pytest

from controlplane.app import RunningControlPlane
from controlplane.limits import HelloLimits, flag
from meshpb.v1 import discovery_pb2
from identity.store import CA_CERT_FILE, ensure_tokens
from tests.integration.test_controlplane_stream import (  # noqa: F401 - fixtures
    CpFactory,
    FakeSidecar,
    get_status,
    in_both_modes,
    instances,
    make_cp,
    target,
)
from tests.integration.sidecar_harness import closed_port
from tests.support import ProcessGroup, loopback_address

pytestmark = pytest.mark.timeout(60)

TWO_MB = 2 * 1024 * 1024


def sample(cp: RunningControlPlane, name: str, **labels: str) -> float:
    value = cp.plane.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_sample(cp: RunningControlPlane, name: str, want: float, timeout: float = 3.0, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    while sample(cp, name, **labels) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return sample(cp, name, **labels)


async def synced_watcher(cp: RunningControlPlane) -> tuple[FakeSidecar, dict[str, Any]]:
    """artist-1, connected, its first snapshot ACKed; and its /status entry."""
    good = await FakeSidecar(target(cp), "artist-1", "artist", address="127.10.1.1").send_hello()
    await good.ack(await good.next_snapshot())
    deadline = time.monotonic() + 3
    while True:
        status = await get_status(cp)
        [entry] = status["sidecars"]
        if entry["synced"] or time.monotonic() > deadline:
            return good, entry
        await asyncio.sleep(0.02)


async def assert_others_unaffected(cp: RunningControlPlane, good: FakeSidecar, before: dict[str, Any]) -> None:
    """Nothing was pushed for the bad Hello; the good stream is still registered and still gets pushes."""
    with pytest.raises(TimeoutError):
        await good.next_snapshot(timeout=0.3)
    [entry] = (await get_status(cp))["sidecars"]
    assert entry == before
    joiner = await FakeSidecar(target(cp), "song-1", "song", address="127.10.2.1").send_hello()
    try:
        snap = await good.snapshot_where(lambda s: "song" in instances(s), timeout=2.0)
        assert instances(snap) == {"artist": {"artist-1"}, "song": {"song-1"}}
    finally:
        await joiner.close()
    assert not good.call.done()


async def test_a_hello_over_the_request_size_is_refused_by_grpc_before_parsing_and_nothing_else_changes(
        make_cp: CpFactory) -> None:
    cp = await make_cp(hello_limits=HelloLimits(max_request_bytes=256 * 1024))
    good, before = await synced_watcher(cp)
    bad = FakeSidecar(target(cp), "evil-1", "evil", labels={"zone": "x" * TWO_MB})
    try:
        await bad.send_hello()
        assert await bad.status_code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = await bad.call.details()
        assert "larger than max" in details and "262144" in details, details
    finally:
        await bad.close()
    assert await wait_sample(cp, "sidemesh_controlplane_streams_without_hello_total", 1.0) == 1.0
    await assert_others_unaffected(cp, good, before)
    await good.close()


@in_both_modes
async def test_a_2mb_label_hello_gets_invalid_argument_naming_the_limit_and_nothing_else_changes(
        make_cp: CpFactory) -> None:
    cp = await make_cp()  # default limits
    good, before = await synced_watcher(cp)
    bad = FakeSidecar(target(cp), "evil-1", "evil", labels={"zone": "x" * TWO_MB})
    try:
        await bad.send_hello()
        assert await bad.status_code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await bad.call.details() == (
            f"invalid hello: label 'zone' value is {TWO_MB} bytes, over the limit --max-label-value-bytes=1024")
    finally:
        await bad.close()
    assert sample(cp, "sidemesh_controlplane_hello_limit_rejections_total", limit="max_label_value_bytes") == 1
    assert sample(cp, "sidemesh_controlplane_rejected_hellos_total") == 1
    await assert_others_unaffected(cp, good, before)
    await good.close()


SMALL = HelloLimits(
    max_labels=3, max_label_key_bytes=10, max_label_value_bytes=20, max_label_bytes=40,
    max_known_instances=4, max_known_endpoints=2, max_node_id_bytes=12, max_address_bytes=16,
    max_last_version_bytes=8,
)
EP = ("song", "127.10.9.9", 15006)
# limit -> (FakeSidecar keyword arguments at the limit, one over it)
BOUNDARIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "max_labels": ({"labels": {"a": "1", "b": "2", "c": "3"}}, {"labels": {"a": "1", "b": "2", "c": "3", "d": "4"}}),
    "max_label_key_bytes": ({"labels": {"k" * 10: "v"}}, {"labels": {"k" * 11: "v"}}),
    "max_label_value_bytes": ({"labels": {"k": "v" * 20}}, {"labels": {"k": "v" * 21}}),
    "max_label_bytes": ({"labels": {"a" * 10: "v" * 10, "b" * 10: "w" * 10}},
                        {"labels": {"a" * 10: "v" * 10, "b" * 10: "w" * 11}}),
    "max_known_instances": ({"known_instances": ["a", "b", "c", "d"]}, {"known_instances": ["a", "b", "c", "d", "e"]}),
    "max_known_endpoints": ({"known_endpoints": [EP, EP]}, {"known_endpoints": [EP, EP, EP]}),
    "max_node_id_bytes": ({"node_id": "n" * 12}, {"node_id": "n" * 13}),
    # ::1 written long: a loopback address, which a loopback peer may advertise over mutual TLS too
    "max_address_bytes": ({"address": "00:0:0:0:0:0:0:1"}, {"address": "000:0:0:0:0:0:0:1"}),
    "max_last_version_bytes": ({"last_version": "1" * 8}, {"last_version": "1" * 9}),
}


@pytest.mark.parametrize("limit", list(BOUNDARIES))
async def test_each_hello_limit_passes_at_its_value_and_refuses_one_more(limit: str, make_cp: CpFactory) -> None:
    cp = await make_cp(hello_limits=SMALL, warmup_timeout=0.0)
    at, over = BOUNDARIES[limit]
    node_at = at.get("node_id", "at-limit")
    ok = FakeSidecar(target(cp), **{"node_id": node_at, "service": "artist", **at})
    bad = FakeSidecar(target(cp), **{"node_id": "over-limit", "service": "artist", **over})
    try:
        await ok.send_hello()
        snap = await ok.next_snapshot()
        assert node_at in instances(snap)["artist"]
        await bad.send_hello()
        assert await bad.status_code() == grpc.StatusCode.INVALID_ARGUMENT
        details = await bad.call.details()
        assert f"over the limit {flag(limit)}={getattr(SMALL, limit)}" in details, details
        assert sample(cp, "sidemesh_controlplane_hello_limit_rejections_total", limit=limit) == 1
        assert [s["node_id"] for s in (await get_status(cp))["sidecars"]] == [node_at]
        with pytest.raises(TimeoutError):
            await ok.next_snapshot(timeout=0.2)
    finally:
        await ok.close()
        await bad.close()


def padded_hello(node_id: str, size: int) -> discovery_pb2.DiscoveryRequest:
    """A Hello whose DiscoveryRequest encodes to exactly ``size`` bytes."""
    for pad in range(size):
        msg = discovery_pb2.DiscoveryRequest(hello=discovery_pb2.Hello(
            node_id=node_id, service="artist", address="127.10.1.1", port=15006, labels={"pad": "p" * pad}))
        if msg.ByteSize() == size:
            return msg
    raise AssertionError(f"no padding gives {size} bytes")


async def test_the_request_size_limit_passes_at_its_value_and_refuses_one_byte_more(make_cp: CpFactory) -> None:
    cp = await make_cp(hello_limits=HelloLimits(max_request_bytes=1000), warmup_timeout=0.0)
    ok, bad = FakeSidecar(target(cp), "ignored"), FakeSidecar(target(cp), "ignored")
    try:
        await ok.send(padded_hello("artist-1", 1000))
        assert instances(await ok.next_snapshot()) == {"artist": {"artist-1"}}
        await bad.send(padded_hello("artist-2", 1001))
        assert await bad.status_code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1001 vs. 1000" in await bad.call.details()
        assert [s["node_id"] for s in (await get_status(cp))["sidecars"]] == ["artist-1"]
    finally:
        await ok.close()
        await bad.close()


@in_both_modes
async def test_a_registration_that_would_overflow_the_snapshot_budget_is_refused_while_others_keep_syncing(
        make_cp: CpFactory) -> None:
    cp = await make_cp(snapshot_budget_bytes=2000, warmup_timeout=0.0)
    a = await FakeSidecar(target(cp), "artist-1", "artist", address="127.10.1.1").send_hello()
    b = await FakeSidecar(target(cp), "artist-2", "artist", address="127.10.1.2").send_hello()
    big = FakeSidecar(target(cp), "artist-3", "artist", address="127.10.1.3",
                      labels={"blob-1": "x" * 1000, "blob-2": "y" * 1000})
    small = FakeSidecar(target(cp), "song-1", "song", address="127.10.2.1")
    try:
        await a.snapshot_where(lambda s: instances(s) == {"artist": {"artist-1", "artist-2"}})
        await big.send_hello()
        assert await big.status_code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = await big.call.details()
        assert details.startswith("registration refused: the route snapshot would grow to about ")
        assert "over the budget of 2000 bytes (--snapshot-budget-bytes" in details
        assert sample(cp, "sidemesh_controlplane_snapshot_budget_refusals_total") == 1
        # the table everybody has keeps flowing, and newcomers that fit still join
        await small.send_hello()
        want = {"artist": {"artist-1", "artist-2"}, "song": {"song-1"}}
        for stream in (a, b, small):
            snap = await stream.snapshot_where(lambda s: instances(s) == want, timeout=2.0)
            await stream.ack(snap)
        status = await get_status(cp)
        assert {s["node_id"] for s in status["sidecars"]} == {"artist-1", "artist-2", "song-1"}
        assert status["snapshot_budget"]["budget_bytes"] == 2000
        assert status["snapshot_budget"]["current_bytes"] <= status["snapshot_budget"]["estimate_bytes"] <= 2000
    finally:
        for stream in (a, b, big, small):
            await stream.close()


# --- the incident, with real sidecar processes ----------------------------------------------

async def sidecar_states(http: aiohttp.ClientSession, addresses: list[str]) -> list[dict[str, Any]]:
    states = []
    for address in addresses:
        async with http.get(f"http://{address}:15000/state") as resp:
            states.append(await resp.json())
    return states


@pytest.mark.parametrize("layers", ["default limits", "only the snapshot budget"])
async def test_sidecar_processes_never_leave_controlplane_mode_while_a_peer_sends_huge_labels(
        layers: str, make_cp: CpFactory, procs: ProcessGroup) -> None:
    if layers == "default limits":
        cp = await make_cp(warmup_timeout=0.0)
        labels = {"zone": "x" * TWO_MB}
    else:
        # the request and label limits opened wide: the 4.5 MB snapshot of the original incident
        # (two 2.2 MB labels) is now stopped by the snapshot budget alone
        wide = 8 * 1024 * 1024
        cp = await make_cp(warmup_timeout=0.0, hello_limits=HelloLimits(
            max_request_bytes=wide, max_label_value_bytes=wide, max_label_bytes=wide))
        labels = {"a": "x" * 2_200_000, "b": "y" * 2_200_000}
    # the real sidecars join the secure control plane as in production: a join token for the
    # first certificate (identity port, checked against the CA file), then mutual TLS
    config = cp.plane.config
    assert config.join_tokens is not None and cp.identity_port is not None
    tokens = ensure_tokens(config.join_tokens, ["artist", "song"])
    addresses = []
    for service in ("artist", "song"):
        address = loopback_address()
        addresses.append(address)
        procs.start(f"{service}-sidecar", "sidecar", "--service", service, "--instance", f"{service}-1",
                    "--address", address, "--listen", address, "--outbound-listen", address,
                    "--app", "%s:%d" % closed_port(), "--controlplane", target(cp).address,
                    "--identity-port", str(cp.identity_port), "--identity-dir", str(procs.logdir / service),
                    "--join-token-file", str(tokens[service]), "--trust-bundle", str(config.ca_dir / CA_CERT_FILE),
                    "--dns-server", "%s:%d" % closed_port(), "--log-level", "info")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        deadline = time.monotonic() + 20
        while True:
            try:
                states = await sidecar_states(http, addresses)
                if all(s["mode"] == "controlplane" and set(s["services"]) == {"artist", "song"} for s in states):
                    break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "sidecars never synced"
            await asyncio.sleep(0.1)
        versions = {s["route_version"] for s in states}

        seen: list[tuple[str, str | None]] = []

        async def watch(seconds: float) -> None:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                seen.extend((s["mode"], s["route_version"]) for s in await sidecar_states(http, addresses))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch(1.0))
        bad = FakeSidecar(target(cp), "evil-1", "evil", address=loopback_address(), labels=labels)
        try:
            await bad.send_hello()
            code = await bad.status_code(timeout=10)
        finally:
            await bad.close()
        await watcher
        await watch(3.0)  # and for a while after
    assert code == (grpc.StatusCode.INVALID_ARGUMENT if layers == "default limits" else grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert len(seen) >= 40
    assert {mode for mode, _ in seen} == {"controlplane"}
    assert {version for _, version in seen} == versions  # nothing was pushed for the bad Hello
    status = await get_status(cp)
    assert {s["node_id"]: s["identity"] for s in status["sidecars"]} == {
        "artist-1": "spiffe://sidemesh.local/service/artist", "song-1": "spiffe://sidemesh.local/service/song"}
    assert sample(cp, "sidemesh_controlplane_certificates_issued_total", via="token") == 2
    if layers != "default limits":
        assert sample(cp, "sidemesh_controlplane_snapshot_budget_refusals_total") == 1
    for proc in procs.procs:
        assert proc.alive and "event=mode_change" not in proc.log().split("to=controlplane", 1)[-1]
