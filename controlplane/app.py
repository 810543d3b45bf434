"""``sidemesh controlplane``: run the gRPC discovery server and the HTTP API.

``start(config)`` binds both listeners and returns a ``RunningControlPlane``
(tests use it in-process with port 0); ``main(argv)`` parses flags, runs under
uvloop and on SIGTERM/SIGINT stops in order: stop publishing and accepting,
end every stream with UNAVAILABLE (sidecars fail over at once instead of
waiting for keepalive), ``await server.stop(grace)``, close HTTP, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import uvloop
from aiohttp import web

from controlplane.config import ControlPlaneConfig, parse_args
from controlplane.httpapi import build_app
from controlplane.plane import ControlPlane

log = logging.getLogger("controlplane")

LOG_FORMAT = "%(asctime)s level=%(levelname)s component=controlplane %(message)s"


class StartupError(RuntimeError):
    """A listener could not be bound."""


@dataclass
class RunningControlPlane:
    """A started control plane with its bound ports."""

    plane: ControlPlane
    grpc_server: grpc.aio.Server
    http_runner: web.AppRunner
    grpc_port: int
    http_port: int

    async def stop(self, grace: float | None = None) -> None:
        """Shut down in order; safe to call once."""
        grace = self.plane.config.grace if grace is None else grace
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace))
        await self.plane.stop()
        await stopping
        await self.http_runner.cleanup()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start(config: ControlPlaneConfig) -> RunningControlPlane:
    """Bind gRPC and HTTP on ``config.listen`` and start publishing."""
    plane = ControlPlane(config)
    server = grpc.aio.server(options=config.grpc_server_options())
    server.add_generic_rpc_handlers((plane.service.generic_handler(),))
    try:
        grpc_port = server.add_insecure_port(_hostport(config.listen, config.grpc_port))
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for gRPC on {_hostport(config.listen, config.grpc_port)}: {exc}") from exc
    if grpc_port == 0:
        raise StartupError(f"cannot listen for gRPC on {_hostport(config.listen, config.grpc_port)}")
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
    plane.start()
    log.info("event=started grpc=%s http=%s coalesce_ms=%s warmup_timeout=%s",
             _hostport(config.listen, grpc_port), _hostport(config.listen, http_port),
             config.coalesce_ms, config.warmup_timeout)
    return RunningControlPlane(plane, server, runner, grpc_port, http_port)


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
