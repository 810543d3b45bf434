#!/usr/bin/env python3
"""lyrics: a small service that joins the sidemesh mesh by configuration alone.

It is written with the Python standard library only and knows nothing of the mesh but HTTP
and ``HTTP_PROXY``: to answer ``GET /lyrics/{song_id}`` it asks the ``song`` service for the
song's details at ``http://song/songs/{id}/details``, and the standard library sends that
request to whatever ``HTTP_PROXY`` names -- the sidecar's outbound port, 127.0.0.1:15001, in
a meshed pod. Any program in any language that honours ``HTTP_PROXY`` joins the same way.

    GET /healthz            200 {"status": "ok", "service": "lyrics", "served_by": ...}
    GET /lyrics/{song_id}   200 {"song_id", "title", "artist", "lyrics": [lines],
                                 "via": {"song": <x-sidemesh-route of song's answer or null>},
                                 "served_by"}
                            404 when it holds no lyrics for the song, or song does not know it
                            502 when song cannot be reached or does not answer with its details:
                                {"error": "song unavailable: ...", "service": "song",
                                 "status": 502, "upstream_status": <song's status or null>}

Run it: ``python3 lyrics.py --port 8080`` (``--help`` for the rest). It logs one key=value
line per event on stderr, ``event=lyrics_started address=HOST:PORT`` first, and stops on
SIGTERM or SIGINT after the requests in flight have been answered.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("lyrics")

SERVICE = "lyrics"
ROUTE_HEADER = "x-sidemesh-route"
# longer ids are not song ids; refusing them early keeps int() cheap
MAX_ID_DIGITS = 9
# what song answers beyond this is not a details document; reading it whole would be a risk
MAX_UPSTREAM_BYTES = 1 << 20

# Original verses for a few songs of the demo catalogue, by song id. Titles and artists are
# not kept here: they come from song on every request, through the mesh.
LYRICS: dict[int, tuple[str, ...]] = {
    1: ("The stream went quiet at a quarter past nine,",
        "every table I held was the last one that was mine,",
        "so I asked the resolver where my neighbours had gone,",
        "and it told me their names, and the music played on."),
    2: ("Two seconds of silence is all that I wait,",
        "then I knock on the DNS and I don't hesitate;",
        "you can leave me unanswered, you can leave me alone,",
        "I still know every address I have ever known."),
    3: ("Keep the last known good, keep it close to your chest,",
        "when the snapshots stop coming it is still your best;",
        "not a route will be lost while the control plane sleeps,",
        "what a sidecar once knew is a thing that it keeps."),
    6: ("You listen on loopback, I answer the door,",
        "two containers, one namespace, who could ask for more;",
        "every call that you make goes by way of my port,",
        "and I carry it home, and I keep it short."),
}


@dataclass(frozen=True, slots=True)
class Config:
    host: str
    port: int
    instance: str
    song_url: str
    timeout_s: float
    shutdown_timeout_s: float
    log_level: str


class UpstreamError(Exception):
    """song could not give us its details; ``status`` is what song answered, if anything."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def parse_song_id(text: str) -> int | None:
    """The song id in a path segment, or None when it is not a plain decimal number."""
    if not text or len(text) > MAX_ID_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


