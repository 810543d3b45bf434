"""The protobuf edge: snapshots are validated once, and a bad one is rejected with a reason."""

from __future__ import annotations

import pytest

from meshpb.v1 import discovery_pb2 as pb
from sidecar import convert
from sidecar.errors import SnapshotRejected
from sidecar.model import DEFAULT_POLICY, LB_LEAST_REQUEST, Endpoint, Policy


def _snapshot(*services: pb.Service, version: str = "v1") -> pb.Snapshot:
    return pb.Snapshot(version=version, nonce="n1", services=list(services))


def _svc(name: str = "artist", *eps: tuple[str, int], **policy: object) -> pb.Service:
    return pb.Service(
        name=name,
        endpoints=[pb.Endpoint(address=a, port=p, instance=f"{name}-{i}") for i, (a, p) in enumerate(eps, 1)],
        policy=pb.Policy(**policy),  # type: ignore[arg-type]
    )


def test_valid_snapshot_becomes_a_route_table() -> None:
    table = convert.table_from_snapshot(
        _snapshot(_svc("artist", ("127.0.0.1", 15006), ("::1", 15006)), _svc("image", ("10.0.0.1", 1), timeout_ms=250, retries=2, lb=LB_LEAST_REQUEST))
    )
    assert table.version == "v1" and table.nonce == "n1"
    assert table.services["artist"].endpoints == (Endpoint("127.0.0.1", 15006, "artist-1"), Endpoint("::1", 15006, "artist-2"))
    # an unset policy means the sidecar defaults (proto: timeout_ms 0 = sidecar default; retries 0 = none)
    assert table.services["artist"].policy == Policy(timeout_s=DEFAULT_POLICY.timeout_s, retries=0)
    assert isinstance(table.services["artist"].policy.timeout_s, float)
    assert table.services["image"].policy == Policy(timeout_s=0.25, retries=2, lb=LB_LEAST_REQUEST)
    assert table.instances() == ("artist-1", "artist-2", "image-1")


def test_duplicate_endpoints_are_collapsed() -> None:
    table = convert.table_from_snapshot(_snapshot(_svc("artist", ("127.0.0.1", 15006), ("127.0.0.1", 15006))))
    assert len(table.services["artist"].endpoints) == 1


@pytest.mark.parametrize(
    ("snapshot", "reason_part"),
    [
        (_snapshot(_svc("artist", ("127.0.0.1", 1)), version=""), "no version"),
        (_snapshot(_svc("artist", ("not-an-ip", 15006))), "'not-an-ip' is not an IP address"),
        (_snapshot(_svc("artist", ("127.0.0.1", 0))), "port 0 out of range"),
        (_snapshot(_svc("artist", ("127.0.0.1", 70000))), "port 70000 out of range"),
        (_snapshot(_svc("artist", ("127.0.0.1", 1)), _svc("artist", ("127.0.0.2", 1))), "appears twice"),
        (_snapshot(_svc("artist", ("127.0.0.1", 1), lb="random")), "unknown lb policy 'random'"),
        (_snapshot(_svc("Artist_1", ("127.0.0.1", 1))), "invalid service name"),
        (_snapshot(_svc("artist", ("127.0.0.1", 1), retries=9)), "retries 9"),
        (_snapshot(_svc("artist", ("127.0.0.1", 1), timeout_ms=4_000_000)), "exceeds one hour"),
    ],
    ids=["no-version", "bad-address", "port-0", "port-70000", "duplicate-service", "bad-lb", "bad-name", "retries", "timeout"],
)
def test_invalid_snapshot_is_rejected_with_its_reason(snapshot: pb.Snapshot, reason_part: str) -> None:
    with pytest.raises(SnapshotRejected) as info:
        convert.table_from_snapshot(snapshot)
    assert reason_part in info.value.reason
    assert info.value.version == snapshot.version


def test_ack_and_nack_echo_version_and_nonce() -> None:
    ack = convert.ack("v7", "n7")
    assert (ack.ack.version, ack.ack.nonce, ack.ack.accepted) == ("v7", "n7", True)
    nack = convert.nack("v8", "n8", "bad address")
    assert (nack.ack.version, nack.ack.accepted, nack.ack.error_detail) == ("v8", False, "bad address")
