"""The song service: ``GET /songs/{id}`` and the aggregating ``GET /songs/{id}/details``.

``details`` is the request the whole demo is about: song asks its sidecar for
the song's artist and cover image at the same time (one TaskGroup, so the call
takes as long as the slower of the two, and when one fails the other is
cancelled) and answers one document::

    {"song": {...}, "artist": {...}, "image": {...},
     "via": {"artist": <x-sidemesh-route of that answer or null>, "image": ...},
     "served_by": "song-1"}

A failed downstream call answers 502 (or 503 when the sidecar said 503) with
``{"error": "artist unavailable: ...", "service": "artist", "status": 502,
"upstream_status": 503|null, "served_by": ...}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from services.catalogue import Catalogue, Song
from services.common import dumps, json_response, not_found, parse_id, precompute
from services.config import ServiceConfig
from services.downstream import DownstreamClient, DownstreamError, DownstreamResponse, new_session

log = logging.getLogger("sidemesh.services.song")

CLIENT_KEY = web.AppKey("downstream_client", DownstreamClient)


@dataclass(frozen=True, slots=True)
class SongTarget:
    """One song, precomputed: its document and the two URLs its details need."""

    song: dict[str, object]
    artist_url: str
    image_url: str


def song_targets(catalogue: Catalogue, config: ServiceConfig) -> dict[int, SongTarget]:
    """song id -> its precomputed document and downstream URLs."""
    def target(song: Song) -> SongTarget:
        return SongTarget(
            song={**song.to_dict(), "served_by": config.instance},
            artist_url=f"{config.artist_url}/artists/{song.artist_id}",
            image_url=f"{config.image_url}/images/{song.image_id}",
        )

    return {song_id: target(song) for song_id, song in catalogue.songs.items()}


def details_document(target: SongTarget, artist: DownstreamResponse, image: DownstreamResponse,
                     instance: str) -> dict[str, object]:
    """The aggregated answer of ``/songs/{id}/details`` (pure)."""
    return {
        "song": target.song,
        "artist": artist.body,
        "image": image.body,
        "via": {"artist": artist.route, "image": image.route},
        "served_by": instance,
    }


async def fetch_both(client: DownstreamClient, target: SongTarget) -> tuple[DownstreamResponse, DownstreamResponse]:
    """Artist and image concurrently; raises the first DownstreamError (the other call is cancelled)."""
    failure: DownstreamError | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            artist_task = tg.create_task(client.get_json("artist", target.artist_url))
            image_task = tg.create_task(client.get_json("image", target.image_url))
    except* DownstreamError as group:
        first = group.exceptions[0]
        assert isinstance(first, DownstreamError)
        failure = first
    if failure is not None:
        raise failure
    return artist_task.result(), image_task.result()


def add_song_routes(app: web.Application, catalogue: Catalogue, config: ServiceConfig) -> None:
    """Register song's routes and the startup/cleanup of its one pooled downstream session."""
    instance = config.instance
    song_bodies = precompute({sid: s.to_dict() for sid, s in catalogue.songs.items()}, instance)
    targets = song_targets(catalogue, config)

    async def get_song(request: web.Request) -> web.StreamResponse:
        raw_id = request.match_info["id"]
        body = song_bodies.get(parse_id(raw_id))  # type: ignore[arg-type]
        if body is None:
            return not_found("song", raw_id, instance)
        return json_response(body)

    async def get_details(request: web.Request) -> web.StreamResponse:
        raw_id = request.match_info["id"]
        target = targets.get(parse_id(raw_id))  # type: ignore[arg-type]
        if target is None:
            return not_found("song", raw_id, instance)
        try:
            artist, image = await fetch_both(request.app[CLIENT_KEY], target)
        except DownstreamError as exc:
            log.warning("event=downstream_failed service=%s status=%s upstream_status=%s reason=%r",
                        exc.service, exc.status, exc.upstream_status, exc.reason)
            return json_response(dumps({**exc.to_dict(), "served_by": instance}), status=exc.status)
        return json_response(dumps(details_document(target, artist, image, instance)))

    async def downstream_session(app: web.Application) -> AsyncIterator[None]:
        # one session (one keep-alive pool) for the life of the process, never one per request
        session = new_session(pool_size=config.pool_size)
        app[CLIENT_KEY] = DownstreamClient(session, proxy=config.proxy, timeout_s=config.timeout_s)
        try:
            yield
        finally:
            await session.close()

    app.cleanup_ctx.append(downstream_session)
    app.router.add_get("/songs/{id}", get_song)
    app.router.add_get("/songs/{id}/details", get_details)
