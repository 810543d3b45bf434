"""Control-plane configuration: parsed once from flags and ``SIDEMESH_*`` env vars.

``parse_args(argv)`` is the only place that reads the environment; the result
is a frozen ``ControlPlaneConfig`` handed to every component. Limits on what
peers may send live in ``limits.py``; who may change state over HTTP in
``adminauth.py``; who may call whom in ``authz.py``; all are parsed here.

Security (DESIGN.md, "Identity") is on unless ``--insecure``: the gRPC port then
speaks mutual TLS only, and a second port (``--identity-port``) issues workload
certificates to sidecars that prove their service with a join token.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from controlplane.adminauth import AdminPolicy, add_admin_arguments, policy_from_args
from controlplane.authz import AuthorizationRules, RuleError, parse_allow
from controlplane.limits import DEFAULT_SNAPSHOT_BUDGET_BYTES, HelloLimits, add_limit_arguments, limits_from_args
from controlplane.model import DNS_LABEL, LB_POLICIES, ServicePolicy
from identity.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId

ENV_LISTEN = "SIDEMESH_CP_LISTEN"
ENV_GRPC_PORT = "SIDEMESH_CP_GRPC_PORT"
ENV_HTTP_PORT = "SIDEMESH_CP_HTTP_PORT"
ENV_COALESCE_MS = "SIDEMESH_CP_COALESCE_MS"
ENV_WARMUP_TIMEOUT = "SIDEMESH_CP_WARMUP_TIMEOUT"
ENV_POLICY = "SIDEMESH_CP_POLICY"  # several policies separated by ';'
ENV_LOG_LEVEL = "SIDEMESH_LOG_LEVEL"
ENV_INSECURE = "SIDEMESH_CP_INSECURE"
ENV_CA_DIR = "SIDEMESH_CP_CA_DIR"
ENV_TRUST_DOMAIN = "SIDEMESH_CP_TRUST_DOMAIN"
ENV_CERT_TTL = "SIDEMESH_CP_CERT_TTL"
ENV_JOIN_TOKENS = "SIDEMESH_CP_JOIN_TOKENS"
ENV_IDENTITY_PORT = "SIDEMESH_CP_IDENTITY_PORT"
ENV_SERVER_NAMES = "SIDEMESH_CP_SERVER_NAMES"  # comma-separated
ENV_ALLOW = "SIDEMESH_CP_ALLOW"  # comma-separated CALLER->CALLEE rules

DEFAULT_LISTEN = "0.0.0.0"
DEFAULT_GRPC_PORT = 15010
DEFAULT_HTTP_PORT = 15014
DEFAULT_COALESCE_MS = 10.0
DEFAULT_WARMUP_TIMEOUT = 1.0
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_GRACE = 2.0
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_IDENTITY_PORT = 15012
DEFAULT_CA_DIR = Path("/var/lib/sidemesh/ca")
DEFAULT_CERT_TTL_S = 24 * 3600.0
# sidecars dial the control plane by whatever address they are given and check its
# certificate for this name (grpc.ssl_target_name_override), so it is always a SAN
CONTROLPLANE_SERVER_NAME = "controlplane"
DEFAULT_SERVER_NAMES = (CONTROLPLANE_SERVER_NAME, "localhost")
# an Identity.Issue request is a CSR of about 1 KiB; the identity port answers anyone
# who completes a TLS handshake, so it parses nothing much larger
MAX_ISSUE_REQUEST_BYTES = 64 * 1024

# gRPC keepalive: sidecars ping every 1 s without data, so the server
# must tolerate that; the server pings too, so silent peers are dropped.
KEEPALIVE_TIME_MS = 2000
KEEPALIVE_TIMEOUT_MS = 2000
MIN_RECV_PING_INTERVAL_MS = 500

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*\Z")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_ALLOW_NEEDS_IDENTITIES = "--allow needs verified caller identities; it cannot be combined with --insecure"


class ConfigError(ValueError):
    """A flag or env var holds a value the control plane cannot use."""


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    """Everything the control plane needs to run, validated."""

    listen: str = DEFAULT_LISTEN
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    coalesce_ms: float = DEFAULT_COALESCE_MS
    warmup_timeout: float = DEFAULT_WARMUP_TIMEOUT
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    grace: float = DEFAULT_GRACE
    log_level: str = DEFAULT_LOG_LEVEL
    default_policy: ServicePolicy = field(default_factory=ServicePolicy)
    policies: Mapping[str, ServicePolicy] = field(default_factory=dict)
    hello_limits: HelloLimits = field(default_factory=HelloLimits)
    snapshot_budget_bytes: int = DEFAULT_SNAPSHOT_BUDGET_BYTES
    admin: AdminPolicy = field(default_factory=AdminPolicy)
    # identity (DESIGN.md, "Identity"); insecure: plaintext gRPC, no certificates at all
    insecure: bool = False
    ca_dir: Path = DEFAULT_CA_DIR
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_ttl_s: float = DEFAULT_CERT_TTL_S
    join_tokens: Path | None = None
    identity_port: int = DEFAULT_IDENTITY_PORT
    server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES
    allow: AuthorizationRules = field(default_factory=AuthorizationRules)

    def __post_init__(self) -> None:
        if self.insecure and self.allow.enforced:
            raise ConfigError(_ALLOW_NEEDS_IDENTITIES)
        if self.cert_ttl_s <= 0:
            raise ConfigError(f"--cert-ttl must be positive, got {self.cert_ttl_s}")

    def policy_for(self, service: str) -> ServicePolicy:
        policy = self.policies.get(service, self.default_policy)
        if not self.allow.enforced:
            return policy
        return replace(policy, authorization=self.allow.for_service(service))

    @property
    def serving_dns_names(self) -> tuple[str, ...]:
        """DNS SANs of the control plane's serving certificate: always ``controlplane``."""
        return tuple(dict.fromkeys((CONTROLPLANE_SERVER_NAME, *self.server_names)))

    @property
    def serving_ips(self) -> tuple[str, ...]:
        """IP SANs of the serving certificate: the listen address, when it is a specific one."""
        try:
            address = ipaddress.ip_address(self.listen.strip("[]"))
        except ValueError:
            return ()
        return () if address.is_unspecified else (str(address),)

    def grpc_server_options(self) -> list[tuple[str, int]]:
        """Channel args for ``grpc.aio.server`` (keepalive both ways, see above)."""
        return [
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_RECV_PING_INTERVAL_MS),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.http2.max_pings_without_data", 0),
            # refused by gRPC before parsing, as RESOURCE_EXHAUSTED (see limits.py)
            ("grpc.max_receive_message_length", self.hello_limits.max_request_bytes),
        ]

    def identity_server_options(self) -> list[tuple[str, int]]:
        """Channel args for the identity port's server: unary calls, small requests."""
        return [("grpc.max_receive_message_length", MAX_ISSUE_REQUEST_BYTES)]


