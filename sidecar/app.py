"""``sidemesh sidecar``: wires the pieces together and runs them on uvloop.

Start order: route book and DNS resolver, listeners (outbound, inbound, admin), then the
discovery stream. Shutdown order (uvicorn's): stop accepting, let in-flight exchanges
drain for ``drain_s``, close what is left, cancel the stream, close pools and resolver.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import uvloop

from dnsfallback import ServiceResolver
from sidecar.admin import AdminApi, AdminConnection
from sidecar.backoff import BackoffPolicy, ExpBackoff
from sidecar.balancer import EndpointHealth, ResolvedRoute
from sidecar.config import SidecarConfig, parse_config
from sidecar.discovery import DiscoveryClient, Identity, StreamSettings
from sidecar.metrics import MetricsExporter, SidecarMetrics
from sidecar.model import Endpoint, Policy, Source
from sidecar.proxy import INBOUND, OUTBOUND, DownstreamConnection, ProxyContext
from sidecar.routing import RouteBook
from sidecar.upstream import UpstreamPool

if TYPE_CHECKING:
    from sidecar.certmanager import CertificateManager
    from sidecar.workload import WorkloadIdentity

log = logging.getLogger("sidemesh.sidecar")

# how long a leaving sidecar waits for the first request of a connection that has not sent one
# (a caller whose handshake finished as we stopped accepting sends it within milliseconds)
FIRST_REQUEST_WAIT_S = 1.0


class Sidecar:
    def __init__(self, config: SidecarConfig, *, resolver: ServiceResolver | None = None) -> None:
        self.config = config
        self.resolver = resolver or ServiceResolver(config.dns)
        self.health = EndpointHealth(eject_s=config.eject_s)
        self.book = RouteBook(
            resolver=self.resolver,
            health=self.health,
            settle_timeout_s=config.initial_fetch_timeout_s + 1.0,
            guard_grace_s=config.guard_grace_s,
        )
        self.identity: WorkloadIdentity | None = None
        self.certs: CertificateManager | None = None
        if config.identity is not None:
            # imported only with identity on: `cryptography` costs an --insecure sidecar ~9 MB RSS
            from identity.store import IdentityFiles
            from sidecar.certmanager import CertificateManager, IssuerConfig
            from sidecar.workload import WorkloadIdentity

            ident = config.identity
            self.identity = WorkloadIdentity(config.service, ident.trust_domain)
            self.certs = CertificateManager(self.identity, IssuerConfig(
                node_id=config.instance, renew_target=config.controlplane, bootstrap_target=ident.bootstrap_target,
                files=IdentityFiles(ident.directory), join_token_file=ident.join_token_file,
                join_token=ident.join_token, trust_bundle=ident.trust_bundle))
        self.metrics = SidecarMetrics()
        self.pool = UpstreamPool(connect_timeout_s=config.connect_timeout_s)
        self.exporter = MetricsExporter(self.metrics, self.book, self.pool, service=config.service, instance=config.instance)
        # with an identity, hops to other sidecars are mTLS and inbound calls are authorized (sidecar/mtls.py)
        self.outbound = ProxyContext(OUTBOUND, pool=self.pool, metrics=self.metrics, book=self.book, limits=config.limits,
                                     identity=self.identity)
        app_ep = Endpoint(config.app[0], config.app[1], "app")
        app_route = ResolvedRoute("app", (app_ep,), Source.CONTROLPLANE, self.health, Policy(timeout_s=config.app_timeout_s, retries=1))
        self.inbound = ProxyContext(INBOUND, pool=self.pool, metrics=self.metrics, app_route=app_route,
                                    limits=config.limits, identity=self.identity, authorizations=self.book)
        self.discovery = DiscoveryClient(
            config.controlplane,
            Identity(config.instance, config.service, config.address, config.inbound_port),
            self.book,
            backoff=ExpBackoff(BackoffPolicy()),
            settings=StreamSettings(
                initial_fetch_timeout_s=config.initial_fetch_timeout_s,
                ping_interval_s=config.ping_interval_s,
                ping_timeout_s=config.ping_timeout_s,
            ),
            credentials=None if self.certs is None else self.certs.channel_credentials(),
        )
        self._servers: list[asyncio.AbstractServer] = []
        self._discovery_task: asyncio.Task[None] | None = None
        self._certs_task: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "service": c.service,
            "instance": c.instance,
            "address": c.address,
            "admin_port": c.admin_port,
            "ports": {"outbound": c.outbound_port, "inbound": c.inbound_port, "admin": c.admin_port},
            "controlplane": {
                "target": c.controlplane,
                "connected": self.discovery.connected,
                "last_error": self.discovery.last_error,
                "attempts": self.discovery.attempts,
            },
            "dns": {
                "template": c.dns.template,
                # the SRV name that gives each peer's inbound port, or None: every peer on ours
                "srv": c.dns.srv_name_for("{service}") if c.dns.srv else None,
                "servers": [f"{h}:{p}" for h, p in c.dns.nameservers] or "system",
            },
            "counters": {
                "inbound": self.metrics.total(INBOUND),
                "outbound": self.metrics.total(OUTBOUND),
                "retries": self.metrics.retries,
                "mtls": self.metrics.mtls_counts(),
            },
            "pool": self.pool.stats(),
            "identity": None if self.certs is None else self.certs.state(),
        }

    async def start(self) -> None:
        c = self.config
        loop = asyncio.get_running_loop()
        if self.certs is not None:
            # a certificate cached by an earlier run serves at once, also during an outage
            await self.certs.load_cached()
            self._certs_task = asyncio.create_task(self.certs.run(), name="certificates")
        # only the mesh listener is mTLS; the extra inbound ones are plaintext ingress (no caller identity)
        listeners = [
            (self.outbound, c.outbound_listen, c.outbound_port, False),
            (self.inbound, c.listen, c.inbound_port, self.identity is not None),
            *((self.inbound, host, port, False) for host, port in c.extra_inbound),
        ]
        for ctx, host, port, mtls in listeners:
            server = await loop.create_server(functools.partial(DownstreamConnection, ctx, mtls=mtls), host, port,
                                              backlog=2048, reuse_address=True)
            self._servers.append(server)
        identity = self.identity
        admin = AdminApi(self.book, self.exporter, self.describe,
                         identity_problem=(lambda: None) if identity is None else identity.unusable_reason)
        self._servers.append(
            await loop.create_server(lambda: AdminConnection(admin), c.listen, c.admin_port, reuse_address=True)
        )
        self._discovery_task = asyncio.create_task(self.discovery.run(), name="discovery")
        log.info(
            "event=sidecar_started service=%s instance=%s address=%s outbound=%s:%d inbound=%s:%d admin=%s:%d "
            "app=%s:%d controlplane=%s dns_template=%s dns_srv=%s dns_servers=%s",
            c.service, c.instance, c.address, c.outbound_listen, c.outbound_port, c.listen, c.inbound_port,
            c.listen, c.admin_port, c.app[0], c.app[1], c.controlplane, c.dns.template,
            c.dns.srv_name_for("{service}") if c.dns.srv else "off",  # off: every peer on our inbound port
            ",".join(f"{h}:{p}" for h, p in c.dns.nameservers) or "system",
        )

    async def stop(self, *, drain_delay_s: float = 0.0, drain_s: float = 5.0) -> None:
        """Leave without failing a call: withdraw, drain, stop accepting, finish, close.

        1. End the discovery stream: the control plane drops our registration and pushes the
           change, so callers in ``controlplane`` mode stop picking us within milliseconds
           (the mode is left as it is: a leaving sidecar has no reason to fail over).
        2. For ``drain_delay_s`` keep serving inbound, but every answer says
           ``Connection: close``, so callers' pools let go of our connections; callers that
           still resolve us through DNS (its TTL) are served meanwhile.
        3. Stop accepting (callers now get a refused connect, which they retry elsewhere),
           close idle connections that carried requests (a caller reusing one retries it),
           let in-flight exchanges finish within ``drain_s`` and connections that have not sent
           their first request yet send it within ``FIRST_REQUEST_WAIT_S`` (a caller whose TLS
           handshake finished as we stopped), then close what is left.
        """
        await self._stop_discovery()
        if self._certs_task is not None:
            self._certs_task.cancel()
            await asyncio.gather(self._certs_task, return_exceptions=True)
        if drain_delay_s > 0:
            self.inbound.drain()
            log.info("event=sidecar_draining instance=%s delay_s=%g", self.config.instance, drain_delay_s)
            await asyncio.sleep(drain_delay_s)
        for server in self._servers:
            server.close()
        now = asyncio.get_running_loop().time()
        deadline = now + drain_s
        first_request_by = now + min(drain_s, FIRST_REQUEST_WAIT_S)
        for ctx in (self.outbound, self.inbound):
            ctx.drain()  # idle connections close; from now on every answer says Connection: close

        def busy(conn: DownstreamConnection, now: float) -> bool:
            return conn.active is not None or (conn.unproven and now < first_request_by)

        while any(busy(conn, now) for ctx in (self.outbound, self.inbound) for conn in ctx.connections):
            if now > deadline:
                break
            await asyncio.sleep(0.05)
            now = asyncio.get_running_loop().time()
        for ctx in (self.outbound, self.inbound):
            for conn in list(ctx.connections):
                conn.abort()
            for task in list(ctx.tasks):
                task.cancel()
        self.book.close()
        await self.pool.close()
        await self.resolver.close()
        log.info("event=sidecar_stopped instance=%s", self.config.instance)

    async def _stop_discovery(self) -> None:
        task, self._discovery_task = self._discovery_task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        log.info("event=controlplane_left instance=%s", self.config.instance)


async def serve(config: SidecarConfig) -> int:
    sidecar = Sidecar(config)
    try:
        await sidecar.start()
    except OSError as exc:
        log.error("event=sidecar_bind_failed reason=%r", str(exc))
        await sidecar.stop(drain_s=0)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("event=sidecar_stopping instance=%s", config.instance)
    await sidecar.stop(drain_delay_s=config.drain_delay_s)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s level=%(levelname)s component=sidecar instance={config.instance} %(message)s",
    )
    return uvloop.run(serve(config))
