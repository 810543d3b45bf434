"""Each peer on its own inbound port: SRV answers turned into endpoints (pure), the choice between
SRV and A/AAAA (pure), and the resolver asking for both, driven by a fake backend and a fake clock.
No sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from dnsfallback import DnsConfig, DnsLookupError, LookupResult, ServiceResolver, SrvLookupResult
from dnsfallback.cache import DnsAnswer, fallback_to_a, srv_decides
from dnsfallback.srv import MAX_SRV_RECORDS, finish_srv, plan_srv, sort_endpoints
from sidecar.config import parse_config
from sidecar.model import Endpoint
from sidecar.routeplan import dns_endpoints

SRV_NAME = "_mesh-inbound._tcp.artist.mesh.local."
T = TypeVar("T")


def srv_rrset(*records: str, ttl: int = 5) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(SRV_NAME, ttl, dns.rdataclass.IN, dns.rdatatype.SRV, list(records))


def a_rrset(name: str, *addresses: str, ttl: int = 5) -> dns.rrset.RRset:
    rdtype = dns.rdatatype.AAAA if ":" in addresses[0] else dns.rdatatype.A
    return dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, rdtype, list(addresses))


# ----- answer -> endpoints (pure) ---------------------------------------------------------------


def test_each_srv_record_gives_its_targets_addresses_on_its_own_port() -> None:
    plan = plan_srv(SRV_NAME, srv_rrset("0 1 15006 artist-1.artist.mesh.local.", "0 1 15106 artist-2.artist.mesh.local."),
                    5.0, [a_rrset("artist-1.artist.mesh.local.", "127.10.1.1"),
                          a_rrset("artist-2.artist.mesh.local.", "127.10.1.2"),
                          a_rrset("artist-2.artist.mesh.local.", "::2")])
    assert plan.endpoints == (("127.10.1.1", 15006), ("127.10.1.2", 15106), ("::2", 15106))
    assert plan.unresolved == ()
    assert finish_srv(SRV_NAME, plan, []) == SrvLookupResult(plan.endpoints, 5.0)


def test_targets_missing_from_the_additional_section_are_left_to_look_up() -> None:
    plan = plan_srv(SRV_NAME, srv_rrset("0 1 15006 a.example.", "0 1 15106 b.example."), 5.0,
                    [a_rrset("a.example.", "10.0.0.1", ttl=3)])
    assert plan.endpoints == (("10.0.0.1", 15006),) and plan.ttl_s == 3.0
    assert plan.unresolved == (("b.example.", 15106),)
    result = finish_srv(SRV_NAME, plan, [LookupResult(("10.0.0.2", "10.0.0.3"), 2.0)])
    assert result == SrvLookupResult((("10.0.0.1", 15006), ("10.0.0.2", 15106), ("10.0.0.3", 15106)), 2.0)


def test_two_sidecars_on_one_address_are_two_endpoints() -> None:
    plan = plan_srv(SRV_NAME, srv_rrset("0 1 15106 pod.example.", "0 1 15006 pod.example."), 5.0,
                    [a_rrset("pod.example.", "10.0.0.1")])
    assert plan.endpoints == (("10.0.0.1", 15006), ("10.0.0.1", 15106))


def test_only_the_lowest_priority_is_used_and_no_target_or_port_zero_is_skipped() -> None:
    plan = plan_srv(SRV_NAME, srv_rrset("0 1 0 a.example.", "0 1 15006 .", "5 1 15006 b.example.",
                                        "9 1 15006 c.example."), 5.0)
    assert plan.unresolved == (("b.example.", 15006),)
    assert plan.skipped == 3


def test_an_srv_answer_that_offers_nothing_is_no_answer() -> None:
    for rrset in (None, srv_rrset("0 1 15006 ."), srv_rrset("0 1 0 a.example.")):
        with pytest.raises(DnsLookupError) as caught:
            plan_srv(SRV_NAME, rrset, 5.0)
        assert caught.value.reason == "no_answer"


def test_a_hostile_answer_makes_at_most_a_bounded_number_of_target_lookups() -> None:
    records = [f"0 1 {15000 + i} t{i}.example." for i in range(MAX_SRV_RECORDS + 50)]
    plan = plan_srv(SRV_NAME, srv_rrset(*records), 5.0)
    assert len(plan.unresolved) == MAX_SRV_RECORDS and plan.skipped == 50


def test_additional_records_of_other_names_or_classes_are_ignored() -> None:
    chaos = dns.rrset.from_text_list("a.example.", 5, dns.rdataclass.CH, dns.rdatatype.A, ["a.example. 1"])
    plan = plan_srv(SRV_NAME, srv_rrset("0 1 15006 a.example."), 5.0,
                    [chaos, a_rrset("elsewhere.example.", "10.6.6.6")])
    assert plan.endpoints == () and plan.unresolved == (("a.example.", 15006),)


def test_targets_that_do_not_resolve_are_left_out_and_none_at_all_is_a_failure() -> None:
    plan = plan_srv(SRV_NAME, srv_rrset("0 1 15006 a.example.", "0 1 15106 b.example."), 5.0)
    nx = DnsLookupError("", "a.example.", "nxdomain")
    timeout = DnsLookupError("", "b.example.", "timeout")
    assert finish_srv(SRV_NAME, plan, [nx, LookupResult(("10.0.0.2",), 5.0)]).endpoints == (("10.0.0.2", 15106),)
    with pytest.raises(DnsLookupError) as caught:
        finish_srv(SRV_NAME, plan, [nx, timeout])
    assert caught.value.reason == "timeout"  # the DNS could not say: a stale answer may keep serving
    with pytest.raises(DnsLookupError) as caught:
        finish_srv(SRV_NAME, plan, [nx, nx])
    assert caught.value.reason == "no_answer"


def test_endpoints_are_sorted_and_deduplicated_for_stable_comparison() -> None:
    assert sort_endpoints([("::1", 1), ("10.0.0.2", 2), ("10.0.0.10", 1), ("10.0.0.2", 1), ("10.0.0.2", 2)]) == (
        ("10.0.0.2", 1), ("10.0.0.2", 2), ("10.0.0.10", 1), ("::1", 1))


# ----- SRV or A/AAAA (pure) ------------------------------------------------------------------


def _answer(via: str) -> DnsAnswer:
    return DnsAnswer("artist", "n", (("10.0.0.1", 15106),), 5.0, 0.0, 5.0, via)  # type: ignore[arg-type]


SRV_OK = SrvLookupResult((("10.0.0.1", 15106),), 5.0)
SRV_NX = DnsLookupError("artist", SRV_NAME, "nxdomain")
SRV_GARBAGE = DnsLookupError("artist", SRV_NAME, "bad_response", "FormError")
A_OK = LookupResult(("10.0.0.1",), 5.0)


def test_srv_endpoints_decide_whatever_came_before() -> None:
    for previous in (None, _answer("a"), _answer("srv")):
        assert srv_decides(SRV_OK, previous) is SRV_OK


def test_without_srv_records_the_a_records_decide() -> None:
    for previous in (None, _answer("a"), _answer("srv")):
        assert srv_decides(SRV_NX, previous) is None
    assert fallback_to_a(SRV_NX, A_OK) is A_OK


def test_srv_garbage_before_any_srv_answer_lets_the_a_records_decide() -> None:
    assert srv_decides(SRV_GARBAGE, None) is None
    assert srv_decides(SRV_GARBAGE, _answer("a")) is None


def test_a_transport_failure_after_an_srv_answer_keeps_that_answer_rather_than_guess_the_port() -> None:
    assert srv_decides(SRV_GARBAGE, _answer("srv")) is SRV_GARBAGE


def test_when_both_fail_the_a_failure_counts_and_the_srv_cause_is_kept() -> None:
    a_error = DnsLookupError("artist", "artist.mesh.local", "nxdomain")
    error = fallback_to_a(SRV_GARBAGE, a_error)
    assert isinstance(error, DnsLookupError) and error.reason == "nxdomain"
    assert SRV_NAME in str(error) and "bad_response" in str(error)


def test_route_endpoints_take_the_port_dns_gave_each_address() -> None:
    from dnsfallback import CachedLookup

    lookup = CachedLookup(_answer("srv"), None, True)
    assert dns_endpoints(lookup) == (Endpoint("10.0.0.1", 15106, "10.0.0.1"),)


# ----- the resolver asking for both ----------------------------------------------------------


class SrvBackend:
    """SRV and A/AAAA answers from dicts; anything else is NXDOMAIN; counts lookups."""

    def __init__(self) -> None:
        self.a: dict[str, LookupResult | Exception] = {}
        self.srv: dict[str, SrvLookupResult | Exception] = {}
        self.calls: list[str] = []

    async def lookup(self, name: str) -> LookupResult:
        self.calls.append(name)
        return self._answer(self.a.get(name), name)

    async def lookup_srv(self, name: str) -> SrvLookupResult:
        self.calls.append(name)
        return self._answer(self.srv.get(name), name)

    @staticmethod
    def _answer(outcome: T | Exception | None, name: str) -> T:
        if outcome is None:
            raise DnsLookupError("", name, "nxdomain")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CONFIG = DnsConfig(template="{service}.mesh.local", port=15006, srv=True, negative_ttl_s=1.0)
A_NAME = "artist.mesh.local"
SRV = "_mesh-inbound._tcp.artist.mesh.local"


@pytest.fixture
async def srv_dns() -> AsyncIterator[tuple[SrvBackend, Clock, Callable[..., ServiceResolver]]]:
    backend, clock = SrvBackend(), Clock()
    made: list[ServiceResolver] = []

    def make(config: DnsConfig = CONFIG) -> ServiceResolver:
        made.append(ServiceResolver(config, clock=clock, backend=backend))
        return made[-1]

    yield backend, clock, make
    for resolver in made:
        await resolver.close()
    lingering = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert lingering == [], f"tasks left behind: {lingering}"


async def test_a_peer_found_through_srv_is_reached_on_its_own_inbound_port(srv_dns) -> None:
    backend, _clock, make = srv_dns
    backend.srv[SRV] = SrvLookupResult((("10.0.0.1", 15106),), 5.0)
    backend.a[A_NAME] = LookupResult(("10.0.0.1",), 5.0)
    answer = await make().resolve("artist")
    assert answer.endpoints == (("10.0.0.1", 15106),) and answer.via == "srv" and answer.name == SRV


async def test_without_srv_records_the_a_records_serve_on_our_own_inbound_port(srv_dns) -> None:
    backend, _clock, make = srv_dns
    backend.a[A_NAME] = LookupResult(("10.0.0.1", "10.0.0.2"), 5.0)
    answer = await make().resolve("artist")
    assert answer.endpoints == (("10.0.0.1", 15006), ("10.0.0.2", 15006)) and answer.via == "a"


async def test_srv_is_not_asked_unless_configured(srv_dns) -> None:
    backend, _clock, make = srv_dns
    backend.a[A_NAME] = LookupResult(("10.0.0.1",), 5.0)
    answer = await make(DnsConfig(template="{service}.mesh.local", port=15006)).resolve("artist")
    assert answer.endpoints == (("10.0.0.1", 15006),) and backend.calls == [A_NAME]


async def test_srv_answers_are_cached_for_their_ttl(srv_dns) -> None:
    backend, clock, make = srv_dns
    backend.srv[SRV] = SrvLookupResult((("10.0.0.1", 15106),), 5.0)
    resolver = make()
    first = await resolver.resolve("artist")
    clock.now += 4.9
    assert await resolver.resolve("artist") is first
    assert backend.calls.count(SRV) == 1
    backend.srv[SRV] = SrvLookupResult((("10.0.0.1", 15206),), 5.0)
    clock.now += 0.2
    assert (await resolver.resolve("artist")).endpoints == (("10.0.0.1", 15206),)


async def test_srv_garbage_falls_back_to_the_a_records_and_is_logged(srv_dns, caplog) -> None:
    backend, _clock, make = srv_dns
    backend.srv[SRV] = DnsLookupError("", SRV, "bad_response", "FormError: truncated SRV rdata")
    backend.a[A_NAME] = LookupResult(("10.0.0.1",), 5.0)
    with caplog.at_level(logging.INFO, logger="dnsfallback"):
        answer = await make().resolve("artist")
    assert answer.endpoints == (("10.0.0.1", 15006),)
    assert any("event=dns_srv_unusable" in r.getMessage() and "reason=bad_response" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records)


async def test_a_backend_that_breaks_on_srv_does_not_break_the_lookup(srv_dns) -> None:
    backend, _clock, make = srv_dns
    backend.srv[SRV] = ValueError("a bug in the SRV parsing")
    backend.a[A_NAME] = LookupResult(("10.0.0.1",), 5.0)
    assert (await make().resolve("artist")).endpoints == (("10.0.0.1", 15006),)


async def test_a_timeout_after_an_srv_answer_serves_it_stale_instead_of_switching_ports(srv_dns) -> None:
    backend, clock, make = srv_dns
    backend.srv[SRV] = SrvLookupResult((("10.0.0.1", 15106),), 2.0)
    backend.a[A_NAME] = LookupResult(("10.0.0.1",), 2.0)
    resolver = make()
    await resolver.resolve("artist")
    backend.srv[SRV] = DnsLookupError("", SRV, "timeout")
    clock.now += 3.0
    stale = await resolver.resolve("artist")
    assert stale.endpoints == (("10.0.0.1", 15106),) and stale.expires_at < clock.now
    lookup = resolver.peek("artist")
    assert lookup is not None and lookup.error is not None and lookup.error.reason == "timeout"


async def test_srv_nxdomain_after_an_srv_answer_moves_to_the_a_records(srv_dns) -> None:
    backend, clock, make = srv_dns
    backend.srv[SRV] = SrvLookupResult((("10.0.0.1", 15106),), 2.0)
    backend.a[A_NAME] = LookupResult(("10.0.0.1",), 2.0)
    resolver = make()
    changes: list[tuple[tuple[str, int], ...]] = []
    resolver.on_change(lambda _s, lookup: changes.append(lookup.answer.endpoints if lookup.answer else ()))
    await resolver.resolve("artist")
    del backend.srv[SRV]
    clock.now += 3.0
    assert (await resolver.resolve("artist")).endpoints == (("10.0.0.1", 15006),)
    # the same address on another port is a change the route book must hear of
    assert changes == [(("10.0.0.1", 15106),), (("10.0.0.1", 15006),)]


async def test_when_both_fail_the_failure_names_both(srv_dns) -> None:
    _backend, _clock, make = srv_dns
    with pytest.raises(DnsLookupError) as caught:
        await make().resolve("artist")
    assert caught.value.reason == "nxdomain" and caught.value.service == "artist" and SRV in str(caught.value)


async def test_a_slow_a_lookup_does_not_hold_up_an_srv_answer(srv_dns) -> None:
    backend, _clock, make = srv_dns
    backend.srv[SRV] = SrvLookupResult((("10.0.0.1", 15106),), 5.0)
    never = asyncio.Event()

    async def stuck(name: str) -> LookupResult:
        await never.wait()
        raise AssertionError("unreachable")

    backend.lookup = stuck  # type: ignore[method-assign]
    answer = await asyncio.wait_for(make().resolve("artist"), 1.0)
    assert answer.via == "srv"


# ----- the sidecar's flag ----------------------------------------------------------------------


def test_the_sidecar_asks_srv_only_when_told_by_flag_or_environment() -> None:
    base = ["--service", "song", "--insecure", "--address", "127.0.0.1"]
    assert parse_config(base, env={}).dns.srv is False
    assert parse_config([*base, "--dns-srv"], env={}).dns.srv is True
    assert parse_config(base, env={"SIDEMESH_DNS_SRV": "1"}).dns.srv is True
    assert parse_config([*base, "--no-dns-srv"], env={"SIDEMESH_DNS_SRV": "1"}).dns.srv is False
    config = parse_config([*base, "--dns-srv", "--dns-template", "{service}.mesh.local", "--inbound-port", "15106"],
                          env={})
    assert config.dns.srv_name_for("artist") == SRV and config.dns.port == 15106
