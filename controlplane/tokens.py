"""Join tokens: how a sidecar without a certificate proves which service it belongs to.

DESIGN.md, "Identity": registration is authenticated by a join token first, then by
mutual TLS. The operator keeps one file per service in ``--join-tokens DIR``, named
after the service (``DIR/artist``) and holding that service's token (``identity.store``
writes them with ``ensure_tokens``). The directory is read when a request needs it, not
at start, so a service's token can be added, or rotated, while the control plane runs.

A token is sent as gRPC call metadata ``authorization: Bearer <token>`` (the bearer
scheme of RFC 6750 section 2.1; the scheme name is case-insensitive, RFC 7235 section
2.1). Every comparison is constant-time (``hmac.compare_digest``), so the time a wrong
guess takes says nothing about a token.

Reading files blocks: call ``services_for`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from controlplane.model import DNS_LABEL

log = logging.getLogger("controlplane.tokens")

# a token file is a few dozen bytes; anything far larger is not one
MAX_TOKEN_FILE_BYTES = 4096


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; None for any other value."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class JoinTokens:
    """The join-token directory; ``None`` means this control plane accepts no join tokens."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    @property
    def configured(self) -> bool:
        return self.directory is not None

    def services_for(self, token: str) -> frozenset[str]:
        """Every service whose token file holds ``token`` (blocking file reads).

        Files whose names are not service names (dot files, editors' backups) are not
        tokens; an unreadable or empty file matches nothing and is logged.
        """
        if self.directory is None:
            return frozenset()
        given = token.encode("utf-8", "surrogateescape")
        matched = set()
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as exc:
            log.warning("event=join_tokens_unreadable dir=%s error=%r", self.directory, str(exc))
            return frozenset()
        for path in entries:
            if not DNS_LABEL.match(path.name):
                continue
            stored = _read(path)
            # compare against every file, matching or not: the work done is the same either way
            if stored is not None and hmac.compare_digest(stored, given):
                matched.add(path.name)
        return frozenset(matched)


def _read(path: Path) -> bytes | None:
    try:
        if not path.is_file():
            return None
        with path.open("rb") as fh:
            data = fh.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        log.warning("event=join_token_unreadable file=%s error=%r", path, str(exc))
        return None
    token = data.strip()
    if not token or len(data) > MAX_TOKEN_FILE_BYTES:
        log.warning("event=join_token_unusable file=%s reason=%s", path, "empty" if not token else "too_large")
        return None
    return token
