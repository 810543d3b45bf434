"""The sidecar's own workload identity as the data path sees it: who we are, and the TLS
contexts to prove it, or why we cannot (fail closed, visibly).

``WorkloadIdentity`` owns one server and one client ``ssl.SSLContext`` for the life of the
process: listeners are created with them once, and a renewed certificate is loaded into the
same contexts in place (OpenSSL uses the context's current certificate for every new
handshake; connections already open keep theirs). Until a valid certificate is loaded -- a
brand-new sidecar that never reached the control plane -- or once it has expired -- an outage
longer than its lifetime -- handshakes fail and ``unusable_reason`` says why; callers answer
503 with that reason rather than fall back to plaintext.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

from identity.certs import CertInfo, cert_from_pem, cert_info, spiffe_id_of
from identity.spiffe import IdentityError, SpiffeId
from identity.store import IdentityFiles
from identity.tls import ALPN


def _context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # the peer's SPIFFE ID is checked instead
    return ctx


class WorkloadIdentity:
    """``spiffe://<td>/service/<service>`` and the TLS contexts of its current certificate."""

    def __init__(self, service: str, trust_domain: str, *, clock: Callable[[], float] = time.time) -> None:
        self.spiffe_id = SpiffeId(trust_domain, service)
        self._clock = clock
        self.server = _context(ssl.PROTOCOL_TLS_SERVER)
        self.client = _context(ssl.PROTOCOL_TLS_CLIENT)
        self.info: CertInfo | None = None
        self._why = "no workload certificate yet (the control plane has not issued one)"

    @property
    def service(self) -> str:
        return self.spiffe_id.service

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id.trust_domain

    def expected_peer(self, service: str) -> SpiffeId:
        """The identity an endpoint of ``service`` must present."""
        return SpiffeId(self.trust_domain, service)

    def unusable_reason(self) -> str | None:
        """None while the certificate is valid; else what is wrong, for a 503 and ``/state``."""
        info = self.info
        if info is None:
            return self._why
        if self._clock() >= info.not_after:
            return (f"workload certificate expired at {_utc(info.not_after)} and could not be renewed "
                    f"({self._why})")
        return None

    def load(self, files: IdentityFiles) -> CertInfo:
        """Load the certificate, key and bundle in ``files`` into both contexts.

        Blocking file reads: call it before the loop runs or through ``asyncio.to_thread``.
        Raises IdentityError when the certificate is not ours or unreadable.
        """
        cert = cert_from_pem(files.cert.read_bytes())
        if spiffe_id_of(cert) != self.spiffe_id:
            raise IdentityError(f"{files.cert} names {spiffe_id_of(cert)}, not {self.spiffe_id}")
        for ctx in (self.server, self.client):
            ctx.load_verify_locations(cafile=str(files.bundle))
            ctx.load_cert_chain(str(files.cert), str(files.key))
        self.info = cert_info(cert)
        return self.info

    def note_problem(self, why: str) -> None:
        """The latest reason the certificate could not be had or renewed (shown once unusable)."""
        self._why = why

    def describe(self) -> dict[str, object]:
        info = self.info
        return {
            "spiffe_id": self.spiffe_id.uri,
            "cert_not_after": None if info is None else info.not_after,
            "cert_renew_at": None if info is None else info.renew_at,
            "usable": self.unusable_reason() is None,
            "problem": self.unusable_reason(),
        }


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
