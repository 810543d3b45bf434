"""The pure parts of `sidemesh status` and of the console: discovery, report shape, table, filters."""

from __future__ import annotations

import io
from pathlib import Path

from sidemesh.console import LogTailer, compact, is_notable, mesh_table
from sidemesh.ctl import describe_action, describe_scale
from sidemesh.statusreport import (
    build_report,
    controlplane_http_from_target,
    humanise_age,
    render_table,
    targets_from_pods,
    targets_from_seed,
)

STATE = {
    "service": "song", "instance": "song-1", "address": "172.18.0.5", "admin_port": 15000,
    "mode": "dns", "mode_since": 1000.0, "route_version": "7", "applied_at": 990.0, "last_update_age_s": 12.5,
    "controlplane": {"target": "controlplane:15010", "connected": False, "last_error": "UNAVAILABLE"},
    "transitions": [],
    "services": {
        "artist": {"source": "dns", "guard": None, "endpoints": [
            {"address": "172.18.0.7", "port": 15006, "instance": "artist-1", "source": "dns"},
            {"address": "172.18.0.8", "port": 15006, "instance": None, "source": "dns"}]},
        "song": {"source": "dns", "guard": None, "endpoints": [
            {"address": "172.18.0.5", "port": 15006, "instance": "song-1", "source": "dns"}]},
        "image": {"source": "cache", "guard": "dropped by control plane", "endpoints": [
            {"address": "172.18.0.9", "port": 15006, "instance": "image-1", "source": "cache"}]},
    },
    "rejected": [], "counters": {"inbound": 1, "outbound": 2},
}


def test_seed_discovery_asks_the_seed_and_every_other_endpoint_once() -> None:
    targets = targets_from_seed("127.0.0.1:15000", STATE)
    assert [t.admin for t in targets] == ["127.0.0.1:15000", "172.18.0.7:15000", "172.18.0.8:15000",
                                          "172.18.0.9:15000"]
    assert targets[1].service == "artist" and targets[3].service == "image"


def test_seed_discovery_without_an_answer_still_asks_the_seed() -> None:
    assert [t.admin for t in targets_from_seed("127.0.0.1:15000", None)] == ["127.0.0.1:15000"]


def test_pods_discovery_takes_only_pods_and_their_admin_port() -> None:
    pods = [{"name": "controlplane", "kind": "controlplane", "address": "127.10.0.2", "ports": {}},
            {"name": "artist-2", "kind": "pod", "service": "artist", "address": "127.10.1.2",
             "ports": {"admin": 15000}, "state": "killed"}]
    (t,) = targets_from_pods(pods)
    assert (t.admin, t.instance, t.state) == ("127.10.1.2:15000", "artist-2", "killed")


def test_controlplane_http_address_is_the_grpc_host_on_15014() -> None:
    assert controlplane_http_from_target("controlplane:15010") == "controlplane:15014"
    assert controlplane_http_from_target("127.10.0.2:15010") == "127.10.0.2:15014"
    assert controlplane_http_from_target(None) is None


def test_report_has_the_documented_shape_and_marks_unreachable_sidecars() -> None:
    targets = targets_from_seed("127.0.0.1:15000", STATE)
    answers = [(targets[0], STATE, None), (targets[1], None, "ClientConnectorError")]
    cp = {"version": "8", "warming_up": False, "faults": {},
          "sidecars": [{"node_id": "song-1", "service": "song", "address": "172.18.0.5", "acked_version": "7",
                        "status": "behind"}]}
    report = build_report("controlplane:15014", cp, None, answers, source="test")
    assert {"address", "reachable", "version"} <= report["controlplane"].keys()
    assert report["controlplane"]["version"] == "8" and report["controlplane"]["reachable"] is True
    keys = {"service", "instance", "address", "mode", "route_version", "mode_since", "last_update_age_s"}
    assert all(keys <= s.keys() for s in report["sidecars"])
    by_instance = {s["instance"]: s for s in report["sidecars"]}
    song = by_instance["song-1"]
    assert (song["mode"], song["route_version"], song["acked"], song["synced"]) == ("dns", "7", "7", "behind")
    assert song["guards"] == {"image": "dropped by control plane"}
    artist = by_instance["artist-1"]
    assert artist["reachable"] is False and artist["mode"] is None and artist["service"] == "artist"


def test_table_humanises_ages_and_says_what_is_unreachable() -> None:
    targets = targets_from_seed("127.0.0.1:15000", STATE)
    report = build_report("controlplane:15014", None, "ClientConnectorError",
                          [(targets[0], STATE, None), (targets[1], None, "refused")], source="test")
    table = render_table(report, now=1003.2)
    assert "UNREACHABLE (ClientConnectorError)" in table
    assert "3.2s ago" in table and "12.5s ago" in table
    assert "artist-1" in table and "UNREACHABLE" in table.splitlines()[-2] + table.splitlines()[-1]


