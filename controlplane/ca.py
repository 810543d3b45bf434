"""The control plane's CA on disk, its own serving certificate, and the TLS credentials of its ports.

Theory of operation (DESIGN.md, "Identity"). The mesh CA lives in ``--ca-dir``: ``ca.pem``
and ``ca-key.pem``, generated there on first start (directory 0700, key 0600) or put there
by the operator; ``open_ca`` loads it once, before the event loop serves anything.

The control plane presents a certificate of its own on both gRPC ports, issued by that CA
for ``spiffe://<td>/controlplane`` with the DNS name ``controlplane`` (what sidecars verify,
whatever address they dial), the ``--server-name`` names and the ``--listen`` IP when it is
a specific one. ``ServingCertificate`` holds it with a fresh key and renews it at half its
life while the process runs (``run``). gRPC reads it through *dynamic* server credentials:
on every new TLS handshake gRPC calls the fetcher, which hands over the renewed key pair
once; connections already open keep the certificate they were made with.

- the discovery port (``mutual_tls``) requires a client certificate chained to the CA;
- the identity port (``server_tls``) asks for none: a sidecar arrives there with only a
  join token, and verifies us with the CA certificate it was given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from identity.certs import CertificateAuthority, cert_info, cert_to_pem, generate_key, key_to_pem, renewal_time
from identity.spiffe import IdentityError
from identity.store import CA_KEY_FILE, load_or_create_ca

log = logging.getLogger("controlplane.ca")

# a renewal that failed is tried again after this long (while the current one is still valid)
RETRY_S = 10.0


class CaError(RuntimeError):
    """The CA directory cannot be used; says why and what to do."""


def open_ca(directory: Path, trust_domain: str, now: float) -> CertificateAuthority:
    """The mesh CA from ``directory``, created there on first start. Blocking (file I/O, key generation)."""
    try:
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
            log.info("event=ca_dir_created dir=%s", directory)
        existed = (directory / CA_KEY_FILE).exists()
        ca = load_or_create_ca(directory, trust_domain, now)
    except IdentityError as exc:
        raise CaError(f"the CA in {directory} cannot be used: {exc}") from exc
    except OSError as exc:
        raise CaError(f"cannot read or create the CA in {directory}: {exc.strerror or exc} "
                      "(choose a writable --ca-dir, or run with --insecure)") from exc
    mode = stat.S_IMODE(os.stat(directory / CA_KEY_FILE).st_mode)
    if mode & 0o077:
        log.warning("event=ca_key_exposed file=%s mode=%o advice='chmod 600 it: whoever reads it can mint "
                    "any identity of the mesh'", directory / CA_KEY_FILE, mode)
    info = cert_info(ca.cert)
    log.info("event=ca_%s dir=%s trust_domain=%s not_after=%d", "loaded" if existed else "created", directory,
             ca.trust_domain, info.not_after)
    return ca


class ServingCertificate:
    """The control plane's own key and certificate, renewed at half-life; see the module docstring."""

    def __init__(self, ca: CertificateAuthority, *, dns_names: tuple[str, ...], ips: tuple[str, ...],
                 ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._ca = ca
        self._dns_names = list(dns_names)
        self._ips = list(ips)
        self._ttl_s = ttl_s
        self._clock = clock
        self.generation = 0
        self.not_after = 0.0
        self.renew_at = 0.0
        self._config: grpc.ServerCertificateConfiguration | None = None

    def renew(self) -> None:
        """Make a new key and certificate (blocking: key generation); handshakes from now on use them."""
        now = self._clock()
        key = generate_key()
        cert = self._ca.issue_server(key, dns_names=self._dns_names, ips=self._ips, ttl_s=self._ttl_s, now=now)
        self._config = grpc.ssl_server_certificate_configuration(
            [(key_to_pem(key), cert_to_pem(cert))], root_certificates=self._ca.bundle_pem)
        self.not_after = cert.not_valid_after_utc.timestamp()
        self.renew_at = renewal_time(cert, now)
        self.generation += 1
        log.info("event=serving_certificate_issued generation=%d dns_names=%s ips=%s not_after=%d",
                 self.generation, ",".join(self._dns_names), ",".join(self._ips) or "-", self.not_after)

    def mutual_tls(self) -> grpc.ServerCredentials:
        """For the discovery port: clients must present a certificate chained to the mesh CA."""
        return self._credentials(require_client_auth=True)

    def server_tls(self) -> grpc.ServerCredentials:
        """For the identity port: the server is authenticated, clients bring a join token instead."""
        return self._credentials(require_client_auth=False)

    def _credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        if self._config is None:
            raise RuntimeError("call renew() (off the event loop: it generates a key) before asking for credentials")
        seen = self.generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # called by gRPC on each new handshake; None keeps what it has
            nonlocal seen
            if self.generation == seen:
                return None
            seen = self.generation
            return self._config

        # without client auth gRPC does not even ask for a client certificate (checked: the
        # identity port's auth context holds none), so the token is the only proof there
        return grpc.dynamic_ssl_server_credentials(self._config, fetch,
                                                   require_client_authentication=require_client_auth)

    async def run(self, *, on_renewed: Callable[[], object] = lambda: None) -> None:
        """Renew at half-life until cancelled; a failed renewal is retried while the old one is valid."""
        while True:
            await asyncio.sleep(max(0.0, self.renew_at - self._clock()))
            try:
                await asyncio.to_thread(self.renew)
            except Exception as exc:  # noqa: BLE001 - keep serving with the current certificate
                log.error("event=serving_certificate_renewal_failed error=%r not_after=%d retry_s=%s",
                          str(exc), self.not_after, RETRY_S)
                self.renew_at = self._clock() + RETRY_S
                continue
            on_renewed()

    def status(self) -> dict[str, object]:
        return {"dns_names": self._dns_names, "ips": self._ips, "not_after": self.not_after,
                "renew_at": self.renew_at, "generation": self.generation}
