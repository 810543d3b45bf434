"""Restart safety: when a freshly started control plane may push.

Theory of operation. A control plane that has just (re)started knows nothing;
if it pushed the first snapshot after the first Hello, every sidecar that
reconnected early would receive a table missing all the instances that have
not reconnected yet and would drop endpoints that still work. Sidecars
therefore say in their Hello which instances their last table held
(``known_instances``) and which endpoints they route to without an instance
id, having learned them through DNS (``known_endpoints``: service, address,
port). The gate holds pushes from start until every instance named in any
Hello has registered and, for every endpoint named, some instance has
registered with that service, address and port; bounded by ``timeout`` seconds
counted from the first Hello that named anything; then it ends for good and
one full snapshot goes out to everybody. (DESIGN.md, "Failover": a fresh
control plane that has not heard from every sidecar yet must not push a
partial view that drops working endpoints.)

A Hello never waits for its own sender: its node_id and its own endpoint are
registered by that very Hello. Hellos that name nothing (a fresh mesh, sidecars with no table) never cause
waiting. The warm-up *window* still stays open for ``timeout`` seconds after
the first Hello, so a restarted control plane whose first caller happens to
be a brand-new sidecar still waits for the old ones that follow at once.

Pure logic: the caller passes ``now`` (a monotonic clock reading) in.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.model import KnownEndpoint

END_ALL_REGISTERED = "all_known_registered"
END_TIMEOUT = "timeout"
END_FRESH_MESH = "fresh_mesh"


@dataclass(frozen=True, slots=True)
class WarmupDecision:
    """``hold``: do not push now. ``wait_s``: re-decide after this long at the latest."""

    hold: bool
    wait_s: float | None
    missing: frozenset[str] = frozenset()
    missing_endpoints: frozenset[KnownEndpoint] = frozenset()


class WarmupGate:
    """Decides whether pushes are held; see the module docstring."""

    def __init__(self, timeout: float) -> None:
        if timeout < 0:
            raise ValueError("warm-up timeout must be >= 0")
        self.timeout = timeout
        self._expected: set[str] = set()
        self._registered: set[str] = set()
        self._expected_endpoints: set[KnownEndpoint] = set()
        self._registered_endpoints: set[KnownEndpoint] = set()
        self._first_hello_at: float | None = None
        self._first_named_at: float | None = None
        self.end_reason: str | None = None
        self.ended_at: float | None = None
        self.missing_at_end: frozenset[str] = frozenset()
        self.missing_endpoints_at_end: frozenset[KnownEndpoint] = frozenset()

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    def on_hello(
        self,
        node_id: str,
        known_instances: frozenset[str],
        now: float,
        *,
        endpoint: KnownEndpoint | None = None,
        known_endpoints: frozenset[KnownEndpoint] = frozenset(),
    ) -> None:
        """Record a valid Hello (its sender registers with it, reachable at ``endpoint``)."""
        self._registered.add(node_id)
        if endpoint is not None:
            self._registered_endpoints.add(endpoint)
        if self.ended:
            return
        if self._first_hello_at is None:
            self._first_hello_at = now
        named = known_instances - {node_id}
        named_endpoints = known_endpoints - {endpoint} if endpoint is not None else known_endpoints
        if (named or named_endpoints) and self._first_named_at is None:
            self._first_named_at = now
        self._expected |= named
        self._expected_endpoints |= named_endpoints

    def decide(self, now: float) -> WarmupDecision:
        """Hold pushes now? Ends the warm-up (for good) when its condition is met."""
        if self.ended:
            return WarmupDecision(hold=False, wait_s=None)
        if self._first_named_at is not None:
            missing, missing_endpoints = self.missing(), self.missing_endpoints()
            if not missing and not missing_endpoints:
                self._end(END_ALL_REGISTERED, now)
                return WarmupDecision(hold=False, wait_s=None)
            deadline = self._first_named_at + self.timeout
            if now >= deadline:
                self._end(END_TIMEOUT, now)
                return WarmupDecision(hold=False, wait_s=None)
            return WarmupDecision(hold=True, wait_s=deadline - now, missing=missing,
                                  missing_endpoints=missing_endpoints)
        if self._first_hello_at is not None:
            deadline = self._first_hello_at + self.timeout
            if now >= deadline:
                self._end(END_FRESH_MESH, now)
                return WarmupDecision(hold=False, wait_s=None)
            return WarmupDecision(hold=False, wait_s=deadline - now)
        return WarmupDecision(hold=False, wait_s=None)

    def holding(self, now: float) -> bool:
        """For /status: are pushes held right now? (Does not end the warm-up.)"""
        if self.ended or self._first_named_at is None:
            return False
        waiting = bool(self.missing()) or bool(self.missing_endpoints())
        return waiting and now < self._first_named_at + self.timeout

    def missing(self) -> frozenset[str]:
        """Named instances that have not registered (yet)."""
        return frozenset(self._expected - self._registered)

    def missing_endpoints(self) -> frozenset[KnownEndpoint]:
        """Named endpoints no instance has registered at (yet)."""
        return frozenset(self._expected_endpoints - self._registered_endpoints)

    def _end(self, reason: str, now: float) -> None:
        self.end_reason = reason
        self.ended_at = now
        self.missing_at_end = self.missing()
        self.missing_endpoints_at_end = self.missing_endpoints()
