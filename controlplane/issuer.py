"""``sidemesh.v1.Identity/Issue``: workload certificates for sidecars that prove their service.

Theory of operation (DESIGN.md, "Identity"). A sidecar makes its own key and sends only
a CSR whose one URI SAN is ``spiffe://<td>/service/<name>``. It proves that it may hold
that identity in one of two ways, one per port:

- **join token**, on the identity port (server-authenticated TLS): call metadata
  ``authorization: Bearer <token>``, equal to the token file of the service the CSR
  names (``tokens.py``). First contact, or a certificate that expired while the
  control plane was away.
- **certificate**, on the discovery port (mutual TLS): the verified client certificate
  names the service; the CSR must name the same one. Renewal, at half-life.

Checks go authenticate, validate, authorize, so a caller without credentials learns
nothing about its CSR: no or an unknown token, or a client certificate that names no
service, is UNAUTHENTICATED; a CSR that is not one, does not verify, holds a weak key,
carries zero or several URI SANs or another trust domain is INVALID_ARGUMENT with the
reason; a proven identity other than the one the CSR names is PERMISSION_DENIED. A
certificate is issued for ``--cert-ttl`` and sent with the trust bundle (the CA
certificate). Every outcome is counted and logged.

``Issuer`` decides and signs (blocking: token files are read, a certificate is signed),
``IdentityService`` is the gRPC edge that runs it in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from controlplane import convert
from controlplane.authn import (
    INVALID_ARGUMENT,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    PeerCertificate,
    Refusal,
    peer_certificate,
)
from controlplane.limits import HelloLimits
from controlplane.metrics import Metrics
from controlplane.model import IssueRequest
from controlplane.tokens import JoinTokens, bearer_token
from identity.certs import CertificateAuthority, cert_to_pem, csr_identity
from identity.spiffe import IdentityError, SpiffeId

log = logging.getLogger("controlplane.issuer")

VIA_TOKEN = "token"
VIA_CERTIFICATE = "certificate"

# refusal reasons (metric label values), besides authn's for client certificates
NO_TOKEN = "no_token"
JOIN_TOKENS_OFF = "join_tokens_not_configured"
BAD_TOKEN = "bad_token"
INVALID_REQUEST = "invalid_request"
INVALID_CSR = "invalid_csr"
WRONG_TRUST_DOMAIN = "wrong_trust_domain"
TOKEN_FOR_OTHER_SERVICE = "token_for_other_service"
IDENTITY_MISMATCH = "identity_mismatch"


class IssueRefusal(Refusal):
    """A refused Issue; ``service`` is what the CSR asked for, when that got known."""

    def __init__(self, code: str, reason: str, detail: str, service: str = "") -> None:
        super().__init__(code, reason, detail)
        self.service = service


@dataclass(frozen=True, slots=True)
class Issued:
    identity: SpiffeId
    cert_pem: bytes
    bundle_pem: bytes
    not_after: float


class Issuer:
    """Decides who gets which certificate, and signs it. Blocking; see the module docstring."""

    def __init__(self, ca: CertificateAuthority, tokens: JoinTokens, *, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.ca = ca
        self.tokens = tokens
        self.ttl_s = ttl_s
        self._clock = clock

    def issue_with_token(self, request: IssueRequest, authorization: str | None) -> Issued:
        token = bearer_token(authorization)
        if not self.tokens.configured:
            raise IssueRefusal(UNAUTHENTICATED, JOIN_TOKENS_OFF,
                               "this control plane accepts no join tokens (it runs without --join-tokens); "
                               "renew over mutual TLS on the discovery port, or ask its operator for a token")
        if token is None:
            raise IssueRefusal(UNAUTHENTICATED, NO_TOKEN,
                               "no join token: send call metadata 'authorization: Bearer <token>' holding "
                               "your service's join token")
        services = self.tokens.services_for(token)
        if not services:
            raise IssueRefusal(UNAUTHENTICATED, BAD_TOKEN,
                               "the join token matches no service's token (--join-tokens DIR/<service>)")
        claimed = self._claimed(request)
        if claimed.service not in services:
            raise IssueRefusal(PERMISSION_DENIED, TOKEN_FOR_OTHER_SERVICE,
                               f"the join token is for service {', '.join(sorted(services))}, "
                               f"the CSR asks for {claimed.service}", claimed.service)
        return self._sign(request, claimed)

    def issue_with_certificate(self, request: IssueRequest, peer: PeerCertificate) -> Issued:
        claimed = self._claimed(request)
        if claimed != peer.identity:
            raise IssueRefusal(PERMISSION_DENIED, IDENTITY_MISMATCH,
                               f"certificate names service {peer.identity.service}, the CSR asks for "
                               f"{claimed.service}; a certificate renews only its own identity", claimed.service)
        return self._sign(request, claimed)

    def _claimed(self, request: IssueRequest) -> SpiffeId:
        try:
            claimed = csr_identity(request.csr_pem)
        except IdentityError as exc:
            raise IssueRefusal(INVALID_ARGUMENT, INVALID_CSR, f"invalid CSR: {exc}") from exc
        if claimed.trust_domain != self.ca.trust_domain:
            raise IssueRefusal(INVALID_ARGUMENT, WRONG_TRUST_DOMAIN,
                               f"invalid CSR: it asks for {claimed}, outside this mesh's trust domain "
                               f"{self.ca.trust_domain}", claimed.service)
        return claimed

    def _sign(self, request: IssueRequest, identity: SpiffeId) -> Issued:
        try:
            cert = self.ca.issue_workload(request.csr_pem, identity, ttl_s=self.ttl_s, now=self._clock())
        except IdentityError as exc:  # checked above already; kept so a new CA rule cannot turn into a 500
            raise IssueRefusal(INVALID_ARGUMENT, INVALID_CSR, f"invalid CSR: {exc}", identity.service) from exc
        return Issued(identity, cert_to_pem(cert), self.ca.bundle_pem, cert.not_valid_after_utc.timestamp())


class IdentityService:
    """The gRPC edge of ``Issuer``: one method handler per port (``via``)."""

    def __init__(self, issuer: Issuer, metrics: Metrics, *, limits: HelloLimits = HelloLimits()) -> None:
        self._issuer = issuer
        self._metrics = metrics
        self._limits = limits

    def generic_handler(self, via: str) -> grpc.GenericRpcHandler:
        """``via`` is VIA_TOKEN on the identity port, VIA_CERTIFICATE on the mutual-TLS port."""

        async def issue(request: Any, context: grpc.aio.ServicerContext) -> bytes:
            return await self._issue(via, request, context)

        handler = grpc.unary_unary_rpc_method_handler(
            issue, request_deserializer=convert.issue_request_deserializer(),
            response_serializer=convert.identity_serializer)
        return grpc.method_handlers_generic_handler(convert.IDENTITY_SERVICE_NAME,
                                                    {convert.ISSUE_METHOD_NAME: handler})

    async def _issue(self, via: str, msg: Any, context: grpc.aio.ServicerContext) -> bytes:
        node = str(getattr(msg, "node_id", ""))[:64] or "-"
        try:
            try:
                request = convert.decode_issue_request(msg, self._limits)
            except convert.ProtocolError as exc:
                raise IssueRefusal(INVALID_ARGUMENT, INVALID_REQUEST, f"invalid request: {exc.reason}") from exc
            node = request.node_id or "-"
            if via == VIA_TOKEN:
                issued = await asyncio.to_thread(self._issuer.issue_with_token, request, _authorization(context))
            else:
                peer = peer_certificate(context.auth_context(), self._issuer.ca.trust_domain)
                issued = await asyncio.to_thread(self._issuer.issue_with_certificate, request, peer)
        except Refusal as refusal:
            service = refusal.service if isinstance(refusal, IssueRefusal) else ""
            self._metrics.issue_refusals.labels(reason=refusal.reason).inc()
            log.warning("event=issue_refused service=%s node=%r via=%s peer=%s reason=%s detail=%r",
                        service or "-", node, via, context.peer(), refusal.reason, refusal.detail)
            await context.abort(getattr(grpc.StatusCode, refusal.code), refusal.detail)
            raise AssertionError("not reached: abort raises") from None
        self._metrics.certificates_issued.labels(via=via).inc()
        log.info("event=certificate_issued service=%s node=%s not_after=%d via=%s peer=%s",
                 issued.identity.service, node, issued.not_after, via, context.peer())
        return convert.encode_issue_response(issued.cert_pem, issued.bundle_pem)


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    values = [str(value) for key, value in (context.invocation_metadata() or ()) if key == "authorization"]
    # more than one is ambiguous: refuse rather than pick
    return values[0] if len(values) == 1 else None
