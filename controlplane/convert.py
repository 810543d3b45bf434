"""The protobuf edge of the control plane: the only module importing ``*_pb2``.

Inbound: ``DiscoveryRequest`` -> ``model.Hello`` (validated) or ``model.AckMessage``.
Outbound: ``model.Snapshot`` -> wire bytes. A snapshot is serialized once per
version (``encode_snapshot``) and each push only appends its nonce
(``with_nonce``): protobuf defines concatenated encodings of a message as the
merge of both, so ``base + encode(Snapshot(nonce=n))`` parses as the snapshot
with that nonce. Pushing one version to 1000 streams therefore costs one
serialization, not 1000.

The Identity service (``Identity/Issue``) is decoded here too: ``decode_issue_request``
turns the wire request into ``IssueRequest`` and ``encode_issue_response`` the answer
into bytes; the decisions live in ``issuer.py``.

Sizes for the snapshot budget (``budget.py``) are computed here too, since
only this module knows the encoding: ``endpoint_wire_bytes`` and
``service_frame_bytes`` are what one instance and one service add to the
encoded snapshot, and ``SNAPSHOT_FIXED_BYTES`` bounds the rest.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from controlplane.limits import HelloLimits, Violation, check_hello
from controlplane.model import (
    DNS_LABEL,
    AckMessage,
    Authorization,
    Hello,
    Instance,
    IssueRequest,
    KnownEndpoint,
    PingMessage,
    ServicePolicy,
    Snapshot,
)
from meshpb.v1 import discovery_pb2

SERVICE_NAME: str = discovery_pb2.DESCRIPTOR.services_by_name["Discovery"].full_name
METHOD_NAME = "Stream"
IDENTITY_SERVICE_NAME: str = discovery_pb2.DESCRIPTOR.services_by_name["Identity"].full_name
ISSUE_METHOD_NAME = "Issue"

_BAD_NODE_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


class ProtocolError(ValueError):
    """A message the protocol does not allow here; ``reason`` is for the peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidHello(ProtocolError):
    """A Hello whose fields cannot make a reachable registration."""


class HelloOverLimit(InvalidHello):
    """A Hello larger than a named limit (``controlplane/limits.py``)."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.reason)
        self.violation = violation


def request_deserializer() -> Callable[[bytes], Any]:
    """For the gRPC method handler: bytes -> DiscoveryRequest."""
    return discovery_pb2.DiscoveryRequest.FromString


def issue_request_deserializer() -> Callable[[bytes], Any]:
    """For the Identity/Issue method handler: bytes -> IssueRequest."""
    return discovery_pb2.IssueRequest.FromString


def identity_serializer(data: bytes) -> bytes:
    """Responses are pre-serialized by ``encode_snapshot``/``with_nonce``."""
    return data


def validate_hello(msg: Any, limits: HelloLimits = HelloLimits()) -> Hello:
    """Check a wire Hello and convert it; raise ``InvalidHello`` with the reason.

    Sizes first (``HelloOverLimit``), then meaning. Entries of ``known_endpoints``
    that could never match a registration (not a DNS-label service, not an IP
    literal, port out of range) are left out, with the reason kept in
    ``Hello.dropped_known_endpoints``: they are hints for the warm-up wait, and a
    bad hint must not cost the sidecar its registration.
    """
    violation = check_hello(
        limits, node_id=msg.node_id, address=msg.address, last_version=msg.last_version, labels=msg.labels,
        known_instances=msg.known_instances,
        known_endpoint_addresses=[e.address for e in msg.known_endpoints],
    )
    if violation is not None:
        raise HelloOverLimit(violation)
    node_id = msg.node_id
    if not node_id:
        raise InvalidHello("node_id is empty")
    if _BAD_NODE_CHARS.search(node_id):
        raise InvalidHello(f"node_id {node_id[:64]!r} holds whitespace or control characters")
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
    known_endpoints, dropped = _known_endpoints(msg.known_endpoints)
    return Hello(
        node_id=node_id,
        service=service,
        address=str(address),
        port=int(msg.port),
        labels=tuple(sorted(msg.labels.items())),
        last_version=msg.last_version,
        known_instances=frozenset(i for i in msg.known_instances if i),
        known_endpoints=known_endpoints,
        dropped_known_endpoints=dropped,
    )


def _known_endpoints(entries: Any) -> tuple[frozenset[KnownEndpoint], tuple[str, ...]]:
    """Valid entries (addresses canonical) and, for the others, why they were left out."""
    kept: set[KnownEndpoint] = set()
    dropped: list[str] = []
    for i, entry in enumerate(entries):
        why = _bad_known_endpoint(entry)
        if why is not None:
            dropped.append(f"known_endpoints[{i}]: {why}")
            continue
        kept.add(KnownEndpoint(entry.service, str(ipaddress.ip_address(entry.address)), int(entry.port)))
    return frozenset(kept), tuple(dropped)


def _bad_known_endpoint(entry: Any) -> str | None:
    if not DNS_LABEL.match(entry.service):
        return f"service {entry.service[:64]!r} is not a DNS label"
    try:
        address = ipaddress.ip_address(entry.address)
    except ValueError:
        return f"address {entry.address[:64]!r} is not an IP literal"
    if address.is_unspecified:
        return f"address {entry.address!r} is unspecified"
    if not 1 <= entry.port <= 65535:
        return f"port {entry.port} is out of range 1..65535"
    return None


def decode_issue_request(msg: Any, limits: HelloLimits = HelloLimits()) -> IssueRequest:
    """A wire IssueRequest -> ``IssueRequest``; ``ProtocolError`` for a node_id unfit for a log line.

    The CSR itself is checked by the issuer (``identity.certs.csr_identity``). The node_id
    is informational and may be empty, but it is logged, so it is held to the Hello's rules.
    """
    node_id = str(msg.node_id)
    if len(node_id.encode("utf-8", "surrogatepass")) > limits.max_node_id_bytes:
        raise ProtocolError(f"node_id is longer than {limits.max_node_id_bytes} bytes")
    if _BAD_NODE_CHARS.search(node_id):
        raise ProtocolError(f"node_id {node_id[:64]!r} holds whitespace or control characters")
    if not msg.csr_pem:
        raise ProtocolError("csr_pem is empty: send a PEM certificate signing request for your SPIFFE ID")
    return IssueRequest(csr_pem=str(msg.csr_pem).encode(), node_id=node_id)


def encode_issue_response(cert_pem: bytes, bundle_pem: bytes) -> bytes:
    """The IssueResponse's wire bytes: the new certificate and the trust bundle, PEM."""
    return bytes(discovery_pb2.IssueResponse(cert_pem=cert_pem.decode("ascii"),
                                             bundle_pem=bundle_pem.decode("ascii")).SerializeToString())


