"""The control plane's parts wired together, without any listener.

``ControlPlane(config)`` owns the registry, the warm-up gate, the publisher,
the metrics and the gRPC service object; ``app.py`` binds them to sockets and
``httpapi.py`` reads ``status()`` and calls ``apply_fault()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from controlplane import convert
from controlplane.budget import SnapshotBudget
from controlplane.config import ControlPlaneConfig
from controlplane.faults import apply_fault
from controlplane.metrics import Metrics
from controlplane.model import Faults
from controlplane.push import Publisher, faults_text
from controlplane.registry import Registry
from controlplane.server import REASON_SHUTDOWN, DiscoveryService
from controlplane.session import STATUS_SYNCED, CloseReason, Session
from controlplane.warmup import WarmupGate

log = logging.getLogger("controlplane")


class ControlPlane:
    """Registry + publisher + warm-up + metrics + the Discovery service."""

    def __init__(
        self,
        config: ControlPlaneConfig,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.started_at = clock()
        self._clock = clock
        self._monotonic = monotonic
        self.metrics = Metrics()
        self.registry: Registry[Session] = Registry()
        self.warmup = WarmupGate(config.warmup_timeout)
        self.publisher = Publisher(
            self.registry, self.warmup, self.metrics,
            policy_for=config.policy_for, coalesce_s=config.coalesce_ms / 1000.0,
            max_snapshot_bytes=config.snapshot_budget_bytes, clock=clock, monotonic=monotonic,
        )
        self.budget = SnapshotBudget(
            config.snapshot_budget_bytes, fixed_bytes=convert.SNAPSHOT_FIXED_BYTES,
            service_bytes=lambda name: convert.service_frame_bytes(name, config.policy_for(name)),
        )
        self.service = DiscoveryService(
            self.registry, self.publisher, self.warmup, self.metrics,
            hello_timeout=config.hello_timeout, budget=self.budget, limits=config.hello_limits,
            clock=clock, monotonic=monotonic,
        )
        self._publisher_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the publish loop (call from the running event loop)."""
        if self._publisher_task is None:
            self._publisher_task = asyncio.create_task(self.publisher.run(), name="publisher")

    async def stop(self) -> None:
        """Stop publishing and close every stream with UNAVAILABLE."""
        if self._publisher_task is not None:
            self._publisher_task.cancel()
            try:
                await self._publisher_task
            except asyncio.CancelledError:
                pass
            self._publisher_task = None
        self.service.close_all(CloseReason(REASON_SHUTDOWN, "UNAVAILABLE", "control plane is shutting down"))

    def apply_fault(self, request: object) -> Faults:
        """Apply a POST /faults body (raises ``FaultError``); a change pushes a new version."""
        before = self.publisher.faults
        after = apply_fault(before, request)
        if after != before:
            self.publisher.set_faults(after)
        log.warning("event=fault_set request=%r faults=%s", request, faults_text(after))
        return after

    def status(self) -> dict[str, Any]:
        """The /status document: the version, warm-up, faults and every sidecar's sync state."""
        version = self.publisher.version
        sidecars = []
        for session in sorted(self.registry.leases(), key=lambda s: s.node_id):
            hello = session.hello
            state = session.status(version)
            sidecars.append({
                "node_id": hello.node_id,
                "service": hello.service,
                "address": hello.address,
                "port": hello.port,
                "acked_version": session.acked_version,
                "synced": state == STATUS_SYNCED,
                "status": state,
                "last_nack": None if session.last_nack is None else {
                    "version": session.last_nack.version, "reason": session.last_nack.reason,
                },
                "connected_at": session.connected_at,
                "sent_version": session.sent_version,
                "pushes": session.pushes,
            })
        return {
            "version": version,
            "warming_up": self.warmup.holding(self._monotonic()),
            "faults": self.publisher.faults.as_json(),
            "started_at": self.started_at,
            "uptime_s": round(self._clock() - self.started_at, 3),
            "streams": len(sidecars),
            "synced": sum(1 for s in sidecars if s["synced"]),
            "warmup": {
                "ended": self.warmup.ended,
                "reason": self.warmup.end_reason,
                "missing": sorted(self.warmup.missing()),
                "missing_endpoints": [e.as_json() for e in sorted(self.warmup.missing_endpoints())],
                "timeout_s": self.warmup.timeout,
            },
            "snapshot_budget": {
                "estimate_bytes": self.budget.estimate,
                "budget_bytes": self.budget.limit,
                "current_bytes": 0 if self.publisher.current is None else len(self.publisher.current.wire),
            },
            "sidecars": sidecars,
        }
