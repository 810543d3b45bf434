"""Gets and renews the sidecar's workload certificate from the control plane's CA.

Theory of operation (DESIGN.md, "Identity"). The sidecar makes its key once and keeps it in
its identity directory (it never leaves the sidecar; the same key across renewals and
restarts is also what lets a restarted sidecar take its own registration back). It sends only
a CSR naming ``spiffe://<td>/service/<name>`` to ``Identity.Issue``:

* with a valid certificate: over mutual TLS to the discovery port (renewal proves itself);
* without one: over server-authenticated TLS to the identity port, with its service's join
  token (``authorization: Bearer <token>``) -- first contact, or after an outage longer than the
  certificate's life.

The control plane is verified against the trust bundle: the one cached from the last issuance,
or the bootstrap bundle given at start (``--trust-bundle``). The certificate and bundle are
cached on disk, so a sidecar restarted during an outage comes back with its identity.

A sidecar that has no usable certificate and cannot reach the control plane leaves its CSR in
its identity directory (``csr.pem``) and keeps looking there for a certificate: the node-local
agent that started it (``sidemesh up``, which holds the mesh CA it created) signs it, so a pod
started during an outage joins the mesh at once. The key still never leaves the sidecar.

When: at start if there is no usable cached certificate, then at half the certificate's life
(so an outage of up to half the lifetime never lets it expire), and after a failure with
jittered exponential backoff. A failure is logged at warning level and noted on the identity,
which shows it once the certificate is unusable (fail closed, visibly).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from meshpb.v1 import discovery_pb2_grpc

from identity.certs import cert_from_pem, cert_info, key_to_pem, make_csr
from identity.spiffe import IdentityError
from identity.store import IdentityFiles, read_token
from sidecar import convert
from sidecar.discovery import CONTROLPLANE_SERVER_NAME
from sidecar.errors import ControlPlaneUnavailable
from sidecar.workload import WorkloadIdentity

log = logging.getLogger("sidemesh.sidecar.certs")

ISSUE_TIMEOUT_S = 5.0
RETRY_BASE_S = 0.5
RETRY_CAP_S = 30.0
# how often a sidecar without a certificate looks for one a local issuer wrote
LOCAL_POLL_S = 0.1
# how long the discovery stream waits for a certificate attempt before it gives up this try
FIRST_CERTIFICATE_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """Where and how the sidecar asks for certificates."""

    node_id: str
    renew_target: str  # the control plane's mutual-TLS port, HOST:PORT
    bootstrap_target: str  # its identity (join token) port, HOST:PORT
    files: IdentityFiles
    join_token_file: Path | None = None
    join_token: str | None = None
    trust_bundle: Path | None = None


class CertificateError(Exception):
    """No certificate could be had this time; the message says why (for logs and /state)."""


class CertificateManager:
    def __init__(self, identity: WorkloadIdentity, config: IssuerConfig, *,
                 clock: Callable[[], float] = time.time, rng: Callable[[], float] = random.random) -> None:
        self.identity = identity
        self.config = config
        self._clock = clock
        self._rng = rng
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        self._attempted = asyncio.Event()  # set after every attempt to get a certificate
        self._tried_mtime: float | None = None  # the certificate file last loaded or found unusable

    async def settled(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the certificate is usable or an attempt to get one ended."""
        if self.identity.unusable_reason() is None:
            return
        self._attempted.clear()
        try:
            await asyncio.wait_for(self._attempted.wait(), timeout)
        except TimeoutError:
            pass

    async def load_cached(self) -> bool:
        """Use the certificate cached on disk if it is ours and not expired; True if so."""
        files = self.config.files
        self._tried_mtime = await asyncio.to_thread(_mtime, files.cert)
        try:
            pem = await asyncio.to_thread(files.load_cert)
            if pem is None or not files.bundle.exists() or not files.key.exists():
                return False
            info = cert_info(cert_from_pem(pem))
            if info.not_after <= self._clock():
                log.warning("event=cached_certificate_expired not_after=%.0f", info.not_after)
                return False
            await asyncio.to_thread(self.identity.load, files)
        except (OSError, IdentityError, ValueError) as exc:
            log.warning("event=cached_certificate_unusable reason=%r", str(exc))
            return False
        log.info("event=certificate_loaded source=cache identity=%s not_after=%.0f renew_at=%.0f",
                 self.identity.spiffe_id, info.not_after, info.renew_at)
        return True

    async def run(self) -> None:
        """Renew forever: now when unusable, else at half-life; back off after failures."""
        failures = 0
        while True:
            info = self.identity.info
            usable = self.identity.unusable_reason() is None
            delay = 0.0 if not usable or info is None else max(0.0, info.renew_at - self._clock())
            if failures:
                delay = self._rng() * min(RETRY_CAP_S, RETRY_BASE_S * 2 ** failures)
                if usable and info is not None:
                    # never sleep past the expiry we are trying to avoid
                    delay = min(delay, max(0.0, info.not_after - self._clock()))
            if delay > 0:
                await self._sleep_or_local_certificate(delay)
            if self.identity.unusable_reason() is None and not usable:
                failures = 0
                continue  # a local issuer answered while we waited
            try:
                await self.renew()
            except CertificateError as exc:
                self._attempted.set()
                if self.identity.unusable_reason() is not None:
                    await self._leave_csr()
                failures += 1
                self.failures += 1
                self.last_error = str(exc)
                self.identity.note_problem(str(exc))
                level = logging.WARNING if failures in (1, 5) or failures % 20 == 0 else logging.DEBUG
                log.log(level, "event=certificate_renewal_failed failures=%d reason=%r", failures, str(exc))
            else:
                self._attempted.set()
                failures = 0

    async def _sleep_or_local_certificate(self, delay: float) -> None:
        """Sleep ``delay``; without a usable certificate, look for one a local issuer left meanwhile."""
        deadline = self._clock() + delay
        while self.identity.unusable_reason() is not None and self._clock() < deadline:
            # a certificate file we have not tried yet: one the issuer may have written at any
            # moment since the CSR was left, even before this sleep began
            mtime = await asyncio.to_thread(_mtime, self.config.files.cert)
            if mtime is None or mtime == self._tried_mtime:
                await asyncio.sleep(min(LOCAL_POLL_S, max(0.0, deadline - self._clock())))
                continue
            self._tried_mtime = mtime
            if await self.load_cached():
                log.info("event=certificate_issued via=local_issuer identity=%s", self.identity.spiffe_id)
                self._attempted.set()
                return
        remaining = deadline - self._clock()
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def _leave_csr(self) -> None:
        files = self.config.files
        try:
            key = await asyncio.to_thread(files.load_or_create_key)
            await asyncio.to_thread(files.leave_csr, make_csr(key, self.identity.spiffe_id, self.config.node_id))
        except (OSError, IdentityError) as exc:
            log.debug("event=csr_not_left reason=%r", str(exc))

    async def renew(self) -> None:
        """Get a fresh certificate now and load it; raises CertificateError."""
        files = self.config.files
        key = await asyncio.to_thread(files.load_or_create_key)
        csr = make_csr(key, self.identity.spiffe_id, self.config.node_id)
        renewing = self.identity.unusable_reason() is None
        bundle = await asyncio.to_thread(self._bundle)
        metadata: tuple[tuple[str, str], ...] = ()
        if renewing:
            cert_pem = await asyncio.to_thread(files.cert.read_bytes)
            creds = grpc.ssl_channel_credentials(root_certificates=bundle, private_key=key_to_pem(key),
                                                 certificate_chain=cert_pem)
            target = self.config.renew_target
        else:
            token = await asyncio.to_thread(self._token)
            creds = grpc.ssl_channel_credentials(root_certificates=bundle)
            target, metadata = self.config.bootstrap_target, (("authorization", f"Bearer {token}"),)
        options = [("grpc.ssl_target_name_override", CONTROLPLANE_SERVER_NAME), ("grpc.enable_retries", 0)]
        try:
            async with grpc.aio.secure_channel(target, creds, options=options) as channel:
                stub = discovery_pb2_grpc.IdentityStub(channel)
                reply = await stub.Issue(convert.issue_request(csr, self.config.node_id),
                                         metadata=metadata, timeout=ISSUE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            via = "certificate" if renewing else "join token"
            raise CertificateError(f"Identity.Issue at {target} ({via}) failed: {exc.code().name}: {exc.details()}") from exc
        cert_pem_new, bundle_pem = convert.issued(reply)
        try:
            cert = cert_from_pem(cert_pem_new)
        except IdentityError as exc:
            raise CertificateError(f"the control plane sent an unusable certificate: {exc}") from exc
        try:
            await asyncio.to_thread(files.save, cert_pem_new, bundle_pem)
            info = await asyncio.to_thread(self.identity.load, files)
        except (OSError, IdentityError) as exc:
            raise CertificateError(f"could not store or load the new certificate: {exc}") from exc
        self.renewals += 1
        self.last_error = None
        log.info("event=certificate_issued via=%s identity=%s serial=%x not_after=%.0f renew_at=%.0f",
                 "certificate" if renewing else "join_token", self.identity.spiffe_id, cert.serial_number,
                 info.not_after, info.renew_at)

    def _bundle(self) -> bytes:
        cached = self.config.files.load_bundle()
        if cached:
            return cached
        if self.config.trust_bundle is not None:
            try:
                return self.config.trust_bundle.read_bytes()
            except OSError as exc:
                raise CertificateError(f"cannot read the trust bundle {self.config.trust_bundle}: {exc}") from exc
        raise CertificateError("no trust bundle to check the control plane with (give --trust-bundle)")

    def _token(self) -> str:
        if self.config.join_token:
            return self.config.join_token
        if self.config.join_token_file is not None:
            try:
                return read_token(self.config.join_token_file)
            except (OSError, IdentityError) as exc:
                raise CertificateError(f"cannot read the join token: {exc}") from exc
        raise CertificateError("no valid certificate and no join token (--join-token-file or $SIDEMESH_JOIN_TOKEN)")

    def channel_credentials(self) -> Callable[[], Awaitable[grpc.ChannelCredentials]]:
        """What the discovery client calls before each attempt (see ``_channel_credentials``)."""
        return _channel_credentials(self)

    def state(self) -> dict[str, object]:
        return {**self.identity.describe(), "renewals": self.renewals, "renewal_failures": self.failures,
                "last_error": self.last_error}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns / 1e9
    except OSError:
        return None


def _channel_credentials(manager: CertificateManager) -> Callable[[], Awaitable[grpc.ChannelCredentials]]:
    """For the discovery client: mutual-TLS credentials of the current certificate, read per attempt."""

    async def credentials() -> grpc.ChannelCredentials:
        # at start the first certificate is usually a round trip away: wait for it rather than
        # count the stream as lost (which would send a fresh sidecar through dns mode for nothing)
        await manager.settled(FIRST_CERTIFICATE_WAIT_S)
        why = manager.identity.unusable_reason()
        if why is not None:
            raise ControlPlaneUnavailable(f"cannot authenticate to the control plane: {why}")
        files = manager.config.files

        def read() -> tuple[bytes, bytes, bytes]:
            return files.bundle.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()

        try:
            bundle, key, cert = await asyncio.to_thread(read)
        except OSError as exc:
            raise ControlPlaneUnavailable(f"cannot read the workload certificate: {exc}") from exc
        return grpc.ssl_channel_credentials(root_certificates=bundle, private_key=key, certificate_chain=cert)

    return credentials
