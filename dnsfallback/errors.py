"""Errors of the DNS fallback.

Hierarchy (one class; the *reason* says what went wrong)::

    Exception
     └── DnsLookupError(service, name, reason)
           reason, negative answers (the DNS said "no"; cached briefly, drop any old answer):
             "nxdomain"      the name does not exist
             "no_answer"     the name exists but has no A/AAAA records
           reason, transport failures (the DNS could not say; a stale answer keeps serving, RFC 8767):
             "timeout"       no usable response within the lookup's time limit
             "unreachable"   the server refused the connection / no route / no resolver configured
             "servfail"      the server answered SERVFAIL, REFUSED or another error rcode
             "bad_response"  malformed, truncated or mismatched responses (wrong id, garbage)

Exceptions of dnspython never leave this package: ``backend.py`` converts them
here with ``raise DnsLookupError(...) from exc``, so ``__cause__`` keeps the
original for logs and debugging.
"""

from __future__ import annotations

from typing import Final, Literal

Reason = Literal["nxdomain", "no_answer", "timeout", "unreachable", "servfail", "bad_response"]

NXDOMAIN: Final = "nxdomain"
NO_ANSWER: Final = "no_answer"
TIMEOUT: Final = "timeout"
UNREACHABLE: Final = "unreachable"
SERVFAIL: Final = "servfail"
BAD_RESPONSE: Final = "bad_response"

NEGATIVE_REASONS: Final[frozenset[str]] = frozenset({NXDOMAIN, NO_ANSWER})
TRANSPORT_REASONS: Final[frozenset[str]] = frozenset({TIMEOUT, UNREACHABLE, SERVFAIL, BAD_RESPONSE})
REASONS: Final[frozenset[str]] = NEGATIVE_REASONS | TRANSPORT_REASONS


class DnsLookupError(Exception):
    """A name could not be resolved to addresses.

    ``service`` is the mesh service asked for ("artist"), ``name`` the DNS
    name queried ("artist.mesh.local"; empty service when raised by a
    backend, which only knows names), ``reason`` one of :data:`REASONS`.
    """

    def __init__(self, service: str, name: str, reason: Reason, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown DNS lookup error reason {reason!r}")
        self.service = service
        self.name = name
        self.reason: Reason = reason
        self.detail = detail
        text = f"DNS lookup of {name!r} failed: {reason}"
        if service and service != name:
            text = f"DNS lookup of service {service!r} ({name!r}) failed: {reason}"
        super().__init__(f"{text} ({detail})" if detail else text)

    @property
    def is_negative(self) -> bool:
        """True when the DNS answered that the name has no addresses (NXDOMAIN, no records)."""
        return self.reason in NEGATIVE_REASONS

    @property
    def is_transport_failure(self) -> bool:
        """True when no authoritative "no" was heard: a stale answer may keep serving."""
        return self.reason in TRANSPORT_REASONS

    def for_service(self, service: str) -> DnsLookupError:
        """The same failure, labelled with the service it was looked up for."""
        err = DnsLookupError(service, self.name, self.reason, self.detail)
        err.__cause__ = self.__cause__ if self.__cause__ is not None else self
        return err

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.service, self.name, self.reason, self.detail))
