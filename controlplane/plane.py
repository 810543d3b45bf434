"""The control plane's parts wired together, without any listener.

``ControlPlane(config, ca=..., serving=...)`` owns the registry, the warm-up
gate, the publisher, the metrics and the gRPC service objects (Discovery, and
Identity unless ``--insecure``); ``app.py`` opens the CA, binds them to sockets
and ``httpapi.py`` reads ``status()`` and calls ``apply_fault()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from controlplane import convert
from controlplane.budget import SnapshotBudget
from controlplane.ca import ServingCertificate
from controlplane.config import ControlPlaneConfig
from controlplane.faults import apply_fault
from controlplane.issuer import IdentityService, Issuer
from controlplane.metrics import Metrics
from controlplane.model import Faults
from controlplane.push import Publisher, faults_text
from controlplane.registry import Registry
from controlplane.server import REASON_SHUTDOWN, DiscoveryService
from controlplane.session import STATUS_SYNCED, CloseReason, Session
from controlplane.tokens import JoinTokens
from controlplane.warmup import WarmupGate
from identity.certs import CertificateAuthority, cert_info

log = logging.getLogger("controlplane")


class ControlPlane:
    """Registry + publisher + warm-up + metrics + the Discovery and Identity services.

    ``ca`` and ``serving`` are required unless ``config.insecure``.
    """

    def __init__(
        self,
        config: ControlPlaneConfig,
        *,
        ca: CertificateAuthority | None = None,
        serving: ServingCertificate | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not config.insecure and (ca is None or serving is None):
            raise ValueError("a secure control plane needs its CA and serving certificate (or config.insecure)")
        self.config = config
        self.ca = None if config.insecure else ca
        self.serving = None if config.insecure else serving
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
            trust_domain=None if self.ca is None else self.ca.trust_domain, clock=clock, monotonic=monotonic,
        )
        self.identity: IdentityService | None = None
        if self.ca is not None:
            issuer = Issuer(self.ca, JoinTokens(config.join_tokens), ttl_s=config.cert_ttl_s, clock=clock)
            self.identity = IdentityService(issuer, self.metrics, limits=config.hello_limits)
        self._publisher_task: asyncio.Task[None] | None = None
        self._renewal_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the publish loop and serving-certificate renewal (call from the running event loop)."""
        if self._publisher_task is None:
            self._publisher_task = asyncio.create_task(self.publisher.run(), name="publisher")
        if self.serving is not None and self._renewal_task is None:
            self.metrics.serving_cert_not_after.set(self.serving.not_after)
            self._renewal_task = asyncio.create_task(self._renew_serving(self.serving), name="serving-cert")

    async def _renew_serving(self, serving: ServingCertificate) -> None:
        await serving.run(on_renewed=lambda: self.metrics.serving_cert_not_after.set(serving.not_after))

    async def stop(self) -> None:
        """Stop publishing and close every stream with UNAVAILABLE."""
        for task in (self._publisher_task, self._renewal_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._publisher_task = self._renewal_task = None
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
                # the verified certificate the stream was opened with (null when insecure)
                "identity": None if session.certificate is None else str(session.certificate.identity),
                "cert_expires_at": None if session.certificate is None else session.certificate.not_after,
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
            "security": self._security_status(),
            "authorization": self.config.allow.as_json(),
            "sidecars": sidecars,
        }

    def _security_status(self) -> dict[str, Any]:
        if self.ca is None or self.serving is None:
            return {"mode": "insecure"}
        return {
            "mode": "mutual_tls",
            "trust_domain": self.ca.trust_domain,
            "ca_dir": str(self.config.ca_dir),
            "ca_not_after": cert_info(self.ca.cert).not_after,
            "cert_ttl_s": self.config.cert_ttl_s,
            "join_tokens": None if self.config.join_tokens is None else str(self.config.join_tokens),
            "serving_certificate": self.serving.status(),
        }
