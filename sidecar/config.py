"""Sidecar configuration: parsed once from flags (or SIDEMESH_* environment variables) into
a frozen dataclass that every component receives explicitly."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dnsfallback import DnsConfig
from identity.spiffe import IdentityError, SpiffeId
from sidecar.limits import DEFAULT_LIMITS, Limits, connections_for_open_files, open_file_limit

ENV_SERVICE = "SIDEMESH_SERVICE"
ENV_INSTANCE = "SIDEMESH_INSTANCE"
ENV_ADDRESS = "SIDEMESH_ADDRESS"
ENV_LISTEN = "SIDEMESH_LISTEN"
ENV_OUTBOUND_LISTEN = "SIDEMESH_OUTBOUND_LISTEN"
ENV_APP = "SIDEMESH_APP"
ENV_CONTROLPLANE = "SIDEMESH_CONTROLPLANE"
ENV_DNS_SERVER = "SIDEMESH_DNS_SERVER"
ENV_DNS_TEMPLATE = "SIDEMESH_DNS_TEMPLATE"
ENV_DNS_SRV = "SIDEMESH_DNS_SRV"
ENV_LOG_LEVEL = "SIDEMESH_LOG_LEVEL"
ENV_INSECURE = "SIDEMESH_INSECURE"
ENV_IDENTITY_DIR = "SIDEMESH_IDENTITY_DIR"
ENV_JOIN_TOKEN = "SIDEMESH_JOIN_TOKEN"
ENV_JOIN_TOKEN_FILE = "SIDEMESH_JOIN_TOKEN_FILE"
ENV_TRUST_BUNDLE = "SIDEMESH_TRUST_BUNDLE"
ENV_TRUST_DOMAIN = "SIDEMESH_TRUST_DOMAIN"

DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_ADMIN_PORT = 15000
DEFAULT_IDENTITY_PORT = 15012
DEFAULT_IDENTITY_DIR = "/var/lib/sidemesh/identity"
DEFAULT_TRUST_DOMAIN = "sidemesh.local"


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    """Mutual TLS and the workload certificate (DESIGN.md, "Identity"); absent with --insecure."""

    trust_domain: str
    directory: Path  # key, certificate and trust bundle, cached across restarts
    join_token_file: Path | None
    join_token: str | None
    trust_bundle: Path | None  # to check the control plane before the first certificate
    bootstrap_target: str  # the control plane's join-token port, HOST:PORT


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    service: str
    instance: str
    address: str  # advertised to the control plane: where other sidecars reach our inbound port
    listen: str  # inbound + admin bind address
    outbound_listen: str
    outbound_port: int
    inbound_port: int
    admin_port: int
    app: tuple[str, int]
    controlplane: str  # host:port
    dns: DnsConfig
    extra_inbound: tuple[tuple[str, int], ...]
    initial_fetch_timeout_s: float
    connect_timeout_s: float
    app_timeout_s: float
    eject_s: float
    guard_grace_s: float
    drain_delay_s: float
    ping_interval_s: float
    ping_timeout_s: float
    log_level: str
    limits: Limits = DEFAULT_LIMITS  # what a client may do on a listener (sidecar/limits.py)
    identity: IdentitySettings | None = None  # None: plaintext everywhere (--insecure)


def _hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
        return text, default_port
    if not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port in {text!r} is not a number") from None
    if not 1 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port in {text!r} is out of range 1-65535")
    return host.strip("[]"), p


def _port(text: str) -> int:
    try:
        p = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port {p} is out of range 1-65535")
    return p


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _nonnegative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidemesh sidecar",
        description=(
            "Run one sidecar proxy beside an app. The app sends its outbound HTTP through the outbound "
            "listener (set HTTP_PROXY=http://127.0.0.1:15001 and call http://SERVICE/...); other sidecars "
            "reach the app through the inbound listener. Routes come from the control plane's discovery "
            "stream; when it is lost the sidecar resolves services through DNS and keeps the last-known-good "
            "endpoints, then returns to the control plane when it is back."
        ),
    )
    p.add_argument("--service", default=env.get(ENV_SERVICE), help=f"name of the service this sidecar fronts (required; ${ENV_SERVICE})")
    p.add_argument("--instance", default=env.get(ENV_INSTANCE), help=f"unique id of this instance, e.g. artist-2 (default: SERVICE-HOSTNAME; ${ENV_INSTANCE})")
    p.add_argument("--address", default=env.get(ENV_ADDRESS), help=f"IP other sidecars use to reach this one (default: --listen if specific, else this host's address; ${ENV_ADDRESS})")
    p.add_argument("--listen", default=env.get(ENV_LISTEN, "0.0.0.0"), help=f"bind address of the inbound and admin listeners (default 0.0.0.0; ${ENV_LISTEN})")
    p.add_argument("--outbound-listen", default=env.get(ENV_OUTBOUND_LISTEN, "127.0.0.1"), help=f"bind address of the outbound listener, the app's egress (default 127.0.0.1; ${ENV_OUTBOUND_LISTEN})")
    p.add_argument("--outbound-port", type=_port, default=DEFAULT_OUTBOUND_PORT, help="outbound listener port (default 15001)")
    p.add_argument("--inbound-port", type=_port, default=DEFAULT_INBOUND_PORT, help="inbound listener port, advertised to the mesh; also the port of every peer found through DNS A/AAAA records without --dns-srv (default 15006)")
    p.add_argument("--admin-port", type=_port, default=DEFAULT_ADMIN_PORT, help="admin API port: /ready, /state, /metrics (default 15000)")
    p.add_argument("--app", type=_hostport, default=env.get(ENV_APP, "127.0.0.1:8080"), help=f"where the local app listens (default 127.0.0.1:8080; ${ENV_APP})")
    p.add_argument("--app-timeout", type=_positive, default=30.0, help="seconds to wait for the app's response head (default 30)")
    p.add_argument("--controlplane", default=env.get(ENV_CONTROLPLANE, "controlplane:15010"), help=f"control plane gRPC address HOST:PORT (default controlplane:15010; ${ENV_CONTROLPLANE})")
    p.add_argument("--dns-server", action="append", type=lambda s: _hostport(s, default_port=53), default=None,
                   help=f"DNS server HOST[:PORT] for the fallback, repeatable (default: /etc/resolv.conf; ${ENV_DNS_SERVER}, comma-separated)")
    p.add_argument("--dns-template", default=env.get(ENV_DNS_TEMPLATE, "{service}"), help=f"DNS name of a service, e.g. '{{service}}.mesh.local' (default '{{service}}'; ${ENV_DNS_TEMPLATE})")
    p.add_argument("--dns-srv", action=argparse.BooleanOptionalAction,
                   default=env.get(ENV_DNS_SRV, "") not in ("", "0", "false"),
                   help=f"ask DNS for _mesh-inbound._tcp.<name> SRV records first: they give each peer sidecar its own "
                   f"inbound port; without them (NXDOMAIN, no records, an error) the A/AAAA records serve with this "
                   f"sidecar's --inbound-port. Off by default: Docker's DNS has no such records; `sidemesh up`'s DNS "
                   f"server and Kubernetes' (a headless Service with a port named mesh-inbound) have (${ENV_DNS_SRV}=1)")
    p.add_argument("--dns-timeout", type=_positive, default=1.0, help="seconds per DNS lookup (default 1)")
    p.add_argument("--dns-max-ttl", type=_positive, default=5.0,
                   help="cap on how long a DNS answer is trusted, whatever its TTL (default 5; Docker's DNS says 600)")
    p.add_argument("--extra-inbound", action="append", type=_hostport, default=[], help="another HOST:PORT to serve inbound traffic on, repeatable (sidemesh up publishes song on 127.0.0.1:8080 this way)")
    p.add_argument("--initial-fetch-timeout", type=_positive, default=2.0, help="seconds to wait for the first snapshot before serving through DNS (default 2)")
    p.add_argument("--connect-timeout", type=_positive, default=1.0, help="seconds to connect to an upstream endpoint (default 1)")
    p.add_argument("--eject", type=_positive, default=3.0, help="seconds an endpoint that refused a connection is skipped (default 3)")
    p.add_argument("--guard-grace", type=_positive, default=3.0,
                   help="seconds a service the control plane stopped listing is kept at least, even once DNS says "
                   "it does not exist (it is kept for good while DNS still knows it; default 3)")
    p.add_argument("--ping-interval", type=_positive, default=10.0,
                   help="seconds of silence on the discovery stream before the sidecar pings the control plane "
                   "through it (gRPC keepalive proves the connection, this proves the stream; default 10)")
    p.add_argument("--ping-timeout", type=_positive, default=5.0,
                   help="seconds to wait for the answer to that ping before the stream counts as dead: the sidecar "
                   "switches to DNS and reconnects (default 5)")
    p.add_argument("--drain-delay", type=_nonnegative, default=1.0,
                   help="on SIGTERM: seconds to keep serving inbound, answering 'Connection: close', after leaving "
                   "the control plane and before refusing new connections, so callers move elsewhere first (default 1)")
    ident = p.add_argument_group(
        "identity",
        "Sidecar-to-sidecar hops are mutual TLS 1.3 with a certificate for spiffe://<trust-domain>/service/<name> "
        "issued by the control plane from a CSR (the key never leaves this sidecar); callers check that a peer is the "
        "service they routed to in every mode, and the inbound side enforces the pushed authorization policy. The "
        "first certificate is had with the service's join token; renewals (at half-life) with the certificate.",
    )
    ident.add_argument("--insecure", action="store_true", default=env.get(ENV_INSECURE, "") not in ("", "0", "false"),
                       help=f"plaintext everywhere, no identity and no authorization (for comparison; ${ENV_INSECURE}=1)")
    ident.add_argument("--identity-dir", default=env.get(ENV_IDENTITY_DIR, DEFAULT_IDENTITY_DIR),
                       help=f"where the key, the certificate and the trust bundle are kept across restarts "
                       f"(default {DEFAULT_IDENTITY_DIR}; ${ENV_IDENTITY_DIR})")
    ident.add_argument("--join-token-file", default=env.get(ENV_JOIN_TOKEN_FILE),
                       help=f"file holding this service's join token (${ENV_JOIN_TOKEN_FILE}; or the token itself in "
                       f"${ENV_JOIN_TOKEN})")
    ident.add_argument("--trust-bundle", default=env.get(ENV_TRUST_BUNDLE),
                       help=f"the mesh CA certificate (PEM), to check the control plane before the first certificate "
                       f"arrives; later the cached bundle is used (${ENV_TRUST_BUNDLE})")
    ident.add_argument("--trust-domain", default=env.get(ENV_TRUST_DOMAIN, DEFAULT_TRUST_DOMAIN),
                       help=f"the SPIFFE trust domain (default {DEFAULT_TRUST_DOMAIN}; ${ENV_TRUST_DOMAIN})")
    ident.add_argument("--identity-port", type=_port, default=DEFAULT_IDENTITY_PORT,
                       help=f"the control plane's join-token port, on the --controlplane host (default {DEFAULT_IDENTITY_PORT})")
    lim = p.add_argument_group("limits", "what one client may do on a listener; see sidecar/limits.py")
    lim.add_argument("--max-url-bytes", type=_positive_int, default=DEFAULT_LIMITS.max_url_bytes,
                     help=f"longest request target; longer gets 414 (default {DEFAULT_LIMITS.max_url_bytes})")
    lim.add_argument("--max-header-bytes", type=_positive_int, default=DEFAULT_LIMITS.max_header_bytes,
                     help=f"largest header block; larger gets 431 (default {DEFAULT_LIMITS.max_header_bytes})")
    lim.add_argument("--max-headers", type=_positive_int, default=DEFAULT_LIMITS.max_headers,
                     help=f"most header fields in a request; more gets 431 (default {DEFAULT_LIMITS.max_headers})")
    lim.add_argument("--head-timeout", type=_positive, default=DEFAULT_LIMITS.head_timeout_s,
                     help="seconds to receive a whole request head, from the accept or from the request's first "
                     f"byte; later gets 408 and a close (default {DEFAULT_LIMITS.head_timeout_s:g})")
    lim.add_argument("--idle-timeout", type=_positive, default=DEFAULT_LIMITS.idle_timeout_s,
                     help="seconds a kept-alive client connection may wait for its next request before it is "
                     f"closed (default {DEFAULT_LIMITS.idle_timeout_s:g})")
    lim.add_argument("--max-connections", type=_positive_int, default=None,
                     help="client connections per listener (outbound; inbound with --extra-inbound); at the limit "
                     "the oldest one that has not sent a whole request yet is closed to make room, else the new one "
                     "(default: from the open-file limit, (RLIMIT_NOFILE - 128) / 4, at most 16384: 224 for 1024 files)")
    lim.add_argument("--max-pipelined", type=_positive_int, default=DEFAULT_LIMITS.max_pipelined,
                     help="pipelined requests queued per connection behind the one being answered; at the limit "
                     f"the client is not read until the queue drains (default {DEFAULT_LIMITS.max_pipelined})")
    lim.add_argument("--close-linger", type=_positive, default=DEFAULT_LIMITS.linger_s,
                     help="seconds a refused client that may still be sending (414, 431, an unread body) is read "
                     f"and ignored after the answer, so it sees the answer (default {DEFAULT_LIMITS.linger_s:g})")
    p.add_argument("--log-level", default=env.get(ENV_LOG_LEVEL, "info"), choices=["debug", "info", "warning", "error"], help="log level (default info)")
    return p


def parse_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> SidecarConfig:
    """Parse flags once; exits with status 2 and a clear message on bad input."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    a = parser.parse_args(list(argv))
    if not a.service:
        parser.error("--service is required (or set SIDEMESH_SERVICE)")
    if "{service}" not in a.dns_template:
        parser.error("--dns-template must contain {service}")
    for name in ("listen", "outbound_listen"):
        try:
            ipaddress.ip_address(getattr(a, name))
        except ValueError:
            parser.error(f"--{name.replace('_', '-')} must be an IP address, got {getattr(a, name)!r}")
    dns_servers = a.dns_server
    if dns_servers is None and env.get(ENV_DNS_SERVER):
        dns_servers = [_hostport(s.strip(), default_port=53) for s in env[ENV_DNS_SERVER].split(",") if s.strip()]
    address = a.address or _default_address(a.listen)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        parser.error(f"--address must be an IP address, got {address!r}")
    host = socket.gethostname()
    identity = None
    if not a.insecure:
        try:
            SpiffeId(a.trust_domain, a.service)
        except IdentityError as exc:
            parser.error(f"--trust-domain/--service do not make an identity: {exc}")
        cp_host = _hostport(a.controlplane, default_port=15010)[0]
        bootstrap = f"[{cp_host}]:{a.identity_port}" if ":" in cp_host else f"{cp_host}:{a.identity_port}"
        identity = IdentitySettings(
            trust_domain=a.trust_domain,
            directory=Path(a.identity_dir),
            join_token_file=Path(a.join_token_file) if a.join_token_file else None,
            join_token=env.get(ENV_JOIN_TOKEN) or None,
            trust_bundle=Path(a.trust_bundle) if a.trust_bundle else None,
            bootstrap_target=bootstrap,
        )
    return SidecarConfig(
        service=a.service,
        instance=a.instance or f"{a.service}-{host}",
        address=address,
        listen=a.listen,
        outbound_listen=a.outbound_listen,
        outbound_port=a.outbound_port,
        inbound_port=a.inbound_port,
        admin_port=a.admin_port,
        app=a.app,
        controlplane=a.controlplane,
        dns=DnsConfig(
            nameservers=tuple(dns_servers or ()),
            template=a.dns_template,
            port=a.inbound_port,
            srv=a.dns_srv,
            timeout_s=a.dns_timeout,
            max_ttl_s=a.dns_max_ttl,
            min_ttl_s=min(1.0, a.dns_max_ttl),
        ),
        extra_inbound=tuple(a.extra_inbound),
        initial_fetch_timeout_s=a.initial_fetch_timeout,
        connect_timeout_s=a.connect_timeout,
        app_timeout_s=a.app_timeout,
        eject_s=a.eject,
        guard_grace_s=a.guard_grace,
        drain_delay_s=a.drain_delay,
        ping_interval_s=a.ping_interval,
        ping_timeout_s=a.ping_timeout,
        log_level=a.log_level,
        limits=Limits(
            max_url_bytes=a.max_url_bytes,
            max_header_bytes=a.max_header_bytes,
            max_headers=a.max_headers,
            head_timeout_s=a.head_timeout,
            idle_timeout_s=a.idle_timeout,
            max_connections=a.max_connections or connections_for_open_files(open_file_limit()),
            max_pipelined=a.max_pipelined,
            linger_s=a.close_linger,
        ),
        identity=identity,
    )


def _default_address(listen: str) -> str:
    """The advertised address when none is given. Runs at startup, before the event loop."""
    if listen not in ("0.0.0.0", "::"):
        return listen
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
