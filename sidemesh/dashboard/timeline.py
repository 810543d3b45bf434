"""The last minutes of the mesh: a point per round (request rate and errors per service, the
control plane up or down, sidecars per mode) and the events that explain them.

Events, each with the wall-clock time it happened:

- ``mode``: a sidecar changed failover mode. Taken from the sidecar's own ``/state``
  ``transitions`` (its clock, to the millisecond), so a change between two rounds is not
  lost and is placed where it happened; each is reported once.
- ``controlplane-down`` / ``controlplane-up``: the control plane stopped or started
  answering ``/status``. Where a ``sidemesh up`` says what happened to its process
  (``/pods``: killed, stopped, exited), the event says so. A control plane that answers
  with a new ``started_at`` was restarted between two rounds: both events are reported.

A round notices the control plane's going with up to a round's delay, while sidecars notice
within milliseconds (their stream breaks). So a ``controlplane-down`` is placed at the round
that noticed it or, if earlier, just before the first mode change since the last round that
saw it up: it went down no later than the first sidecar noticed. ``/pods`` and ``/status``
are asked in parallel, so a round may see the control plane gone while ``sidemesh up`` still
says it runs: the cause is then taken from the next round (the time stays the first round's).
Pure: the server feeds it each round's answers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

DOWN, UP, MODE = "controlplane-down", "controlplane-up", "mode"
MAX_EVENTS = 1000


class Timeline:
    """Points and events over the last ``history_s`` seconds."""

    def __init__(self, history_s: float, *, max_events: int = MAX_EVENTS) -> None:
        self.history_s = history_s
        self.points: deque[dict[str, Any]] = deque()
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._seen: dict[tuple[str, float, str, str], float] = {}
        self._cp_up: bool | None = None
        self._cp_started: float | None = None
        self._cp_seen_up: float | None = None  # the last round that saw it up
        self._down_cause: str | None = None
        self._down_noticed: float | None = None  # a round saw it gone while `sidemesh up` said running

    def observe(self, now: float, cp_status: Mapping[str, Any] | None, states: Mapping[str, Mapping[str, Any]],
                pods: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        """New events from one round: ``cp_status`` the control plane's ``/status`` (None when it did not
        answer), ``states`` instance -> its ``/state``, ``pods`` the ``sidemesh up`` units (None without one)."""
        modes = self._modes(now, states)
        new = modes + self._control_plane(now, cp_status, pods, modes)
        new.sort(key=lambda e: e["at"])
        self.events.extend(new)
        while self.events and self.events[0]["at"] < now - self.history_s:
            self.events.popleft()
        return new

    def record(self, now: float, services: Mapping[str, tuple[float, float]], cp_up: bool | None,
               modes: Mapping[str, int]) -> dict[str, Any]:
        """Append this round's point: service -> (requests/s, errors/s), control plane up, sidecars per mode."""
        point = {"t": round(now, 3), "s": {k: [round(r, 3), round(e, 3)] for k, (r, e) in sorted(services.items())},
                 "cp": None if cp_up is None else int(cp_up), "m": dict(sorted(modes.items()))}
        self.points.append(point)
        while self.points and self.points[0]["t"] < now - self.history_s:
            self.points.popleft()
        return point

    def history(self) -> dict[str, Any]:
        return {"points": list(self.points), "events": list(self.events), "history_s": self.history_s}

    def _control_plane(self, now: float, cp_status: Mapping[str, Any] | None,
                       pods: Sequence[Mapping[str, Any]] | None, modes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        up = cp_status is not None
        started = (cp_status or {}).get("started_at")
        unit = next((str(p.get("state")) for p in pods or [] if p.get("kind") == "controlplane"), None)
        events: list[dict[str, Any]] = []
        if up:
            self._down_noticed = None  # (a round that saw it gone, undecided: it is back)
        if self._cp_up is not None:
            if self._cp_up and not up:
                cause = unit if unit in ("killed", "stopped", "exited") else None
                if cause is None and unit == "running" and self._down_noticed is None:
                    # `sidemesh up` still says running: its answer may predate a kill in this very
                    # round (asked in parallel); the cause is decided next round, the time kept
                    self._down_noticed = now
                    return events
                first = now if self._down_noticed is None else self._down_noticed
                self._down_noticed = None
                self._down_cause = cause or "unreachable"
                changes = [*(e for e in self.events if e["kind"] == MODE), *modes]
                noticed = [e["at"] for e in changes if self._cp_seen_up is not None and e["at"] > self._cp_seen_up]
                at = min([first, *(t - 0.001 for t in noticed)])
                events.append(_event(at, DOWN, f"control plane {self._down_cause}"))
            elif up and not self._cp_up:
                what = "reachable again" if self._down_cause == "unreachable" else "started"
                events.append(_event(now, UP, f"control plane {what}"))
            elif up and started is not None and self._cp_started is not None and started != self._cp_started:
                events.append(_event(now, DOWN, "control plane restarted"))
                events.append(_event(now, UP, "control plane restarted"))
        self._cp_up = up
        if up:
            self._cp_seen_up = now
            if started is not None:
                self._cp_started = started
        return events

    def _modes(self, now: float, states: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        events = []
        for instance, state in sorted(states.items()):
            for t in state.get("transitions") or []:
                at = float(t.get("at") or 0.0)
                key = (instance, at, str(t.get("from")), str(t.get("to")))
                if key in self._seen or at < now - self.history_s:
                    continue
                self._seen[key] = at
                e = _event(at, MODE, f"{instance}: {t.get('from')} \u2192 {t.get('to')}")
                e.update({"instance": instance, "from": t.get("from"), "to": t.get("to"), "reason": t.get("reason")})
                events.append(e)
        for key, at in list(self._seen.items()):
            if at < now - self.history_s:
                del self._seen[key]
        return events


def _event(at: float, kind: str, text: str) -> dict[str, Any]:
    return {"at": round(at, 3), "kind": kind, "text": text}
