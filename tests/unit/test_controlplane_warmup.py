"""The restart-safety gate, driven by a fake clock (plain floats)."""

from __future__ import annotations

import pytest

from controlplane.model import KnownEndpoint
from controlplane.warmup import END_ALL_REGISTERED, END_FRESH_MESH, END_TIMEOUT, WarmupGate


def test_nothing_is_held_before_any_hello() -> None:
    gate = WarmupGate(1.0)
    assert gate.decide(0.0).hold is False
    assert not gate.ended


def test_hello_without_known_instances_never_holds_and_window_closes_after_timeout() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("artist-1", frozenset(), now=10.0)
    decision = gate.decide(10.0)
    assert decision.hold is False and decision.wait_s == pytest.approx(1.0)
    assert gate.decide(11.0).hold is False
    assert gate.end_reason == END_FRESH_MESH


def test_hello_naming_instances_holds_until_all_have_registered() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("artist-1", frozenset({"artist-1", "song-1", "image-1"}), now=0.0)
    held = gate.decide(0.1)
    assert held.hold is True
    assert held.missing == {"song-1", "image-1"}
    assert held.wait_s == pytest.approx(0.9)
    assert gate.holding(0.1) is True
    gate.on_hello("song-1", frozenset({"artist-1", "song-1", "image-1"}), now=0.2)
    assert gate.decide(0.2).missing == {"image-1"}
    gate.on_hello("image-1", frozenset(), now=0.3)
    assert gate.decide(0.3).hold is False
    assert gate.end_reason == END_ALL_REGISTERED
    assert gate.holding(0.3) is False


def test_hold_ends_at_timeout_counted_from_first_naming_hello() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("fresh-1", frozenset(), now=0.0)  # a fresh sidecar first: no wait from it
    gate.on_hello("artist-1", frozenset({"artist-2"}), now=0.5)
    assert gate.decide(1.4).hold is True
    decision = gate.decide(1.5)
    assert decision.hold is False
    assert (gate.end_reason, gate.missing_at_end) == (END_TIMEOUT, {"artist-2"})


def test_later_hellos_add_to_what_is_awaited_but_not_to_the_deadline() -> None:
    gate = WarmupGate(2.0)
    gate.on_hello("a", frozenset({"b"}), now=0.0)
    gate.on_hello("b", frozenset({"c"}), now=1.0)
    assert gate.decide(1.0).missing == {"c"}
    assert gate.decide(1.9).wait_s == pytest.approx(0.1)
    assert gate.decide(2.0).hold is False


def test_a_registered_instance_that_left_again_still_counts_as_heard_from() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("b", frozenset(), now=0.0)  # b came and (say) went
    gate.on_hello("a", frozenset({"b"}), now=0.1)
    assert gate.decide(0.1).hold is False
    assert gate.end_reason == END_ALL_REGISTERED


def test_once_ended_the_gate_never_holds_again() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("a", frozenset(), now=0.0)
    gate.decide(5.0)
    gate.on_hello("b", frozenset({"gone-1"}), now=6.0)  # a reconnect in normal operation
    assert gate.decide(6.0).hold is False
    assert gate.holding(6.0) is False


def test_zero_timeout_disables_waiting() -> None:
    gate = WarmupGate(0.0)
    gate.on_hello("a", frozenset({"b"}), now=0.0)
    assert gate.decide(0.0).hold is False
    assert gate.end_reason == END_TIMEOUT


def test_negative_timeout_is_refused() -> None:
    with pytest.raises(ValueError):
        WarmupGate(-1.0)


# --- known_endpoints: what a sidecar routes to through DNS, without instance ids ----------------

ARTIST_DNS = KnownEndpoint("artist", "127.10.1.7", 15006)
SONG_DNS = KnownEndpoint("song", "127.10.2.7", 15006)


def test_an_endpoint_only_hello_holds_pushes_until_an_instance_registers_at_that_endpoint() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("song-1", frozenset(), 0.0, endpoint=KnownEndpoint("song", "127.10.2.1", 15006),
                  known_endpoints=frozenset({ARTIST_DNS}))
    held = gate.decide(0.1)
    assert (held.hold, held.missing, held.missing_endpoints) == (True, frozenset(), {ARTIST_DNS})
    assert held.wait_s == pytest.approx(0.9)
    assert gate.holding(0.1) is True
    # same address, other port or other service: not the endpoint the sidecar routes to
    gate.on_hello("artist-x", frozenset(), 0.2, endpoint=KnownEndpoint("artist", "127.10.1.7", 15007))
    gate.on_hello("image-x", frozenset(), 0.3, endpoint=KnownEndpoint("image", "127.10.1.7", 15006))
    assert gate.decide(0.3).missing_endpoints == {ARTIST_DNS}
    gate.on_hello("artist-7", frozenset(), 0.4, endpoint=ARTIST_DNS)
    assert gate.decide(0.4).hold is False
    assert gate.end_reason == END_ALL_REGISTERED and gate.missing_endpoints_at_end == frozenset()


def test_an_unregistered_known_endpoint_stops_holding_at_the_timeout() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("song-1", frozenset(), 0.0, endpoint=SONG_DNS, known_endpoints=frozenset({ARTIST_DNS}))
    assert gate.decide(0.99).hold is True
    assert gate.decide(1.0).hold is False
    assert (gate.end_reason, gate.missing_endpoints_at_end) == (END_TIMEOUT, {ARTIST_DNS})


def test_the_senders_own_endpoint_never_waits() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("song-1", frozenset({"song-1"}), 0.0, endpoint=SONG_DNS, known_endpoints=frozenset({SONG_DNS}))
    decision = gate.decide(0.0)
    assert decision.hold is False and decision.missing_endpoints == frozenset()
    assert gate.holding(0.0) is False


def test_an_endpoint_registered_before_it_was_named_counts() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("artist-7", frozenset(), 0.0, endpoint=ARTIST_DNS)
    gate.on_hello("song-1", frozenset(), 0.1, endpoint=SONG_DNS, known_endpoints=frozenset({ARTIST_DNS}))
    assert gate.decide(0.1).hold is False
    assert gate.end_reason == END_ALL_REGISTERED


def test_instances_and_endpoints_are_both_awaited() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("song-1", frozenset({"image-1"}), 0.0, endpoint=SONG_DNS, known_endpoints=frozenset({ARTIST_DNS}))
    gate.on_hello("artist-7", frozenset(), 0.1, endpoint=ARTIST_DNS)
    held = gate.decide(0.1)
    assert (held.hold, held.missing, held.missing_endpoints) == (True, {"image-1"}, frozenset())
    gate.on_hello("image-1", frozenset(), 0.2, endpoint=KnownEndpoint("image", "127.10.3.1", 15006))
    assert gate.decide(0.2).hold is False


def test_known_endpoints_named_after_the_warmup_ended_never_hold() -> None:
    gate = WarmupGate(1.0)
    gate.on_hello("a", frozenset(), 0.0)
    gate.decide(5.0)
    gate.on_hello("song-1", frozenset(), 6.0, endpoint=SONG_DNS, known_endpoints=frozenset({ARTIST_DNS}))
    assert gate.decide(6.0).hold is False
    assert gate.holding(6.0) is False
