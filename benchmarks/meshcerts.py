"""Certificates for the mutual-TLS paths of the data plane benchmark.

One mesh CA serves both proxies under test, so that the key type (EC P-256), the chain (one
CA, no intermediates) and the SPIFFE URI SANs are the same on both:

* the CA and the join tokens are made the way an operator makes them for a deployment that
  runs the pieces apart: ``sidemesh identity init --ca-dir DIR --services client,upstream``;
  the sidemesh control plane then issues the sidecars' certificates from it (their keys never
  leave the sidecars), as in production;
* the Envoys and the fresh-connection client get workload certificates minted here from the
  same CA with ``identity.certs`` (``make_csr``, ``CertificateAuthority.issue_workload``):
  what the control plane would have issued them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.envoyconfig import TlsFiles
from benchmarks.procs import BenchError
from identity.certs import CertificateAuthority, cert_to_pem, generate_key, key_to_pem, make_csr
from identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from identity.store import CA_CERT_FILE, CA_KEY_FILE, write_atomic

# long enough for any run; the benchmark never renews
CERT_TTL_S = 24 * 3600.0
INIT_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class MeshCa:
    """A mesh CA directory as ``sidemesh identity init`` leaves it: ca.pem, ca-key.pem, tokens/."""

    directory: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def bundle(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def tokens(self) -> Path:
        return self.directory / "tokens"

    def token(self, service: str) -> Path:
        return self.tokens / service

    def uri(self, service: str) -> str:
        """The SPIFFE ID every certificate of ``service`` names."""
        return SpiffeId(self.trust_domain, service).uri


def init_mesh_ca(directory: Path, services: tuple[str, ...], *, repo: Path) -> MeshCa:
    """``sidemesh identity init`` into ``directory``: the CA and one join token per service."""
    argv = [sys.executable, "-m", "sidemesh", "identity", "init", "--ca-dir", str(directory),
            "--services", ",".join(services)]
    try:
        done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=INIT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} did not finish within {INIT_TIMEOUT_S:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-1500:]}")
    ca = MeshCa(directory)
    if not ca.bundle.exists() or not all(ca.token(s).exists() for s in services):
        raise BenchError(f"sidemesh identity init left no CA or tokens in {directory}")
    return ca


def issue_files(ca: MeshCa, service: str, directory: Path, *, now: float | None = None) -> TlsFiles:
    """A key and a workload certificate for ``service`` from the mesh CA, written to ``directory``.

    The same steps a sidecar and the control plane take (a P-256 key, a CSR naming only the
    SPIFFE ID, the CA's checks and signature), without the network in between.
    """
    authority = CertificateAuthority.load(ca.bundle.read_bytes(), (ca.directory / CA_KEY_FILE).read_bytes())
    identity = SpiffeId(ca.trust_domain, service)
    key = generate_key()
    csr = make_csr(key, identity, f"bench-{service}")
    cert = authority.issue_workload(csr, identity, ttl_s=CERT_TTL_S, now=time.time() if now is None else now)
    files = TlsFiles(cert=directory / "cert.pem", key=directory / "key.pem", ca=ca.bundle)
    write_atomic(files.key, key_to_pem(key), private=True)
    write_atomic(files.cert, cert_to_pem(cert))
    return files
