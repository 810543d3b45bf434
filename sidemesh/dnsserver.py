"""The local authoritative DNS server of `sidemesh up`: `{service}.{zone}` -> the pods' addresses.

What it answers is the zone's business (``sidemesh.dnszone``): ``{service}.{zone}`` A/AAAA,
and ``_mesh-inbound._tcp.{service}.{zone}`` SRV giving each pod's sidecar inbound port. This
module serves those answers over UDP and TCP on one port, and the records API:

* garbage (unparseable datagrams, responses sent to us) gets silence and is
  counted; a TCP peer that sends junk is disconnected, one that stalls is
  timed out; neither affects anyone else.
* an answer too big for the client's UDP size goes without its additional section
  (RFC 2181 9: those records are optional), else truncated (TC) so the client asks over TCP.

The records are replaced as a whole through the HTTP API on ``--api-port``
(``PUT /records`` with ``{"artist": ["127.10.1.1", "127.10.1.2"]}``, or with pods that name
their sidecar's inbound port, ``{"artist": [{"address": "127.10.1.1", "port": 15006,
"instance": "artist-1"}]}``; ``GET /records``, ``GET /healthz``), which `sidemesh up` calls
whenever pods come and go. ``PUT /records`` would let anyone repoint any service, so it
passes the admin policy first (``sidemesh.adminauth``: a peer in
``--admin-allow``, loopback by default, or the admin bearer token; else 403).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import uvloop
from aiohttp import web

from sidemesh.adminauth import AdminPolicy, add_admin_arguments, admin_middleware, policy_from_args
from sidemesh.dnszone import PodRecord, RecordsError, build_response, validate_records

__all__ = ["MeshDnsServer", "RecordsError", "build_response", "main", "make_api_app", "validate_records"]

log = logging.getLogger("sidemesh.dns")

DEFAULT_LISTEN: Final = "127.0.0.1"
DEFAULT_PORT: Final = 15053
DEFAULT_API_PORT: Final = 15054
DEFAULT_ZONE: Final = "mesh.local"
DEFAULT_TTL: Final = 2
ENV_LISTEN: Final = "SIDEMESH_DNS_LISTEN"
ENV_PORT: Final = "SIDEMESH_DNS_PORT"
ENV_API_PORT: Final = "SIDEMESH_DNS_API_PORT"
ENV_ZONE: Final = "SIDEMESH_DNS_ZONE"
ENV_TTL: Final = "SIDEMESH_DNS_TTL"
ENV_LOG_LEVEL: Final = "SIDEMESH_LOG_LEVEL"

TCP_IDLE_TIMEOUT_S: Final = 10.0  # RFC 7766 6.2.3: servers may close idle connections after seconds
MAX_TCP_CONNECTIONS: Final = 256
UDP_MIN_PAYLOAD: Final = 512
TCP_MAX_MESSAGE: Final = 65535
SHUTDOWN_GRACE_S: Final = 2.0


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: MeshDnsServer) -> None:
        self._server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport, hence the cast
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = self._server.handle_wire(data, tcp=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("event=dns_udp_error error=%s", exc)


class MeshDnsServer:
    """Authoritative DNS for one zone over UDP and TCP, records replaced as a whole."""

    def __init__(
        self,
        zone: str = DEFAULT_ZONE,
        ttl: int = DEFAULT_TTL,
        *,
        tcp_idle_timeout_s: float = TCP_IDLE_TIMEOUT_S,
        max_tcp_connections: int = MAX_TCP_CONNECTIONS,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 2**31 - 1:
            raise ValueError(f"ttl must be an integer number of seconds >= 0, got {ttl!r}")
        try:
            self.zone = dns.name.from_text(zone)
        except dns.exception.DNSException as exc:
            raise ValueError(f"zone {zone!r} is not a valid DNS name: {exc}") from exc
        if self.zone == dns.name.root:
            raise ValueError("zone must not be the root")
        self.ttl = ttl
        self._records: dict[str, tuple[PodRecord, ...]] = {}
        self._serial = 1
        self._idle_timeout_s = tcp_idle_timeout_s
        self._max_tcp = max_tcp_connections
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_tasks: set[asyncio.Task[Any]] = set()
        self.port: int | None = None
        self.stats: dict[str, int] = {"queries": 0, "garbage": 0, "tcp_rejected": 0}

    async def start(self, host: str = DEFAULT_LISTEN, port: int = DEFAULT_PORT) -> None:
        """Listen on ``host:port`` over UDP and TCP (port 0: one free port for both)."""
        loop = asyncio.get_running_loop()
        for _attempt in range(5 if port == 0 else 1):
            udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, port))
            bound = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound, reuse_address=True)
            except OSError:
                udp.close()
                if port != 0:
                    raise
                continue
            self._udp, self.port = udp, bound
            log.info("event=dns_listening host=%s port=%d zone=%s ttl=%d", host, bound, self.zone, self.ttl)
            return
        raise OSError(f"no port free for both UDP and TCP on {host}")

    def set_records(self, mapping: Mapping[str, Sequence[object]] | object) -> dict[str, list[str | dict[str, str | int]]]:
        """Replace all records (validated; raises :class:`RecordsError`); returns what is now served."""
        records = validate_records(mapping, self.zone)
        old = self._records
        self._records = records
        self._serial = (self._serial + 1) % 2**32 or 1
        changed = sorted(n for n in records.keys() | old.keys() if records.get(n) != old.get(n))
        log.info(
            "event=dns_records_updated services=%d addresses=%d serial=%d changed=%s %s",
            len(records),
            sum(len(a) for a in records.values()),
            self._serial,
            ",".join(changed) or "-",
            " ".join(f"{n}={_pods_text(records[n])}" for n in changed if n in records),
        )
        return self.records()

    def records(self) -> dict[str, list[str | dict[str, str | int]]]:
        """The records now served: ``{service: [address or pod object, ...]}``."""
        return {name: [pod.as_json() for pod in pods] for name, pods in self._records.items()}

    def handle_wire(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """Answer one DNS message in wire format; None means stay silent. Never raises."""
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # noqa: BLE001 - garbage from the network, whatever dnspython makes of it
            self.stats["garbage"] += 1
            log.debug("event=dns_garbage size=%d tcp=%s error=%s", len(wire), tcp, type(exc).__name__)
            return None
        if query.flags & dns.flags.QR:
            self.stats["garbage"] += 1  # a response sent to us; answering could start a loop
            return None
        self.stats["queries"] += 1
        try:
            response = build_response(query, self.zone, self._records, self.ttl, self._serial)
            max_size = TCP_MAX_MESSAGE if tcp else max(UDP_MIN_PAYLOAD, query.payload if query.edns >= 0 else 0)
            try:
                return response.to_wire(max_size=max_size)
            except dns.exception.TooBig:
                pass
            if response.additional:
                response.additional = []
                try:
                    return response.to_wire(max_size=max_size)
                except dns.exception.TooBig:
                    pass
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC  # RFC 1035 4.2.1: retry over TCP
            return truncated.to_wire(max_size=max_size)
        except Exception:  # noqa: BLE001 - a bug here must cost one answer, not the server
            log.exception("event=dns_answer_failed")
            return None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tcp_tasks) >= self._max_tcp or task is None:
            self.stats["tcp_rejected"] += 1
            writer.close()
            return
        self._tcp_tasks.add(task)
        try:
            while True:
                # RFC 1035 4.2.2 / RFC 7766: each message is preceded by its 2-byte length
                async with asyncio.timeout(self._idle_timeout_s):
                    length = int.from_bytes(await reader.readexactly(2), "big")
                    wire = await reader.readexactly(length)
                reply = self.handle_wire(wire, tcp=True)
                if reply is None:
                    break  # junk: the framing cannot be trusted any more
                writer.write(len(reply).to_bytes(2, "big") + reply)
                async with asyncio.timeout(self._idle_timeout_s):
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - one connection's trouble must not reach the server
            log.exception("event=dns_tcp_error")
        finally:
            self._tcp_tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        """Stop listening and drop open TCP connections."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        tasks = list(self._tcp_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), SHUTDOWN_GRACE_S)
            self._tcp = None


