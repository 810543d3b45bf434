"""The sidecar's own view of routes: frozen, slotted dataclasses, no protobuf.

``convert.py`` is the only place that turns the wire format into these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Source(StrEnum):
    """Where an endpoint came from; also the value of ``x-sidemesh-route``."""

    CONTROLPLANE = "controlplane"
    DNS = "dns"
    # last-known-good: a control-plane table kept after the stream was lost, or a stale DNS answer
    CACHE = "cache"


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    instance: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


LB_ROUND_ROBIN = "round_robin"
LB_LEAST_REQUEST = "least_request"
LB_POLICIES = (LB_ROUND_ROBIN, LB_LEAST_REQUEST)


@dataclass(frozen=True, slots=True)
class Authorization:
    """Who may call a service, enforced by its sidecars' inbound listeners (DESIGN.md, "Identity")."""

    enforced: bool = False
    allowed_callers: frozenset[str] = frozenset()

    def allows(self, caller: str) -> bool:
        return not self.enforced or caller in self.allowed_callers

    def describe(self) -> str:
        if not self.enforced:
            return "any mesh identity may call"
        return f"allowed callers: {', '.join(sorted(self.allowed_callers)) or 'none'}"


ALLOW_ALL = Authorization()


@dataclass(frozen=True, slots=True)
class Policy:
    timeout_s: float = 5.0
    retries: int = 1
    lb: str = LB_ROUND_ROBIN
    authorization: Authorization = ALLOW_ALL


DEFAULT_POLICY = Policy()


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    name: str
    endpoints: tuple[Endpoint, ...]
    policy: Policy = DEFAULT_POLICY


@dataclass(frozen=True, slots=True)
class RouteTable:
    """One applied control-plane snapshot: a versioned, latest-value table."""

    version: str
    nonce: str
    services: Mapping[str, ServiceEntry] = field(default_factory=lambda: MappingProxyType({}))

    def instances(self) -> tuple[str, ...]:
        return tuple(sorted({ep.instance for s in self.services.values() for ep in s.endpoints if ep.instance}))