def parse_duration(text: str) -> float:
    """``20s``, ``90m``, ``24h``, ``7d`` or plain seconds (``3600``) -> seconds, > 0."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a duration (e.g. 20s, 90m, 24h, 7d, or seconds)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"duration {text!r} must be positive")
    return seconds


def parse_server_name(text: str) -> str:
    """A DNS name for the serving certificate (RFC 1123 host name), lowercased."""
    name = text.strip().rstrip(".").lower()
    if not name or len(name) > 253 or not all(DNS_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(f"--server-name {text!r} is not a DNS name (labels of a-z, 0-9, '-', joined by '.')")
    return name


def default_server_names(hostname: str) -> tuple[str, ...]:
    """``controlplane``, ``localhost`` and this host's name (when it is a usable DNS name)."""
    try:
        return tuple(dict.fromkeys((*DEFAULT_SERVER_NAMES, parse_server_name(hostname))))
    except ConfigError:
        return DEFAULT_SERVER_NAMES


def parse_bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be one of {', '.join(_TRUE)} or {', '.join(v for v in _FALSE if v)}, got {text!r}")


def parse_policy(text: str) -> tuple[str, ServicePolicy]:
    """``artist=timeout_ms:2000,retries:1,lb:least_request`` -> ("artist", policy)."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not DNS_LABEL.match(name):
        raise ConfigError(f"policy {text!r}: expected SERVICE=key:value,... with SERVICE a DNS label")
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, colon, value = item.partition(":")
        if not colon:
            raise ConfigError(f"policy {text!r}: {item!r} is not key:value")
        if key in ("timeout_ms", "retries"):
            try:
                number = int(value)
            except ValueError as exc:
                raise ConfigError(f"policy {text!r}: {key} must be an integer") from exc
            if number < 0:
                raise ConfigError(f"policy {text!r}: {key} must be >= 0")
            values[key] = number
        elif key == "lb":
            if value not in LB_POLICIES:
                raise ConfigError(f"policy {text!r}: lb must be one of {', '.join(LB_POLICIES)}")
            values[key] = value
        else:
            raise ConfigError(f"policy {text!r}: unknown key {key!r} (timeout_ms, retries, lb)")
    return name, ServicePolicy(**values)  # type: ignore[arg-type]


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a port: {value!r}") from exc
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0..65535: {port}")
    return port


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from exc
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value}")
    return number


def _add_security_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    group = parser.add_argument_group(
        "identity and mutual TLS",
        "By default every sidecar proves its service: the gRPC port speaks mutual TLS and accepts only "
        "workload certificates (spiffe://<trust-domain>/service/<name>) issued by this control plane's CA; "
        "a stream may register only the service its certificate names, at the address it connects from. "
        "A sidecar without a certificate gets one on the identity port with its service's join token "
        "(sidemesh.v1.Identity/Issue, metadata 'authorization: Bearer <token>'), and renews it over "
        "mutual TLS on the gRPC port.",
    )
    group.add_argument(
        "--insecure", action="store_true", default=None,
        help=(f"plaintext gRPC as before identities: no TLS, no Identity service, any peer may register "
              f"any service (env {ENV_INSECURE}=1; default: off)"),
    )
    group.add_argument(
        "--ca-dir", type=Path, default=Path(env.get(ENV_CA_DIR, str(DEFAULT_CA_DIR))), metavar="DIR",
        help=(f"the mesh CA: ca.pem and ca-key.pem, loaded from here, or generated here on first start "
              f"(the key with mode 0600); put your own CA there to use it (env {ENV_CA_DIR}; default %(default)s)"),
    )
    group.add_argument(
        "--trust-domain", default=env.get(ENV_TRUST_DOMAIN, DEFAULT_TRUST_DOMAIN),
        help=f"the SPIFFE trust domain of every identity (env {ENV_TRUST_DOMAIN}; default %(default)s)",
    )
    group.add_argument(
        "--cert-ttl", default=env.get(ENV_CERT_TTL, "24h"), metavar="DURATION",
        help=(f"lifetime of issued workload certificates and of the control plane's own serving "
              f"certificate, e.g. 20s, 90m, 24h or seconds; sidecars renew at half-life (env {ENV_CERT_TTL}; "
              f"default %(default)s)"),
    )
    group.add_argument(
        "--join-tokens", type=Path, default=env.get(ENV_JOIN_TOKENS), metavar="DIR",
        help=(f"one file per service, named after it, holding that service's join token; read on every "
              f"request, so tokens can be added while running (env {ENV_JOIN_TOKENS}; default: none, "
              f"no certificate is issued to a sidecar that has none yet)"),
    )
    group.add_argument(
        "--identity-port", type=_port, default=env.get(ENV_IDENTITY_PORT, DEFAULT_IDENTITY_PORT),
        help=(f"server-authenticated TLS port where a sidecar trades its join token and a CSR for its "
              f"first certificate; 0 picks a free port (env {ENV_IDENTITY_PORT}; default %(default)s)"),
    )
    group.add_argument(
        "--server-name", action="append", default=None, metavar="NAME",
        help=(f"a DNS name for the control plane's serving certificate, repeatable; "
              f"'{CONTROLPLANE_SERVER_NAME}' is always included (sidecars verify that name) and so is the "
              f"--listen address when it is a specific IP (env {ENV_SERVER_NAMES}, comma-separated; "
              f"default: {', '.join(DEFAULT_SERVER_NAMES)} and this host's name)"),
    )
    group.add_argument(
        "--allow", action="append", default=None, metavar="CALLER->CALLEE",
        help=(f"authorization rule, repeatable or comma-separated, e.g. 'song->artist,song->image' "
              f"(quote it: '>' is a shell redirect). With any rule every service is deny-by-default and "
              f"its sidecars admit only the callers rules name for it; with none nothing is enforced "
              f"(env {ENV_ALLOW}; default: none)"),
    )


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The ``sidemesh controlplane`` parser; defaults come from ``env`` when set."""
    parser = argparse.ArgumentParser(
        prog="sidemesh controlplane",
        description=(
            "Run the sidemesh control plane: a gRPC discovery stream (sidecars register with a "
            "Hello; the open stream is their lease) that pushes a full, versioned route snapshot "
            "to every sidecar on each change, plus an HTTP API with /healthz, /status, /metrics "
            "and /faults (POST {\"fault\": \"empty-snapshot\"|\"drop-service\"|\"clear\"}). "
            "It is also the mesh's certificate authority: sidecars prove their service with a join token "
            "or their current certificate and get workload certificates (see 'identity and mutual TLS')."
        ),
    )
    parser.add_argument(
        "--listen", default=env.get(ENV_LISTEN, DEFAULT_LISTEN),
        help=f"address for both the gRPC and HTTP listeners (env {ENV_LISTEN}; default %(default)s)",
    )
    parser.add_argument(
        "--grpc-port", type=_port, default=env.get(ENV_GRPC_PORT, DEFAULT_GRPC_PORT),
        help=(f"gRPC port: the discovery stream and certificate renewal, mutual TLS unless --insecure; "
              f"0 picks a free port (env {ENV_GRPC_PORT}; default %(default)s)"),
    )
    parser.add_argument(
        "--http-port", type=_port, default=env.get(ENV_HTTP_PORT, DEFAULT_HTTP_PORT),
        help=f"HTTP status/metrics/faults port; 0 picks a free port (env {ENV_HTTP_PORT}; default %(default)s)",
    )
    parser.add_argument(
        "--coalesce-ms", type=_non_negative, default=env.get(ENV_COALESCE_MS, DEFAULT_COALESCE_MS),
        help=(f"wait this long after a registry change before building a snapshot, so a burst of "
              f"joins/leaves becomes one push (env {ENV_COALESCE_MS}; default %(default)s)"),
    )
    parser.add_argument(
        "--warmup-timeout", type=_non_negative,
        default=env.get(ENV_WARMUP_TIMEOUT, DEFAULT_WARMUP_TIMEOUT),
        help=(f"restart safety: after start, hold pushes until every instance named in a Hello's "
              f"known_instances has registered, at most this many seconds from the first such "
              f"Hello; Hellos naming no instances never wait (env {ENV_WARMUP_TIMEOUT}; "
              f"default %(default)s)"),
    )
    parser.add_argument(
        "--policy", action="append", default=None, metavar="SERVICE=KEY:VALUE,...",
        help=(f"per-service policy override, repeatable, e.g. artist=timeout_ms:2000,retries:1,"
              f"lb:least_request (keys timeout_ms, retries, lb={'|'.join(LB_POLICIES)}; "
              f"defaults timeout_ms:5000,retries:1,lb:round_robin; env {ENV_POLICY}, ';'-separated)"),
    )
    parser.add_argument(
        "--hello-timeout", type=_non_negative, default=DEFAULT_HELLO_TIMEOUT,
        help="abort a stream whose first message (the Hello) has not arrived after this many seconds (default %(default)s)",
    )
    parser.add_argument(
        "--grace", type=_non_negative, default=DEFAULT_GRACE,
        help="on SIGTERM/SIGINT, give open streams and requests this many seconds to finish (default %(default)s)",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default=env.get(ENV_LOG_LEVEL, DEFAULT_LOG_LEVEL),
        help=f"log verbosity (env {ENV_LOG_LEVEL}; default %(default)s)",
    )
    _add_security_arguments(parser, env)
    add_limit_arguments(parser)
    add_admin_arguments(parser, env, "POST /faults (it changes what every sidecar receives)")
    return parser


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ControlPlaneConfig:
    """Parse flags (falling back to env vars) into a config; exits 2 on bad input."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(list(argv))
    # env defaults arrive as strings and bypass argparse's type=; convert them here
    try:
        grpc_port = _port(str(args.grpc_port))
        http_port = _port(str(args.http_port))
        coalesce_ms = _non_negative(str(args.coalesce_ms))
        warmup_timeout = _non_negative(str(args.warmup_timeout))
        identity_port = _port(str(args.identity_port))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    try:
        security = _security_settings(args, env)
    except ConfigError as exc:
        parser.error(str(exc))
    if not security["insecure"] and identity_port != 0 and identity_port == grpc_port:
        parser.error(f"--identity-port and --grpc-port must differ (both {grpc_port})")
    if args.log_level not in LOG_LEVELS:
        parser.error(f"{ENV_LOG_LEVEL} must be one of {', '.join(LOG_LEVELS)}")
    specs = args.policy if args.policy is not None else [
        s for s in env.get(ENV_POLICY, "").split(";") if s.strip()
    ]
    policies: dict[str, ServicePolicy] = {}
    for spec in specs:
        try:
            name, policy = parse_policy(spec)
        except ConfigError as exc:
            parser.error(str(exc))
        policies[name] = policy
    try:
        admin = policy_from_args(args, env)
    except ValueError as exc:
        parser.error(str(exc))
    limits = limits_from_args(args)
    return ControlPlaneConfig(
        listen=args.listen,
        grpc_port=grpc_port,
        http_port=http_port,
        coalesce_ms=coalesce_ms,
        warmup_timeout=warmup_timeout,
        hello_timeout=args.hello_timeout,
        grace=args.grace,
        log_level=args.log_level,
        policies=policies,
        hello_limits=limits,
        snapshot_budget_bytes=args.snapshot_budget_bytes,
        admin=admin,
        identity_port=identity_port,
        **security,
    )


def _security_settings(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """The identity fields of the config from flags and env; ConfigError says what is wrong."""
    insecure = True if args.insecure else parse_bool(ENV_INSECURE, env.get(ENV_INSECURE, ""))
    try:
        SpiffeId(args.trust_domain, "controlplane")
    except IdentityError as exc:
        raise ConfigError(f"--trust-domain: {exc}") from exc
    if args.server_name is not None:
        names = tuple(parse_server_name(n) for n in args.server_name)
    elif env.get(ENV_SERVER_NAMES, "").strip():
        names = tuple(parse_server_name(n) for n in env[ENV_SERVER_NAMES].split(",") if n.strip())
    else:
        names = default_server_names(socket.gethostname())
    rules = args.allow if args.allow is not None else [env.get(ENV_ALLOW, "")]
    try:
        allow = parse_allow(rules)
    except RuleError as exc:
        raise ConfigError(str(exc)) from exc
    if insecure and allow.enforced:
        raise ConfigError(_ALLOW_NEEDS_IDENTITIES)
    return {
        "insecure": insecure,
        "ca_dir": args.ca_dir,
        "trust_domain": args.trust_domain,
        "cert_ttl_s": parse_duration(str(args.cert_ttl)),
        "join_tokens": None if not args.join_tokens else Path(args.join_tokens),
        "server_names": names,
        "allow": allow,
    }
