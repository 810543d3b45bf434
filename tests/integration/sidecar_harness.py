"""Shared harness for the sidecar's integration tests: real sockets on loopback, nothing mocked.

* ``TestControlPlane``: a grpc.aio server implementing ``sidemesh.v1.Discovery/Stream`` that the
  TEST feeds (like linkerd2-proxy's ``app/integration`` controller): every stream gets the
  current snapshot right after its Hello and every later ``push``; ACK/NACKs are recorded.
  It does not import ``controlplane/``: the proto is the only contract.
* ``snapshot(...)``: builds a Snapshot message from plain tuples.
* ``MeshCa``: a real ``identity.certs.CertificateAuthority`` in a temp dir that mints workload
  certificates into identity directories (what the sidecar's certificate manager caches), and
  the control plane's serving credentials; ``TestControlPlane(host, ca=...)`` then speaks mTLS.
* ``start_sidecar(...)``: a ``sidecar.app.Sidecar`` in this process, on a fresh loopback address;
  plaintext (``--insecure``) unless given an identity directory.
* ``start_sidecar_process(...)``: ``sidemesh sidecar`` as a real process (uvloop, as deployed),
  optionally with a small open-file limit; its RSS and its sockets' TCP states are readable.
* ``start_app(...)`` / ``start_raw(...)``: upstream servers (aiohttp, or raw asyncio for faults).
* ``raw_request(...)``: one request over a raw socket, reading the reply until close or a
  complete message, for what aiohttp clients hide (malformed requests, truncation).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
from aiohttp import web

from identity.certs import CertificateAuthority, cert_to_pem, generate_key, key_to_pem, make_csr
from identity.spiffe import SpiffeId
from identity.store import IdentityFiles
from identity.tls import client_context
from meshpb.v1 import discovery_pb2 as pb
from meshpb.v1 import discovery_pb2_grpc
from sidecar.app import Sidecar
from sidecar.config import parse_config
from tests.support import REPO, Proc, ProcessGroup, free_port, loopback_address

_nonces = itertools.count(1)

EndpointSpec = tuple[str, int] | tuple[str, int, str]


def snapshot(version: str, services: dict[str, Iterable[EndpointSpec]], *,
             allowed_callers: dict[str, Iterable[str]] | None = None, **policy: Any) -> pb.Snapshot:
    """A Snapshot: ``{"artist": [("127.0.0.1", 8080, "artist-1")]}``; ``policy`` applies to every service.

    ``timeout_ms`` defaults to 5000 here (not 0, "sidecar default") so that these data-path tests
    do not depend on convert.py's handling of an unset timeout; test_sidecar_convert covers that.
    ``allowed_callers``: service -> the callers its enforced authorization allows (others: anyone).
    """
    policy.setdefault("timeout_ms", 5000)
    out = []
    for name, eps in services.items():
        endpoints = []
        for i, ep in enumerate(eps, 1):
            instance = ep[2] if len(ep) > 2 else f"{name}-{i}"  # type: ignore[misc]
            endpoints.append(pb.Endpoint(address=ep[0], port=ep[1], instance=instance))
        authz = {}
        if allowed_callers is not None and name in allowed_callers:
            authz["authorization"] = pb.Authorization(enforced=True, allowed_callers=sorted(allowed_callers[name]))
        out.append(pb.Service(name=name, endpoints=endpoints, policy=pb.Policy(**policy, **authz)))
    return pb.Snapshot(version=version, nonce=f"nonce-{next(_nonces)}", services=out)


TRUST_DOMAIN = "sidemesh.local"
# the name the sidecars check on the control plane's certificate (sidecar/discovery.py)
CONTROLPLANE_NAME = "controlplane"


class MeshCa:
    """A mesh CA in a temp dir, minting certificates as the control plane's CA would issue them."""

    def __init__(self, root: Path, trust_domain: str = TRUST_DOMAIN) -> None:
        self.root = root
        self.trust_domain = trust_domain
        self.ca = CertificateAuthority.create(trust_domain, time.time())
        self._dirs = itertools.count(1)

    def mint(self, service: str, *, ttl_s: float = 3600.0, not_after: float | None = None) -> Path:
        """An identity directory holding a key and a certificate for ``service`` and the bundle.

        ``not_after``: when it expires (wall clock), for certificates that expire during a test.
        """
        files = IdentityFiles(self.root / f"{service}-{next(self._dirs)}")
        key = files.load_or_create_key()
        spiffe = SpiffeId(self.trust_domain, service)
        now = time.time() if not_after is None else not_after - ttl_s
        cert = self.ca.issue_workload(make_csr(key, spiffe, f"{service}-test"), spiffe, ttl_s=ttl_s, now=now)
        files.save(cert_to_pem(cert), self.ca.bundle_pem)
        return files.directory

    @staticmethod
    def client_tls(identity: Path) -> ssl.SSLContext:
        """A TLS client presenting the certificate in ``identity``, as a calling sidecar does."""
        files = IdentityFiles(identity)
        return client_context(files.cert, files.key, files.bundle)

    def empty(self, service: str) -> Path:
        """An identity directory with nothing in it yet (a sidecar that never got a certificate)."""
        path = self.root / f"{service}-{next(self._dirs)}"
        path.mkdir(parents=True)
        return path

    def server_credentials(self) -> grpc.ServerCredentials:
        """The control plane's side of the discovery stream's mutual TLS."""
        key = generate_key()
        cert = self.ca.issue_server(key, dns_names=[CONTROLPLANE_NAME], ips=[], ttl_s=3600, now=time.time())
        return grpc.ssl_server_credentials([(key_to_pem(key), cert_to_pem(cert))],
                                           root_certificates=self.ca.bundle_pem, require_client_auth=True)


