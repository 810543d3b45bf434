"""Who is on the other end of a call, and what that lets a discovery stream claim.

Theory of operation (DESIGN.md, "Identity": "a stream registers only its own service").
On the mutual-TLS port gRPC has already checked the client's certificate chain against
the mesh CA before any handler runs; what it cannot know is what the certificate
*permits*. That is decided here, from the verified certificate gRPC hands over in the
call's auth context (``x509_pem_cert``), in pure functions the server calls before
anything is registered:

1. the certificate must name exactly one service identity of our trust domain,
   ``spiffe://<td>/service/<name>`` (``peer_certificate``); otherwise the stream is
   UNAUTHENTICATED;
2. the Hello must claim that service, advertise the address the stream comes from (a
   loopback peer may advertise any loopback address: a local mesh lives on 127.x.y.z
   while the kernel picks 127.0.0.1 as the source), and may take over a node_id that a
   live stream holds only with that stream's key (a sidecar that reconnected keeps
   its key; DESIGN.md, "Discovery protocol": the newest stream for a node replaces the
   old one); otherwise PERMISSION_DENIED (``check_stream_claims``).

A refusal carries its gRPC status code (by name, so this module needs no grpc), a
``reason`` for metrics and logs, and a ``detail`` telling the peer what to change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controlplane.model import Hello
from identity.certs import cert_from_pem, public_key_fingerprint, spiffe_id_of
from identity.spiffe import IdentityError, SpiffeId

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
INVALID_ARGUMENT = "INVALID_ARGUMENT"

# refusal reasons (metric label values)
NO_CERTIFICATE = "no_certificate"
NOT_A_SERVICE = "not_a_service_certificate"
SERVICE_MISMATCH = "service_mismatch"
ADDRESS_MISMATCH = "address_mismatch"
NODE_ID_HELD = "node_id_held"

# the auth-context property grpc sets to the verified client certificate (PEM)
AUTH_PEM_CERT = "x509_pem_cert"


class Refusal(Exception):
    """A call refused: ``code`` is a grpc.StatusCode name, ``reason`` a metric label,
    ``detail`` what the peer is told (and should change)."""

    def __init__(self, code: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The verified client certificate of a call, as far as the mesh cares."""

    identity: SpiffeId
    # SHA-256 of the public key: "the same sidecar" across reconnects and renewals
    fingerprint: str
    not_after: float


def peer_certificate(auth_context: Mapping[str, Sequence[bytes]], trust_domain: str) -> PeerCertificate:
    """The service identity proven by the call's client certificate; Refusal if none."""
    values = auth_context.get(AUTH_PEM_CERT) or ()
    if not values:
        raise Refusal(UNAUTHENTICATED, NO_CERTIFICATE,
                      "no client certificate: use the mutual-TLS port with a workload certificate")
    try:
        cert = cert_from_pem(bytes(values[0]))
        identity = spiffe_id_of(cert)
    except IdentityError as exc:
        raise Refusal(UNAUTHENTICATED, NOT_A_SERVICE,
                      f"the client certificate names no service identity: {exc}") from exc
    if identity.trust_domain != trust_domain:
        raise Refusal(UNAUTHENTICATED, NOT_A_SERVICE,
                      f"the client certificate names {identity}, outside trust domain {trust_domain}")
    return PeerCertificate(identity, public_key_fingerprint(cert), cert.not_valid_after_utc.timestamp())


def peer_address(peer: str) -> IPAddress | None:
    """The IP of a grpc peer string (``ipv4:10.0.0.5:4242``, ``ipv6:[::1]:4242``); None if not IP.

    An IPv4-mapped IPv6 source (a dual-stack listener) is the IPv4 address it maps.
    """
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]").split("%", 1)[0]
    else:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_matches(advertised: str, source: IPAddress | None) -> bool:
    """May a stream from ``source`` advertise ``advertised`` (see the module docstring)?"""
    if source is None:
        return False
    try:
        claimed = ipaddress.ip_address(advertised)
    except ValueError:
        return False
    if isinstance(claimed, ipaddress.IPv6Address) and claimed.ipv4_mapped is not None:
        claimed = claimed.ipv4_mapped
    return claimed == source or (claimed.is_loopback and source.is_loopback)


def check_stream_claims(peer: PeerCertificate, hello: Hello, source: IPAddress | None,
                        holder: PeerCertificate | None) -> None:
    """Raise Refusal unless ``hello`` claims only what ``peer`` proves.

    ``holder`` is the certificate of the live stream that holds ``hello.node_id`` now, if any.
    """
    if hello.service != peer.identity.service:
        raise Refusal(PERMISSION_DENIED, SERVICE_MISMATCH,
                      f"certificate names service {peer.identity.service}, hello claims {hello.service}")
    if not address_matches(hello.address, source):
        seen = "an unknown address" if source is None else str(source)
        raise Refusal(PERMISSION_DENIED, ADDRESS_MISMATCH,
                      f"hello advertises address {hello.address}, but the stream comes from {seen}; "
                      "advertise the address this sidecar connects from")
    if holder is not None and holder.fingerprint != peer.fingerprint:
        raise Refusal(PERMISSION_DENIED, NODE_ID_HELD,
                      f"node_id {hello.node_id} is held by a connected sidecar with another key; "
                      "give every sidecar its own node_id (a reconnecting sidecar keeps its key)")
