"""Keys, CSRs and X.509 certificates for workload identity, on the ``cryptography`` package.

Theory of operation. The control plane holds a certificate authority (``CertificateAuthority``):
a self-signed CA certificate and its key, generated on first start (or supplied by the
operator). A sidecar makes its own key (EC P-256; it never leaves the sidecar) and a CSR whose
only URI SAN is its SPIFFE ID; the CA signs a short-lived leaf certificate (24 h by default) for
exactly the identity the caller proved (join token or current certificate), with both
serverAuth and clientAuth, since every sidecar is a TLS server (inbound) and client (outbound).
The trust bundle is the CA certificate, public, cached by every sidecar so that certificates
keep being checked while the control plane is gone. A certificate is renewed at half its life.

Everything here is pure computation on bytes and a given ``now``; file I/O lives in ``store``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.spiffe import SCHEME, IdentityError, SpiffeId

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_TTL = dt.timedelta(days=3650)
BACKDATE = dt.timedelta(seconds=60)  # tolerate small clock skew between hosts
MIN_RSA_BITS = 2048
CONTROLPLANE_PATH = "/controlplane"


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def key_from_pem(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"not a PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"unsupported key type {type(key).__name__}")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate: {exc}") from exc


def cert_from_der(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"not a DER certificate: {exc}") from exc


def make_csr(key: PrivateKey, identity: SpiffeId, node_id: str) -> bytes:
    """A CSR for ``identity``; the subject CN carries the node id (informational)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id[:64] or identity.service)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_identity(csr_pem: bytes) -> SpiffeId:
    """The one service identity a CSR asks for, after checking what a CA must check first.

    IdentityError (with a reason a person can act on) if the PEM is not a CSR, its signature
    does not verify (the requester does not hold the key, RFC 2986 section 3), its key is weak,
    or it does not carry exactly one URI SAN that is a ``spiffe://<td>/service/<name>`` ID.
    The trust domain is returned as asked; whether it is the CA's own is the caller's check.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise IdentityError("the CSR's signature does not verify with its own public key")
    _check_public_key(csr.public_key())
    uris = uris_of(csr)
    if len(uris) != 1:
        listed = ", ".join(u[:100] for u in uris[:3]) or "none"
        raise IdentityError(f"the CSR must carry exactly one URI SAN (a SPIFFE ID); it carries {len(uris)}: {listed}")
    return SpiffeId.parse(uris[0])


def renewal_time(cert: x509.Certificate, received_at: float) -> float:
    """When to renew ``cert``: half the lifetime left at ``received_at`` (its issue time).

    ``CertInfo.renew_at`` counts from ``not_before``, which the CA backdates by ``BACKDATE`` for
    clock skew; for a short-lived certificate (say 20 s) that point lies before the certificate
    even arrived. Counting from receipt keeps half the remaining life as the margin at any TTL.
    """
    not_after = cert.not_valid_after_utc.timestamp()
    return received_at + max(0.0, not_after - received_at) / 2


def uris_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The one sidemesh service identity a certificate names; IdentityError otherwise."""
    uris = [u for u in uris_of(cert) if u.startswith(SCHEME)]
    if len(uris) != 1:
        raise IdentityError(f"certificate names {len(uris)} SPIFFE IDs, expected exactly one")
    return SpiffeId.parse(uris[0])


@dataclass(frozen=True, slots=True)
class CertInfo:
    uri: str
    not_before: float
    not_after: float
    serial: int

    @property
    def renew_at(self) -> float:
        """Half-life: renew with half the lifetime left, so an outage of up to half the lifetime
        never lets the certificate expire. Counted from the issue time (``not_before`` is
        backdated by ``BACKDATE`` for clock skew), so a 20 s certificate renews after 10 s."""
        issued = min(self.not_before + BACKDATE.total_seconds(), self.not_after)
        return issued + (self.not_after - issued) / 2