def make_api_app(server: MeshDnsServer, *, admin: AdminPolicy | None = None) -> web.Application:
    """The records API: ``PUT /records`` (replace all, guarded by ``admin``), ``GET /records``, ``GET /healthz``."""

    async def put_records(request: web.Request) -> web.Response:
        try:
            data = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _json_error(f"body is not JSON: {exc}")
        try:
            server.set_records(data)
        except RecordsError as exc:
            return _json_error(str(exc))
        return web.json_response(server.records())

    async def get_records(_request: web.Request) -> web.Response:
        return web.json_response(server.records())

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[admin_middleware(admin if admin is not None else AdminPolicy())])
    app.router.add_put("/records", put_records)
    app.router.add_get("/records", get_records)
    app.router.add_get("/healthz", healthz)
    return app


def _pods_text(pods: Sequence[PodRecord]) -> str:
    return ",".join(p.address if p.port is None else f"{p.instance}@{p.address}:{p.port}" for p in pods) or "-"


def _json_error(message: str) -> web.Response:
    return web.json_response({"error": message, "status": 400}, status=400)


def _env_default(name: str, fallback: str) -> str:
    return os.environ.get(name) or fallback


def build_parser() -> argparse.ArgumentParser:
    """The ``sidemesh dns`` command line."""
    parser = argparse.ArgumentParser(
        prog="sidemesh dns",
        description="Run the local authoritative DNS server for the mesh zone (UDP+TCP) and its records API.",
    )
    options = [
        ("--listen", ENV_LISTEN, DEFAULT_LISTEN, "IP address to listen on for DNS and the API"),
        ("--port", ENV_PORT, DEFAULT_PORT, "DNS port, UDP and TCP"),
        ("--api-port", ENV_API_PORT, DEFAULT_API_PORT, "HTTP port of the records API"),
        ("--zone", ENV_ZONE, DEFAULT_ZONE, "the zone served: names are SERVICE.ZONE"),
        ("--ttl", ENV_TTL, DEFAULT_TTL, "TTL in seconds of every answer, also the negative-caching TTL"),
    ]
    for flag, env, default, text in options:
        parser.add_argument(flag, default=_env_default(env, str(default)), help=f"{text} (default {default}; ${env})")
    parser.add_argument("--record", action="append", default=[], metavar="SERVICE=ADDR[,ADDR...]",
                        help="initial records (repeatable), e.g. --record artist=127.10.1.1,127.10.1.2")
    parser.add_argument("--log-level", default=_env_default(ENV_LOG_LEVEL, "info"),
                        choices=["debug", "info", "warning", "error"],
                        help=f"log level (default info; ${ENV_LOG_LEVEL})")
    add_admin_arguments(parser, os.environ, "PUT /records (it repoints services)")
    return parser