class SongClient:
    """Asks song for a song's details, through ``HTTP_PROXY`` when the environment sets it."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        # ProxyHandler() reads HTTP_PROXY / http_proxy and NO_PROXY from the environment
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler())

    def details(self, song_id: int) -> tuple[dict[str, Any] | None, str | None]:
        """(details document or None when song does not know the id, x-sidemesh-route)."""
        url = f"{self.base_url}/songs/{song_id}/details"
        try:
            with self.opener.open(url, timeout=self.timeout_s) as resp:
                route = resp.headers.get(ROUTE_HEADER)
                body = resp.read(MAX_UPSTREAM_BYTES + 1)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == HTTPStatus.NOT_FOUND:
                return None, exc.headers.get(ROUTE_HEADER)
            raise UpstreamError(f"song answered {exc.code}", exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UpstreamError(f"cannot reach song: {reason}") from exc
        if len(body) > MAX_UPSTREAM_BYTES:
            raise UpstreamError("song's answer is larger than any details document", HTTPStatus.OK)
        try:
            doc = json.loads(body)
            title, artist = doc["song"]["title"], doc["artist"]["name"]
        except (ValueError, TypeError, KeyError) as exc:
            raise UpstreamError("song's answer is not a song details document", HTTPStatus.OK) from exc
        if not isinstance(title, str) or not isinstance(artist, str):
            raise UpstreamError("song's answer is not a song details document", HTTPStatus.OK)
        return doc, route


def lyrics_answer(song_id: int, client: SongClient, instance: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON document) of ``GET /lyrics/{song_id}``."""
    lines = LYRICS.get(song_id)
    if lines is None:
        return 404, {"error": f"no lyrics for song {song_id}", "status": 404, "song_id": song_id,
                     "served_by": instance}
    try:
        doc, route = client.details(song_id)
    except UpstreamError as exc:
        return 502, {"error": f"song unavailable: {exc.reason}", "service": "song", "status": 502,
                     "upstream_status": exc.status, "served_by": instance}
    if doc is None:
        return 404, {"error": f"song {song_id} not found", "status": 404, "song_id": song_id,
                     "served_by": instance}
    return 200, {"song_id": song_id, "title": doc["song"]["title"], "artist": doc["artist"]["name"],
                 "lyrics": list(lines), "via": {"song": route}, "served_by": instance}


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps the sidecar's pooled connections to this app open between requests
    protocol_version = "HTTP/1.1"
    server: LyricsServer

    # an idle keep-alive connection is closed after this long (it holds a thread)
    timeout = 60

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        with self.server.in_flight():
            self._get()

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        instance = self.server.config.instance
        if path == "/healthz":
            self._answer(200, {"status": "ok", "service": SERVICE, "served_by": instance})
            return
        prefix, _, raw_id = path.rpartition("/")
        song_id = parse_song_id(raw_id) if prefix == "/lyrics" else None
        if song_id is None:
            self._answer(404, {"error": f"no route for GET {path}", "status": 404, "served_by": instance})
            return
        status, doc = lyrics_answer(song_id, self.server.client, instance)
        if status == 502:
            log.warning("event=upstream_failed service=song status=%s reason=%r", doc["upstream_status"], doc["error"])
        self._answer(status, doc)

    def _refuse(self) -> None:
        self._answer(405, {"error": f"method {self.command} not allowed", "status": 405,
                           "served_by": self.server.config.instance}, allow="GET")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _answer(self, status: int, doc: dict[str, Any], *, allow: str | None = None) -> None:
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-served-by", self.server.config.instance)
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("event=request %s", format % args)


class LyricsServer(ThreadingHTTPServer):
    """One thread per connection. Stopping waits for requests being answered, not for idle
    keep-alive connections (those threads are daemons and end with the process)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, config: Config, client: SongClient) -> None:
        super().__init__((config.host, config.port), Handler)
        self.config = config
        self.client = client
        self._busy = 0
        self._idle = threading.Condition()

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until no request is being answered; False when some still were after timeout_s."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=timeout_s)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 0-65535")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def parse_args(argv: Sequence[str]) -> Config:
    p = argparse.ArgumentParser(
        prog="lyrics",
        description="Serve song lyrics; titles and artists come from the song service through HTTP_PROXY.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1: only its sidecar reaches it)")
    p.add_argument("--port", type=_port, default=8080, help="port; 0 picks a free one, logged at start (default 8080)")
    p.add_argument("--instance", default="lyrics-1", help="name in served_by and x-served-by (default lyrics-1)")
    p.add_argument("--song-url", default="http://song", help="where song is, as the mesh names it (default http://song)")
    p.add_argument("--timeout", type=_positive, default=5.0, help="seconds to wait for song (default 5)")
    p.add_argument("--shutdown-timeout", type=_positive, default=5.0,
                   help="on SIGTERM, seconds to let requests in flight finish (default 5)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(list(argv))
    return Config(a.host, a.port, a.instance, a.song_url, a.timeout, a.shutdown_timeout, a.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s component=lyrics %(message)s")
    try:
        server = LyricsServer(config, SongClient(config.song_url, config.timeout_s))
    except OSError as exc:
        log.error("event=bind_failed address=%s:%s error=%r", config.host, config.port, str(exc))
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # serve_forever runs in its own thread: shutdown() must be called from another one
    serving = threading.Thread(target=server.serve_forever, name="lyrics-http")
    serving.start()
    host, port = server.server_address[:2]
    log.info("event=lyrics_started address=%s:%s song_url=%s", host, port, config.song_url)
    stop.wait()
    log.info("event=lyrics_stopping")
    server.shutdown()  # stops accepting
    serving.join()
    drained = server.drain(config.shutdown_timeout_s)
    server.server_close()
    log.info("event=lyrics_stopped drained=%s", str(drained).lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