def cert_info(cert: x509.Certificate) -> CertInfo:
    uris = uris_of(cert)
    return CertInfo(
        uri=uris[0] if uris else "",
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        serial=cert.serial_number,
    )


def _utc(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.timezone.utc)


class CertificateAuthority:
    """Signs workload certificates. Build with ``create`` or ``load``."""

    def __init__(self, cert: x509.Certificate, key: PrivateKey, trust_domain: str) -> None:
        self.cert = cert
        self.key = key
        self.trust_domain = trust_domain
        self.bundle_pem = cert_to_pem(cert)

    @classmethod
    def create(cls, trust_domain: str, now: float) -> CertificateAuthority:
        SpiffeId(trust_domain, "ca")  # validates the trust domain
        key = generate_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidemesh"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"sidemesh CA {trust_domain}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now) - BACKDATE).not_valid_after(_utc(now) + CA_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{SCHEME}{trust_domain}")]),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        cert, key = cert_from_pem(cert_pem), key_from_pem(key_pem)
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise IdentityError("the CA certificate is not a CA (BasicConstraints ca=true missing)")
        if _public_der(cert.public_key()) != _public_der(key.public_key()):
            raise IdentityError("the CA key does not match the CA certificate")
        uris = [u for u in uris_of(cert) if u.startswith(SCHEME)]
        trust_domain = uris[0][len(SCHEME):].rstrip("/") if uris else "sidemesh.local"
        SpiffeId(trust_domain, "ca")
        return cls(cert, key, trust_domain)

    def issue_workload(self, csr_pem: bytes, expected: SpiffeId, *, ttl_s: float, now: float) -> x509.Certificate:
        """Sign ``csr_pem`` if its one URI SAN is ``expected``; IdentityError says why not."""
        if expected.trust_domain != self.trust_domain:
            raise IdentityError(f"identity {expected} is not in trust domain {self.trust_domain}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise IdentityError(f"not a PEM CSR: {exc}") from exc
        if not csr.is_signature_valid:
            raise IdentityError("CSR signature is not valid")
        _check_public_key(csr.public_key())
        uris = uris_of(csr)
        if uris != [expected.uri]:
            raise IdentityError(f"CSR asks for {uris or 'no URI'}, but the caller proved {expected.uri}")
        return self._sign(csr.public_key(), csr.subject, [x509.UniformResourceIdentifier(expected.uri)],
                          ttl_s=ttl_s, now=now)

    def issue_server(self, key: PrivateKey, *, dns_names: list[str], ips: list[str], ttl_s: float,
                     now: float) -> x509.Certificate:
        """The control plane's own serving certificate: ``spiffe://<td>/controlplane``."""
        import ipaddress

        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"{SCHEME}{self.trust_domain}{CONTROLPLANE_PATH}")]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidemesh control plane")])
        return self._sign(key.public_key(), subject, sans, ttl_s=ttl_s, now=now)

    def _sign(self, public_key: object, subject: x509.Name, sans: list[x509.GeneralName], *, ttl_s: float,
              now: float) -> x509.Certificate:
        not_after = min(_utc(now + ttl_s), self.cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now) - BACKDATE).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's public key (hex): a stable name for "the same key"."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_public_der(cert.public_key()))
    return digest.finalize().hex()


def _check_public_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise IdentityError(f"EC curve {key.curve.name} is not accepted (P-256 or P-384)")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise IdentityError(f"RSA key of {key.key_size} bits is too small (>= {MIN_RSA_BITS})")
        return
    raise IdentityError(f"key type {type(key).__name__} is not accepted")


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, now: float) -> None:
    """Check ``cert`` was signed by ``ca_cert`` and is valid at ``now``; IdentityError otherwise."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IdentityError(f"certificate was not issued by the mesh CA: {exc or type(exc).__name__}") from exc
    info = cert_info(cert)
    if not info.not_before <= now <= info.not_after:
        raise IdentityError(f"certificate is not valid now (valid {info.not_before:.0f}..{info.not_after:.0f})")
