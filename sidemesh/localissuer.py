"""The node-local issuer of `sidemesh up`: certificates for pods started while the control plane
cannot be reached.

A sidecar with no usable certificate that cannot reach the control plane leaves a CSR in its
identity directory and looks there for a certificate (``sidecar/certmanager.py``). `sidemesh up`
made the mesh's CA, so it can play the node agent: for every pod it starts, until that pod has
a certificate (from the control plane or from here), it signs such a CSR for exactly the pod's
service. The key stays with the sidecar; the identity is the same one the control plane would
have issued. Without this, a pod scaled up during an outage could not join the mesh until the
control plane came back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from controlplane.config import parse_duration
from identity.certs import CertificateAuthority, cert_to_pem
from identity.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId
from identity.store import CA_CERT_FILE, CA_KEY_FILE, IdentityFiles
from sidemesh.layout import MeshLayout

log = logging.getLogger("sidemesh.up.issuer")

WATCH_S = 15.0  # a pod that has no certificate by then gets one from the control plane when it is back
POLL_S = 0.05


class LocalIssuer:
    def __init__(self, layout: MeshLayout, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.layout = layout
        self._clock = clock
        self._ca: CertificateAuthority | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.issued = 0

    def watch(self, pod: str, service: str, running: Callable[[], bool]) -> None:
        """Sign ``pod``'s CSR if its sidecar leaves one, until it has a certificate."""
        task = asyncio.create_task(self._watch(pod, service, running), name=f"issue-{pod}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, pod: str, service: str, running: Callable[[], bool]) -> None:
        files = IdentityFiles(Path(self.layout.identity_paths().pods_dir) / pod)
        expected = SpiffeId(DEFAULT_TRUST_DOMAIN, service)
        deadline = self._clock() + WATCH_S
        while self._clock() < deadline and running():
            csr = await asyncio.to_thread(files.take_csr)
            if csr is not None:
                try:
                    await asyncio.to_thread(self._sign, files, csr, expected)
                except (OSError, IdentityError) as exc:
                    log.warning("event=local_issue_failed name=%s reason=%r", pod, str(exc))
                    return
                self.issued += 1
                log.info("event=certificate_issued_locally name=%s identity=%s reason=controlplane_unreachable",
                         pod, expected)
                return
            if await asyncio.to_thread(files.cert.exists):
                return  # the control plane issued it
            await asyncio.sleep(POLL_S)

    def _sign(self, files: IdentityFiles, csr: bytes, expected: SpiffeId) -> None:
        """Blocking: load the CA (once), sign exactly ``expected``, write where the sidecar looks."""
        if self._ca is None:
            ca_dir = Path(self.layout.identity_paths().ca_dir)
            self._ca = CertificateAuthority.load((ca_dir / CA_CERT_FILE).read_bytes(),
                                                 (ca_dir / CA_KEY_FILE).read_bytes())
        cert = self._ca.issue_workload(csr, expected, ttl_s=parse_duration(self.layout.cert_ttl), now=time.time())
        files.save(cert_to_pem(cert), self._ca.bundle_pem)
        files.csr.unlink(missing_ok=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
