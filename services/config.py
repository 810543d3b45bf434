"""Configuration of a demo service, parsed once from flags and environment.

``sidemesh service NAME [options]``: every option has a named default here and,
where it is useful in containers, a ``SIDEMESH_*`` environment fallback. The
outbound proxy (the pod's sidecar) defaults to ``$HTTP_PROXY`` because that is
how an unmodified app is pointed at its sidecar (DESIGN.md, "Ports").
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from yarl import URL

SERVICE_NAMES = ("artist", "song", "image")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_ARTIST_URL = "http://artist"
DEFAULT_IMAGE_URL = "http://image"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error")
# song sends all its calls to one proxy, so the pool is sized by concurrency, not per host
DEFAULT_POOL_SIZE = 256

ENV_INSTANCE = "SIDEMESH_INSTANCE"
ENV_PROXY = "HTTP_PROXY"
ENV_PROXY_LOWER = "http_proxy"
ENV_ARTIST_URL = "SIDEMESH_ARTIST_URL"
ENV_IMAGE_URL = "SIDEMESH_IMAGE_URL"
ENV_TIMEOUT = "SIDEMESH_TIMEOUT"
ENV_LOG_LEVEL = "SIDEMESH_LOG_LEVEL"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Everything one demo service process needs to know."""

    name: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    instance: str = "local"
    proxy: str | None = None
    artist_url: str = DEFAULT_ARTIST_URL
    image_url: str = DEFAULT_IMAGE_URL
    timeout_s: float = DEFAULT_TIMEOUT_S
    log_level: str = DEFAULT_LOG_LEVEL
    access_log: bool = False
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    pool_size: int = DEFAULT_POOL_SIZE


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds: {text}")
    return value


def _http_url(text: str) -> str:
    try:
        url = URL(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r}") from None
    if url.scheme != "http" or not url.host:
        raise argparse.ArgumentTypeError(f"not an http:// URL with a host: {text!r}")
    return str(url).rstrip("/")


def _optional_http_url(text: str) -> str | None:
    return _http_url(text) if text else None


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The ``sidemesh service`` parser; defaults read from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="sidemesh service",
        description=(
            "Run one demo service of the mesh. artist serves GET /artists/{id}, image serves "
            "GET /images/{id} (metadata only), song serves GET /songs/{id} and GET /songs/{id}/details, "
            "which calls artist and image concurrently through the outbound proxy (the pod's sidecar) "
            "and returns one JSON document. Every service answers GET /healthz."
        ),
    )
    parser.add_argument("name", metavar="NAME", choices=SERVICE_NAMES,
                        help=f"which service to run: one of {', '.join(SERVICE_NAMES)}")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--instance", default=env.get(ENV_INSTANCE) or socket.gethostname(),
                        help=f"instance id reported as served_by / x-served-by (default ${ENV_INSTANCE}, "
                             "else the hostname)")
    parser.add_argument("--proxy", type=_optional_http_url,
                        default=env.get(ENV_PROXY) or env.get(ENV_PROXY_LOWER) or None,
                        help=f"outbound HTTP proxy (the sidecar, e.g. http://127.0.0.1:15001) for song's calls "
                             f"to artist and image (default ${ENV_PROXY}; empty string: call directly)")
    parser.add_argument("--artist-url", type=_http_url, default=env.get(ENV_ARTIST_URL) or DEFAULT_ARTIST_URL,
                        help=f"base URL of the artist service, used by song (default ${ENV_ARTIST_URL}, "
                             f"else {DEFAULT_ARTIST_URL})")
    parser.add_argument("--image-url", type=_http_url, default=env.get(ENV_IMAGE_URL) or DEFAULT_IMAGE_URL,
                        help=f"base URL of the image service, used by song (default ${ENV_IMAGE_URL}, "
                             f"else {DEFAULT_IMAGE_URL})")
    parser.add_argument("--timeout", type=_positive_seconds,
                        default=env.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S,
                        help=f"total timeout in seconds of each downstream call made by song "
                             f"(default ${ENV_TIMEOUT}, else {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--shutdown-timeout", type=_positive_seconds, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                        help="seconds to let in-flight requests finish after SIGTERM/SIGINT "
                             f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    parser.add_argument("--access-log", action="store_true",
                        help="log every request (off by default: it costs throughput)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=env.get(ENV_LOG_LEVEL) or DEFAULT_LOG_LEVEL,
                        help=f"log level (default ${ENV_LOG_LEVEL}, else {DEFAULT_LOG_LEVEL})")
    return parser


def parse_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Parse ``argv`` (without the ``service`` word) into a ServiceConfig; exits 2 on bad input."""
    parser = build_parser(environ)
    args = parser.parse_args(list(argv))
    if args.log_level not in LOG_LEVELS:  # argparse does not check choices of a default
        parser.error(f"${ENV_LOG_LEVEL} must be one of {', '.join(LOG_LEVELS)}, not {args.log_level!r}")
    # argparse applies ``type`` to string defaults too, so env values are validated like flags
    return ServiceConfig(
        name=args.name,
        host=args.host,
        port=args.port,
        instance=args.instance,
        proxy=args.proxy,
        artist_url=args.artist_url,
        image_url=args.image_url,
        timeout_s=float(args.timeout),
        log_level=args.log_level,
        access_log=args.access_log,
        shutdown_timeout_s=args.shutdown_timeout,
    )
