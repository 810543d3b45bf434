"""The snapshot budget: refuse a registration that would make the snapshot too big.

Theory of operation. Every connected sidecar receives the whole route table in
one gRPC message, and a sidecar refuses a message over its receive limit
(``limits.SIDECAR_MAX_RECEIVE_BYTES``). A table past that limit would be
refused by *every* sidecar, so one registration too many must be turned away
instead (RESOURCE_EXHAUSTED), and everybody else keeps the table they have.

Deciding must be cheap: the table is not re-encoded per Hello. Instead the
budget keeps a running *upper bound* of the encoded snapshot: a fixed part
(version, nonce, framing), plus for each service present its framing (name,
policy, and the longest length prefix the message could need), plus for each
registered instance its own encoded endpoint with framing. ``convert.py``
computes those parts; protobuf encodes repeated fields as the concatenation of
their elements, so the sum bounds the real encoding from above. Pure logic,
kept in step with the registry by the server (same register/unregister calls).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """``admitted``: the registration fits. ``estimate``: the bound with it included."""

    admitted: bool
    estimate: int
    limit: int

    @property
    def reason(self) -> str:
        return (f"the route snapshot would grow to about {self.estimate} bytes, over the budget of "
                f"{self.limit} bytes (--snapshot-budget-bytes; sidecars refuse larger messages)")


class SnapshotBudget:
    """A running upper bound of the encoded snapshot size, by node_id."""

    def __init__(self, limit_bytes: int, *, fixed_bytes: int, service_bytes: Callable[[str], int]) -> None:
        if limit_bytes < 1:
            raise ValueError("snapshot budget must be at least 1 byte")
        self.limit = limit_bytes
        self._fixed = fixed_bytes
        self._service_bytes = service_bytes
        self._by_node: dict[str, tuple[str, int]] = {}
        self._instances_per_service: Counter[str] = Counter()
        self._endpoints_total = 0
        self._services_total = 0

    @property
    def estimate(self) -> int:
        """Upper bound of the snapshot's encoded size for what is registered now."""
        return self._fixed + self._services_total + self._endpoints_total

    def decide(self, node_id: str, service: str, endpoint_bytes: int) -> BudgetDecision:
        """Would registering (or replacing) ``node_id`` keep the snapshot within budget?"""
        old = self._by_node.get(node_id)
        endpoints = self._endpoints_total + endpoint_bytes - (old[1] if old is not None else 0)
        services = self._services_total
        if self._instances_per_service[service] == 0:
            services += self._service_bytes(service)
        # a replaced instance's service may vanish with it; keeping its framing
        # counted only makes the bound looser, never wrong
        estimate = self._fixed + services + endpoints
        return BudgetDecision(estimate <= self.limit, estimate, self.limit)

    def add(self, node_id: str, service: str, endpoint_bytes: int) -> None:
        """Record a registration (replacing one for the same node_id)."""
        self.remove(node_id)
        if self._instances_per_service[service] == 0:
            self._services_total += self._service_bytes(service)
        self._instances_per_service[service] += 1
        self._by_node[node_id] = (service, endpoint_bytes)
        self._endpoints_total += endpoint_bytes

    def remove(self, node_id: str) -> None:
        """Forget a registration that left; unknown node_ids are ignored."""
        old = self._by_node.pop(node_id, None)
        if old is None:
            return
        service, endpoint_bytes = old
        self._endpoints_total -= endpoint_bytes
        self._instances_per_service[service] -= 1
        if self._instances_per_service[service] == 0:
            del self._instances_per_service[service]
            self._services_total -= self._service_bytes(service)
