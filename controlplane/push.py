"""Snapshot building and the publisher that pushes it to every stream.

Building is pure: ``build_services`` turns the registry's instances, the
policies and the injected faults into a route table; ``next_version`` derives
a version from the wall clock so it increases across restarts too (and never
goes below what a reconnecting sidecar reported as its ``last_version``).

The ``Publisher`` coalesces: a registry change only marks it dirty; it waits
``coalesce_ms`` so a burst of joins/leaves becomes one version, waits until
the previous version has been written to every stream (bounded; under a storm
of joins the push rate so follows what the server can write), asks the
warm-up gate whether it may push, builds, serializes once, and offers the
result to every session's latest-value slot. A table equal to the current
one keeps the current version (no push to streams that already have it).

A table whose encoding exceeds ``max_snapshot_bytes`` is never offered: every
sidecar would refuse it. Registrations are held to that budget before they
happen (``budget.py``), so this is a last line that only a wrong estimate
reaches; it keeps the current table flowing and logs an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

from controlplane import convert
from controlplane.faults import apply_faults_to_services
from controlplane.limits import DEFAULT_SNAPSHOT_BUDGET_BYTES
from controlplane.metrics import Metrics
from controlplane.model import (
    Endpoint,
    Faults,
    Instance,
    PreparedSnapshot,
    ServicePolicy,
    ServiceRoutes,
    Snapshot,
)
from controlplane.registry import Registry
from controlplane.session import Fanout, Session
from controlplane.warmup import WarmupGate

log = logging.getLogger("controlplane.push")

# Backpressure: before building the next version, wait (at most this long) for
# every stream to have written the previous one. A stream stuck in flow control
# must not hold everybody, hence the bound.
MAX_FANOUT_WAIT_S = 0.5


def build_services(
    instances: Iterable[Instance],
    policy_for: Callable[[str], ServicePolicy],
    faults: Faults = Faults(),
) -> tuple[ServiceRoutes, ...]:
    """The route table: services sorted by name, endpoints by instance id."""
    by_service: defaultdict[str, list[Endpoint]] = defaultdict(list)
    for inst in instances:
        by_service[inst.service].append(Endpoint(inst.address, inst.port, inst.node_id, inst.labels))
    services = tuple(
        ServiceRoutes(name, tuple(sorted(eps, key=lambda e: e.instance)), policy_for(name))
        for name, eps in sorted(by_service.items())
    )
    return apply_faults_to_services(services, faults)


def version_number(version: str | None) -> int:
    """A version of ours as an int; 0 for none or a foreign/opaque one."""
    if version and version.isdigit() and len(version) < 20:
        return int(version)
    return 0


def next_version(prev: str | None, now: float, floor: int = 0) -> str:
    """``str(max(prev + 1, floor + 1, now in ms))``: increasing, also across restarts."""
    return str(max(version_number(prev) + 1, floor + 1, int(now * 1000)))


class Publisher:
    """Builds snapshots on change and offers them to every registered session."""

    def __init__(
        self,
        registry: Registry[Session],
        warmup: WarmupGate,
        metrics: Metrics,
        *,
        policy_for: Callable[[str], ServicePolicy],
        coalesce_s: float,
        max_snapshot_bytes: int = DEFAULT_SNAPSHOT_BUDGET_BYTES,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._warmup = warmup
        self._metrics = metrics
        self._policy_for = policy_for
        self._coalesce_s = coalesce_s
        self._max_snapshot_bytes = max_snapshot_bytes
        self._clock = clock
        self._monotonic = monotonic
        self._dirty = asyncio.Event()
        self._faults = Faults()
        self._version_floor = 0
        self.current: PreparedSnapshot | None = None
        self.held = False
        self._fanout = Fanout(0)

    @property
    def faults(self) -> Faults:
        return self._faults

    @property
    def version(self) -> str | None:
        return None if self.current is None else self.current.version

    def set_faults(self, faults: Faults) -> None:
        self._faults = faults
        self._metrics.faults.set(1 if faults.active else 0)
        self.mark_dirty()

    def note_version(self, version: str) -> None:
        """A sidecar reported ``version``; never issue one at or below it."""
        self._version_floor = max(self._version_floor, version_number(version))

    def mark_dirty(self) -> None:
        """Something changed (join, leave, fault): publish soon."""
        self._dirty.set()

    async def run(self) -> None:
        """Publish loop; runs until cancelled."""
        while True:
            await self._dirty.wait()
            if self._coalesce_s > 0:
                await asyncio.sleep(self._coalesce_s)
            await self._fanout.wait(MAX_FANOUT_WAIT_S)
            self._dirty.clear()
            await self._wait_for_warmup()
            self.publish_now()

    async def _wait_for_warmup(self) -> None:
        was_ended = self._warmup.ended
        while True:
            decision = self._warmup.decide(self._monotonic())
            if not decision.hold:
                break
            if not self.held:
                log.info("event=warmup_hold missing=%s missing_endpoints=%s wait_ms=%d",
                         ",".join(sorted(decision.missing)) or "-",
                         ",".join(map(str, sorted(decision.missing_endpoints))) or "-",
                         int((decision.wait_s or 0) * 1000))
            self.held = True
            self._metrics.warming_up.set(1)
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=decision.wait_s)
                self._dirty.clear()
            except TimeoutError:
                pass
        self.held = False
        self._metrics.warming_up.set(0)
        if self._warmup.ended and not was_ended:
            log.info(
                "event=warmup_done reason=%s missing=%s missing_endpoints=%s",
                self._warmup.end_reason, ",".join(sorted(self._warmup.missing_at_end)) or "-",
                ",".join(map(str, sorted(self._warmup.missing_endpoints_at_end))) or "-",
            )

    def publish_now(self) -> PreparedSnapshot | None:
        """Build the table now; new version if it changed; offer it to every stream.

        Returns what the streams now have (None if nothing could be published yet).
        """
        services = build_services(self._registry.instances(), self._policy_for, self._faults)
        current = self.current
        sessions = self._registry.leases()
        if current is None or services != current.snapshot.services:
            current = self._prepare(services, len(sessions)) or current
            if current is None:
                return None
        targets = [s for s in sessions if s.offered_version != current.version]
        # streams still busy writing an older version are slow or stuck (their
        # slot makes them skip ahead); they do not hold back the next version
        ready = [s for s in targets if not s.writing]
        fanout = Fanout(len(ready))
        for session in targets:
            session.offer(current, None if session.writing else fanout)
        self._fanout = fanout
        return current


    def _prepare(self, services: tuple[ServiceRoutes, ...], streams: int) -> PreparedSnapshot | None:
        """A new version of ``services``, made current; None if it is over budget."""
        now = self._clock()
        snapshot = Snapshot(
            version=next_version(self.version, now, self._version_floor),
            services=services,
            created_at=now,
        )
        wire = convert.encode_snapshot(snapshot)
        if len(wire) + convert.MAX_NONCE_FIELD_BYTES > self._max_snapshot_bytes:
            log.error("event=snapshot_over_budget version=%s bytes=%d budget=%d kept_version=%s",
                      snapshot.version, len(wire), self._max_snapshot_bytes, self.version or "-")
            return None
        prepared = PreparedSnapshot(snapshot, wire)
        self.current = prepared
        self._metrics.snapshots.inc()
        self._metrics.snapshot.info({"version": snapshot.version})
        self._metrics.services.set(len(services))
        self._metrics.endpoints.set(snapshot.endpoint_count)
        self._metrics.snapshot_bytes.set(len(wire))
        log.info(
            "event=snapshot_pushed version=%s services=%d endpoints=%d streams=%d bytes=%d faults=%s",
            snapshot.version, len(services), snapshot.endpoint_count, streams, len(wire), faults_text(self._faults),
        )
        return prepared


def faults_text(faults: Faults) -> str:
    if not faults.active:
        return "none"
    parts = ["empty-snapshot"] if faults.empty_snapshot else []
    parts += [f"drop-service:{s}" for s in sorted(faults.dropped_services)]
    return ",".join(parts)
