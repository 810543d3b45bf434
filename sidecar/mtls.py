"""Mutual TLS on the data path: who a connection's peer is, and whether it may call us.

DESIGN.md, "Identity": sidecar-to-sidecar hops are mTLS; the caller checks that the peer is
the service it routed to, in every routing mode (a DNS answer cannot send a call to an
impostor); authorization is pushed with the routes, kept with last-known-good, and enforced
inbound. Theory of operation:

* Caller (``OutboundTls``). Before anything is routed, our own certificate must be usable
  (``WorkloadIdentity.unusable_reason``); else the call fails closed with 503, and not a
  byte leaves in plaintext. A new upstream connection is TCP, then a TLS 1.3 handshake with
  our client certificate (``UpstreamPool.connect``); then the peer's SPIFFE ID must be
  ``expected_peer(route.service)``, whatever the route's source (control plane, DNS, cache).
  A failed handshake or another identity makes ``PeerNotVerified``: the proxy counts it as a
  connect failure of that endpoint (ejected, another endpoint tried; nothing was sent to
  it), and when no endpoint is left the caller gets 503 naming the endpoint, what it
  presented and what was expected. A verified connection remembers the service (``peer``)
  and is pooled for that service only, so the check costs one handshake per connection.
* Callee (``InboundTls``). The mesh listener (``--listen:--inbound-port``) accepts TCP, then
  runs the server handshake (``loop.start_tls``) inside the connection's own head deadline
  and connection limit (``sidecar/limits.py``), so a client stuck in the handshake meets the
  same limits as one stuck in its request head. The verified peer's identity is read once
  per connection. Each request is then authorized with a dict and a set lookup: the policy
  last pushed for our service (``RouteBook.authorization_of``, kept across outages); a
  caller it does not allow gets 403 and the app never sees the request. No policy ever
  pushed: allowed (the control plane never said otherwise).

Plaintext ingress (``--extra-inbound``, e.g. the published front door) carries no client
identity and is not subject to mesh authorization; ``--insecure`` (no identity) is the
plaintext data path throughout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from identity.spiffe import IdentityError, SpiffeId
from identity.tls import peer_identity
from sidecar.errors import Forbidden, HandshakeFailed, IdentityUnavailable, PeerNotVerified
from sidecar.metrics import INBOUND, OUTBOUND
from sidecar.upstream import handshake_failure

if TYPE_CHECKING:
    from sidecar.metrics import SidecarMetrics
    from sidecar.model import Authorization, Endpoint
    from sidecar.upstream import UpstreamConnection, UpstreamPool
    from sidecar.workload import WorkloadIdentity

log = logging.getLogger("sidemesh.sidecar.mtls")

# outcomes of a handshake (sidemesh_tls_handshakes_total{outcome})
HANDSHAKE_OK = "ok"
HANDSHAKE_FAILED = "failed"
# why a peer was not accepted (sidemesh_peer_identity_failures_total{reason})
PEER_MISMATCH = "mismatch"  # a mesh certificate of another service
PEER_UNVERIFIED = "unverified"  # no handshake: no certificate, another CA, not TLS at all
PEER_NO_IDENTITY = "no_identity"  # a certificate of our CA naming no service of our trust domain


def replay(protocol: asyncio.BaseProtocol, chunks: list[bytes]) -> None:
    """Give ``protocol`` bytes its transport read before it was installed, through the Protocol API.

    ``loop.start_tls`` swaps its TLS protocol into a transport the loop may already have read
    from; TLS protocols are buffered protocols (``get_buffer``/``buffer_updated``).
    """
    buffered: Any = protocol if hasattr(protocol, "buffer_updated") else None
    for data in chunks:
        if buffered is None:
            protocol.data_received(data)  # type: ignore[attr-defined]
            continue
        view = memoryview(data)
        while view:
            buf = buffered.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            buffered.buffer_updated(n)
            view = view[n:]


class Authorizations(Protocol):
    """Where the inbound side reads the policy of its own service (``RouteBook``)."""

    def authorization_of(self, service: str) -> Authorization | None: ...


def peer_mismatch(presented: SpiffeId, expected: SpiffeId) -> bool:
    """True when a verified peer is not the service the call was routed to."""
    return presented != expected


def denial(policy: Authorization | None, caller: str, service: str) -> Forbidden | None:
    """The 403 for ``caller`` calling ``service`` under ``policy``; None when it is allowed.

    No policy at all (None) allows: the control plane never said otherwise.
    """
    if policy is None or policy.allows(caller):
        return None
    return Forbidden(f"caller {caller} is not allowed to call {service}: {policy.describe()}",
                     service=service, caller=caller)


class OutboundTls:
    """The caller side: our certificate, the handshake, and the peer's identity."""

    __slots__ = ("identity", "metrics")

    def __init__(self, identity: WorkloadIdentity, metrics: SidecarMetrics) -> None:
        self.identity = identity
        self.metrics = metrics

    def refusal(self, service: str) -> IdentityUnavailable | None:
        """The 503 owed to every call while we hold no valid certificate, else None."""
        why = self.identity.unusable_reason()
        if why is None:
            return None
        return IdentityUnavailable(f"cannot call {service} over mTLS: {why}", service=service)

    async def connect(self, pool: UpstreamPool, endpoint: Endpoint, service: str) -> UpstreamConnection:
        """A new connection to ``endpoint`` whose peer proved it is ``service``; PeerNotVerified otherwise."""
        where = f"{endpoint.address}:{endpoint.port}"
        try:
            expected = self.identity.expected_peer(service)
        except IdentityError as exc:  # a name DNS answered for that no mesh identity can carry
            raise PeerNotVerified(service, where, presented="nothing (not connected)",
                                  expected=f"an identity no certificate can hold ({exc})") from exc
        metrics = self.metrics
        try:
            conn = await pool.connect(endpoint.key, tls=self.identity.client)
        except HandshakeFailed as exc:
            metrics.handshake(OUTBOUND, HANDSHAKE_FAILED)
            metrics.peer_failure(OUTBOUND, service, PEER_UNVERIFIED)
            log.warning("event=peer_identity_unverified service=%s endpoint=%s presented=%r expected=%s",
                        service, where, exc.reason, expected)
            raise PeerNotVerified(service, where, presented=exc.reason, expected=expected.uri) from exc
        metrics.handshake(OUTBOUND, HANDSHAKE_OK)
        transport = conn.transport
        try:
            presented = peer_identity(transport.get_extra_info("ssl_object") if transport is not None else None)
        except IdentityError as exc:
            conn.abort()
            metrics.peer_failure(OUTBOUND, service, PEER_NO_IDENTITY)
            log.warning("event=peer_identity_mismatch service=%s endpoint=%s presented=%r expected=%s",
                        service, where, str(exc), expected)
            raise PeerNotVerified(service, where, presented=f"no service identity ({exc})",
                                  expected=expected.uri) from exc
        if peer_mismatch(presented, expected):
            conn.abort()  # not a byte of the request was written to it, nor will be
            metrics.peer_failure(OUTBOUND, service, PEER_MISMATCH)
            log.warning("event=peer_identity_mismatch service=%s endpoint=%s presented=%s expected=%s",
                        service, where, presented, expected)
            raise PeerNotVerified(service, where, presented=presented.uri, expected=expected.uri)
        conn.peer = service
        return conn


