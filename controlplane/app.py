"""``sidemesh controlplane``: run the gRPC servers and the HTTP API.

``start(config)`` opens the CA (unless ``--insecure``), binds every listener and
returns a ``RunningControlPlane`` (tests use it in-process with port 0):

- ``--grpc-port``: Discovery/Stream and Identity/Issue (renewal), mutual TLS;
  plaintext and Discovery only with ``--insecure``;
- ``--identity-port``: Identity/Issue with a join token, server-authenticated TLS
  (not bound with ``--insecure``);
- ``--http-port``: /healthz, /status, /metrics, /faults.

``main(argv)`` parses flags, runs under uvloop and on SIGTERM/SIGINT stops in
order: stop publishing and accepting, end every stream with UNAVAILABLE
(sidecars fail over at once instead of waiting for keepalive),
``await server.stop(grace)``, close HTTP, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import uvloop
from aiohttp import web

from controlplane.ca import CaError, ServingCertificate, open_ca
from controlplane.config import ControlPlaneConfig, parse_args
from controlplane.httpapi import build_app
from controlplane.issuer import VIA_CERTIFICATE, VIA_TOKEN
from controlplane.plane import ControlPlane
from identity.certs import CertificateAuthority

log = logging.getLogger("controlplane")

LOG_FORMAT = "%(asctime)s level=%(levelname)s component=controlplane %(message)s"


class StartupError(RuntimeError):
    """A listener could not be bound, or the CA could not be opened."""


@dataclass
class RunningControlPlane:
    """A started control plane with its bound ports."""

    plane: ControlPlane
    grpc_server: grpc.aio.Server
    http_runner: web.AppRunner
    grpc_port: int
    http_port: int
    # the join-token port; None with --insecure
    identity_server: grpc.aio.Server | None = None
    identity_port: int | None = None

    async def stop(self, grace: float | None = None) -> None:
        """Shut down in order; safe to call once."""
        grace = self.plane.config.grace if grace is None else grace
        stopping = [asyncio.ensure_future(self.grpc_server.stop(grace))]
        if self.identity_server is not None:
            stopping.append(asyncio.ensure_future(self.identity_server.stop(grace)))
        await self.plane.stop()
        await asyncio.gather(*stopping)
        await self.http_runner.cleanup()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _bind(server: grpc.aio.Server, what: str, host: str, port: int,
          credentials: grpc.ServerCredentials | None) -> int:
    address = _hostport(host, port)
    try:
        bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for {what} on {address}: {exc}") from exc
    if bound == 0:
        raise StartupError(f"cannot listen for {what} on {address}")
    return int(bound)


def _open_identity(config: ControlPlaneConfig) -> tuple[CertificateAuthority, ServingCertificate]:
    """The CA and a first serving certificate; blocking (files, key generation)."""
    ca = open_ca(config.ca_dir, config.trust_domain, time.time())
    serving = ServingCertificate(ca, dns_names=config.serving_dns_names, ips=config.serving_ips,
                                 ttl_s=config.cert_ttl_s)
    serving.renew()
    if config.join_tokens is not None and not config.join_tokens.is_dir():
        log.warning("event=join_tokens_missing dir=%s effect='every join token is refused until it exists'",
                    config.join_tokens)
    return ca, serving


async def start(config: ControlPlaneConfig) -> RunningControlPlane:
    """Open the CA (secure mode), bind gRPC and HTTP on ``config.listen`` and start publishing."""
    ca = serving = None
    if not config.insecure:
        try:
            ca, serving = await asyncio.to_thread(_open_identity, config)
        except CaError as exc:
            raise StartupError(str(exc)) from exc
    plane = ControlPlane(config, ca=ca, serving=serving)
    server = grpc.aio.server(options=config.grpc_server_options())
    handlers = [plane.service.generic_handler()]
    identity_server = None
    identity_port = None
    if plane.identity is not None and serving is not None:
        handlers.append(plane.identity.generic_handler(VIA_CERTIFICATE))
        identity_server = grpc.aio.server(options=config.identity_server_options())
        identity_server.add_generic_rpc_handlers((plane.identity.generic_handler(VIA_TOKEN),
                                                  plane.service.refusing_handler()))
        identity_port = _bind(identity_server, "identity (TLS)", config.listen, config.identity_port,
                              serving.server_tls())
    server.add_generic_rpc_handlers(tuple(handlers))
    grpc_port = _bind(server, "gRPC" if serving is None else "gRPC (mutual TLS)", config.listen, config.grpc_port,
                      None if serving is None else serving.mutual_tls())
    runner = web.AppRunner(build_app(plane), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.listen, config.http_port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen for HTTP on {_hostport(config.listen, config.http_port)}: {exc}") from exc
    http_port = int(runner.addresses[0][1])
    await server.start()
    if identity_server is not None:
        await identity_server.start()
    plane.start()
    log.info("event=started mode=%s grpc=%s identity=%s http=%s trust_domain=%s cert_ttl_s=%s authorization=%s "
             "coalesce_ms=%s warmup_timeout=%s",
             "insecure" if config.insecure else "mutual_tls", _hostport(config.listen, grpc_port),
             "-" if identity_port is None else _hostport(config.listen, identity_port),
             _hostport(config.listen, http_port), "-" if ca is None else ca.trust_domain,
             config.cert_ttl_s, ",".join(config.allow.texts()) or "off",
             config.coalesce_ms, config.warmup_timeout)
    return RunningControlPlane(plane, server, runner, grpc_port, http_port, identity_server, identity_port)


async def serve(config: ControlPlaneConfig) -> int:
    """Run until SIGTERM/SIGINT; return the exit code."""
    try:
        running = await start(config)
    except StartupError as exc:
        log.error("event=startup_failed error=%r", str(exc))
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("event=stopping grace_s=%s streams=%d", config.grace, len(running.plane.registry))
    await running.stop()
    log.info("event=stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sidemesh controlplane``."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
    return uvloop.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
