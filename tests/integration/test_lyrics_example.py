"""The lyrics example as a real process: its answers, its errors, and what it asks song for.

Song is played by a small HTTP server that the example reaches the way it reaches its sidecar
in a pod, through ``HTTP_PROXY``: a request that arrives in absolute form
(``GET http://song/songs/1/details``) proves the example went through the proxy by the mesh
name, not around it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, free_port

LYRICS = REPO / "examples" / "lyrics" / "lyrics.py"
STARTED = re.compile(r"event=lyrics_started address=([\d.]+):(\d+)")
DETAILS = {
    "song": {"id": 1, "title": "Control Plane Blues", "artist_id": 1},
    "artist": {"id": 1, "name": "The Quiet Pylons"},
    "image": {"id": 101},
    "via": {"artist": "controlplane", "image": "controlplane"},
    "served_by": "song-1",
}


@dataclass
class FakeSong:
    """Plays song behind a sidecar: records request targets, answers what the test says."""

    status: int = 200
    body: bytes = json.dumps(DETAILS).encode()
    content_type: str = "application/json"
    route: str = "dns"
    proxy: str = ""  # HTTP_PROXY for the example: this server
    targets: list[str] = field(default_factory=list)


def _serve_fake(fake: FakeSong) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            fake.targets.append(self.path)
            self.send_response(fake.status)
            self.send_header("Content-Type", fake.content_type)
            self.send_header("Content-Length", str(len(fake.body)))
            self.send_header("x-sidemesh-route", fake.route)
            self.end_headers()
            self.wfile.write(fake.body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # a short poll interval: shutdown() in teardown waits for the loop to notice
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@dataclass
class Lyrics:
    popen: subprocess.Popen[bytes]
    log_path: Path
    base: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, Any], dict[str, str]]:
        req = urllib.request.Request(self.base + path, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read()), dict(exc.headers)


def _start_lyrics(tmp_path: Path, proxy: str) -> Lyrics:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy", "https_proxy")}
    env.update(HTTP_PROXY=proxy, NO_PROXY="127.0.0.1,localhost")
    log_path = tmp_path / "lyrics.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, str(LYRICS), "--host", "127.0.0.1", "--port", "0", "--instance", "lyrics-7",
             "--timeout", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    lyrics = Lyrics(popen, log_path)
    deadline = time.monotonic() + 10
    while (match := STARTED.search(lyrics.log())) is None:
        if popen.poll() is not None or time.monotonic() > deadline:
            popen.kill()
            raise AssertionError(f"lyrics did not start:\n{lyrics.log()}")
        time.sleep(0.02)
    lyrics.base = f"http://{match.group(1)}:{match.group(2)}"
    return lyrics


@pytest.fixture
def fake_song() -> Iterator[FakeSong]:
    fake = FakeSong()
    server = _serve_fake(fake)
    fake.proxy = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def stop_lyrics() -> Iterator[list[Lyrics]]:
    started: list[Lyrics] = []
    yield started
    for lyrics in started:
        if lyrics.popen.poll() is None:
            lyrics.popen.kill()
        lyrics.popen.wait(timeout=10)


@pytest.fixture
def lyrics(tmp_path: Path, fake_song: FakeSong, stop_lyrics: list[Lyrics]) -> Lyrics:
    started = _start_lyrics(tmp_path, fake_song.proxy)
    stop_lyrics.append(started)
    return started


def test_lyrics_answers_title_and_artist_from_song_details_asked_through_http_proxy(
        lyrics: Lyrics, fake_song: FakeSong) -> None:
    status, doc, headers = lyrics.get("/lyrics/1")
    assert status == 200
    assert doc["song_id"] == 1
    assert doc["title"] == "Control Plane Blues"
    assert doc["artist"] == "The Quiet Pylons"
    assert len(doc["lyrics"]) >= 2 and all(isinstance(line, str) and line for line in doc["lyrics"])
    assert doc["via"] == {"song": "dns"}
    assert doc["served_by"] == "lyrics-7" and headers["x-served-by"] == "lyrics-7"
    # absolute form: the request went to the proxy, naming song as the mesh does
    assert fake_song.targets == ["http://song/songs/1/details"]


def test_lyrics_answers_502_json_when_song_cannot_be_reached(
        tmp_path: Path, stop_lyrics: list[Lyrics]) -> None:
    closed = free_port()
    lyrics = _start_lyrics(tmp_path, f"http://127.0.0.1:{closed}")
    stop_lyrics.append(lyrics)
    status, doc, _ = lyrics.get("/lyrics/1")
    assert status == 502
    assert doc["service"] == "song" and doc["status"] == 502 and doc["upstream_status"] is None
    assert doc["error"].startswith("song unavailable: cannot reach song")


def test_lyrics_answers_502_with_songs_status_when_the_sidecar_answers_503(
        lyrics: Lyrics, fake_song: FakeSong) -> None:
    fake_song.status, fake_song.body = 503, b'{"error": "no endpoints for song"}'
    status, doc, _ = lyrics.get("/lyrics/2")
    assert status == 502
    assert doc["upstream_status"] == 503
    assert doc["error"] == "song unavailable: song answered 503"


def test_lyrics_answers_502_when_song_answers_something_that_is_not_song_details(
        lyrics: Lyrics, fake_song: FakeSong) -> None:
    fake_song.body, fake_song.content_type = b"<html>hello</html>", "text/html"
    status, doc, _ = lyrics.get("/lyrics/3")
    assert status == 502
    assert doc["error"] == "song unavailable: song's answer is not a song details document"


def test_lyrics_answers_404_without_asking_song_for_a_song_it_has_no_lyrics_for(
        lyrics: Lyrics, fake_song: FakeSong) -> None:
    status, doc, _ = lyrics.get("/lyrics/5")
    assert status == 404
    assert doc["error"] == "no lyrics for song 5"
    assert fake_song.targets == []


def test_lyrics_answers_404_when_song_does_not_know_the_song(lyrics: Lyrics, fake_song: FakeSong) -> None:
    fake_song.status, fake_song.body = 404, b'{"error": "song \'6\' not found"}'
    status, doc, _ = lyrics.get("/lyrics/6")
    assert status == 404
    assert doc["error"] == "song 6 not found"


def test_lyrics_answers_unknown_paths_and_methods_with_json_errors(lyrics: Lyrics) -> None:
    for path in ("/nope", "/lyrics/abc", "/lyrics/", "/lyrics/1/2"):
        status, doc, _ = lyrics.get(path)
        assert (status, doc["status"]) == (404, 404), path
    status, doc, headers = lyrics.get("/lyrics/1", method="POST")
    assert status == 405 and headers["Allow"] == "GET"
    status, doc, _ = lyrics.get("/healthz")
    assert (status, doc["status"], doc["service"]) == (200, "ok", "lyrics")


def test_lyrics_stops_with_exit_code_0_on_sigterm(lyrics: Lyrics) -> None:
    assert lyrics.get("/healthz")[0] == 200
    lyrics.popen.send_signal(signal.SIGTERM)
    assert lyrics.popen.wait(timeout=10) == 0
    assert "event=lyrics_stopped drained=true" in lyrics.log()


def test_lyrics_example_imports_only_the_standard_library() -> None:
    tree = ast.parse(LYRICS.read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert modules and modules <= sys.stdlib_module_names, modules - sys.stdlib_module_names


def test_no_mesh_package_names_the_lyrics_example() -> None:
    # the mesh onboards any app by configuration; no mesh code may know this one
    offenders = [str(path.relative_to(REPO))
                 for package in ("sidecar", "controlplane", "dnsfallback", "sidemesh")
                 for path in (REPO / package).rglob("*")
                 if path.is_file() and "__pycache__" not in path.parts
                 and b"lyrics" in path.read_bytes().lower()]
    assert offenders == []
