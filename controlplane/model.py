"""The control plane's vocabulary: frozen, slotted values with no protobuf in them.

``convert.py`` turns wire messages into these and back; everything else in
``controlplane/`` (registry, snapshot building, warm-up, faults, status) works
on these types only (STYLE.md point 12).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LB_ROUND_ROBIN = "round_robin"
LB_LEAST_REQUEST = "least_request"
LB_POLICIES = (LB_ROUND_ROBIN, LB_LEAST_REQUEST)

DEFAULT_TIMEOUT_MS = 5000
DEFAULT_RETRIES = 1


@dataclass(frozen=True, slots=True)
class Hello:
    """A validated registration: who the sidecar is and what it last knew."""

    node_id: str
    service: str
    address: str
    port: int
    labels: tuple[tuple[str, str], ...] = ()
    last_version: str = ""
    # instance ids in the sidecar's last applied table (restart safety, issue 3)
    known_instances: frozenset[str] = frozenset()


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
class ServicePolicy:
    """Per-service routing policy sent with every snapshot."""

    timeout_ms: int = DEFAULT_TIMEOUT_MS
    retries: int = DEFAULT_RETRIES
    lb: str = LB_ROUND_ROBIN


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
    """Injected faults for drills (issue 3 point 8). The default is no fault."""

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
class PreparedSnapshot:
    """A snapshot with its wire encoding (nonce not set), built once per version."""

    snapshot: Snapshot
    wire: bytes

    @property
    def version(self) -> str:
        return self.snapshot.version


@dataclass(frozen=True, slots=True)
class Nack:
    """The last snapshot a sidecar rejected and why."""

    version: str
    reason: str