@dataclass
class StreamRecord:
    hello: pb.Hello
    acks: list[pb.Ack] = field(default_factory=list)
    outbox: asyncio.Queue[pb.Snapshot | None] = field(default_factory=asyncio.Queue)


class TestControlPlane:
    """A discovery server the test drives: ``push`` snapshots, read ``acks``."""

    __test__ = False  # not a pytest class

    def __init__(self, host: str, *, ca: MeshCa | None = None) -> None:
        self.host = host
        self.ca = ca  # mutual TLS with sidecars holding this CA's certificates; None: plaintext
        self.port = 0
        self.current: pb.Snapshot | None = None
        self.streams: list[StreamRecord] = []
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Condition()

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> TestControlPlane:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "sidemesh.v1.Discovery",
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=pb.DiscoveryRequest.FromString,
                    response_serializer=pb.Snapshot.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        if self.ca is None:
            self.port = server.add_insecure_port(f"{self.host}:0")
        else:
            self.port = server.add_secure_port(f"{self.host}:0", self.ca.server_credentials())
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        for rec in self.streams:
            rec.outbox.put_nowait(None)
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    async def push(self, snap: pb.Snapshot) -> None:
        """Make ``snap`` current and send it on every open stream."""
        self.current = snap
        for rec in self.streams:
            rec.outbox.put_nowait(snap)

    def all_acks(self) -> list[pb.Ack]:
        return [a for rec in self.streams for a in rec.acks]

    async def wait_ack(self, version: str, timeout: float = 5.0) -> pb.Ack:
        """The ACK or NACK for ``version`` (whichever stream sent it)."""

        def found() -> pb.Ack | None:
            return next((a for a in self.all_acks() if a.version == version), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), timeout)
        ack = found()
        assert ack is not None
        return ack

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _stream(self, request_iterator: AsyncIterator[pb.DiscoveryRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Snapshot]:
        first = await anext(aiter(request_iterator))
        rec = StreamRecord(first.hello)
        self.streams.append(rec)
        await self._notify()
        if self.current is not None:
            rec.outbox.put_nowait(self.current)

        async def read_acks() -> None:
            async for req in request_iterator:
                if req.HasField("ack"):
                    rec.acks.append(req.ack)
                    await self._notify()
                elif req.HasField("ping"):
                    rec.outbox.put_nowait(pb.Snapshot(pong=req.ping.seq))  # the stream is alive

        reader = asyncio.ensure_future(read_acks())
        try:
            while True:
                snap = await rec.outbox.get()
                if snap is None:
                    return
                yield snap
        finally:
            reader.cancel()


# ----- upstream servers -----


@asynccontextmanager
async def start_app(app: web.Application, host: str | None = None, port: int = 0) -> AsyncIterator[tuple[str, int]]:
    """Serve an aiohttp app on a loopback port (a free one unless given); yields (host, port)."""
    host = host or loopback_address()
    port = port or free_port(host)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        yield host, port
    finally:
        await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def start_raw(handler: RawHandler, host: str | None = None, port: int = 0) -> AsyncIterator[tuple[str, int]]:
    """A raw TCP server; ``handler`` owns each connection (``reset(writer)`` sends an RST)."""
    host = host or loopback_address()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, host, port)
    port = server.sockets[0].getsockname()[1]
    try:
        yield host, port
    finally:
        server.close()
        await server.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing upstream would."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def closed_port() -> tuple[str, int]:
    """A loopback address and port where nothing listens (connects are refused)."""
    host = loopback_address()
    return host, free_port(host)


