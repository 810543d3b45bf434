"""The registry of instances, keyed by node_id.

A sidecar's stream is its registration and its lease (DESIGN.md, "Discovery
protocol"): the server registers an instance with the stream's lease object
when a Hello arrives and unregisters it when the stream ends. The newest
stream for a node_id replaces the old one (a sidecar that reconnected before
its old stream was noticed dead); the old stream's end then must not remove
the new registration, so ``unregister`` checks the lease's identity.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from controlplane.model import Instance

L = TypeVar("L")


class Registry(Generic[L]):
    """Instances by node_id, each held by one lease (the stream's session)."""

    def __init__(self) -> None:
        self._by_node: dict[str, tuple[Instance, L]] = {}
        self._seen: set[str] = set()
        # bumped on every change, so watchers can tell whether anything moved
        self.generation = 0

    def register(self, instance: Instance, lease: L) -> L | None:
        """Add or replace ``instance``; return the lease it replaced, if any."""
        old = self._by_node.get(instance.node_id)
        self._by_node[instance.node_id] = (instance, lease)
        self._seen.add(instance.node_id)
        self.generation += 1
        return None if old is None else old[1]

    def unregister(self, node_id: str, lease: L) -> Instance | None:
        """Remove ``node_id`` if ``lease`` still holds it; return the removed instance."""
        entry = self._by_node.get(node_id)
        if entry is None or entry[1] is not lease:
            return None
        del self._by_node[node_id]
        self.generation += 1
        return entry[0]

    def instances(self) -> tuple[Instance, ...]:
        """Every registered instance, sorted by node_id."""
        return tuple(inst for _, (inst, _) in sorted(self._by_node.items()))

    def leases(self) -> list[L]:
        return [lease for _, lease in self._by_node.values()]

    def lease_of(self, node_id: str) -> L | None:
        entry = self._by_node.get(node_id)
        return None if entry is None else entry[1]

    def has_registered(self, node_id: str) -> bool:
        """True once ``node_id`` has registered at any time since start (warm-up)."""
        return node_id in self._seen

    @property
    def seen(self) -> frozenset[str]:
        return frozenset(self._seen)

    def __len__(self) -> int:
        return len(self._by_node)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_node