class InboundTls:
    """The callee side: the server handshake, the caller's identity, and authorization."""

    __slots__ = ("identity", "service", "authorizations", "metrics", "handshake_timeout_s", "shutdown_timeout_s",
                 "_logged_at", "_quiet")

    def __init__(self, identity: WorkloadIdentity, authorizations: Authorizations, metrics: SidecarMetrics, *,
                 handshake_timeout_s: float, shutdown_timeout_s: float) -> None:
        self.identity = identity
        self.service = identity.service
        self.authorizations = authorizations
        self.metrics = metrics
        self.handshake_timeout_s = handshake_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s  # a client that never answers our close_notify
        self._logged_at = float("-inf")
        self._quiet = 0  # failures not logged since the last line (a scanner must not flood the log)

    async def accept(self, transport: asyncio.Transport, protocol: asyncio.Protocol) -> tuple[asyncio.Transport, str]:
        """Run the server handshake on ``transport`` for ``protocol``: (TLS transport, caller's service).

        Raises ConnectionError when the client cannot prove a mesh identity (counted and logged here).
        """
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        cause: BaseException | None = None
        tls: asyncio.Transport | None = None
        try:
            if transport.is_closing():  # the client left before we began: start_tls would never return
                raise ConnectionResetError("the connection closed before the handshake began")
            # bounded here too (in this task: start_tls must take the transport over in this very
            # step, see DownstreamConnection._accept_tls), should the transport be lost unseen
            async with asyncio.timeout(self.handshake_timeout_s + 0.5):
                tls = await loop.start_tls(transport, protocol, self.identity.server, server_side=True,
                                           ssl_handshake_timeout=self.handshake_timeout_s,
                                           ssl_shutdown_timeout=self.shutdown_timeout_s)
        except (OSError, TimeoutError) as exc:
            tls, cause = None, exc
        if tls is None or tls.is_closing():
            # (closed by the client, or by us: a deadline, the connection limit, shutdown)
            transport.close()
            self.metrics.handshake(INBOUND, HANDSHAKE_FAILED)
            self._refused(loop, peer, handshake_failure(cause, self.handshake_timeout_s))
            raise ConnectionError("TLS handshake failed") from cause
        self.metrics.handshake(INBOUND, HANDSHAKE_OK)
        try:
            caller = peer_identity(tls.get_extra_info("ssl_object"))
            if caller.trust_domain != self.identity.trust_domain:
                raise IdentityError(f"{caller} is not in trust domain {self.identity.trust_domain}")
        except IdentityError as exc:
            self.metrics.peer_failure(INBOUND, "-", PEER_NO_IDENTITY)
            self._refused(loop, peer, f"no service identity ({exc})")
            tls.abort()
            raise ConnectionError("the peer proved no service identity") from exc
        return tls, caller.service

    def denial(self, caller: str) -> Forbidden | None:
        """Per request: the 403 when our service's policy does not allow ``caller``, else None."""
        service = self.service
        policy = self.authorizations.authorization_of(service)
        refusal = denial(policy, caller, service)
        if refusal is not None:
            self.metrics.denied(service, caller)
            log.info("event=authorization_denied service=%s caller=%s policy=%r",
                     service, caller, policy.describe() if policy is not None else "-")
        return refusal

    def _refused(self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int] | None, reason: str) -> None:
        now = loop.time()
        if now - self._logged_at < 1.0:
            self._quiet += 1
            return
        log.info("event=peer_identity_unverified direction=inbound peer=%s reason=%r suppressed=%d",
                 f"{peer[0]}:{peer[1]}" if peer else "-", reason, self._quiet)
        self._logged_at = now
        self._quiet = 0
