"""The route book driven by hand: snapshots and stream events fed in, a real ServiceResolver
over a fake DNS backend answering from a dict. No sockets; only short real-time waits for
the book's own sweep timer (polled with a deadline).

Each test is one transition of the rule "a sidecar never knows less after a transition".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import MappingProxyType

import pytest

from dnsfallback import DnsConfig, DnsLookupError, LookupResult, ServiceResolver
from sidecar.errors import NoEndpoints
from sidecar.failover import Mode
from sidecar.model import Endpoint, RouteTable, ServiceEntry, Source
from sidecar.routing import RouteBook

A1 = Endpoint("127.0.1.1", 15006, "artist-1")
S1 = Endpoint("127.0.2.1", 15006, "song-1")
I1 = Endpoint("127.0.3.1", 15006, "image-1")


class DictBackend:
    """DNS answers from a dict; anything else is NXDOMAIN."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[str, ...]] = {}

    async def lookup(self, name: str) -> LookupResult:
        addresses = self.answers.get(name)
        if addresses is None:
            raise DnsLookupError("", name, "nxdomain")
        return LookupResult(addresses, 1.0)


Dns = tuple[DictBackend, ServiceResolver]


def _table(version: str, **services: tuple[Endpoint, ...]) -> RouteTable:
    return RouteTable(version, "n", MappingProxyType({n: ServiceEntry(n, eps) for n, eps in services.items()}))


@pytest.fixture
async def dns() -> AsyncIterator[tuple[DictBackend, ServiceResolver]]:
    backend = DictBackend()
    resolver = ServiceResolver(DnsConfig(template="{service}.mesh.local", port=15006, negative_ttl_s=0.2), backend=backend)
    yield backend, resolver
    await resolver.close()


async def _eventually(what: str, check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not within {timeout}s"
        await asyncio.sleep(0.02)


def _book(resolver: ServiceResolver, **kw: float) -> RouteBook:
    return RouteBook(resolver=resolver, **kw)


async def test_a_partial_first_snapshot_after_dns_mode_keeps_every_name_the_sidecar_routed_through_dns(dns: Dns) -> None:
    backend, resolver = dns
    backend.answers = {"artist.mesh.local": ("127.0.1.1",), "image.mesh.local": ("127.0.3.1",)}
    book = _book(resolver)
    book.on_stream_lost("connection refused")  # connecting -> dns: the control plane is not up yet
    assert (await book.route_slow("artist")).source is Source.DNS
    assert (await book.route_slow("image")).source is Source.DNS
    book.on_config_update(_table("v1", song=(S1,)))  # artist and image have not registered yet
    assert book.mode is Mode.CONTROLPLANE
    assert book.route("artist") is not None and book.route("image") is not None
    state = book.state()
    assert {g["service"]: g["origin"] for g in state["guarded"]} == {"artist": "dns", "image": "dns"}
    assert state["services"]["artist"]["guard"] and state["services"]["artist"]["listed"] is False
    book.on_config_update(_table("v2", song=(S1,), artist=(A1,), image=(I1,)))
    assert book.route("artist").source is Source.CONTROLPLANE  # type: ignore[union-attr]
    assert book.state()["guarded"] == []
    book.close()


async def test_controlplane_mode_looks_a_name_up_in_dns_before_it_answers_503(dns: Dns) -> None:
    backend, resolver = dns
    backend.answers = {"lyrics.mesh.local": ("127.0.4.1",)}
    book = _book(resolver)
    book.on_config_update(_table("v1", artist=(A1,)))
    route = await book.route_slow("lyrics")
    assert route.source is Source.DNS and [e.address for e in route.endpoints] == ["127.0.4.1"]
    assert book.state()["dns_names"] == ["lyrics"]
    with pytest.raises(NoEndpoints) as info:
        await book.route_slow("nosuch")
    assert "not listed by snapshot v1" in info.value.message and "nxdomain" in info.value.message
    assert info.value.status == 503
    book.close()


async def test_a_restarted_control_plane_that_has_not_heard_from_image_does_not_take_it_away(dns: Dns) -> None:
    backend, resolver = dns
    backend.answers = {"image.mesh.local": ("127.0.3.1",)}
    book = _book(resolver)
    book.on_config_update(_table("v1", artist=(A1,), image=(I1,)))
    book.on_stream_lost("UNAVAILABLE")
    assert book.route("image") is not None
    book.on_config_update(_table("v2", artist=(A1,)))  # the fresh control plane pushed early
    route = book.route("image")
    assert route is not None and [e.address for e in route.endpoints] == ["127.0.3.1"]
    assert [g["service"] for g in book.state()["guarded"]] == ["image"]
    book.close()


async def test_a_dropped_service_dns_already_called_nxdomain_is_released_after_the_grace(dns: Dns) -> None:
    backend, resolver = dns
    book = _book(resolver, guard_grace_s=0.3, sweep_interval_s=0.05)
    book.on_config_update(_table("v1", artist=(A1,), evil=(Endpoint("127.0.9.9", 15006, "evil-1"),)))
    with pytest.raises(DnsLookupError):
        await resolver.resolve("evil")  # NXDOMAIN is cached before the drop: no change callback will come
    book.on_config_update(_table("v2", artist=(A1,)))
    assert book.route("evil") is not None, "kept during the grace period"
    t0 = asyncio.get_running_loop().time()
    await _eventually("evil released", lambda: book.route("evil") is None)
    held = asyncio.get_running_loop().time() - t0
    print(f"guard on evil held {held:.2f}s (grace 0.3s)")
    assert held >= 0.25
    assert book.state()["guarded"] == [] and book.counters.released == 1
    book.close()


async def test_a_guard_dns_still_answers_for_is_kept(dns: Dns) -> None:
    backend, resolver = dns
    backend.answers = {"artist.mesh.local": ("127.0.1.1",)}
    book = _book(resolver, guard_grace_s=0.1, sweep_interval_s=0.05)
    book.on_config_update(_table("v1", artist=(A1,), image=(I1,)))
    book.on_config_update(_table("v2", image=(I1,)))
    await asyncio.sleep(0.5)  # ten sweeps and several refreshes of artist's answer
    route = book.route("artist")
    assert route is not None and route.source in (Source.DNS, Source.CACHE)
    book.close()


async def test_names_dns_disowns_are_forgotten_so_the_book_stays_bounded(dns: Dns) -> None:
    backend, resolver = dns
    backend.answers = {"temp.mesh.local": ("127.0.5.1",)}
    book = _book(resolver, sweep_interval_s=0.05)
    book.on_config_update(_table("v1", artist=(A1,)))
    await book.route_slow("temp")
    assert book.state()["dns_names"] == ["temp"]
    del backend.answers["temp.mesh.local"]
    await _eventually("temp forgotten", lambda: book.state()["dns_names"] == [] and book.route("temp") is None)
    assert "temp" not in resolver.watched()
    book.close()
