"""The failover state machine and the reconnect backoff: pure logic, driven by events."""

from __future__ import annotations

import itertools

import pytest

from sidecar.backoff import BackoffPolicy, ExpBackoff
from sidecar.failover import TRANSITIONS, Event, FailoverState, IllegalTransition, Mode

LEGAL = sorted(TRANSITIONS.items())


def _state_in(mode: Mode, clock: itertools.count[int] | None = None) -> FailoverState:
    ticks = clock or itertools.count(100)
    state = FailoverState(clock=lambda: float(next(ticks)))
    path = {
        Mode.CONNECTING: [],
        Mode.CONTROLPLANE: [Event.SNAPSHOT_APPLIED],
        Mode.DNS: [Event.STREAM_LOST],
    }[mode]
    for event in path:
        state.handle(event, "setup")
    assert state.mode is mode
    return state


def test_transition_table_is_exactly_the_documented_one() -> None:
    assert TRANSITIONS == {
        (Mode.CONNECTING, Event.SNAPSHOT_APPLIED): Mode.CONTROLPLANE,
        (Mode.CONNECTING, Event.STREAM_LOST): Mode.DNS,
        (Mode.CONNECTING, Event.INITIAL_FETCH_TIMEOUT): Mode.DNS,
        (Mode.CONTROLPLANE, Event.SNAPSHOT_APPLIED): Mode.CONTROLPLANE,
        (Mode.CONTROLPLANE, Event.STREAM_LOST): Mode.DNS,
        (Mode.DNS, Event.SNAPSHOT_APPLIED): Mode.CONTROLPLANE,
        (Mode.DNS, Event.STREAM_LOST): Mode.DNS,
    }


@pytest.mark.parametrize(("start_event", "target"), LEGAL, ids=[f"{m}-{e}" for (m, e), _ in LEGAL])
def test_every_legal_transition_lands_in_its_target_mode(start_event: tuple[Mode, Event], target: Mode) -> None:
    start, event = start_event
    state = _state_in(start)
    before = len(state.history)
    since = state.since
    transition = state.handle(event, "because")
    assert state.mode is target
    if target is start:
        # staying put is not a transition: nothing logged, mode_since unchanged
        assert transition is None
        assert len(state.history) == before
        assert state.since == since
    else:
        assert transition is not None
        assert (transition.from_mode, transition.to_mode, transition.reason) == (start, target, "because")
        assert state.history[-1] == transition
        assert state.since == transition.at > since


@pytest.mark.parametrize(
    ("mode", "event"),
    [(m, e) for m in Mode for e in Event if (m, e) not in TRANSITIONS],
)
def test_an_event_not_in_the_table_raises_and_leaves_the_mode_alone(mode: Mode, event: Event) -> None:
    state = _state_in(mode)
    with pytest.raises(IllegalTransition):
        state.handle(event, "late timer")
    assert state.mode is mode


def test_initial_fetch_timeout_after_a_snapshot_is_illegal() -> None:
    # the route book guards this call; the machine itself must refuse it
    state = _state_in(Mode.CONTROLPLANE)
    with pytest.raises(IllegalTransition):
        state.handle(Event.INITIAL_FETCH_TIMEOUT, "late")


def test_sidecar_is_settled_only_once_it_left_connecting() -> None:
    state = FailoverState(clock=lambda: 1.0)
    assert state.mode is Mode.CONNECTING and not state.settled
    state.handle(Event.INITIAL_FETCH_TIMEOUT, "no snapshot within 2s")
    assert state.mode is Mode.DNS and state.settled
    state.handle(Event.SNAPSHOT_APPLIED, "v1")
    assert state.settled


def test_outage_and_recovery_history_reads_in_order() -> None:
    state = _state_in(Mode.CONNECTING)
    for event in (Event.SNAPSHOT_APPLIED, Event.STREAM_LOST, Event.STREAM_LOST, Event.SNAPSHOT_APPLIED):
        state.handle(event, event.value)
    assert [(t.from_mode, t.to_mode) for t in state.history] == [
        (Mode.CONNECTING, Mode.CONTROLPLANE),
        (Mode.CONTROLPLANE, Mode.DNS),
        (Mode.DNS, Mode.CONTROLPLANE),
    ]


def test_history_is_bounded() -> None:
    state = FailoverState(clock=lambda: 0.0, history=3)
    for _ in range(10):
        state.handle(Event.SNAPSHOT_APPLIED, "up")
        state.handle(Event.STREAM_LOST, "down")
    assert len(state.history) == 3


# ----- backoff -----


def test_backoff_uses_full_jitter_up_to_an_exponential_ceiling() -> None:
    policy = BackoffPolicy(base_s=0.1, cap_s=1.0, multiplier=2.0)
    top = ExpBackoff(policy, rng=lambda: 0.999999)
    ceilings = [top.next_delay() for _ in range(6)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0], rel=1e-5)
    bottom = ExpBackoff(policy, rng=lambda: 0.0)
    assert [bottom.next_delay() for _ in range(6)] == [0.0] * 6


def test_backoff_delay_is_the_random_fraction_of_the_ceiling() -> None:
    draws = iter([0.5, 0.25, 0.75])
    backoff = ExpBackoff(BackoffPolicy(base_s=0.2, cap_s=10.0), rng=lambda: next(draws))
    assert [backoff.next_delay() for _ in range(3)] == pytest.approx([0.1, 0.1, 0.6])


def test_backoff_reset_starts_again_from_the_base() -> None:
    backoff = ExpBackoff(BackoffPolicy(base_s=0.05, cap_s=1.0), rng=lambda: 1.0)
    for _ in range(8):
        backoff.next_delay()
    assert backoff.persistent
    backoff.reset()
    assert backoff.failures == 0 and not backoff.persistent
    assert backoff.next_delay() == pytest.approx(0.05)


def test_backoff_becomes_persistent_after_five_failures() -> None:
    backoff = ExpBackoff(BackoffPolicy(), rng=lambda: 0.5)
    flags = []
    for _ in range(6):
        backoff.next_delay()
        flags.append(backoff.persistent)
    assert flags == [False, False, False, False, True, True]


@pytest.mark.parametrize(
    "kwargs", [{"base_s": 0}, {"base_s": -1}, {"base_s": 2.0, "cap_s": 1.0}, {"multiplier": 0.5}]
)
def test_backoff_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)
