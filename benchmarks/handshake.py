"""Fresh mutual-TLS connections to a proxy's inbound listener: the cost of a handshake.

    python -m benchmarks.handshake --connect 127.77.6.1:15006 --cert C --key K --ca CA \\
        --host upstream --seconds 3 --clients 2

A sidemesh sidecar has no setting that makes its A -> B hop open a new connection per
request (its pool keeps them, and ``Connection: close`` from the app is hop-by-hop), so the
handshake cost of the two proxies is compared where both can be driven alike: at B's
inbound listener. Each of ``--clients`` processes loops until the deadline:

    TCP connect -> TLS 1.3 handshake with the client's mesh certificate (full handshake: no
    session is ever resumed) -> ``GET / HTTP/1.1``, ``Connection: close`` -> read to EOF

and counts the connections that ended in a 200. The client's context is the sidecar's own
(``identity.tls.client_context``: TLS 1.3 only, the mesh CA, ALPN http/1.1), so B sees what
a sidemesh caller sends. The client does not read the server's SPIFFE ID afterwards: that
is client-side work and the figure of interest is B's.

The summary is printed as one line ``HANDSHAKE_JSON {...}`` (like wrk's Lua hook), with the
client's own CPU seconds (``getrusage``, the worker processes included), so a reader can see
whether the client or the proxy was the bottleneck. Parsing and merging are pure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.loadtools import PERCENTILES, percentile
from benchmarks.procs import BenchError

HANDSHAKE_JSON_MARK = "HANDSHAKE_JSON "
CONNECT_TIMEOUT_S = 5.0
READ_LIMIT = 64 * 1024  # a 12-byte body and its head; more means something else answered


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """Fresh connections (handshake + one request) made against one listener."""

    connections: int
    duration_s: float
    errors: dict[str, int]
    latency_ms: dict[str, float]  # connect to EOF, per connection
    client_cpu_s: float
    clients: int

    @property
    def rate(self) -> float:
        return self.connections / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def request_bytes(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("ascii")


def _one(address: tuple[str, int], ctx: ssl.SSLContext, request: bytes) -> str | None:
    """One fresh connection; None when it ended in a 200, else the kind of failure."""
    try:
        with socket.create_connection(address, timeout=CONNECT_TIMEOUT_S) as raw:
            # as every proxy (and asyncio) does: with Nagle on, the request written right after the
            # client's Finished waits for the server's delayed ACK, ~40 ms on Linux
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw) as tls:  # the handshake runs here
                tls.sendall(request)
                data = b""
                while len(data) < READ_LIMIT:
                    chunk = tls.recv(READ_LIMIT)
                    if not chunk:
                        break
                    data += chunk
    except ssl.SSLError as exc:
        return f"ssl:{exc.reason or type(exc).__name__}"
    except OSError as exc:
        return type(exc).__name__
    return None if data.startswith(b"HTTP/1.1 200 ") else "status"


def _worker(job: tuple[tuple[str, int], str, str, str, str, float]) -> tuple[int, dict[str, int], list[float],
                                                                                float, float]:
    address, cert, key, ca, host, deadline = job
    # the sidecar's own client context (imported here: identity/ is only needed by this process)
    from identity.tls import client_context

    ctx = client_context(Path(cert), Path(key), Path(ca))
    request = request_bytes(host)
    ok = 0
    errors: dict[str, int] = {}
    latencies: list[float] = []
    start = time.monotonic()
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        failure = _one(address, ctx, request)
        if failure is None:
            ok += 1
            latencies.append(time.perf_counter() - t0)
        else:
            errors[failure] = errors.get(failure, 0) + 1
    return ok, errors, latencies, start, time.monotonic()


def measure(address: tuple[str, int], *, cert: str, key: str, ca: str, host: str, seconds: float,
            clients: int) -> dict[str, object]:
    """Run ``clients`` processes for ``seconds``; the summary as a JSON-able dict."""
    deadline = time.monotonic() + seconds  # CLOCK_MONOTONIC is one clock for every process
    job = (address, cert, key, ca, host, deadline)
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        results = pool.map(_worker, [job] * clients)
        pool.close()
        pool.join()
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    latencies = sorted(x * 1000 for r in results for x in r[2])
    errors: dict[str, int] = {}
    for r in results:
        for kind, n in r[1].items():
            errors[kind] = errors.get(kind, 0) + n
    return {
        "connections": sum(r[0] for r in results),
        "duration_s": max(r[4] for r in results) - min(r[3] for r in results),
        "errors": errors,
        "latency_ms": {f"p{p:g}": percentile(latencies, p) for p in PERCENTILES} if latencies else {},
        "client_cpu_s": sum(u.ru_utime + u.ru_stime for u in usage),
        "clients": clients,
    }


def handshake_command(address: str, port: int, *, cert: Path, key: Path, ca: Path, host: str,
                      seconds: float, clients: int) -> list[str]:
    """This module as a child process of the benchmark."""
    return [sys.executable, "-m", "benchmarks.handshake", "--connect", f"{address}:{port}",
            "--cert", str(cert), "--key", str(key), "--ca", str(ca), "--host", host,
            "--seconds", f"{seconds:g}", "--clients", str(clients)]


def parse_handshake(output: str) -> HandshakeResult:
    """The ``HANDSHAKE_JSON`` line this module prints."""
    for line in output.splitlines():
        if line.startswith(HANDSHAKE_JSON_MARK):
            try:
                d = json.loads(line[len(HANDSHAKE_JSON_MARK):])
                return HandshakeResult(connections=int(d["connections"]), duration_s=float(d["duration_s"]),
                                       errors={k: int(v) for k, v in d["errors"].items()},
                                       latency_ms={k: float(v) for k, v in d["latency_ms"].items()},
                                       client_cpu_s=float(d["client_cpu_s"]), clients=int(d["clients"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise BenchError(f"malformed handshake summary: {line[:300]!r}") from exc
    raise BenchError(f"no handshake summary in the client's output:\n{output[-1500:]}")


def merge_handshakes(rounds: Sequence[HandshakeResult]) -> HandshakeResult:
    """Rounds as one: connections, time, errors and client CPU add up; the latency figures
    are those of the median round (by rate), as for wrk's rounds."""
    if not rounds:
        raise ValueError("no rounds to merge")
    median = sorted(rounds, key=lambda r: r.rate)[(len(rounds) - 1) // 2]
    errors: dict[str, int] = {}
    for r in rounds:
        for kind, n in r.errors.items():
            errors[kind] = errors.get(kind, 0) + n
    return HandshakeResult(connections=sum(r.connections for r in rounds),
                           duration_s=sum(r.duration_s for r in rounds), errors=errors,
                           latency_ms=dict(median.latency_ms),
                           client_cpu_s=sum(r.client_cpu_s for r in rounds), clients=median.clients)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.handshake", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connect", required=True, help="HOST:PORT of the mutual-TLS listener")
    parser.add_argument("--cert", required=True, help="the client's certificate (PEM)")
    parser.add_argument("--key", required=True, help="the client's private key (PEM)")
    parser.add_argument("--ca", required=True, help="the mesh CA (PEM)")
    parser.add_argument("--host", default="upstream", help="Host header of the one request (default upstream)")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to run (default 3)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    args = parser.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    if not host or not port.isdigit() or not 0 < args.seconds <= 600 or not 1 <= args.clients <= 64:
        parser.error("--connect HOST:PORT, --seconds within (0, 600], --clients within 1..64")
    summary = measure((host, int(port)), cert=args.cert, key=args.key, ca=args.ca, host=args.host,
                      seconds=args.seconds, clients=args.clients)
    print(HANDSHAKE_JSON_MARK + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