def decode_first(msg: Any, limits: HelloLimits = HelloLimits()) -> Hello:
    """The first message of a stream: it must be a valid Hello within ``limits``."""
    kind = msg.WhichOneof("kind")
    if kind != "hello":
        raise ProtocolError(f"first message must be a hello, got {kind or 'an empty message'}")
    return validate_hello(msg.hello, limits)


def decode_next(msg: Any) -> AckMessage | PingMessage:
    """Any later message: an Ack or a Ping (a second Hello is an error)."""
    kind = msg.WhichOneof("kind")
    if kind == "ping":
        if msg.ping.seq == 0:
            raise ProtocolError("ping seq must be non-zero")
        return PingMessage(seq=int(msg.ping.seq))
    if kind != "ack":
        raise ProtocolError(
            "a second hello on one stream is not allowed" if kind == "hello"
            else "empty message: expected an ack or a ping"
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
        _set_authorization(out.policy, svc.policy.authorization)
        for ep in svc.endpoints:
            e = out.endpoints.add(address=ep.address, port=ep.port, instance=ep.instance)
            e.labels.update(dict(ep.labels))
    return msg


def _set_authorization(policy: Any, authorization: Authorization) -> None:
    # left unset when not enforced: an absent message reads as enforced=false, and a
    # mesh without rules (or --insecure) then encodes exactly as before identities
    if authorization.enforced:
        policy.authorization.enforced = True
        policy.authorization.allowed_callers.extend(authorization.allowed_callers)


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The snapshot's wire encoding without a nonce; done once per version."""
    return bytes(snapshot_to_pb(snapshot).SerializeToString(deterministic=True))


# The nonce field ``with_nonce`` appends: tag, length and "<stream>-<push>",
# two counters of at most 20 digits each.
MAX_NONCE_FIELD_BYTES = 64
# Upper bound of what a snapshot holds besides its services: the version field
# (tag, length, at most 20 digits: see push.version_number) and the nonce field.
SNAPSHOT_FIXED_BYTES = 128
# the longest varint a message length can need (lengths below 2**35)
_MAX_LENGTH_PREFIX = 5


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def endpoint_wire_bytes(instance: Instance) -> int:
    """Exactly what ``instance`` adds to its service's message in the snapshot."""
    endpoint = discovery_pb2.Endpoint(address=instance.address, port=instance.port, instance=instance.node_id)
    endpoint.labels.update(dict(instance.labels))
    size = endpoint.ByteSize()
    return 1 + _varint_bytes(size) + size  # field tag, length, message


def service_frame_bytes(name: str, policy: ServicePolicy) -> int:
    """Upper bound of what a service adds to the snapshot besides its endpoints."""
    service = discovery_pb2.Service(name=name)
    service.policy.timeout_ms = policy.timeout_ms
    service.policy.retries = policy.retries
    service.policy.lb = policy.lb
    _set_authorization(service.policy, policy.authorization)
    return 1 + _MAX_LENGTH_PREFIX + service.ByteSize()


def pong(seq: int) -> bytes:
    """The answer to Ping(seq): a Snapshot with only ``pong`` set."""
    return bytes(discovery_pb2.Snapshot(pong=seq).SerializeToString())


def with_nonce(base: bytes, nonce: str) -> bytes:
    """``base`` (from ``encode_snapshot``) with ``nonce`` set, by protobuf merge."""
    return base + discovery_pb2.Snapshot(nonce=nonce).SerializeToString()


def claimed_node_id(msg: Any) -> str:
    """The node_id a rejected first message claimed, for the log line ("" if none)."""
    if msg.WhichOneof("kind") == "hello":
        return str(msg.hello.node_id)[:64]
    return ""
