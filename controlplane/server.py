"""The gRPC side: ``sidemesh.v1.Discovery/Stream`` on grpc.aio.

Per stream: on the mutual-TLS port, take the identity of the verified client
certificate (``authn.py``; none that names a service: UNAUTHENTICATED); read the
Hello (validated in ``convert`` against the named limits of ``limits.py``; a bad
one aborts this stream with INVALID_ARGUMENT and touches nothing else); check
that it claims only what the certificate proves (its service, its own address, a
node_id no other key holds; otherwise PERMISSION_DENIED, nothing registered),
check it against the snapshot budget (``budget.py``;
over it, the stream ends with RESOURCE_EXHAUSTED and nothing changes), register a
``Session`` as the lease, then run two loops: this handler writes whatever the
session's latest-value slot holds, and a reader task matches Acks/NACKs. When
the stream ends for any reason (client closed, cancelled, keepalive timeout,
protocol error, replaced by a newer stream for the same node, shutdown) the
``finally`` unregisters the instance and the publisher pushes the change.

Responses are pre-serialized bytes (see ``convert.with_nonce``), so the
method handler is built here with an identity serializer instead of the
generated ``add_DiscoveryServicer_to_server``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from controlplane import authn, convert
from controlplane.budget import SnapshotBudget
from controlplane.limits import HelloLimits
from controlplane.metrics import Metrics
from controlplane.model import Instance, PingMessage
from controlplane.push import Publisher
from controlplane.registry import Registry
from controlplane.session import AckKind, CloseReason, Pong, Session
from controlplane.warmup import WarmupGate

log = logging.getLogger("controlplane.server")

REASON_CLIENT_CLOSED = "client_closed"
REASON_PROTOCOL = "protocol_error"
REASON_REPLACED = "replaced"
REASON_SHUTDOWN = "shutdown"


class DiscoveryService:
    """Implements the Discovery stream over the registry, publisher and warm-up gate."""

    def __init__(
        self,
        registry: Registry[Session],
        publisher: Publisher,
        warmup: WarmupGate,
        metrics: Metrics,
        *,
        hello_timeout: float,
        budget: SnapshotBudget,
        limits: HelloLimits = HelloLimits(),
        trust_domain: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._publisher = publisher
        self._warmup = warmup
        self._metrics = metrics
        self._hello_timeout = hello_timeout
        self._budget = budget
        self._limits = limits
        # None: plaintext (--insecure), nobody is authenticated
        self._trust_domain = trust_domain
        self._clock = clock
        self._monotonic = monotonic
        self._accepting = True

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The handler to pass to ``server.add_generic_rpc_handlers``."""
        handlers = {
            convert.METHOD_NAME: grpc.stream_stream_rpc_method_handler(
                self.stream,
                request_deserializer=convert.request_deserializer(),
                response_serializer=convert.identity_serializer,
            )
        }
        return grpc.method_handlers_generic_handler(convert.SERVICE_NAME, handlers)

    def refusing_handler(self) -> grpc.GenericRpcHandler:
        """For the identity port, where no client certificate is asked for: every stream is refused."""

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            del request_iterator
            await self._refuse(context, authn.Refusal(
                authn.UNAUTHENTICATED, authn.NO_CERTIFICATE,
                "this is the identity port (join tokens, no client certificates): use the mutual-TLS port "
                "with a workload certificate for the discovery stream"), node="-")

        handlers = {convert.METHOD_NAME: grpc.stream_stream_rpc_method_handler(
            refuse, request_deserializer=convert.request_deserializer(),
            response_serializer=convert.identity_serializer)}
        return grpc.method_handlers_generic_handler(convert.SERVICE_NAME, handlers)

    async def _refuse(self, context: grpc.aio.ServicerContext, refusal: authn.Refusal, *, node: str,
                      service: str = "-", identity: str = "-") -> NoReturn:
        """Count, log and end the stream with the refusal's status (raises, like ``abort``)."""
        self._metrics.stream_auth_refusals.labels(reason=refusal.reason).inc()
        log.warning("event=stream_refused node=%s service=%s identity=%s peer=%s reason=%s detail=%r",
                    node, service, identity, context.peer(), refusal.reason, refusal.detail)
        await context.abort(getattr(grpc.StatusCode, refusal.code), refusal.detail)
        raise AssertionError("not reached: abort raises")

    def close_all(self, reason: CloseReason) -> None:
        """Stop accepting Hellos and end every open stream (shutdown)."""
        self._accepting = False
        for session in self._registry.leases():
            session.close(reason)

    async def stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """One sidecar's stream, from Hello to its end."""
        del request_iterator  # we use context.read() so reads and writes run concurrently
        if not self._accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "control plane is shutting down")
        certificate: authn.PeerCertificate | None = None
        if self._trust_domain is not None:
            try:
                certificate = authn.peer_certificate(context.auth_context(), self._trust_domain)
            except authn.Refusal as refusal:
                await self._refuse(context, refusal, node="-")
        try:
            first = await asyncio.wait_for(context.read(), timeout=self._hello_timeout)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no hello within {self._hello_timeout}s")
        if first is grpc.aio.EOF:
            # a client that closed early, or a request gRPC refused before we saw it
            # (over --max-request-bytes: the peer got RESOURCE_EXHAUSTED from gRPC)
            self._metrics.streams_without_hello.inc()
            log.info("event=stream_ended_before_hello peer=%s max_request_bytes=%d",
                     context.peer(), self._limits.max_request_bytes)
            return
        try:
            hello = convert.decode_first(first, self._limits)
        except convert.ProtocolError as exc:
            self._metrics.rejected_hellos.inc()
            limit = exc.violation.limit if isinstance(exc, convert.HelloOverLimit) else "-"
            if limit != "-":
                self._metrics.hello_limit_rejections.labels(limit=limit).inc()
            log.warning("event=hello_rejected node=%s peer=%s limit=%s reason=%r",
                        convert.claimed_node_id(first) or "-", context.peer(), limit, exc.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid hello: {exc.reason}")
            return  # not reached: abort raises
        if certificate is not None:
            # from here to register() nothing awaits: the holder checked is the holder replaced
            holder = self._registry.lease_of(hello.node_id)
            try:
                authn.check_stream_claims(certificate, hello, authn.peer_address(context.peer()),
                                          None if holder is None else holder.certificate)
            except authn.Refusal as refusal:
                await self._refuse(context, refusal, node=hello.node_id, service=hello.service,
                                   identity=str(certificate.identity))

        instance = Instance.from_hello(hello)
        endpoint_bytes = convert.endpoint_wire_bytes(instance)
        decision = self._budget.decide(hello.node_id, hello.service, endpoint_bytes)
        if not decision.admitted:
            self._metrics.budget_refusals.inc()
            log.warning("event=registration_refused node=%s service=%s peer=%s reason=snapshot_budget "
                        "instance_bytes=%d estimate=%d budget=%d", hello.node_id, hello.service, context.peer(),
                        endpoint_bytes, decision.estimate, decision.limit)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"registration refused: {decision.reason}")
            return  # not reached: abort raises
        if hello.dropped_known_endpoints:
            self._metrics.known_endpoints_dropped.inc(len(hello.dropped_known_endpoints))
            log.info("event=known_endpoints_dropped node=%s count=%d first=%r", hello.node_id,
                     len(hello.dropped_known_endpoints), hello.dropped_known_endpoints[0])

        session = Session(hello, connected_at=self._clock(), peer=context.peer(), certificate=certificate)
        self._warmup.on_hello(hello.node_id, hello.known_instances, self._monotonic(),
                              endpoint=hello.endpoint, known_endpoints=hello.known_endpoints)
        self._publisher.note_version(hello.last_version)
        replaced = self._registry.register(instance, session)
        self._budget.add(hello.node_id, hello.service, endpoint_bytes)
        self._metrics.snapshot_estimate_bytes.set(self._budget.estimate)
        if replaced is not None:
            log.info("event=sidecar_replaced node=%s old_stream=%d new_stream=%d",
                     hello.node_id, replaced.id, session.id)
            replaced.close(CloseReason(REASON_REPLACED, "ABORTED", "replaced by a newer stream for this node_id"))
        else:
            self._metrics.joins.inc()
        self._metrics.connected.set(len(self._registry))
        log.info(
            "event=sidecar_connected node=%s service=%s address=%s port=%d last_version=%s known_instances=%d "
            "known_endpoints=%d stream=%d identity=%s",
            hello.node_id, hello.service, hello.address, hello.port, hello.last_version or "-",
            len(hello.known_instances), len(hello.known_endpoints), session.id,
            "-" if certificate is None else certificate.identity,
        )
        self._publisher.mark_dirty()
        reader = asyncio.create_task(self._read_acks(session, context), name=f"acks-{hello.node_id}")
        try:
            await self._write_pushes(session, context)
        finally:
            reader.cancel()
            removed = self._registry.unregister(hello.node_id, session)
            reason = session.close_reason.reason if session.close_reason else "stream_ended"
            if removed is not None:
                self._budget.remove(hello.node_id)
                self._metrics.snapshot_estimate_bytes.set(self._budget.estimate)
                self._metrics.leaves.inc()
                self._metrics.connected.set(len(self._registry))
                log.info("event=sidecar_left node=%s service=%s address=%s reason=%s stream=%d",
                         hello.node_id, hello.service, hello.address, reason, session.id)
                self._publisher.mark_dirty()

    async def _write_pushes(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        while True:
            push = await session.next_push()
            if push is None:
                break
            if isinstance(push, Pong):
                await context.write(convert.pong(push.seq))
                continue
            session.writing = True
            try:
                nonce = session.record_sent(push.prepared.version, self._monotonic())
                await context.write(convert.with_nonce(push.prepared.wire, nonce))
            finally:
                session.writing = False
                push.done()
            self._metrics.pushes.inc()
        close = session.close_reason
        if close is not None and close.code is not None:
            await context.abort(getattr(grpc.StatusCode, close.code), close.detail)

    async def _read_acks(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        node = session.node_id
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    session.close(CloseReason(REASON_CLIENT_CLOSED))
                    return
                try:
                    ack = convert.decode_next(msg)
                except convert.ProtocolError as exc:
                    self._metrics.protocol_errors.inc()
                    log.warning("event=protocol_error node=%s reason=%r", node, exc.reason)
                    session.close(CloseReason(REASON_PROTOCOL, "INVALID_ARGUMENT", exc.reason))
                    return
                if isinstance(ack, PingMessage):
                    session.ping(ack.seq)
                    continue
                outcome = session.on_ack(ack, self._monotonic())
                if outcome.kind is AckKind.ACK:
                    self._metrics.acks.inc()
                    self._metrics.ack_latency.observe(outcome.latency_s or 0.0)
                    log.debug("event=ack node=%s version=%s", node, outcome.version)
                elif outcome.kind is AckKind.NACK:
                    self._metrics.nacks.inc()
                    self._metrics.ack_latency.observe(outcome.latency_s or 0.0)
                    log.warning("event=nack node=%s version=%s reason=%r", node, outcome.version, ack.error_detail)
                else:
                    self._metrics.unknown_acks.inc()
                    # stale nonces (we pushed newer ones since) are normal under load
                    (log.debug if outcome.kind is AckKind.STALE_NONCE else log.info)("event=ack_ignored node=%s why=%s version=%s nonce=%s",
                             node, outcome.kind.value, ack.version, ack.nonce)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any read failure ends this stream only
            log.debug("event=stream_read_failed node=%s error=%r", node, exc)
            session.close(CloseReason("read_failed"))