def test_humanise_age() -> None:
    assert humanise_age(None) == "-"
    assert humanise_age(3.24) == "3.2s ago"
    assert humanise_age(252) == "4m12s ago"
    assert humanise_age(7500) == "2h05m ago"


def test_console_echoes_mode_changes_and_errors_but_not_access_lines() -> None:
    assert is_notable("ts level=INFO component=sidecar event=mode_change from=controlplane to=dns reason=x")
    assert is_notable("ts level=ERROR component=sidecar event=upstream_failed")
    assert is_notable("Traceback (most recent call last):")
    assert is_notable("ts level=WARNING component=sidecar event=snapshot_rejected version=3")
    assert not is_notable("ts level=INFO component=sidecar event=request method=GET path=/artists/1 code=200")


async def test_log_tailer_prints_only_new_complete_notable_lines(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("x level=INFO event=started\nx level=INFO event=mode_change to=dns\nx level=ERR")
    out = io.StringIO()
    tailer = LogTailer(lambda: {log: "artist-1/sidecar"}, out=out)
    await tailer.poll()
    assert out.getvalue() == "[artist-1/sidecar] x level=INFO event=mode_change to=dns\n"
    with log.open("a") as f:
        f.write("OR boom\n")
    await tailer.poll()
    assert out.getvalue().splitlines()[-1] == "[artist-1/sidecar] x level=ERROR boom"


def test_console_lines_drop_the_date_and_component_but_keep_time_level_and_event() -> None:
    line = ("2026-11-24 14:39:51,332 level=WARNING component=sidecar instance=artist-1 "
            "event=mode_change from=connecting to=controlplane")
    assert compact(line) == "14:39:51.332 WARNING event=mode_change from=connecting to=controlplane"
    assert compact("Traceback (most recent call last):") == "Traceback (most recent call last):"


def test_mesh_table_lists_name_address_ports_and_pids() -> None:
    table = mesh_table([
        {"name": "controlplane", "kind": "controlplane", "address": "127.10.0.2", "ports": {"grpc": 15010},
         "pid": 11, "state": "running"},
        {"name": "artist-1", "kind": "pod", "address": "127.10.1.1", "ports": {"app": 8080},
         "app_pid": 12, "sidecar_pid": 13, "state": "running"},
    ])
    assert "controlplane  127.10.0.2  grpc:15010  11" in table
    assert "app 12 sidecar 13" in table


def test_ctl_lines_say_what_happened() -> None:
    unit = {"name": "artist-2", "state": "killed", "changed": True, "before_pids": [5, 6], "pids": []}
    assert describe_action("kill", unit) == "killed artist-2 (pid 5, 6)"
    assert describe_action("kill", {**unit, "changed": False}) == "artist-2 was already killed"
    started = {"name": "controlplane", "state": "running", "changed": True, "address": "127.10.0.2",
               "pids": [9], "ready": True, "before": "killed"}
    assert describe_action("start", started) == "started controlplane at 127.10.0.2 (pid 9), ready"
    scale = {"service": "artist", "started": ["artist-2"], "removed": [], "ready_s": {"artist-2": 0.81},
             "pods": [{"name": "artist-1", "state": "running"}, {"name": "artist-2", "state": "running"}]}
    assert describe_scale(scale) == ("artist: started artist-2 (ready in 0.81 s); "
                                     "now artist-1 running, artist-2 running")


def test_faults_are_described_in_words_and_nothing_when_none() -> None:
    from sidemesh.statusreport import describe_faults

    assert describe_faults({"empty_snapshot": False, "dropped_services": []}) == ""
    assert describe_faults(None) == ""
    assert describe_faults({"empty_snapshot": True, "dropped_services": ["artist"]}) == "empty-snapshot, drop-service artist"


def test_status_also_asks_dns_for_peers_a_lagging_table_misses() -> None:
    """compose: a restarted replica is in Docker's DNS before every sidecar's cached answer has it."""
    from sidemesh.statusreport import dns_names

    state = {**STATE, "dns": {"template": "{service}", "servers": "system"}}
    assert dns_names(state) == {name: name for name in sorted(STATE["services"])}
    assert dns_names({**STATE, "dns": {"template": "{service}.mesh.local", "servers": ["127.10.0.3:15053"]}}) == {}
    known = {t.address for t in targets_from_seed("127.0.0.1:15000", STATE)}
    extra = targets_from_seed("127.0.0.1:15000", STATE, {"artist": ["172.20.0.99", *sorted(a for a in known if a)]})
    added = [t for t in extra if t.address not in known]
    assert [(t.admin, t.service) for t in added] == [("172.20.0.99:15000", "artist")]
