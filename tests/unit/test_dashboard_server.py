"""The dashboard's round folding (no I/O) and its wire formats: a round with the control plane dead
still gives every sidecar and the graph; server-sent events are one data line each; a slow page is
dropped, not buffered; `status --watch` frames redraw in place on a terminal and append elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import math

from sidemesh.dashboard.config import DashboardConfig, parse_args
from sidemesh.dashboard.rates import MetricsSample
from sidemesh.dashboard.scrape import Round
from sidemesh.dashboard.server import QUEUE_PER_PAGE, Dashboard, sse
from sidemesh.status import CLEAR_LINE_END, CLEAR_SCREEN_END, HOME, Answers, frame
from sidemesh.statusreport import Target

INF = math.inf


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _state(service: str, instance: str, mode: str) -> dict[str, object]:
    return {"service": service, "instance": instance, "address": "127.0.0.1", "mode": mode, "mode_since": 1.0,
            "route_version": "7", "controlplane": {"connected": mode == "controlplane"}, "transitions": [],
            "services": {"artist": {"source": mode, "endpoints": []}}, "rejected": []}


def _round(wall: float, mono: float, n: float, *, cp_up: bool) -> Round:
    targets = [Target("127.0.0.1:15000", "song", "song-1"), Target("127.0.0.2:15000", "artist", "artist-1")]
    mode = "controlplane" if cp_up else "dns"
    answers = Answers(
        source="test", controlplane_http="127.0.0.3:15014",
        controlplane={"version": "7", "started_at": 1.0, "sidecars": []} if cp_up else None,
        controlplane_error=None if cp_up else "refused",
        sidecars=[(targets[0], _state("song", "song-1", mode), None), (targets[1], _state("artist", "artist-1", mode), None)],
        pods=None)
    song = MetricsSample({("outbound", "artist", 200): n, ("inbound", "-", 200): n},
                         {("outbound", "artist", mode): {0.01: n, INF: n}})
    artist = MetricsSample({("inbound", "-", 200): n}, {})
    return Round(wall, mono, answers, {"127.0.0.1:15000": (mono, song), "127.0.0.2:15000": (mono, artist)}, 0.004)


def test_a_round_without_the_control_plane_still_shows_every_sidecar_and_the_calls_between_them() -> None:
    clock = FakeClock()
    dash = Dashboard(parse_args(["--listen", "127.0.0.1:15080"]), monotonic=clock)
    dash.apply(_round(1000.0, 100.0, 0, cp_up=True))
    clock.t = 101.0
    dash.apply(_round(1001.0, 101.0, 200, cp_up=True))
    clock.t = 102.0
    tick = dash.apply(_round(1002.0, 102.0, 400, cp_up=False))
    view = tick["view"]
    assert [(s["instance"], s["mode"]) for s in view["sidecars"]] == [("artist-1", "dns"), ("song-1", "dns")]
    assert view["controlplane"]["reachable"] is False
    assert view["controlplane"]["as_of"] == 1001.0  # its last answer stays on the page, dated
    edges = {e["id"]: e for e in view["graph"]["edges"]}
    assert edges["song->artist"]["rps"] == 200.0 and edges["song->artist"]["source"] == "dns"
    assert [e["kind"] for e in tick["events"]] == ["controlplane-down"]
    assert tick["point"]["cp"] == 0 and tick["point"]["s"]["artist"] == [200.0, 0.0]


def test_an_event_is_one_data_line_of_json() -> None:
    msg = sse("tick", {"text": "a\nb"})
    assert msg.startswith(b"event: tick\ndata: {") and msg.endswith(b"}\n\n") and msg.count(b"\n") == 3
    assert json.loads(msg.split(b"data: ", 1)[1]) == {"text": "a\nb"}


async def test_a_page_that_does_not_keep_up_is_closed_instead_of_buffered() -> None:
    dash = Dashboard(DashboardConfig("127.0.0.1", 15080, "c", "a", None))
    slow, fast = dash.subscribe(), dash.subscribe()
    for i in range(QUEUE_PER_PAGE + 1):
        dash.publish(b"m%d" % i)
        if i < QUEUE_PER_PAGE:
            await fast.get()
    assert dash.pages == 1
    assert slow.get_nowait() is None  # the handler ends the stream; the browser reconnects
    assert await asyncio.wait_for(fast.get(), 1) == b"m%d" % QUEUE_PER_PAGE


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"json": False, "interval": 1.0, "control": "c:1", "admin": "a:1", **kw})


REPORT = {"controlplane": {"address": "cp:15014", "reachable": False, "error": "refused"}, "sidecars": [],
          "source": "test"}


def test_a_watch_frame_redraws_from_the_top_left_on_a_terminal_and_appends_elsewhere() -> None:
    on_tty = frame(REPORT, _args(), now=0.0, tty=True)
    assert on_tty.startswith(HOME) and on_tty.endswith(CLEAR_SCREEN_END)
    assert all(line.endswith(CLEAR_LINE_END) for line in on_tty[len(HOME):-len(CLEAR_SCREEN_END)].splitlines())
    assert "UNREACHABLE" in on_tty
    piped = frame(REPORT, _args(), now=0.0, tty=False)
    assert "\x1b" not in piped and piped.endswith("\n\n")
    line = frame(REPORT, _args(json=True), now=5.0, tty=False)
    assert json.loads(line) == {"at": 5.0, "report": REPORT} and line.count("\n") == 1


def test_a_sidecar_with_only_its_baseline_scrape_does_not_make_its_calls_look_like_outside_clients() -> None:
    clock = FakeClock()
    dash = Dashboard(parse_args([]), monotonic=clock)
    first = _round(1000.0, 100.0, 0, cp_up=True)
    del first.metrics["127.0.0.1:15000"]  # song's /metrics did not answer this round
    dash.apply(first)
    ids = []
    for i in (1, 2, 3):
        clock.t = 100.0 + i
        tick = dash.apply(_round(1000.0 + i, 100.0 + i, 200 * i, cp_up=True))
        ids.append({e["id"] for e in tick["view"]["graph"]["edges"]})
    assert all("clients->artist" not in edges for edges in ids), ids
    assert "song->artist" in ids[-1] and "clients->song" in ids[-1]
