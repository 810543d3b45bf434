"""Control-plane configuration: parsed once from flags and ``SIDEMESH_*`` env vars.

``parse_args(argv)`` is the only place that reads the environment; the result
is a frozen ``ControlPlaneConfig`` handed to every component. Limits on what
peers may send live in ``limits.py``; who may change state over HTTP in
``adminauth.py``; both are parsed here.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controlplane.adminauth import AdminPolicy, add_admin_arguments, policy_from_args
from controlplane.limits import (
    DEFAULT_SNAPSHOT_BUDGET_BYTES,
    SIDECAR_MAX_RECEIVE_BYTES,
    HelloLimits,
    flag,
)
from controlplane.model import LB_POLICIES, ServicePolicy

ENV_LISTEN = "SIDEMESH_CP_LISTEN"
ENV_GRPC_PORT = "SIDEMESH_CP_GRPC_PORT"
ENV_HTTP_PORT = "SIDEMESH_CP_HTTP_PORT"
ENV_COALESCE_MS = "SIDEMESH_CP_COALESCE_MS"
ENV_WARMUP_TIMEOUT = "SIDEMESH_CP_WARMUP_TIMEOUT"
ENV_POLICY = "SIDEMESH_CP_POLICY"  # several policies separated by ';'
ENV_LOG_LEVEL = "SIDEMESH_LOG_LEVEL"

DEFAULT_LISTEN = "0.0.0.0"
DEFAULT_GRPC_PORT = 15010
DEFAULT_HTTP_PORT = 15014
DEFAULT_COALESCE_MS = 10.0
DEFAULT_WARMUP_TIMEOUT = 1.0
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_GRACE = 2.0
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error")

# gRPC keepalive: sidecars ping every 1 s without data, so the server
# must tolerate that; the server pings too, so silent peers are dropped.
KEEPALIVE_TIME_MS = 2000
KEEPALIVE_TIMEOUT_MS = 2000
MIN_RECV_PING_INTERVAL_MS = 500

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


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

    def policy_for(self, service: str) -> ServicePolicy:
        return self.policies.get(service, self.default_policy)

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


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {value}")
    return number


_LIMIT_HELP = {
    "max_labels": "labels in one Hello",
    "max_label_key_bytes": "bytes of one label key",
    "max_label_value_bytes": "bytes of one label value",
    "max_label_bytes": "bytes of all label keys and values of one Hello together (they are copied into every snapshot)",
    "max_known_instances": "entries in a Hello's known_instances",
    "max_known_endpoints": "entries in a Hello's known_endpoints",
    "max_node_id_bytes": "bytes of node_id (and of each known_instances entry)",
    "max_address_bytes": "bytes of address (and of each known_endpoints address)",
    "max_last_version_bytes": "bytes of last_version",
    "max_request_bytes": ("bytes of one message a sidecar sends (grpc.max_receive_message_length); gRPC "
                          "itself refuses a larger one with RESOURCE_EXHAUSTED before it is parsed"),
}


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "limits (hostile peers)",
        "A Hello over any of these is refused: its stream ends with INVALID_ARGUMENT naming the limit "
        "and the value, nothing is registered or pushed, and it is counted in "
        "sidemesh_controlplane_hello_limit_rejections_total{limit=...}.",
    )
    defaults = HelloLimits()
    for name, text in _LIMIT_HELP.items():
        group.add_argument(flag(name), dest=name, type=_positive_int, default=getattr(defaults, name),
                           metavar="N", help=f"most {text} (default %(default)s)")
    group.add_argument(
        "--snapshot-budget-bytes", type=_positive_int, default=DEFAULT_SNAPSHOT_BUDGET_BYTES, metavar="N",
        help=(f"refuse (RESOURCE_EXHAUSTED) a registration that would make the encoded route snapshot "
              f"larger than this; everyone else keeps receiving the current table. Sidecars accept "
              f"messages up to {SIDECAR_MAX_RECEIVE_BYTES} bytes (default %(default)s: that, less a safety margin)"),
    )


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The ``sidemesh controlplane`` parser; defaults come from ``env`` when set."""
    parser = argparse.ArgumentParser(
        prog="sidemesh controlplane",
        description=(
            "Run the sidemesh control plane: a gRPC discovery stream (sidecars register with a "
            "Hello; the open stream is their lease) that pushes a full, versioned route snapshot "
            "to every sidecar on each change, plus an HTTP API with /healthz, /status, /metrics "
            "and /faults (POST {\"fault\": \"empty-snapshot\"|\"drop-service\"|\"clear\"})."
        ),
    )
    parser.add_argument(
        "--listen", default=env.get(ENV_LISTEN, DEFAULT_LISTEN),
        help=f"address for both the gRPC and HTTP listeners (env {ENV_LISTEN}; default %(default)s)",
    )
    parser.add_argument(
        "--grpc-port", type=_port, default=env.get(ENV_GRPC_PORT, DEFAULT_GRPC_PORT),
        help=f"gRPC discovery port; 0 picks a free port (env {ENV_GRPC_PORT}; default %(default)s)",
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
    _add_limit_arguments(parser)
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
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
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
    limits = HelloLimits(**{name: getattr(args, name) for name in _LIMIT_HELP})
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
    )
