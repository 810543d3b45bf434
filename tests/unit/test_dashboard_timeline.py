"""The timeline's points and events: sidecars' own transitions once each, control-plane kills,
starts and restarts, and points trimmed to the history."""

from __future__ import annotations

from typing import Any

from sidemesh.dashboard.timeline import DOWN, MODE, UP, Timeline

CP = {"version": "7", "started_at": 1000.0, "sidecars": []}


def _pods(state: str) -> list[dict[str, Any]]:
    return [{"kind": "controlplane", "name": "controlplane", "state": state}, {"kind": "pod", "state": "running"}]


def _state(*transitions: tuple[str, str, float]) -> dict[str, Any]:
    return {"transitions": [{"from": f, "to": t, "at": at, "reason": "r"} for f, t, at in transitions]}


def test_each_sidecar_transition_is_reported_once_at_the_sidecars_own_time() -> None:
    tl = Timeline(300)
    states = {"song-1": _state(("controlplane", "dns", 1500.25))}
    first = tl.observe(1500.5, CP, states, None)
    again = tl.observe(1501.0, CP, states, None)
    assert [(e["kind"], e["instance"], e["from"], e["to"], e["at"]) for e in first] == [
        (MODE, "song-1", "controlplane", "dns", 1500.25)]
    assert again == []


def test_transitions_older_than_the_history_are_not_reported() -> None:
    tl = Timeline(60)
    assert tl.observe(2000.0, CP, {"song-1": _state(("connecting", "dns", 1000.0))}, None) == []


def test_a_killed_control_plane_is_marked_no_later_than_the_first_sidecar_noticed_and_its_start_after() -> None:
    tl = Timeline(300)
    assert tl.observe(100.0, CP, {}, _pods("running")) == []  # the first look sets the baseline
    down = tl.observe(100.5, None, {"song-1": _state(("controlplane", "dns", 100.2))}, _pods("killed"))
    assert [(e["kind"], e.get("text")) for e in down] == [
        (DOWN, "control plane killed"), (MODE, "song-1: controlplane \u2192 dns")]
    assert down[0]["at"] < 100.2
    assert tl.observe(101.0, None, {}, _pods("running")) == []  # starting, not answering yet
    up = tl.observe(101.5, {**CP, "started_at": 101.2}, {}, _pods("running"))
    assert [(e["kind"], e["text"]) for e in up] == [(UP, "control plane started")]


def test_without_sidemesh_up_a_silent_control_plane_is_unreachable_then_reachable_again() -> None:
    tl = Timeline(300)
    tl.observe(100.0, CP, {}, None)
    assert [e["text"] for e in tl.observe(100.5, None, {}, None)] == ["control plane unreachable"]
    assert [e["text"] for e in tl.observe(101.0, CP, {}, None)] == ["control plane reachable again"]


def test_a_restart_between_two_rounds_shows_as_down_and_up() -> None:
    tl = Timeline(300)
    tl.observe(100.0, CP, {}, None)
    events = tl.observe(100.5, {**CP, "started_at": 1100.3}, {}, None)
    assert [(e["kind"], e["text"]) for e in events] == [(DOWN, "control plane restarted"), (UP, "control plane restarted")]


def test_points_and_events_older_than_the_history_are_dropped() -> None:
    tl = Timeline(10)
    for t in range(30):
        tl.record(float(t), {"song": (200.0, 0.0)}, True, {"controlplane": 3})
    tl.observe(29.0, CP, {"song-1": _state(("controlplane", "dns", 25.0))}, None)
    h = tl.history()
    assert [p["t"] for p in h["points"]][0] == 19.0
    assert h["points"][-1] == {"t": 29.0, "s": {"song": [200.0, 0.0]}, "cp": 1, "m": {"controlplane": 3}}
    assert [e["at"] for e in h["events"]] == [25.0]


def test_a_kill_that_sidemesh_up_reports_a_round_late_is_still_marked_killed_at_the_first_round() -> None:
    tl = Timeline(300)
    assert tl.observe(100.0, CP, {}, _pods("running")) == []
    # /pods answered before the kill, /status after: gone, but `sidemesh up` still says running
    assert tl.observe(101.0, None, {"song-1": _state(("controlplane", "dns", 100.9))}, _pods("running")) == [
        {"at": 100.9, "kind": MODE, "text": "song-1: controlplane \u2192 dns", "instance": "song-1",
         "from": "controlplane", "to": "dns", "reason": "r"}]
    down = tl.observe(102.0, None, {"song-1": _state(("controlplane", "dns", 100.9))}, _pods("killed"))
    assert [(e["kind"], e["text"], e["at"]) for e in down] == [(DOWN, "control plane killed", 100.899)]


def test_a_control_plane_that_stops_answering_while_running_is_unreachable_from_the_second_round() -> None:
    tl = Timeline(300)
    tl.observe(100.0, CP, {}, _pods("running"))
    assert tl.observe(101.0, None, {}, _pods("running")) == []
    assert [(e["kind"], e["text"], e["at"]) for e in tl.observe(102.0, None, {}, _pods("running"))] == [
        (DOWN, "control plane unreachable", 101.0)]
    assert [(e["kind"], e["text"]) for e in tl.observe(103.0, CP, {}, _pods("running"))] == [
        (UP, "control plane reachable again")]
