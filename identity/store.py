"""Identity material on disk: a sidecar's key, certificate and trust bundle; the CA; join tokens.

Files are written atomically (write a temporary file in the same directory, fsync, rename), so a
crash never leaves half a key; private keys and tokens are created with mode 0600. These are
blocking file calls: async code runs them through ``asyncio.to_thread``.

Layout of a sidecar's identity directory::

    key.pem      the private key, generated here, never sent anywhere
    cert.pem     the current workload certificate
    bundle.pem   the trust bundle (the mesh CA certificate)
    csr.pem      a request left for a local issuer while the control plane cannot be reached

Layout of a control plane's CA directory: ``ca.pem`` and ``ca-key.pem``.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from identity.certs import CertificateAuthority, PrivateKey, cert_from_pem, generate_key, key_from_pem, key_to_pem
from identity.spiffe import IdentityError

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
BUNDLE_FILE = "bundle.pem"
CSR_FILE = "csr.pem"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
TOKEN_BYTES = 32


def write_atomic(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """Paths of one sidecar's identity material (``ssl`` loads certificates from files)."""

    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def cert(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def bundle(self) -> Path:
        return self.directory / BUNDLE_FILE

    @property
    def csr(self) -> Path:
        return self.directory / CSR_FILE

    def leave_csr(self, csr_pem: bytes) -> None:
        write_atomic(self.csr, csr_pem)

    def take_csr(self) -> bytes | None:
        return self.csr.read_bytes() if self.csr.exists() else None

    def load_or_create_key(self) -> PrivateKey:
        """The sidecar's key: reused across restarts (so its registration stays its own)."""
        if self.key.exists():
            return key_from_pem(self.key.read_bytes())
        key = generate_key()
        write_atomic(self.key, key_to_pem(key), private=True)
        return key

    def save(self, cert_pem: bytes, bundle_pem: bytes) -> None:
        cert_from_pem(cert_pem)
        write_atomic(self.bundle, bundle_pem)
        write_atomic(self.cert, cert_pem)

    def load_cert(self) -> bytes | None:
        return self.cert.read_bytes() if self.cert.exists() else None

    def load_bundle(self) -> bytes | None:
        return self.bundle.read_bytes() if self.bundle.exists() else None


def load_or_create_ca(directory: Path, trust_domain: str, now: float) -> CertificateAuthority:
    """The control plane's CA: loaded from ``directory`` or generated there on first start."""
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if cert_path.exists() or key_path.exists():
        if not (cert_path.exists() and key_path.exists()):
            raise IdentityError(f"{directory} holds only one of {CA_CERT_FILE} and {CA_KEY_FILE}")
        ca = CertificateAuthority.load(cert_path.read_bytes(), key_path.read_bytes())
        if ca.trust_domain != trust_domain:
            raise IdentityError(f"the CA in {directory} is for trust domain {ca.trust_domain!r}, not {trust_domain!r}")
        return ca
    ca = CertificateAuthority.create(trust_domain, now)
    write_atomic(key_path, key_to_pem(ca.key), private=True)
    write_atomic(cert_path, ca.bundle_pem)
    return ca


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def read_token(path: Path) -> str:
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not text:
        raise IdentityError(f"join token file {path} is empty")
    return text


def ensure_tokens(directory: Path, services: list[str]) -> dict[str, Path]:
    """A join token file per service in ``directory`` (kept if present); service -> path."""
    out = {}
    for service in services:
        path = directory / service
        if not path.exists():
            write_atomic(path, (new_token() + "\n").encode(), private=True)
        out[service] = path
    return out
