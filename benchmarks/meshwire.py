"""The control-plane benchmark's only protobuf module (STYLE rule 12: pb at the edge).

A simulated sidecar needs three things from the wire: a Hello, an Ack, and the
version and nonce of each Snapshot it receives. Parsing a full 1000-endpoint
Snapshot costs ~0.3 ms in Python; a thousand of them in one load process would
measure the load process, not the control plane. So snapshots are decoded with
``SnapshotHead``, a message type built at run time (with protobuf's own
descriptor API) that declares only fields 1 (version) and 2 (nonce) of
``sidemesh.v1.Snapshot``; protobuf skips the rest as unknown fields (~40 us).
``full_instances`` decodes a whole Snapshot where the content is checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from meshpb.v1 import discovery_pb2

STREAM_METHOD = "/sidemesh.v1.Discovery/Stream"


def _snapshot_head_class() -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="benchmarks/snapshot_head.proto", package="sidemesh.bench", syntax="proto3")
    msg = fdp.message_type.add(name="SnapshotHead")
    for number, name in ((1, "version"), (2, "nonce")):
        msg.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("sidemesh.bench.SnapshotHead"))


_SnapshotHead = _snapshot_head_class()


def hello(*, node_id: str, service: str, address: str, port: int) -> bytes:
    """A serialized DiscoveryRequest carrying a Hello (no known instances: never held by warm-up)."""
    return discovery_pb2.DiscoveryRequest(hello=discovery_pb2.Hello(
        node_id=node_id, service=service, address=address, port=port,
        labels={"bench": "true"})).SerializeToString()


def ack(version: str, nonce: str) -> bytes:
    """A serialized DiscoveryRequest carrying an ACK of ``version``/``nonce``."""
    return discovery_pb2.DiscoveryRequest(
        ack=discovery_pb2.Ack(version=version, nonce=nonce, accepted=True)).SerializeToString()


def snapshot_head(data: bytes) -> tuple[str, str]:
    """(version, nonce) of a serialized Snapshot, without decoding its services."""
    head = _SnapshotHead.FromString(data)
    return str(head.version), str(head.nonce)


def full_instances(data: bytes) -> set[str]:
    """Every endpoint's instance id in a serialized Snapshot (full decode)."""
    snap = discovery_pb2.Snapshot.FromString(data)
    return {e.instance for s in snap.services for e in s.endpoints}


def identity(data: bytes) -> bytes:
    """A (de)serializer that leaves bytes as they are (we serialize ourselves)."""
    return data


RAW: Callable[[bytes], bytes] = identity
