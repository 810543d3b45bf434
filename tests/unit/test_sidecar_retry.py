"""When a failed attempt is tried again (sidecar/retry.py): a pure rule, driven by its inputs."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.retry import MAX_ATTEMPTS, MAX_WALK, Failure, should_retry


def retry(failure: Failure, **kw: Any) -> bool:
    args: dict[str, Any] = {"attempts": 1, "endpoints": 3, "policy_retries": 0, "idempotent": True, "can_resend": True}
    args.update(kw)
    return should_retry(failure, **args)


def test_a_dead_pooled_connection_is_retried_on_each_endpoint_once_beyond_the_policy() -> None:
    assert [retry(Failure.DEAD_POOLED, attempts=n, endpoints=3) for n in (1, 2, 3)] == [True, True, False]


def test_a_dead_pooled_connection_on_a_one_endpoint_route_is_retried_once_on_it() -> None:
    assert [retry(Failure.DEAD_POOLED, attempts=n, endpoints=1) for n in (1, 2)] == [True, False]


def test_policy_retries_stop_at_the_maximum_whatever_the_policy_says() -> None:
    assert retry(Failure.RESET, attempts=MAX_ATTEMPTS - 1, endpoints=1, policy_retries=5)
    assert not retry(Failure.RESET, attempts=MAX_ATTEMPTS, endpoints=1, policy_retries=5)
    assert not retry(Failure.CONNECT, attempts=MAX_ATTEMPTS, endpoints=1, policy_retries=5)


def test_a_refused_connect_reaches_the_one_live_replica_behind_three_dead_ones() -> None:
    # scale 4 -> 1 with the control plane dead: DNS may still list three replicas that are gone
    assert [retry(Failure.CONNECT, attempts=n, endpoints=4) for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert [retry(Failure.APP_UNAVAILABLE, attempts=n, endpoints=4) for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert [retry(Failure.DEAD_POOLED, attempts=n, endpoints=4) for n in (1, 2, 3, 4)] == [True, True, True, False]


def test_walking_the_endpoints_stops_at_its_bound_however_many_there_are() -> None:
    assert retry(Failure.CONNECT, attempts=MAX_WALK - 1, endpoints=100)
    assert not retry(Failure.CONNECT, attempts=MAX_WALK, endpoints=100)
    assert not retry(Failure.DEAD_POOLED, attempts=MAX_WALK, endpoints=100)


def test_a_non_idempotent_request_is_not_retried_once_it_may_have_reached_the_app() -> None:
    for failure in (Failure.DEAD_POOLED, Failure.RESET):
        assert not retry(failure, idempotent=False, policy_retries=2)


def test_a_refused_connect_is_retried_for_any_method_while_the_request_is_still_held() -> None:
    assert retry(Failure.CONNECT, idempotent=False)
    assert retry(Failure.APP_UNAVAILABLE, idempotent=False)
    assert not retry(Failure.CONNECT, idempotent=False, can_resend=False)


def test_a_refused_connect_walks_the_endpoints_once_each() -> None:
    assert [retry(Failure.CONNECT, attempts=n, endpoints=2) for n in (1, 2)] == [True, False]


def test_a_reset_is_retried_only_within_the_policy() -> None:
    assert retry(Failure.RESET, policy_retries=1)
    assert not retry(Failure.RESET, attempts=2, policy_retries=1)
    assert not retry(Failure.RESET, policy_retries=0)


@pytest.mark.parametrize("failure", list(Failure))
def test_nothing_is_retried_when_the_request_cannot_be_sent_again(failure: Failure) -> None:
    assert not retry(failure, can_resend=False, policy_retries=2)
