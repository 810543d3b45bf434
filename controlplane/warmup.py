"""Restart safety: when a freshly started control plane may push (issue 3).

Theory of operation. A control plane that has just (re)started knows nothing;
if it pushed the first snapshot after the first Hello, every sidecar that
reconnected early would receive a table missing all the instances that have
not reconnected yet and would drop endpoints that still work. Sidecars
therefore say in their Hello which instances their last table held
(``known_instances``). The gate holds pushes from start until every instance
named in any Hello has registered, bounded by ``timeout`` seconds counted from
the first Hello that named instances; then it ends for good and one full
snapshot goes out to everybody.

Hellos that name nothing (a fresh mesh, sidecars with no table) never cause
waiting. The warm-up *window* still stays open for ``timeout`` seconds after
the first Hello, so a restarted control plane whose first caller happens to
be a brand-new sidecar still waits for the old ones that follow at once.

Pure logic: the caller passes ``now`` (a monotonic clock reading) in.
"""

from __future__ import annotations

from dataclasses import dataclass

END_ALL_REGISTERED = "all_known_registered"
END_TIMEOUT = "timeout"
END_FRESH_MESH = "fresh_mesh"


@dataclass(frozen=True, slots=True)
class WarmupDecision:
    """``hold``: do not push now. ``wait_s``: re-decide after this long at the latest."""

    hold: bool
    wait_s: float | None
    missing: frozenset[str] = frozenset()


class WarmupGate:
    """Decides whether pushes are held; see the module docstring."""

    def __init__(self, timeout: float) -> None:
        if timeout < 0:
            raise ValueError("warm-up timeout must be >= 0")
        self.timeout = timeout
        self._expected: set[str] = set()
        self._registered: set[str] = set()
        self._first_hello_at: float | None = None
        self._first_named_at: float | None = None
        self.end_reason: str | None = None
        self.ended_at: float | None = None
        self.missing_at_end: frozenset[str] = frozenset()

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    def on_hello(self, node_id: str, known_instances: frozenset[str], now: float) -> None:
        """Record a valid Hello (its sender registers with it)."""
        self._registered.add(node_id)
        if self.ended:
            return
        if self._first_hello_at is None:
            self._first_hello_at = now
        named = known_instances - {node_id}
        if named and self._first_named_at is None:
            self._first_named_at = now
        self._expected |= named

    def decide(self, now: float) -> WarmupDecision:
        """Hold pushes now? Ends the warm-up (for good) when its condition is met."""
        if self.ended:
            return WarmupDecision(hold=False, wait_s=None)
        if self._first_named_at is not None:
            missing = frozenset(self._expected - self._registered)
            if not missing:
                self._end(END_ALL_REGISTERED, now, missing)
                return WarmupDecision(hold=False, wait_s=None)
            deadline = self._first_named_at + self.timeout
            if now >= deadline:
                self._end(END_TIMEOUT, now, missing)
                return WarmupDecision(hold=False, wait_s=None)
            return WarmupDecision(hold=True, wait_s=deadline - now, missing=missing)
        if self._first_hello_at is not None:
            deadline = self._first_hello_at + self.timeout
            if now >= deadline:
                self._end(END_FRESH_MESH, now, frozenset())
                return WarmupDecision(hold=False, wait_s=None)
            return WarmupDecision(hold=False, wait_s=deadline - now)
        return WarmupDecision(hold=False, wait_s=None)

    def holding(self, now: float) -> bool:
        """For /status: are pushes held right now? (Does not end the warm-up.)"""
        if self.ended or self._first_named_at is None:
            return False
        return bool(self._expected - self._registered) and now < self._first_named_at + self.timeout

    def missing(self) -> frozenset[str]:
        return frozenset(self._expected - self._registered)

    def _end(self, reason: str, now: float, missing: frozenset[str]) -> None:
        self.end_reason = reason
        self.ended_at = now
        self.missing_at_end = missing
