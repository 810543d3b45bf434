"""TLS 1.3 contexts for mutual TLS between sidecars, and the identity check after a handshake.

Chain validation is the ``ssl`` module's (OpenSSL): both sides present a certificate and
require one signed by the mesh CA (the trust bundle). Host names play no part in a mesh, so
``check_hostname`` is off and the *identity* check is ours: after the handshake the caller reads
the peer's SPIFFE ID from its certificate and compares it with the service it routed to
(``peer_identity``), in every routing mode, so a DNS answer cannot send a call to an impostor.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from identity.spiffe import SCHEME, IdentityError, SpiffeId

# the ALPN protocol of sidecar-to-sidecar hops (HTTP/1.1 inside mutual TLS)
ALPN = "http/1.1"


def _base(purpose: int, cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    return ctx


def server_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    """For a sidecar's inbound listener: clients must present a mesh certificate."""
    return _base(ssl.PROTOCOL_TLS_SERVER, cert, key, bundle)


def client_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    """For a sidecar's upstream connections: present ours, require a mesh certificate back."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, cert, key, bundle)
    ctx.check_hostname = False  # the SPIFFE ID is checked instead (peer_identity)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> SpiffeId:
    """The SPIFFE ID of the verified peer of a finished handshake; IdentityError if none.

    Read from the certificate OpenSSL already verified and decoded (``getpeercert()``), so the
    per-connection check costs no X.509 parse of our own.
    """
    if ssl_object is None:
        raise IdentityError("the connection is not TLS")
    cert = ssl_object.getpeercert()
    if not cert:
        raise IdentityError("the peer presented no certificate")
    sans: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    uris = [value for kind, value in sans if kind == "URI" and value.startswith(SCHEME)]
    if len(uris) != 1:
        raise IdentityError(f"peer certificate names {len(uris)} SPIFFE IDs, expected exactly one")
    return SpiffeId.parse(uris[0])
