"""Errors of the sidecar, each carrying the HTTP status a client sees.

Hierarchy::

    SidecarError (status 500)
    ├── BadRequest (400)            the app sent something we cannot route (no host, malformed target)
    ├── Forbidden (403)             inbound, mTLS: the policy of our service does not allow the calling service
    ├── RequestRejected (400)       the client broke a rule of the listener (sidecar/limits.py):
    │   │                           answered once, then the connection closes
    │   ├── MalformedRequest (400)  httptools could not parse it
    │   ├── UntrustedFraming (400)  Connection names Content-Length, Transfer-Encoding or Host,
    │   │                           or two Host lines (RFC 9112 3.2, 11.2)
    │   ├── UpgradeRefused (405)    CONNECT or an Upgrade: sidemesh proxies plain HTTP/1.1
    │   ├── HeadTimeout (408)       the request head did not arrive within the head timeout
    │   ├── UrlTooLong (414)        request target over max_url_bytes
    │   └── HeadTooLarge (431)      header block over max_header_bytes or max_headers
    ├── NoRoute (503)               nothing to send the request to
    │   ├── NoEndpoints (503)       neither the control plane nor DNS gave endpoints; keeps both causes
    │   ├── AppUnavailable (503)    inbound: the local app refuses connections (the caller retries elsewhere)
    │   └── IdentityUnavailable (503)  mTLS: we hold no valid certificate (none yet, or expired); nothing is sent
    ├── UpstreamError (502)         the chosen endpoint failed
    │   ├── UpstreamConnectError    could not connect (refused, unreachable, connect timeout)
    │   │   ├── HandshakeFailed     mTLS: the TLS handshake failed (the pool says so; see PeerNotVerified)
    │   │   └── PeerNotVerified (503)  mTLS: the endpoint proved no identity, or not the service routed to;
    │   │                           nothing was sent to it (DESIGN.md, "Identity")
    │   └── UpstreamReset           the connection died before a whole response head arrived
    └── UpstreamTimeout (504)       no response head within the route's timeout
    ControlPlaneError               the discovery stream (not an HTTP error)
    ├── ControlPlaneUnavailable     stream failed, closed or timed out (wraps grpc.aio.AioRpcError)
    └── SnapshotRejected            a snapshot failed validation or a guard; NACKed, never applied

Foreign exceptions (OSError, ssl.SSLError, grpc.aio.AioRpcError, DNS errors) are converted where they enter,
with ``raise X from exc`` so the cause is kept.
"""

from __future__ import annotations

import json


class SidecarError(Exception):
    status = 500

    def __init__(self, message: str, *, service: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.service = service

    def to_json(self) -> bytes:
        body: dict[str, object] = {"error": self.message, "status": self.status}
        if self.service is not None:
            body["service"] = self.service
        body.update(self.details())
        return json.dumps(body).encode()

    def details(self) -> dict[str, object]:
        return {}


class BadRequest(SidecarError):
    status = 400


class Forbidden(SidecarError):
    """The caller's service may not call ours (the authorization pushed with the routes)."""

    status = 403

    def __init__(self, message: str, *, service: str, caller: str) -> None:
        super().__init__(message, service=service)
        self.caller = caller

    def details(self) -> dict[str, object]:
        return {"caller": self.caller}


class RequestRejected(SidecarError):
    """The client broke a rule of the listener; ``reason`` is the log's short token."""

    status = 400
    reason = "bad_request"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedRequest(RequestRejected):
    reason = "malformed"


class UntrustedFraming(RequestRejected):
    reason = "untrusted_framing"


class UpgradeRefused(RequestRejected):
    status = 405
    reason = "upgrade_unsupported"


class HeadTimeout(RequestRejected):
    status = 408
    reason = "head_timeout"


class UrlTooLong(RequestRejected):
    status = 414
    reason = "url_too_long"


class HeadTooLarge(RequestRejected):
    status = 431
    reason = "header_block_too_large"


class NoRoute(SidecarError):
    status = 503


class NoEndpoints(NoRoute):
    """Neither source had endpoints; both causes are kept (like linkerd's ResolveError)."""

    def __init__(self, service: str, *, controlplane_cause: str, dns_cause: str) -> None:
        super().__init__(
            f"no endpoints for {service!r}: control plane: {controlplane_cause}; DNS: {dns_cause}",
            service=service,
        )
        self.controlplane_cause = controlplane_cause
        self.dns_cause = dns_cause

    def details(self) -> dict[str, object]:
        return {"controlplane": self.controlplane_cause, "dns": self.dns_cause}


class AppUnavailable(NoRoute):
    """The inbound side: our own app refuses connections (stopping, or not started yet)."""


class IdentityUnavailable(NoRoute):
    """mTLS without a usable certificate of our own: fail closed, never fall back to plaintext."""


class UpstreamError(SidecarError):
    status = 502


class UpstreamConnectError(UpstreamError):
    pass


class HandshakeFailed(UpstreamConnectError):
    """The TCP connection was made but the TLS handshake failed; ``reason`` says how."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerNotVerified(UpstreamConnectError):
    """An endpoint of ``service`` did not prove it is ``service``: another identity, or none.

    A connect failure of that endpoint (it is ejected and another one tried: it processed
    nothing), but 503 when no endpoint is left: there is nobody we may send the call to.
    """

    status = 503

    def __init__(self, service: str, endpoint: str, *, presented: str, expected: str) -> None:
        super().__init__(
            f"endpoint {endpoint} of {service} is not {service}: it presented {presented}, expected {expected}",
            service=service,
        )
        self.endpoint = endpoint
        self.presented = presented
        self.expected = expected

    def details(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "presented": self.presented, "expected": self.expected}


class UpstreamReset(UpstreamError):
    pass


class UpstreamTimeout(SidecarError):
    status = 504


class ControlPlaneError(Exception):
    pass


class ControlPlaneUnavailable(ControlPlaneError):
    pass


class SnapshotRejected(ControlPlaneError):
    def __init__(self, version: str, reason: str) -> None:
        super().__init__(f"snapshot {version or '<no version>'} rejected: {reason}")
        self.version = version
        self.reason = reason
