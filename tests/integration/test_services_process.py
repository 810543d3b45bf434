"""`sidemesh service NAME` as real processes: CLI, the three services together, clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from tests.support import REPO, ProcessGroup, loopback_subnet, wait_for_http

APP_PORT = "8080"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidemesh", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30)


def fetch(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def test_service_help_exits_0_and_documents_every_option() -> None:
    result = run_cli("service", "artist", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--port", "--instance", "--proxy", "--artist-url", "--image-url", "--timeout",
                   "--log-level", "HTTP_PROXY", "SIDEMESH_INSTANCE", "artist, song, image"):
        assert option in result.stdout, option


def test_unknown_service_name_exits_2_with_a_clear_message() -> None:
    result = run_cli("service", "nosuch")
    assert result.returncode == 2
    assert "invalid choice: 'nosuch'" in result.stderr
    assert "artist" in result.stderr and "song" in result.stderr and "image" in result.stderr
    assert "Traceback" not in result.stderr


def test_three_service_processes_serve_details_and_stop_cleanly_on_sigterm(procs: ProcessGroup) -> None:
    net = loopback_subnet()
    addr = {"artist": f"{net}.1", "song": f"{net}.2", "image": f"{net}.3"}
    for name in ("artist", "image"):
        procs.start(name, "service", name, "--host", addr[name], "--port", APP_PORT)
    song = procs.start(
        "song", "service", "song", "--host", addr["song"], "--port", APP_PORT, "--proxy", "",
        "--artist-url", f"http://{addr['artist']}:{APP_PORT}", "--image-url", f"http://{addr['image']}:{APP_PORT}",
        env={"SIDEMESH_INSTANCE": "song-42"},
    )
    for name in ("artist", "image", "song"):
        wait_for_http(f"http://{addr[name]}:{APP_PORT}/healthz", timeout=10)

    status, doc, headers = fetch(f"http://{addr['song']}:{APP_PORT}/songs/1/details")
    assert status == 200
    assert doc["served_by"] == "song-42" and headers["x-served-by"] == "song-42"
    assert doc["artist"]["id"] == doc["song"]["artist_id"]
    assert doc["image"]["id"] == doc["song"]["image_id"]

    status, doc, _ = fetch(f"http://{addr['song']}:{APP_PORT}/songs/404")
    assert status == 404 and "error" in doc

    for proc in procs.procs:
        proc.signal(signal.SIGTERM)
    for proc in procs.procs:
        assert proc.popen.wait(timeout=10) == 0, proc.log()
    log = song.log()
    assert f"event=service_started name=song instance=song-42 address={addr['song']}:{APP_PORT}" in log
    assert "event=service_stopped name=song" in log
    assert "Traceback" not in procs.logs()
