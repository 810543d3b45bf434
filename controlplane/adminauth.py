"""Who may change the control plane over HTTP (``POST /faults``).

A fault makes the control plane push wrong tables to the whole mesh, so a
request that changes state is served only when the peer's address is in the
allowed networks (default: loopback) or it carries ``Authorization: Bearer
<token>`` matching the configured admin token (RFC 6750 section 2.1; the
scheme name is case-insensitive, RFC 7235 section 2.1). Anything else gets a
403 with a JSON body saying why and how to fix it. Reads (GET, HEAD) stay open:
``/status`` and ``/metrics`` are what operators and ``sidemesh status`` watch.

The DNS server's ``PUT /records`` and the ``sidemesh up`` control API use this
same policy through ``sidemesh/adminauth.py`` (``sidemesh`` may import the control
plane; the reverse is not allowed, DESIGN.md "Who may import whom").
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from controlplane.tokens import bearer_token

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_ADMIN_TOKEN = "SIDEMESH_ADMIN_TOKEN"
ENV_ADMIN_TOKEN_FILE = "SIDEMESH_ADMIN_TOKEN_FILE"
ENV_ADMIN_ALLOW = "SIDEMESH_ADMIN_ALLOW"
DEFAULT_ADMIN_ALLOW = "127.0.0.0/8,::1/128"
READ_ONLY_METHODS = frozenset({"GET", "HEAD"})

log = logging.getLogger("controlplane.admin")


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``"127.0.0.0/8,::1"`` -> networks; "" allows no address (token only)."""
    networks = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise ValueError(f"{part!r} is not an IP network (CIDR such as 127.0.0.0/8) or address") from exc
    return tuple(networks)


def read_token_file(path: str) -> str:
    """The admin token in ``path`` (surrounding whitespace removed); it must not be empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read admin token file {path!r}: {exc}") from exc
    if not token:
        raise ValueError(f"admin token file {path!r} is empty")
    return token


@dataclass(frozen=True, slots=True)
class AdminPolicy:
    """Allowed networks and an optional bearer token for state-changing requests."""

    allow: tuple[IPNetwork, ...] = field(default_factory=lambda: parse_networks(DEFAULT_ADMIN_ALLOW))
    token: str | None = field(default=None, repr=False)

    def denial(self, peer: str | None, authorization: str | None) -> str | None:
        """None if allowed; else the reason: no_token_configured, no_token or bad_token."""
        if self._peer_allowed(peer) or self._token_matches(authorization):
            return None
        if self.token is None:
            return "no_token_configured"
        return "bad_token" if authorization else "no_token"

    def _token_matches(self, authorization: str | None) -> bool:
        if self.token is None or not authorization:
            return False
        given = bearer_token(authorization)
        # constant-time, so the time a wrong guess takes says nothing about the token
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def _peer_allowed(self, peer: str | None) -> bool:
        try:
            address = ipaddress.ip_address((peer or "").split("%", 1)[0])
        except ValueError:
            return False  # a Unix socket or an unknown peer is not an allowed address
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.allow)

    def explain(self, reason: str, method: str, path: str, peer: str | None) -> str:
        """The 403 body's ``error``: what was refused, why, and how to get in."""
        allowed = ", ".join(map(str, self.allow)) or "no address"
        head = (f"{method} {path} changes state; it is allowed from {allowed} (--admin-allow) "
                f"or with 'Authorization: Bearer <admin token>'; peer {peer or 'unknown'} is not allowed")
        if reason == "no_token_configured":
            return (f"{head}, and this server has no admin token: start it with --admin-token-file FILE "
                    f"or ${ENV_ADMIN_TOKEN}, or call it from an allowed address")
        if reason == "bad_token":
            return f"{head}, and the bearer token sent does not match the server's admin token"
        return f"{head}; send the server's admin token (sidemesh's clients send ${ENV_ADMIN_TOKEN})"


def admin_middleware(policy: AdminPolicy) -> Middleware:
    """An aiohttp middleware that applies ``policy`` to every non-GET/HEAD request."""

    @web.middleware
    async def check_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in READ_ONLY_METHODS:
            return await handler(request)
        reason = policy.denial(request.remote, request.headers.get("Authorization"))
        if reason is None:
            return await handler(request)
        log.warning("event=admin_denied peer=%s method=%s path=%s reason=%s",
                    request.remote or "-", request.method, request.path, reason)
        message = policy.explain(reason, request.method, request.path, request.remote)
        return web.json_response({"error": message, "status": 403}, status=403)

    return check_admin


def add_admin_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str], what: str) -> None:
    """``--admin-allow``, ``--admin-token`` and ``--admin-token-file``; ``what`` names the guarded requests."""
    group = parser.add_argument_group(
        "admin access",
        f"{what} change state, so they are served only to a peer in --admin-allow or to a request with "
        "'Authorization: Bearer <token>' matching the admin token; others get 403. GET requests stay open.",
    )
    group.add_argument(
        "--admin-allow", default=env.get(ENV_ADMIN_ALLOW, DEFAULT_ADMIN_ALLOW), metavar="CIDR[,CIDR]",
        help=(f"networks whose peers may change state without a token; '' for none "
              f"(env {ENV_ADMIN_ALLOW}; default %(default)s)"),
    )
    group.add_argument(
        "--admin-token", default=None, metavar="TOKEN",
        help=(f"the admin bearer token (env {ENV_ADMIN_TOKEN}, which keeps it out of the process list; "
              f"default: none, only --admin-allow peers may change state)"),
    )
    group.add_argument(
        "--admin-token-file", default=env.get(ENV_ADMIN_TOKEN_FILE), metavar="PATH",
        help=f"read the admin token from this file (env {ENV_ADMIN_TOKEN_FILE}; default: none)",
    )


def policy_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> AdminPolicy:
    """The policy from ``add_admin_arguments``' flags and env; raises ValueError with the reason."""
    allow = parse_networks(args.admin_allow)
    if args.admin_token is not None and args.admin_token_file:
        raise ValueError("give --admin-token or --admin-token-file, not both")
    if args.admin_token_file:
        return AdminPolicy(allow, read_token_file(args.admin_token_file))
    if args.admin_token is not None and not args.admin_token.strip():
        raise ValueError("--admin-token must not be empty")
    token = args.admin_token if args.admin_token is not None else env.get(ENV_ADMIN_TOKEN, "")
    return AdminPolicy(allow, token.strip() or None)
