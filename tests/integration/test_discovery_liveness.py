"""The discovery stream's liveness once it is established: a real sidecar process against a
real gRPC server (a small one here, whose stream handler the test can hang) and against the
real control plane (whose node id a second stream takes over).

gRPC keepalive proves the connection alive; these tests are about the stream on top of it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from meshpb.v1 import discovery_pb2 as pb
from meshpb.v1 import discovery_pb2_grpc as pb_grpc

from tests.support import ProcessGroup, loopback_address, wait_for_http

pytestmark = pytest.mark.timeout(90)


def _state(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{admin}/state", timeout=2) as resp:
        return dict(json.loads(resp.read()))


def _poll(what: str, check: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.05)


class HangableControlPlane:
    """Answers a Hello with one snapshot listing the caller; answers pings unless ``hung``."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.hung = False
        self.hellos = 0
        self.pings = 0
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "sidemesh.v1.Discovery",
            {"Stream": grpc.stream_stream_rpc_method_handler(
                self._stream, request_deserializer=pb.DiscoveryRequest.FromString,
                response_serializer=pb.Snapshot.SerializeToString)},
        )
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port(f"{self.host}:0")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def _stream(self, requests: AsyncIterator[pb.DiscoveryRequest], context: Any) -> AsyncIterator[pb.Snapshot]:
        hello = (await anext(aiter(requests))).hello
        self.hellos += 1
        snap = pb.Snapshot(version=str(self.hellos), nonce=f"n{self.hellos}")
        svc = snap.services.add(name=hello.service)
        svc.endpoints.add(address=hello.address, port=hello.port, instance=hello.node_id)
        yield snap
        async for req in requests:
            if req.HasField("ping"):
                self.pings += 1
                if not self.hung:
                    yield pb.Snapshot(pong=req.ping.seq)


@pytest.fixture
def group() -> Iterator[ProcessGroup]:
    g = ProcessGroup()
    yield g
    g.close()


def _sidecar(group: ProcessGroup, address: str, controlplane: str, *extra: str) -> str:
    # plaintext: these tests are about the stream's liveness, not who may open it
    group.start("sidecar", "sidecar", "--insecure", "--service", "artist", "--instance", "artist-1", "--address", address,
                "--listen", address, "--outbound-listen", address, "--app", f"{address}:8080",
                "--controlplane", controlplane, "--dns-server", f"{address}:15053", "--dns-timeout", "0.2", *extra)
    admin = f"{address}:15000"
    wait_for_http(f"http://{admin}/ready", timeout=15)
    return admin


async def test_a_stream_whose_handler_stops_answering_is_torn_down_and_reconnected(group: ProcessGroup) -> None:
    host = loopback_address()
    cp = HangableControlPlane(host)
    await cp.start()
    try:
        admin = await asyncio.to_thread(_sidecar, group, loopback_address(), f"{host}:{cp.port}",
                                        "--ping-interval", "1", "--ping-timeout", "1")
        await asyncio.to_thread(_poll, "controlplane mode", lambda: _state(admin)["mode"] == "controlplane", 10)
        # pings are answered: the stream stays up across several intervals
        await asyncio.to_thread(_poll, "three pings answered", lambda: cp.pings >= 3, 15)
        state = _state(admin)
        assert cp.hellos == 1 and state["mode"] == "controlplane" and state["controlplane"]["connected"] is True

        cp.hung = True
        t_hung = time.monotonic()
        took = await asyncio.to_thread(
            _poll, "the sidecar giving up on the silent stream",
            lambda: _state(admin)["controlplane"]["last_error"] is not None
            and "stream silent" in _state(admin)["controlplane"]["last_error"], 10)
        print(f"silent stream noticed {took:.2f}s after the handler hung (ping interval 1 s + timeout 1 s)")
        assert took <= 2.0 + 3.0, "interval + timeout, with margin for a busy machine"
        dns_transition = [t for t in _state(admin)["transitions"] if t["to"] == "dns"]
        assert dns_transition and "stream silent" in dns_transition[-1]["reason"]

        cp.hung = False
        await asyncio.to_thread(_poll, "a new stream", lambda: cp.hellos >= 2, 10)
        await asyncio.to_thread(_poll, "controlplane mode again",
                                lambda: _state(admin)["mode"] == "controlplane" and _state(admin)["controlplane"]["connected"], 10)
        print(f"reconnected {time.monotonic() - t_hung:.2f}s after the hang began; hellos={cp.hellos}")
    finally:
        await cp.stop()


async def test_a_sidecar_whose_node_id_another_stream_takes_over_registers_again_and_reports_it_truthfully(
    group: ProcessGroup,
) -> None:
    cp_host = loopback_address()
    # plaintext, so a second stream can claim the node id at all (with identity the control plane
    # refuses a takeover by another key: tests/integration/test_identity_mesh.py)
    group.start("controlplane", "controlplane", "--insecure", "--listen", cp_host)
    wait_for_http(f"http://{cp_host}:15014/healthz", timeout=15)
    address = loopback_address()
    admin = await asyncio.to_thread(_sidecar, group, address, f"{cp_host}:15010", "--ping-interval", "1", "--ping-timeout", "1")

    def registered_at(addr: str) -> bool:
        with urllib.request.urlopen(f"http://{cp_host}:15014/status", timeout=2) as resp:
            status = json.loads(resp.read())
        return any(s["node_id"] == "artist-1" and s.get("address") == addr for s in status["sidecars"])

    await asyncio.to_thread(_poll, "artist-1 registered", lambda: registered_at(address), 10)
    # a second stream claims artist-1 from another address, five times in a row, then goes away
    async with grpc.aio.insecure_channel(f"{cp_host}:15010") as channel:
        for _ in range(5):
            call = pb_grpc.DiscoveryStub(channel).Stream()
            await call.write(pb.DiscoveryRequest(hello=pb.Hello(node_id="artist-1", service="artist",
                                                                address="127.0.0.99", port=15006)))
            with pytest.raises((asyncio.TimeoutError, grpc.aio.AioRpcError)):
                while True:
                    await asyncio.wait_for(call.read(), 0.5)
            call.cancel()
    took = await asyncio.to_thread(_poll, "artist-1 registered again at its own address",
                                   lambda: registered_at(address), 10)
    print(f"artist-1 back in the registry {took:.2f}s after the takeovers ended")
    # for several ping intervals, /state says connected exactly when the control plane lists us
    for _ in range(20):
        state = _state(admin)
        listed = registered_at(address)
        assert not (state["controlplane"]["connected"] and not listed and state["mode"] == "controlplane"), state
        await asyncio.sleep(0.1)
    assert _state(admin)["mode"] == "controlplane"
