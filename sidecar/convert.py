"""The protobuf edge: wire messages <-> the sidecar's model. The only module importing *_pb2.

Validation happens here, once, before anything is applied: a snapshot that fails it is
NACKed with the reason and the last good table stays.
"""

from __future__ import annotations

import ipaddress
import re
from types import MappingProxyType

from meshpb.v1 import discovery_pb2 as pb

from sidecar.errors import SnapshotRejected
from sidecar.model import (
    ALLOW_ALL,
    DEFAULT_POLICY,
    LB_POLICIES,
    LB_ROUND_ROBIN,
    Authorization,
    Endpoint,
    Policy,
    RouteTable,
    ServiceEntry,
)

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAX_TIMEOUT_MS = 3_600_000
_MAX_RETRIES = 5

Snapshot = pb.Snapshot
DiscoveryRequest = pb.DiscoveryRequest


def is_service_name(name: str) -> bool:
    return bool(_LABEL.match(name))


def table_from_snapshot(msg: pb.Snapshot) -> RouteTable:
    """Validate and convert; raises SnapshotRejected with a reason a human can act on."""
    version = msg.version
    if not version:
        raise SnapshotRejected(version, "snapshot has no version")
    services: dict[str, ServiceEntry] = {}
    for svc in msg.services:
        if not is_service_name(svc.name):
            raise SnapshotRejected(version, f"invalid service name {svc.name!r}")
        if svc.name in services:
            raise SnapshotRejected(version, f"service {svc.name!r} appears twice")
        endpoints = []
        seen: set[tuple[str, int]] = set()
        for ep in svc.endpoints:
            try:
                address = str(ipaddress.ip_address(ep.address))
            except ValueError:
                raise SnapshotRejected(
                    version, f"service {svc.name!r}: endpoint address {ep.address!r} is not an IP address"
                ) from None
            if not 1 <= ep.port <= 65535:
                raise SnapshotRejected(version, f"service {svc.name!r}: endpoint port {ep.port} out of range")
            if (address, ep.port) in seen:
                continue
            seen.add((address, ep.port))
            endpoints.append(Endpoint(address, ep.port, ep.instance or f"{address}:{ep.port}"))
        services[svc.name] = ServiceEntry(svc.name, tuple(endpoints), _policy(version, svc))
    return RouteTable(version, msg.nonce, MappingProxyType(services))


def _policy(version: str, svc: pb.Service) -> Policy:
    p = svc.policy
    lb = p.lb or LB_ROUND_ROBIN
    if lb not in LB_POLICIES:
        raise SnapshotRejected(version, f"service {svc.name!r}: unknown lb policy {lb!r}")
    if p.timeout_ms > _MAX_TIMEOUT_MS:
        raise SnapshotRejected(version, f"service {svc.name!r}: timeout_ms {p.timeout_ms} exceeds one hour")
    if p.retries > _MAX_RETRIES:
        raise SnapshotRejected(version, f"service {svc.name!r}: retries {p.retries} exceeds {_MAX_RETRIES}")
    timeout_s = p.timeout_ms / 1000 if p.timeout_ms else DEFAULT_POLICY.timeout_s
    callers = frozenset(p.authorization.allowed_callers)
    for caller in callers:
        if not is_service_name(caller):
            raise SnapshotRejected(version, f"service {svc.name!r}: allowed caller {caller!r} is not a service name")
    authz = Authorization(enforced=p.authorization.enforced, allowed_callers=callers)
    return Policy(timeout_s=timeout_s, retries=p.retries, lb=lb,
                  authorization=authz if authz != ALLOW_ALL else ALLOW_ALL)


def hello(
    *,
    node_id: str,
    service: str,
    address: str,
    port: int,
    labels: dict[str, str],
    last_version: str,
    known_instances: tuple[str, ...],
    known_endpoints: tuple[tuple[str, str, int], ...] = (),
) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(
        hello=pb.Hello(
            node_id=node_id,
            service=service,
            address=address,
            port=port,
            labels=labels,
            last_version=last_version,
            known_instances=known_instances,
            known_endpoints=[pb.KnownEndpoint(service=s, address=a, port=p) for s, a, p in known_endpoints],
        )
    )


def ping(seq: int) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(ping=pb.Ping(seq=seq))


def is_pong(msg: pb.Snapshot) -> bool:
    """A Snapshot that only answers a Ping: no table, not to be applied or acknowledged."""
    return msg.pong != 0


def ack(version: str, nonce: str) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(ack=pb.Ack(version=version, nonce=nonce, accepted=True))


def nack(version: str, nonce: str, reason: str) -> pb.DiscoveryRequest:
    return pb.DiscoveryRequest(ack=pb.Ack(version=version, nonce=nonce, accepted=False, error_detail=reason))


def issue_request(csr_pem: bytes, node_id: str) -> pb.IssueRequest:
    return pb.IssueRequest(csr_pem=csr_pem.decode("ascii"), node_id=node_id)


def issued(reply: pb.IssueResponse) -> tuple[bytes, bytes]:
    """(certificate PEM, trust bundle PEM) of an ``Identity.Issue`` answer."""
    return reply.cert_pem.encode("ascii", "replace"), reply.bundle_pem.encode("ascii", "replace")
