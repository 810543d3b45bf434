"""The failover state machine of a sidecar: which source of routes it trusts.

Theory of operation
-------------------
A sidecar is in exactly one mode:

* ``connecting``   -- started, no table yet. Requests wait (bounded) for the mode to settle.
* ``controlplane`` -- the discovery stream is up and its last snapshot is applied.
* ``dns``          -- the stream is lost; endpoints come from DNS, and the last-known-good
                      table serves names DNS cannot answer.

Events move it (the table below is the whole truth; anything not in it raises
``IllegalTransition``, as h11's state machine does):

* ``snapshot_applied``      a snapshot passed validation and is now the table;
* ``stream_lost``           the stream failed, closed, or its keepalive timed out;
* ``initial_fetch_timeout`` no snapshot arrived within the initial fetch timeout (~2 s),
                            e.g. the control plane accepts connections but never answers.

A sidecar that starts during an outage therefore reaches ``dns`` at once (connection
refused is ``stream_lost``) or after the initial fetch timeout (a hung control plane),
which is what hurt most in the March 2022 outage: new proxies could never get routes.

This class does no I/O and reads no clock it was not given; the discovery client feeds it
events and the route book reads ``mode``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    CONNECTING = "connecting"
    CONTROLPLANE = "controlplane"
    DNS = "dns"


class Event(StrEnum):
    SNAPSHOT_APPLIED = "snapshot_applied"
    STREAM_LOST = "stream_lost"
    INITIAL_FETCH_TIMEOUT = "initial_fetch_timeout"


TRANSITIONS: dict[tuple[Mode, Event], Mode] = {
    (Mode.CONNECTING, Event.SNAPSHOT_APPLIED): Mode.CONTROLPLANE,
    (Mode.CONNECTING, Event.STREAM_LOST): Mode.DNS,
    (Mode.CONNECTING, Event.INITIAL_FETCH_TIMEOUT): Mode.DNS,
    (Mode.CONTROLPLANE, Event.SNAPSHOT_APPLIED): Mode.CONTROLPLANE,
    (Mode.CONTROLPLANE, Event.STREAM_LOST): Mode.DNS,
    (Mode.DNS, Event.SNAPSHOT_APPLIED): Mode.CONTROLPLANE,
    (Mode.DNS, Event.STREAM_LOST): Mode.DNS,
}


class IllegalTransition(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Transition:
    from_mode: Mode
    to_mode: Mode
    reason: str
    at: float  # wall-clock time (for /state and humans)


class FailoverState:
    """Current mode, when it was entered, and the recent transitions."""

    def __init__(self, *, clock: Callable[[], float] = time.time, history: int = 50) -> None:
        self._clock = clock
        self.mode = Mode.CONNECTING
        self.since = clock()
        self.history: deque[Transition] = deque(maxlen=history)

    def handle(self, event: Event, reason: str) -> Transition | None:
        """Apply ``event``; return the transition if the mode changed, else None."""
        try:
            new_mode = TRANSITIONS[(self.mode, event)]
        except KeyError:
            raise IllegalTransition(f"event {event} is not allowed in mode {self.mode}") from None
        if new_mode is self.mode:
            return None
        transition = Transition(self.mode, new_mode, reason, self._clock())
        self.mode = new_mode
        self.since = transition.at
        self.history.append(transition)
        return transition

    @property
    def settled(self) -> bool:
        """True once the sidecar knows where routes come from."""
        return self.mode is not Mode.CONNECTING