def _port(parser: argparse.ArgumentParser, option: str, text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        parser.error(f"{option}: {text!r} is not a port number")
    if not 0 < port < 65536:
        parser.error(f"{option}: {port} is not in 1..65535")
    return port


def main(argv: list[str] | None = None) -> int:
    """``sidemesh dns``: serve until SIGTERM/SIGINT, then exit 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    port = _port(parser, "--port", args.port)
    api_port = _port(parser, "--api-port", args.api_port)
    try:
        ipaddress.ip_address(args.listen)
    except ValueError:
        parser.error(f"--listen: {args.listen!r} is not an IP address")
    try:
        ttl = int(args.ttl)
        server = MeshDnsServer(args.zone, ttl)
    except ValueError as exc:
        parser.error(f"--zone/--ttl: {exc}")
    initial: dict[str, list[str]] = {}
    for item in args.record:
        name, sep, addresses = item.partition("=")
        if not sep:
            parser.error(f"--record {item!r}: expected SERVICE=ADDR[,ADDR...]")
        initial[name] = [a for a in addresses.split(",") if a]
    try:
        validate_records(initial, server.zone)
    except RecordsError as exc:
        parser.error(f"--record: {exc}")
    try:
        admin = policy_from_args(args, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s level=%(levelname)s component=dns %(message)s",
    )
    if initial:
        server.set_records(initial)

    return uvloop.run(_serve(server, args.listen, port, api_port, admin))


async def _serve(server: MeshDnsServer, host: str, port: int, api_port: int, admin: AdminPolicy) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        make_api_app(server, admin=admin), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    try:
        await server.start(host, port)
        await runner.setup()
        await web.TCPSite(runner, host, api_port).start()
    except OSError as exc:
        log.error("event=dns_start_failed host=%s port=%d api_port=%d error=%s", host, port, api_port, exc)
        await runner.cleanup()
        await server.close()
        return 1
    log.info("event=dns_api_listening host=%s port=%d", host, api_port)
    await stop.wait()
    log.info("event=dns_stopping")
    await runner.cleanup()
    await server.close()
    log.info("event=dns_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
