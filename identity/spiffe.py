"""Workload identities: ``spiffe://<trust-domain>/service/<name>`` (SPIFFE ID, as in the SPIFFE
spec "SPIFFE-ID.md": scheme ``spiffe``, a trust domain of lowercase letters, digits, dots,
dashes and underscores, and a path). sidemesh names services, not pods: every replica of
``artist`` holds the identity ``spiffe://<td>/service/artist``, which is what a caller checks
(it routed to *the artist service*, any replica will do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
SERVICE_PATH = "/service/"
DEFAULT_TRUST_DOMAIN = "sidemesh.local"

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
# the mesh's service names are DNS labels (RFC 1123)
_SERVICE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class IdentityError(ValueError):
    """Something about an identity, key, certificate or token is not acceptable; says what."""


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    trust_domain: str
    service: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise IdentityError(f"trust domain {self.trust_domain[:64]!r} is not valid "
                                "(lowercase letters, digits, '.', '-', '_')")
        if not _SERVICE.match(self.service):
            raise IdentityError(f"service {self.service[:64]!r} is not a DNS label")

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}{SERVICE_PATH}{self.service}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """``spiffe://td/service/name`` -> SpiffeId; IdentityError for anything else."""
        if not uri.startswith(SCHEME):
            raise IdentityError(f"{uri[:100]!r} is not a spiffe:// URI")
        rest = uri[len(SCHEME):]
        trust_domain, sep, path = rest.partition("/")
        kind, sep2, name = path.partition("/")
        if not sep or not sep2 or kind != "service":
            raise IdentityError(f"{uri[:100]!r} is not a sidemesh service identity (spiffe://<td>/service/<name>)")
        return cls(trust_domain, name)
