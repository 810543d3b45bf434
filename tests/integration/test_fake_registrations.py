"""Damage that must not outlive the attacker: registrations that come and go leave nothing
behind in any sidecar's table. A real `sidemesh up` mesh (real DNS server, which answers
NXDOMAIN for names no pod serves) and real grpcio streams as the attacker.

The mesh runs `--insecure` so that anyone can register, as anyone could before identity: what
is tested is that the sidecars' tables heal, whoever the registrations came from (with identity
on, the same holds for a service whose credentials leaked).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc.aio
import pytest
from meshpb.v1 import discovery_pb2 as pb
from meshpb.v1 import discovery_pb2_grpc as pb_grpc

from tests.mesh import Mesh, get_json, running_mesh

pytestmark = [pytest.mark.timeout(120)]

GRACE_S = 3.0  # the sidecar's default --guard-grace


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with running_mesh("--insecure") as m:
        yield m


def _cp(mesh: Mesh) -> tuple[str, str]:
    info = get_json(f"http://{mesh.control}/mesh")
    return info["controlplane"]["grpc"], info["controlplane"]["http"]


def _tables(mesh: Mesh) -> dict[str, set[str]]:
    return {name: set(st["services"]) for name, st in mesh.sidecar_states().items()}


async def _register(channel: grpc.aio.Channel, service: str, n: int) -> Any:
    call = pb_grpc.DiscoveryStub(channel).Stream()
    await call.write(pb.DiscoveryRequest(hello=pb.Hello(node_id=f"{service}-fake-{n}", service=service,
                                                        address=f"127.0.250.{n % 250 + 1}", port=15006)))
    return call


async def _wait(what: str, check: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while not await asyncio.to_thread(check):
        assert time.monotonic() - t0 < timeout, f"{what} not within {timeout}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


async def test_a_service_registered_for_two_seconds_and_dropped_is_gone_from_every_table_within_grace(mesh: Mesh) -> None:
    grpc_target, _ = _cp(mesh)
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        call = await _register(channel, "evil", 1)
        await _wait("evil in every table", lambda: all("evil" in t for t in _tables(mesh).values()), 10)
        await asyncio.sleep(2.0)  # the attacker's lease lasts two seconds
        call.cancel()
        t_left = time.monotonic()
    took = await _wait("evil gone from every table", lambda: all("evil" not in t for t in _tables(mesh).values()),
                       GRACE_S + 5.0)
    print(f"evil gone from every sidecar {took:.2f}s after it left (grace {GRACE_S:g}s)")
    assert time.monotonic() - t_left >= GRACE_S - 0.5, "kept at least the grace period"
    assert all(st["mode"] == "controlplane" for st in mesh.sidecar_states().values())


async def test_300_fake_registrations_that_leave_are_gone_from_every_table_within_grace(mesh: Mesh) -> None:
    grpc_target, _ = _cp(mesh)
    real = {name: set(t) for name, t in _tables(mesh).items()}
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        calls = [await _register(channel, f"fake{n:03d}", n) for n in range(300)]
        await _wait("the fakes in every table", lambda: all(len(t) >= 300 for t in _tables(mesh).values()), 20)
        for call in calls:
            call.cancel()
    took = await _wait("every fake gone", lambda: _tables(mesh) == real, GRACE_S + 5.0 + 5.0)
    print(f"300 fake services gone from every sidecar {took:.2f}s after they left (grace {GRACE_S:g}s)")
    assert took <= GRACE_S + 5.0 + 2.0, "grace + 5 s, with a margin for a 2-core machine serving 300 streams"
    resp = await asyncio.to_thread(mesh.cli, "status", "--json")
    assert resp.returncode == 0
    for state in mesh.sidecar_states().values():
        assert state["guarded"] == [] and state["mode"] == "controlplane"
