"""The control plane's Prometheus metrics, in their own ``CollectorRegistry``.

One ``Metrics`` object per control plane (no global registry), so several control planes in one test process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "sidemesh_controlplane"
# push-to-ack latency: the target is 1000 sidecars within 500 ms (benchmarks/README.md)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Counters, gauges and histograms the server and publisher update."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connected = Gauge(f"{PREFIX}_connected_sidecars", "Sidecars with an open, registered stream", registry=r)
        self.warming_up = Gauge(f"{PREFIX}_warming_up", "1 while restart warm-up holds pushes", registry=r)
        self.snapshots = Counter(f"{PREFIX}_snapshots_total", "Snapshot versions built", registry=r)
        self.pushes = Counter(f"{PREFIX}_pushes_total", "Snapshots written to sidecar streams", registry=r)
        self.acks = Counter(f"{PREFIX}_acks_total", "ACKs received", registry=r)
        self.nacks = Counter(f"{PREFIX}_nacks_total", "NACKs received", registry=r)
        self.unknown_acks = Counter(
            f"{PREFIX}_unknown_acks_total", "Acks ignored: unknown nonce or version mismatch", registry=r
        )
        self.rejected_hellos = Counter(f"{PREFIX}_rejected_hellos_total", "Streams refused for a bad Hello", registry=r)
        self.protocol_errors = Counter(
            f"{PREFIX}_protocol_errors_total", "Streams aborted for a message out of protocol", registry=r
        )
        self.hello_limit_rejections = Counter(
            f"{PREFIX}_hello_limit_rejections_total", "Hellos refused for exceeding a named limit (see --help)",
            ["limit"], registry=r,
        )
        self.streams_without_hello = Counter(
            f"{PREFIX}_streams_without_hello_total",
            "Streams that ended before a Hello arrived (also requests gRPC refused as over --max-request-bytes)",
            registry=r,
        )
        self.budget_refusals = Counter(
            f"{PREFIX}_snapshot_budget_refusals_total",
            "Registrations refused because the snapshot would exceed --snapshot-budget-bytes", registry=r,
        )
        self.known_endpoints_dropped = Counter(
            f"{PREFIX}_known_endpoints_dropped_total",
            "Hello known_endpoints entries left out as unmatchable (bad service, address or port)", registry=r,
        )
        self.stream_auth_refusals = Counter(
            f"{PREFIX}_stream_auth_refusals_total",
            "Discovery streams refused by identity checks (certificate, claimed service, address, node_id)",
            ["reason"], registry=r,
        )
        self.certificates_issued = Counter(
            f"{PREFIX}_certificates_issued_total", "Workload certificates issued, by proof (token or certificate)",
            ["via"], registry=r,
        )
        self.issue_refusals = Counter(
            f"{PREFIX}_issue_refusals_total", "Identity.Issue requests refused, by reason", ["reason"], registry=r,
        )
        self.serving_cert_not_after = Gauge(
            f"{PREFIX}_serving_certificate_not_after_seconds",
            "Expiry (Unix time) of the control plane's own serving certificate; 0 when insecure", registry=r,
        )
        self.snapshot_bytes = Gauge(f"{PREFIX}_snapshot_bytes", "Encoded size of the current snapshot", registry=r)
        self.snapshot_estimate_bytes = Gauge(
            f"{PREFIX}_snapshot_estimate_bytes", "Upper bound of the snapshot size the budget works with", registry=r,
        )
        self.joins = Counter(f"{PREFIX}_joins_total", "Instances registered", registry=r)
        self.leaves = Counter(f"{PREFIX}_leaves_total", "Instances that left (stream ended)", registry=r)
        self.snapshot = Info(f"{PREFIX}_snapshot", "The current snapshot version", registry=r)
        self.services = Gauge(f"{PREFIX}_snapshot_services", "Services in the current snapshot", registry=r)
        self.endpoints = Gauge(f"{PREFIX}_snapshot_endpoints", "Endpoints in the current snapshot", registry=r)
        self.faults = Gauge(f"{PREFIX}_faults_active", "1 while an injected fault is active", registry=r)
        self.ack_latency = Histogram(
            f"{PREFIX}_push_ack_seconds", "Time from writing a snapshot to a stream to its ACK/NACK",
            buckets=LATENCY_BUCKETS, registry=r,
        )

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return bytes(generate_latest(self.registry))
