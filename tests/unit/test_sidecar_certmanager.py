"""The certificate manager without a control plane: the cache on disk, and certificates a
node-local issuer leaves (real CA, real files, no network)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from identity.certs import CertificateAuthority, cert_to_pem, make_csr
from identity.spiffe import SpiffeId
from identity.store import IdentityFiles
from sidecar.certmanager import CertificateManager, IssuerConfig
from sidecar.workload import WorkloadIdentity

ARTIST = SpiffeId("sidemesh.local", "artist")


def _manager(tmp_path: Path) -> tuple[CertificateManager, IdentityFiles, CertificateAuthority]:
    ca = CertificateAuthority.create("sidemesh.local", time.time())
    files = IdentityFiles(tmp_path / "artist-2")
    config = IssuerConfig(node_id="artist-2", renew_target="127.0.0.1:1", bootstrap_target="127.0.0.1:1", files=files)
    return CertificateManager(WorkloadIdentity("artist", "sidemesh.local"), config), files, ca


def _issue(ca: CertificateAuthority, files: IdentityFiles, ttl_s: float, now: float | None = None) -> None:
    key = files.load_or_create_key()
    cert = ca.issue_workload(make_csr(key, ARTIST, "artist-2"), ARTIST, ttl_s=ttl_s, now=now or time.time())
    files.save(cert_to_pem(cert), ca.bundle_pem)


async def test_a_certificate_the_local_issuer_wrote_before_the_wait_began_is_picked_up(tmp_path: Path) -> None:
    manager, files, ca = _manager(tmp_path)
    assert not await manager.load_cached()  # nothing yet: the sidecar leaves its CSR ...
    _issue(ca, files, 3600)  # ... and the issuer answers before the sidecar starts waiting
    t0 = time.monotonic()
    await asyncio.wait_for(manager._sleep_or_local_certificate(5.0), 2.0)
    print(f"local certificate picked up after {time.monotonic() - t0:.3f}s")
    assert manager.identity.unusable_reason() is None


async def test_a_cached_certificate_serves_at_start_and_an_expired_one_does_not(tmp_path: Path) -> None:
    manager, files, ca = _manager(tmp_path)
    _issue(ca, files, 3600)
    assert await manager.load_cached() and manager.identity.unusable_reason() is None
    other, files2, _ = _manager(tmp_path / "b")
    _issue(ca, files2, 10, now=time.time() - 3600)  # expired an hour ago
    assert not await other.load_cached()
    assert "no workload certificate" in (other.identity.unusable_reason() or "")
