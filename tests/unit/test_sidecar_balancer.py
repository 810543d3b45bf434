"""Endpoint picking: round robin, least-request, ejection, panic mode. Pure, with a fake clock."""

from __future__ import annotations

from collections import Counter

import pytest

from sidecar.balancer import EndpointHealth, ResolvedRoute
from sidecar.model import LB_LEAST_REQUEST, Endpoint, Policy, Source

EPS = tuple(Endpoint(f"127.0.0.{i}", 15006, f"artist-{i}") for i in (1, 2, 3))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _route(health: EndpointHealth, *, lb: str = "round_robin", rand: object = None) -> ResolvedRoute:
    return ResolvedRoute("artist", EPS, Source.CONTROLPLANE, health, Policy(lb=lb), rand=rand or (lambda n: 0))  # type: ignore[arg-type]


def test_round_robin_spreads_calls_evenly() -> None:
    route = _route(EndpointHealth())
    picks = Counter(route.pick() for _ in range(300))
    assert picks == {EPS[0]: 100, EPS[1]: 100, EPS[2]: 100}


def test_round_robin_visits_endpoints_in_turn() -> None:
    route = _route(EndpointHealth())
    assert [route.pick() for _ in range(4)] == [EPS[0], EPS[1], EPS[2], EPS[0]]


def test_round_robin_starts_at_a_random_endpoint() -> None:
    route = ResolvedRoute("artist", EPS, Source.CONTROLPLANE, EndpointHealth(), rand=lambda n: 2)
    assert route.pick() == EPS[2]


def test_round_robin_skips_an_ejected_endpoint_until_its_ejection_expires() -> None:
    clock = FakeClock()
    health = EndpointHealth(eject_s=3.0, clock=clock)
    route = _route(health)
    health.eject(EPS[1].key)
    assert EPS[1] not in {route.pick() for _ in range(30)}
    clock.now += 3.0
    assert EPS[1] in {route.pick() for _ in range(3)}
    assert not health.ejected  # expired ejections are forgotten


def test_all_endpoints_ejected_still_picks_one_in_panic_mode() -> None:
    health = EndpointHealth(clock=FakeClock())
    for ep in EPS:
        health.eject(ep.key)
    route = _route(health)
    picks = Counter(route.pick() for _ in range(30))
    assert set(picks) == set(EPS)  # spread, not stuck on one


def test_exclude_avoids_the_endpoint_that_just_failed() -> None:
    route = _route(EndpointHealth())
    assert all(route.pick(exclude=EPS[0]) != EPS[0] for _ in range(30))


def test_exclude_of_the_only_healthy_endpoint_falls_back_to_the_ejected_others() -> None:
    health = EndpointHealth(clock=FakeClock())
    health.eject(EPS[1].key)
    health.eject(EPS[2].key)
    route = _route(health)
    picks = {route.pick(exclude=EPS[0]) for _ in range(10)}
    assert picks <= {EPS[1], EPS[2]} and picks


def test_single_endpoint_route_excluding_it_still_returns_it() -> None:
    route = ResolvedRoute("artist", EPS[:1], Source.DNS, EndpointHealth(), rand=lambda n: 0)
    assert route.pick(exclude=EPS[0]) == EPS[0]


def test_least_request_prefers_the_idle_endpoint() -> None:
    health = EndpointHealth()
    for _ in range(5):
        health.started(EPS[0].key)
    draws = iter([0, 1] * 50)
    route = _route(health, lb=LB_LEAST_REQUEST, rand=lambda n: next(draws) % n)
    assert {route.pick() for _ in range(20)} == {EPS[1]}


def test_least_request_skips_ejected_and_excluded_endpoints() -> None:
    health = EndpointHealth(clock=FakeClock())
    health.eject(EPS[0].key)
    route = ResolvedRoute("artist", EPS, Source.CONTROLPLANE, health, Policy(lb=LB_LEAST_REQUEST))
    assert {route.pick(exclude=EPS[1]) for _ in range(20)} == {EPS[2]}


def test_in_flight_counts_return_to_zero() -> None:
    health = EndpointHealth()
    health.started(EPS[0].key)
    health.started(EPS[0].key)
    health.finished(EPS[0].key)
    assert health.active == {EPS[0].key: 1}
    health.finished(EPS[0].key)
    assert health.active == {}


def test_a_route_without_endpoints_is_refused() -> None:
    with pytest.raises(ValueError):
        ResolvedRoute("artist", (), Source.CONTROLPLANE, EndpointHealth())


@pytest.mark.parametrize("lb", ["round_robin", LB_LEAST_REQUEST])
def test_exclude_skips_every_endpoint_already_tried(lb: str) -> None:
    route = _route(EndpointHealth(), lb=lb, rand=lambda n: n - 1)
    assert {route.pick(exclude=(EPS[0], EPS[2])) for _ in range(10)} == {EPS[1]}
    assert {route.pick(exclude=[EPS[1], EPS[2]]) for _ in range(10)} == {EPS[0]}


def test_tried_endpoints_are_skipped_before_ejected_ones_are_tried() -> None:
    health = EndpointHealth(clock=FakeClock())
    health.eject(EPS[2].key)
    route = _route(health)
    assert {route.pick(exclude=(EPS[0], EPS[1])) for _ in range(5)} == {EPS[2]}


def test_when_every_endpoint_was_tried_any_one_is_picked() -> None:
    route = _route(EndpointHealth())
    picks = Counter(route.pick(exclude=EPS) for _ in range(30))
    assert set(picks) == set(EPS)
