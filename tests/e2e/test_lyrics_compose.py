"""Issue 13: the lyrics example (a standard-library app sidemesh knows nothing of) on the mesh
under compose, from the compose file `sidemesh compose` wrote for examples/lyrics/mesh.toml.

The sidemesh image comes from the session's offline build (tests/e2e/conftest.py); the lyrics
image is built here from examples/lyrics/Dockerfile on the offline base image, so no registry
is needed. The project is its own (sidemesh-e2e-lyrics), on free loopback ports, and always
taken down with ``down -v``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import IMAGE, REPO, _build_image, compose_command, compose_failover_drill
from tests.support import free_port

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

PROJECT = "sidemesh-e2e-lyrics"
COMPOSE_FILE = REPO / "examples" / "lyrics" / "docker-compose.yml"
BASE = os.environ.get("SIDEMESH_BASE_IMAGE", "sidemesh-base:bookworm")  # what scripts/offline-build makes


class Lyrics:
    def __init__(self, compose: list[str], env: dict[str, str], port: int) -> None:
        self.compose, self.env, self.port = compose, env, port

    def run(self, *args: str, timeout: float = 180.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.compose, "-p", PROJECT, "-f", str(COMPOSE_FILE), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=COMPOSE_FILE.parent,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def get(self, path: str) -> tuple[int, Any]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")


@pytest.fixture(scope="module")
def lyrics() -> Iterator[Lyrics]:
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, timeout=60).returncode != 0:
        _build_image()  # run alone: the demo's session fixture has not built it
    build = subprocess.run(["docker", "build", "--build-arg", f"BASE={BASE}", "-t", "lyrics:latest",
                            str(COMPOSE_FILE.parent)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"docker build of the lyrics image failed:\n{build.stdout[-2000:]}\n{build.stderr[-2000:]}"
    port = free_port()
    env = {**os.environ, "SIDEMESH_PORT": str(port), "SIDEMESH_CONTROLPLANE_HTTP_PORT": str(free_port()),
           "SIDEMESH_DASHBOARD_PORT": str(free_port()), "SIDEMESH_IMAGE": IMAGE}
    mesh = Lyrics(compose_command(), env, port)
    mesh.run("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
    try:
        started = time.monotonic()
        mesh.run("up", "-d", "--no-build")
        last: object = None
        while time.monotonic() - started < 180:
            try:
                last = mesh.get("/lyrics/1")
                if last[0] == 200:
                    break
            except OSError as exc:
                last = exc
            time.sleep(0.5)
        else:
            raise AssertionError(f"lyrics did not answer 200 within 180s (last: {last})\n"
                                 f"{mesh.run('logs', '--no-color', '--tail=60', check=False).stdout[-6000:]}")
        print(f"\nlyrics compose up + first 200 in {time.monotonic() - started:.1f}s")
        yield mesh
    finally:
        mesh.run("down", "-v", "--remove-orphans", "--timeout", "5", check=False)


def test_lyrics_is_served_through_the_mesh_under_compose_and_asks_song_through_its_sidecar(lyrics: Lyrics) -> None:
    status, doc = lyrics.get("/lyrics/1")
    print(f"GET /lyrics/1 -> {status} {json.dumps(doc)[:300]}")
    assert status == 200, doc
    # what song answered, asked through lyrics' sidecar: the route it took says so
    assert isinstance(doc, dict) and doc["title"] and doc["artist"] and doc["lyrics"], doc
    assert doc["via"]["song"] == "controlplane" and doc["served_by"] == "lyrics-1", doc


def test_the_failover_drill_holds_for_lyrics_under_compose(lyrics: Lyrics, tmp_path: Path) -> None:
    # one song: lyrics has words for a few, and the drill's {id} cycles 1-20
    result = compose_failover_drill(COMPOSE_FILE, PROJECT, f"http://127.0.0.1:{lyrics.port}/lyrics/1", lyrics.env,
                                    tmp_path / "lyrics.json", timeout=180)
    instances = {sc["instance"] for sc in result["sidecars"]}
    assert {"lyrics-1", "song-1", "artist-1", "image-1"} <= instances, instances