# ----- the sidecar under test -----


@dataclass
class RunningSidecar:
    sidecar: Sidecar
    address: str
    outbound_port: int
    inbound_port: int
    admin_port: int
    session: aiohttp.ClientSession

    @property
    def proxy(self) -> str:
        return f"http://{self.address}:{self.outbound_port}"

    @property
    def admin(self) -> str:
        return f"http://{self.address}:{self.admin_port}"

    async def get(self, url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        """A request through the outbound listener, as an app with HTTP_PROXY sends it."""
        async with self.session.request(kw.pop("method", "GET"), url, proxy=self.proxy, **kw) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def state(self) -> dict[str, Any]:
        async with self.session.get(f"{self.admin}/state") as resp:
            assert resp.status == 200
            return await resp.json()  # type: ignore[no-any-return]

    async def metrics_text(self) -> str:
        async with self.session.get(f"{self.admin}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            state = await self.state()
            if predicate(state):
                return state
            if loop.time() > deadline:
                raise AssertionError(f"sidecar state never matched: {json.dumps(state)[:2000]}")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def start_sidecar(
    cp: TestControlPlane | None,
    *,
    app: tuple[str, int] | None = None,
    service: str = "song",
    extra: Iterable[str] = (),
    identity: Path | None = None,
    dns: tuple[str, int] | None = None,
) -> AsyncIterator[RunningSidecar]:
    """An in-process sidecar on a fresh loopback address with the mesh's usual ports.

    With a control plane it waits until the sidecar is in mode ``controlplane``; DNS points
    at ``dns``, else at a loopback port where nothing answers. ``identity``: an identity
    directory (``MeshCa.mint``): mutual TLS with the certificate cached there; without one the
    sidecar is ``--insecure`` (plaintext).
    """
    address = loopback_address()
    app = app or closed_port()
    controlplane = cp.target if cp is not None else "%s:%d" % closed_port()
    dns_host, dns_port = dns or closed_port()
    config = parse_config(
        [
            "--service", service, "--instance", f"{service}-test", "--address", address,
            "--listen", address, "--outbound-listen", address,
            "--app", f"{app[0]}:{app[1]}", "--controlplane", controlplane,
            "--dns-server", f"{dns_host}:{dns_port}", "--dns-timeout", "0.2",
            "--initial-fetch-timeout", "1", "--log-level", "warning",
            *identity_args(identity),
            *extra,
        ],
        env={},
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    running = RunningSidecar(sidecar, address, config.outbound_port, config.inbound_port, config.admin_port, session)
    try:
        if cp is not None and cp.current is not None:
            await running.wait_for(lambda s: s["mode"] == "controlplane")
        yield running
    finally:
        await session.close()
        await sidecar.stop(drain_s=0.5)


def identity_args(identity: Path | None) -> list[str]:
    """``sidemesh sidecar`` flags: mTLS with the certificate cached in ``identity``, else ``--insecure``."""
    if identity is None:
        return ["--insecure"]
    # no join token: a missing or expired certificate stays missing or expired
    return ["--identity-dir", str(identity), "--trust-domain", TRUST_DOMAIN]


# ----- the sidecar as a process -----

# /proc/net/tcp's "st" column (include/net/tcp_states.h)
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


@dataclass
class SidecarProcess:
    proc: Proc
    address: str
    outbound_port: int = 15001
    inbound_port: int = 15006
    admin_port: int = 15000

    @property
    def pid(self) -> int:
        return self.proc.popen.pid

    @property
    def alive(self) -> bool:
        return self.proc.alive

    def status_kb(self, field: str) -> int:
        """A figure of /proc/PID/status, e.g. VmRSS or VmHWM, in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def tcp_states(self) -> Counter[str]:
        """TCP states of the sockets this process holds (its fds' inodes matched in /proc/net/tcp)."""
        inodes = set()
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        states: Counter[str] = Counter()
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    states[TCP_STATES.get(int(cols[3], 16), cols[3])] += 1
        return states

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def start_sidecar_process(
    procs: ProcessGroup,
    cp: TestControlPlane | None,
    *,
    app: tuple[str, int],
    service: str = "song",
    extra: Iterable[str] = (),
    open_files: int | None = None,
    identity: Path | None = None,
    dns: tuple[str, int] | None = None,
    inbound_port: int = 15006,
) -> SidecarProcess:
    """``sidemesh sidecar`` on a fresh loopback address; ``open_files`` sets its RLIMIT_NOFILE.

    ``identity``: mTLS with the certificate cached there (``MeshCa.mint``), else ``--insecure``.
    Without a control plane it points at a port where nothing answers (it serves through DNS);
    DNS points at ``dns``, else at such a port too. Registered in ``procs``, which stops it and
    prints its log when the test failed.
    """
    address = loopback_address()
    dns = dns or closed_port()
    controlplane = cp.target if cp is not None else "%s:%d" % closed_port()
    args = [
        "sidecar", "--service", service, "--instance", f"{service}-proc", "--address", address,
        "--listen", address, "--outbound-listen", address, "--app", "%s:%d" % app,
        "--inbound-port", str(inbound_port),
        "--controlplane", controlplane, "--dns-server", "%s:%d" % dns, "--dns-timeout", "0.2",
        "--log-level", "info", *identity_args(identity), *extra,
    ]

    def limit_files() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    log_path = procs.logdir / f"sidecar-{address}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "sidemesh", *args], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=REPO, start_new_session=True,
            preexec_fn=limit_files if open_files is not None else None,
        )
    proc = Proc(f"sidecar-{address}", popen, log_path)
    procs.procs.append(proc)
    return SidecarProcess(proc, address, inbound_port=inbound_port)


async def wait_ready(sp: SidecarProcess, timeout: float = 15.0) -> None:
    """Until the sidecar's admin API says ready (its first snapshot is applied)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            reply = await raw_request(sp.address, sp.admin_port, b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                                      timeout=2.0)
            if reply.startswith(b"HTTP/1.1 200 "):
                return
        except OSError:
            pass
        if not sp.alive:
            raise AssertionError(f"sidecar exited with {sp.proc.popen.returncode}:\n{sp.proc.log()[-3000:]}")
        if loop.time() > deadline:
            raise TimeoutError(f"sidecar at {sp.address} not ready within {timeout}s")
        await asyncio.sleep(0.05)


# ----- raw client -----


async def raw_request(host: str, port: int, data: bytes, *, timeout: float = 5.0,
                      tls: ssl.SSLContext | None = None) -> bytes:
    """Send ``data`` on a new connection (TLS with ``tls``) and read until the peer closes it."""
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from ``reader`` (Content-Length or chunked), leaving the connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if head_request or status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, headers, bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return status, headers, await reader.read(-1)
