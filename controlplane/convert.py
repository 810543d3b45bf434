"""The protobuf edge of the control plane: the only module importing ``*_pb2``.

Inbound: ``DiscoveryRequest`` -> ``model.Hello`` (validated) or ``model.AckMessage``.
Outbound: ``model.Snapshot`` -> wire bytes. A snapshot is serialized once per
version (``encode_snapshot``) and each push only appends its nonce
(``with_nonce``): protobuf defines concatenated encodings of a message as the
merge of both, so ``base + encode(Snapshot(nonce=n))`` parses as the snapshot
with that nonce. Pushing one version to 1000 streams therefore costs one
serialization, not 1000 (issue 5).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from controlplane.model import AckMessage, Hello, Snapshot
from meshpb.v1 import discovery_pb2

SERVICE_NAME: str = discovery_pb2.DESCRIPTOR.services_by_name["Discovery"].full_name
METHOD_NAME = "Stream"

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_NODE_ID = 253
_BAD_NODE_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


class ProtocolError(ValueError):
    """A message the protocol does not allow here; ``reason`` is for the peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidHello(ProtocolError):
    """A Hello whose fields cannot make a reachable registration."""


def request_deserializer() -> Callable[[bytes], Any]:
    """For the gRPC method handler: bytes -> DiscoveryRequest."""
    return discovery_pb2.DiscoveryRequest.FromString


def identity_serializer(data: bytes) -> bytes:
    """Responses are pre-serialized by ``encode_snapshot``/``with_nonce``."""
    return data


def validate_hello(msg: Any) -> Hello:
    """Check a wire Hello and convert it; raise ``InvalidHello`` with the reason."""
    node_id = msg.node_id
    if not node_id:
        raise InvalidHello("node_id is empty")
    if len(node_id) > MAX_NODE_ID or _BAD_NODE_CHARS.search(node_id):
        raise InvalidHello(f"node_id {node_id[:64]!r} is longer than {MAX_NODE_ID} or holds whitespace/control characters")
    service = msg.service
    if not service:
        raise InvalidHello("service is empty")
    if not DNS_LABEL.match(service):
        raise InvalidHello(f"service {service[:64]!r} is not a DNS label (lowercase a-z, 0-9, '-', 1..63 characters)")
    try:
        address = ipaddress.ip_address(msg.address)
    except ValueError as exc:
        raise InvalidHello(f"address {msg.address[:64]!r} is not an IP literal") from exc
    if address.is_unspecified:
        raise InvalidHello(f"address {msg.address!r} is unspecified; advertise an address other sidecars can reach")
    if not 1 <= msg.port <= 65535:
        raise InvalidHello(f"port {msg.port} is out of range 1..65535")
    return Hello(
        node_id=node_id,
        service=service,
        address=str(address),
        port=int(msg.port),
        labels=tuple(sorted(msg.labels.items())),
        last_version=msg.last_version,
        known_instances=frozenset(i for i in msg.known_instances if i),
    )


def decode_first(msg: Any) -> Hello:
    """The first message of a stream: it must be a valid Hello."""
    kind = msg.WhichOneof("kind")
    if kind != "hello":
        raise ProtocolError(f"first message must be a hello, got {kind or 'an empty message'}")
    return validate_hello(msg.hello)


def decode_next(msg: Any) -> AckMessage:
    """Any later message: it must be an Ack (a second Hello is an error)."""
    kind = msg.WhichOneof("kind")
    if kind != "ack":
        raise ProtocolError(
            "a second hello on one stream is not allowed" if kind == "hello"
            else "empty message: expected an ack"
        )
    ack = msg.ack
    return AckMessage(version=ack.version, nonce=ack.nonce, accepted=ack.accepted, error_detail=ack.error_detail)


def snapshot_to_pb(snapshot: Snapshot, nonce: str = "") -> Any:
    """model -> ``discovery_pb2.Snapshot`` (used by tests and ``encode_snapshot``)."""
    msg = discovery_pb2.Snapshot(version=snapshot.version, nonce=nonce)
    for svc in snapshot.services:
        out = msg.services.add(name=svc.name)
        out.policy.timeout_ms = svc.policy.timeout_ms
        out.policy.retries = svc.policy.retries
        out.policy.lb = svc.policy.lb
        for ep in svc.endpoints:
            e = out.endpoints.add(address=ep.address, port=ep.port, instance=ep.instance)
            e.labels.update(dict(ep.labels))
    return msg


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The snapshot's wire encoding without a nonce; done once per version."""
    return bytes(snapshot_to_pb(snapshot).SerializeToString(deterministic=True))


def with_nonce(base: bytes, nonce: str) -> bytes:
    """``base`` (from ``encode_snapshot``) with ``nonce`` set, by protobuf merge."""
    return base + discovery_pb2.Snapshot(nonce=nonce).SerializeToString()


def claimed_node_id(msg: Any) -> str:
    """The node_id a rejected first message claimed, for the log line ("" if none)."""
    if msg.WhichOneof("kind") == "hello":
        return str(msg.hello.node_id)[:64]
    return ""
