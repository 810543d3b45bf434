"""The lyrics example on a real mesh, onboarded by its mesh file alone.

`sidemesh up -f examples/lyrics/mesh.toml` runs the demo's services and lyrics, a standard-
library program no sidemesh code knows, with its sidecar, its join token and its
authorization rule (lyrics->song) from the file, in secure mode (mutual TLS between
sidecars). The front door is lyrics; lyrics calls song through its sidecar. Then the
control plane dies: every call lyrics makes to song keeps working, through DNS.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.mesh import Mesh, get_json, running_mesh
from tests.support import REPO

pytestmark = pytest.mark.timeout(120)

MESH_FILE = REPO / "examples" / "lyrics" / "mesh.toml"


def _get(url: str, *, proxy: str | None = None) -> tuple[int, dict[str, Any]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy} if proxy else {}))
    try:
        with opener.open(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()
            try:
                return exc.code, json.loads(body)
            except ValueError:
                return exc.code, {"body": body.decode(errors="replace")}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with running_mesh("-f", str(MESH_FILE)) as m:
        yield m


def _pod(mesh: Mesh, name: str) -> dict[str, Any]:
    return mesh.unit(name)


def test_up_runs_every_service_of_the_file_and_lyrics_answers_through_the_mesh(mesh: Mesh) -> None:
    names = {p["name"] for p in mesh.pods()}
    assert names == {"dns", "controlplane", "artist-1", "song-1", "image-1", "lyrics-1"}
    assert f"curl {mesh.publish}/lyrics/1" in mesh.proc.log()
    status, doc = _get(mesh.url("/lyrics/1"))
    assert status == 200, doc
    # song's answer came through lyrics' sidecar, routed from the control plane's table
    assert (doc["title"], doc["artist"], doc["via"], doc["served_by"]) == (
        "Control Plane Blues", "The Quiet Pylons", {"song": "controlplane"}, "lyrics-1")
    sidecars = {s["instance"]: s for s in mesh.status()["sidecars"]}
    assert sidecars["lyrics-1"]["mode"] == "controlplane"
    assert sidecars["lyrics-1"]["identity"].endswith("/service/lyrics")


def test_the_files_allow_list_lets_lyrics_call_song_and_nothing_else(mesh: Mesh) -> None:
    lyrics = _pod(mesh, "lyrics-1")
    proxy = f"http://{lyrics['address']}:{lyrics['ports']['outbound']}"
    status, doc = _get("http://song/songs/2/details", proxy=proxy)
    assert status == 200 and doc["song"]["id"] == 2, doc
    status, doc = _get("http://artist/artists/1", proxy=proxy)
    assert status == 403, (status, doc)


def test_scale_works_on_a_service_from_the_file_and_an_unknown_one_is_exit_status_2(mesh: Mesh) -> None:
    out = mesh.ok("scale", "lyrics=2")
    assert "started lyrics-2 (ready in" in out
    mesh.wait_until("lyrics-2's sidecar on the control plane", lambda: any(
        s["instance"] == "lyrics-2" and s["mode"] == "controlplane" for s in mesh.status()["sidecars"]), timeout=10)
    records = get_json(f"http://{mesh.control}/mesh")["records"]
    assert len(records["lyrics"]) == 2
    bad = mesh.cli("scale", "nosuch=1")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [f"sidemesh scale: unknown service 'nosuch'; the mesh ({MESH_FILE}) has "
                                       "artist, song, image, lyrics"]
    assert "removed lyrics-2" in mesh.ok("scale", "lyrics=1")


def test_lyrics_keeps_answering_through_a_control_plane_outage(mesh: Mesh) -> None:
    lyrics = _pod(mesh, "lyrics-1")
    admin = f"http://{lyrics['address']}:{lyrics['ports']['admin']}"
    assert _get(mesh.url("/lyrics/1"))[0] == 200
    mesh.ok("kill", "controlplane")
    answers = []
    deadline = time.monotonic() + 15
    # keep calling while the sidecar notices the outage and moves to DNS, and once it has
    while get_json(f"{admin}/state")["mode"] != "dns":
        assert time.monotonic() < deadline, "the lyrics sidecar never switched to dns"
        answers.append(_get(mesh.url("/lyrics/2")))
    answers += [_get(mesh.url("/lyrics/3")) for _ in range(10)]
    failed = [(s, d) for s, d in answers if s != 200]
    assert failed == []
    assert answers[-1][1]["via"] == {"song": "dns"} and answers[-1][1]["title"] == "Last Known Good"
    mesh.ok("start", "controlplane")
    mesh.wait_until("every sidecar back on the control plane", mesh.all_synced, timeout=20)
    assert _get(mesh.url("/lyrics/1"))[1]["via"] == {"song": "controlplane"}


def test_the_failover_drill_under_load_holds_for_lyrics_with_no_failed_request(mesh: Mesh, tmp_path: Any) -> None:
    """`sidemesh demo failover` against lyrics' front door: 50 req/s, the control plane killed at 4 s
    and started at 8 s; exit 0 means not one request failed."""
    mesh.wait_until("every sidecar on the control plane", mesh.all_synced, timeout=20)
    out = tmp_path / "drill.json"
    # one song: lyrics has words for songs 1, 2, 3 and 6 only, and the drill's {id} cycles 1-20
    done = mesh.cli("demo", "failover", "--url", mesh.url("/lyrics/1"), "--rate", "50", "--duration", "14",
                    "--kill-at", "4", "--start-at", "8", "--json", str(out), "--quiet", timeout=90)
    print(done.stdout[-2500:])
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    result = json.loads(out.read_text())
    assert result["failures"] == 0
    assert all(result["phases"][p]["requests"] >= 150 for p in ("before", "outage", "after")), result["phases"]
    assert {"lyrics-1", "song-1", "artist-1", "image-1"} <= {sc["instance"] for sc in result["sidecars"]}
