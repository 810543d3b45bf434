"""The control plane's vocabulary: frozen, slotted values with no protobuf in them.

``convert.py`` turns wire messages into these and back; everything else in
``controlplane/`` (registry, snapshot building, warm-up, faults, status) works
on these types only: protobuf stays at the edge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A service name is a DNS label (RFC 1123 section 2.1), lowercase: it is a DNS name in
# the fallback (DESIGN.md, "Failover") and the last segment of a SPIFFE ID. ``\Z``, not
# ``$``, so a trailing newline is not a name.
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")

LB_ROUND_ROBIN = "round_robin"
LB_LEAST_REQUEST = "least_request"
LB_POLICIES = (LB_ROUND_ROBIN, LB_LEAST_REQUEST)

DEFAULT_TIMEOUT_MS = 5000
DEFAULT_RETRIES = 1


@dataclass(frozen=True, slots=True, order=True)
class KnownEndpoint:
    """An endpoint a sidecar routes to without an instance id (learned through DNS).

    ``address`` is canonical (``str(ipaddress.ip_address(...))``), so it
    compares equal to the address of the instance that registers there.
    """

    service: str
    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.service}@{host}:{self.port}"

    def as_json(self) -> dict[str, object]:
        return {"service": self.service, "address": self.address, "port": self.port}


@dataclass(frozen=True, slots=True)
class Hello:
    """A validated registration: who the sidecar is and what it last knew."""

    node_id: str
    service: str
    address: str
    port: int
    labels: tuple[tuple[str, str], ...] = ()
    last_version: str = ""
    # instance ids in the sidecar's last applied table (restart safety, warmup.py)
    known_instances: frozenset[str] = frozenset()
    # endpoints it routes to that have no instance id (learned through DNS)
    known_endpoints: frozenset[KnownEndpoint] = frozenset()
    # why entries of the wire Hello's known_endpoints were left out (for the log)
    dropped_known_endpoints: tuple[str, ...] = field(default=(), compare=False)

    @property
    def endpoint(self) -> KnownEndpoint:
        """Where this sidecar itself is reached, in the terms of ``known_endpoints``."""
        return KnownEndpoint(self.service, self.address, self.port)


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered sidecar, as other sidecars should reach it."""

    node_id: str
    service: str
    address: str
    port: int
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_hello(cls, hello: Hello) -> Instance:
        return cls(hello.node_id, hello.service, hello.address, hello.port, hello.labels)


@dataclass(frozen=True, slots=True)
class Authorization:
    """Who may call a service (DESIGN.md, "Identity"); its sidecars enforce it inbound.

    ``enforced=False`` lets any mesh identity call; with ``enforced=True`` only the
    services named in ``allowed_callers`` (sorted) may, and an empty tuple means nobody.
    """

    enforced: bool = False
    allowed_callers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """Per-service routing policy sent with every snapshot."""

    timeout_ms: int = DEFAULT_TIMEOUT_MS
    retries: int = DEFAULT_RETRIES
    lb: str = LB_ROUND_ROBIN
    authorization: Authorization = Authorization()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one instance of a service listens (its sidecar's inbound)."""

    address: str
    port: int
    instance: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceRoutes:
    """One service of a snapshot: its endpoints (sorted by instance) and policy."""

    name: str
    endpoints: tuple[Endpoint, ...]
    policy: ServicePolicy


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A full route table at one version. ``services`` is sorted by name."""

    version: str
    services: tuple[ServiceRoutes, ...]
    created_at: float = field(default=0.0, compare=False)

    @property
    def endpoint_count(self) -> int:
        return sum(len(s.endpoints) for s in self.services)


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected faults for drills (faults.py). The default is no fault."""

    empty_snapshot: bool = False
    dropped_services: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return self.empty_snapshot or bool(self.dropped_services)

    def as_json(self) -> dict[str, object]:
        return {
            "empty_snapshot": self.empty_snapshot,
            "dropped_services": sorted(self.dropped_services),
        }


@dataclass(frozen=True, slots=True)
class AckMessage:
    """An ACK (accepted) or NACK (not accepted, with ``error_detail``)."""

    version: str
    nonce: str
    accepted: bool
    error_detail: str = ""


@dataclass(frozen=True, slots=True)
class PingMessage:
    """A sidecar asking whether its stream is alive; answered at once with ``pong = seq``."""

    seq: int


@dataclass(frozen=True, slots=True)
class PreparedSnapshot:
    """A snapshot with its wire encoding (nonce not set), built once per version."""

    snapshot: Snapshot
    wire: bytes

    @property
    def version(self) -> str:
        return self.snapshot.version


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """A request for a workload certificate: a PEM CSR and the sidecar's node id (for the log)."""

    csr_pem: bytes
    node_id: str = ""


@dataclass(frozen=True, slots=True)
class Nack:
    """The last snapshot a sidecar rejected and why."""

    version: str
    reason: str
