"""The load process of the control-plane benchmark: N simulated sidecars on grpc.aio.

    python -m benchmarks.meshload --target 127.79.0.2:15010 --streams 1000

Each simulated sidecar has its own channel (its own HTTP/2 connection, as real
sidecars do), sends a Hello, and ACKs every Snapshot at once. It speaks the
proto (meshpb.v1) and nothing else of sidemesh. The driver
(``benchmarks.controlplane``) talks to this process by lines:

    stdout  {"event": "connected", ...}   every stream has ACKed a first snapshot
    stdin   mark NODE_ID                   remember each stream's current version;
                                           NODE_ID is the instance the change adds
    stdout  {"event": "marked", ...}
    stdin   join NODE_ID                   open one more stream (the registry change)
    stdout  {"event": "joined", "t0": ...} wall-clock time just before its Hello
    stdout  {"event": "changed", ...}      every marked stream ACKed a newer version:
                                           wall-clock times of the last receive/ACK
    stdin   quit

Times are ``time.time()`` so that several load processes share one clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import grpc
import uvloop

from benchmarks import meshwire

SERVICES = 10
CONNECT_BATCH = 100
PHASE_TIMEOUT_S = 120.0


@dataclass
class SimSidecar:
    """One simulated sidecar: what it last ACKed and when."""

    node_id: str
    service: str
    address: str
    check: bool = False  # decode the whole snapshot (to verify the change arrived)
    version: str | None = None
    baseline: str | None = None
    changed_at: tuple[float, float] | None = None  # (received, acked) of the first newer version
    instances: set[str] = field(default_factory=set)
    error: str | None = None

    def on_ack(self, version: str, received: float, acked: float) -> None:
        self.version = version
        if self.baseline is not None and self.changed_at is None and version != self.baseline:
            self.changed_at = (received, acked)


async def run_stream(sim: SimSidecar, target: str) -> None:
    """Hello, then ACK every Snapshot until the stream ends or the task is cancelled."""
    # a local subchannel pool: one connection per simulated sidecar, not one shared
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = channel.stream_stream(meshwire.STREAM_METHOD, request_serializer=meshwire.RAW,
                                     response_deserializer=meshwire.RAW)()
        try:
            await call.write(meshwire.hello(node_id=sim.node_id, service=sim.service,
                                            address=sim.address, port=15006))
            while True:
                data = await call.read()
                if data is grpc.aio.EOF:
                    sim.error = "stream closed by the control plane"
                    return
                received = time.time()
                version, nonce = meshwire.snapshot_head(data)
                if sim.check:
                    sim.instances = meshwire.full_instances(data)
                await call.write(meshwire.ack(version, nonce))
                sim.on_ack(version, received, time.time())
        except grpc.aio.AioRpcError as exc:
            sim.error = f"{exc.code().name}: {exc.details()}"
        finally:
            call.cancel()


def make_sim(index: int, offset: int, *, check: bool = False) -> SimSidecar:
    n = offset + index
    return SimSidecar(node_id=f"bench-{n}", service=f"bench{n % SERVICES}",
                      address=f"127.200.{n // 250}.{n % 250 + 1}", check=check)


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def wait_until(predicate, timeout: float, what: str, sims: list[SimSidecar]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        errors = [s.error for s in sims if s.error]
        if errors:
            raise RuntimeError(f"{len(errors)} streams failed while waiting for {what}: {errors[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {timeout:.0f}s")
        await asyncio.sleep(0.005)


async def main_async(args: argparse.Namespace) -> int:
    sims = [make_sim(i, args.offset, check=(i == 0)) for i in range(args.streams)]
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    for first in range(0, len(sims), args.batch):
        batch = sims[first:first + args.batch]
        tasks += [asyncio.create_task(run_stream(s, args.target)) for s in batch]
        await wait_until(lambda b=batch: all(s.version is not None for s in b), PHASE_TIMEOUT_S,
                         "first snapshots", sims)
    emit("connected", streams=len(sims), seconds=round(time.monotonic() - started, 3))

    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := (await reader.readline()).decode().strip():
            command, _, arg = line.partition(" ")
            if command == "mark":
                for s in sims:
                    s.baseline, s.changed_at = s.version, None
                emit("marked", versions=sorted({s.version or "" for s in sims}))
                tasks.append(asyncio.create_task(report_change(sims, expected_instance=arg)))
            elif command == "join":
                joiner = SimSidecar(node_id=arg, service="bench-join", address="127.200.255.1")
                t0 = time.time()
                tasks.append(asyncio.create_task(run_stream(joiner, args.target)))
                emit("joined", t0=t0)
            elif command == "quit":
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 0


async def report_change(sims: list[SimSidecar], *, expected_instance: str) -> None:
    """Once every marked stream ACKed a newer version: when the last one did, and
    whether the fully decoded stream's snapshot holds ``expected_instance``."""
    try:
        await wait_until(lambda: all(s.changed_at is not None for s in sims), PHASE_TIMEOUT_S,
                         "the change", sims)
    except (RuntimeError, TimeoutError) as exc:
        emit("error", reason=str(exc))
        return
    received = [s.changed_at[0] for s in sims if s.changed_at]
    acked = [s.changed_at[1] for s in sims if s.changed_at]
    checked = [s for s in sims if s.check]
    emit("changed", streams=len(sims), first_received=min(received), last_received=max(received),
         last_acked=max(acked), saw_join=bool(checked) and all(expected_instance in s.instances for s in checked))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.meshload",
                                     description="N simulated sidecars on one control plane (driven by "
                                                 "benchmarks.controlplane over stdin/stdout).")
    parser.add_argument("--target", required=True, help="control plane gRPC HOST:PORT")
    parser.add_argument("--streams", type=int, required=True, help="simulated sidecars in this process")
    parser.add_argument("--offset", type=int, default=0, help="first sidecar index (bench-OFFSET...)")
    parser.add_argument("--batch", type=int, default=CONNECT_BATCH,
                        help=f"streams opened at once while connecting (default {CONNECT_BATCH})")
    args = parser.parse_args(argv)
    try:
        return uvloop.run(main_async(args))
    except (RuntimeError, TimeoutError) as exc:
        emit("error", reason=str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
