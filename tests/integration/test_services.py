"""The demo services over real loopback sockets: artist, image and song in-process.

song is pointed straight at real artist/image servers (no proxy), at
misbehaving stand-in servers (slow, 503, invalid JSON, hanging, refusing), and
through a small forwarding HTTP proxy written here to prove it sends
absolute-form proxy requests the way a sidecar expects them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.app import build_app, serve
from services.catalogue import default_catalogue
from services.config import ServiceConfig
from tests.support import free_port, loopback_address

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Servers:
    """Runs aiohttp apps on one loopback address of this test; stops them all at the end."""

    host: str = field(default_factory=loopback_address)
    runners: list[web.AppRunner] = field(default_factory=list)

    async def start(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, self.host, 0)
        await site.start()
        self.runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://{self.host}:{port}"

    async def service(self, name: str, **config: Any) -> str:
        config.setdefault("instance", f"{name}-1")
        return await self.start(build_app(name, ServiceConfig(name=name, **config)))

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    group = Servers()
    yield group
    await group.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with client.get(url) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, json.loads(await resp.read()), resp


def fake_downstream(handler: Handler, path: str) -> web.Application:
    app = web.Application()
    app.router.add_get(path, handler)
    return app


def real_document(kind: str, doc_id: int) -> dict[str, Any]:
    cat = default_catalogue()
    record = cat.artists[doc_id] if kind == "artist" else cat.images[doc_id]
    return {**record.to_dict(), "served_by": f"slow-{kind}"}


async def test_details_returns_song_with_its_artist_and_cover_image(servers: Servers,
                                                                    client: aiohttp.ClientSession) -> None:
    artist = await servers.service("artist", instance="artist-7")
    image = await servers.service("image", instance="image-2")
    song = await servers.service("song", instance="song-1", artist_url=artist, image_url=image)

    status, doc, resp = await get(client, f"{song}/songs/4/details")

    assert status == 200
    assert resp.headers["x-served-by"] == "song-1"
    assert doc["song"]["id"] == 4 and doc["song"]["title"] == "Lagos Loopback"
    assert doc["artist"]["id"] == doc["song"]["artist_id"] == 2
    assert doc["artist"]["name"] == "Mira Okafor" and doc["artist"]["served_by"] == "artist-7"
    assert doc["image"]["id"] == doc["song"]["image_id"] == 104
    assert doc["image"]["served_by"] == "image-2"
    assert doc["via"] == {"artist": None, "image": None}  # no sidecar in between
    assert doc["served_by"] == "song-1"


async def test_every_service_answers_its_documents_and_healthz_with_served_by(
        servers: Servers, client: aiohttp.ClientSession) -> None:
    urls = {name: await servers.service(name, instance=f"{name}-x") for name in ("artist", "image", "song")}
    for name, path in (("artist", "/artists/8"), ("image", "/images/3"), ("song", "/songs/24")):
        status, doc, resp = await get(client, urls[name] + path)
        assert status == 200
        assert doc["id"] == int(path.rsplit("/", 1)[1])
        assert doc["served_by"] == f"{name}-x" == resp.headers["x-served-by"]
        status, health, resp = await get(client, urls[name] + "/healthz")
        assert (status, health["status"], health["service"]) == (200, "ok", name)
        assert resp.headers["x-served-by"] == f"{name}-x"


@pytest.mark.parametrize("name,path", [
    ("artist", "/artists/9"), ("artist", "/artists/abc"), ("image", "/images/0"), ("image", "/images/-1"),
    ("song", "/songs/25"), ("song", "/songs/x/details"), ("song", "/songs/999/details"), ("song", "/nope"),
    ("artist", "/songs/1"), ("image", "/"),
])
async def test_unknown_ids_and_paths_answer_404_json(servers: Servers, client: aiohttp.ClientSession,
                                                     name: str, path: str) -> None:
    # song's unknown-id 404s must come before any downstream call: these URLs refuse connections
    dead = f"http://{servers.host}:{free_port(servers.host)}"
    url = await servers.service(name, artist_url=dead, image_url=dead)
    status, doc, resp = await get(client, url + path)
    assert status == 404
    assert isinstance(doc["error"], str) and doc["status"] == 404
    assert resp.headers["x-served-by"] == f"{name}-1"


async def test_wrong_method_answers_405_json(servers: Servers, client: aiohttp.ClientSession) -> None:
    url = await servers.service("artist")
    async with client.post(f"{url}/artists/1") as resp:
        assert resp.status == 405
        assert resp.content_type == "application/json"
        assert (await resp.json())["status"] == 405


async def test_details_calls_artist_and_image_concurrently(servers: Servers, client: aiohttp.ClientSession) -> None:
    delay = 0.5

    async def slow_artist(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.json_response(real_document("artist", int(request.match_info["id"])))

    async def slow_image(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.json_response(real_document("image", int(request.match_info["id"])))

    artist = await servers.start(fake_downstream(slow_artist, "/artists/{id}"))
    image = await servers.start(fake_downstream(slow_image, "/images/{id}"))
    song = await servers.service("song", artist_url=artist, image_url=image)

    started = time.monotonic()
    status, doc, _ = await get(client, f"{song}/songs/1/details")
    elapsed = time.monotonic() - started

    assert status == 200
    assert doc["artist"]["served_by"] == "slow-artist" and doc["image"]["served_by"] == "slow-image"
    assert delay <= elapsed < 1.6 * delay, f"took {elapsed:.2f}s: the calls ran one after the other"


async def test_details_via_reports_the_sidecar_route_header_of_each_answer(
        servers: Servers, client: aiohttp.ClientSession) -> None:
    async def artist_via_dns(request: web.Request) -> web.Response:
        return web.json_response(real_document("artist", 1), headers={"x-sidemesh-route": "dns"})

    async def image_via_cache(request: web.Request) -> web.Response:
        return web.json_response(real_document("image", 101), headers={"x-sidemesh-route": "cache"})

    artist = await servers.start(fake_downstream(artist_via_dns, "/artists/{id}"))
    image = await servers.start(fake_downstream(image_via_cache, "/images/{id}"))
    song = await servers.service("song", artist_url=artist, image_url=image)
    status, doc, _ = await get(client, f"{song}/songs/1/details")
    assert status == 200
    assert doc["via"] == {"artist": "dns", "image": "cache"}


async def test_song_sends_absolute_form_requests_through_its_proxy_on_pooled_connections(
        servers: Servers, client: aiohttp.ClientSession) -> None:
    real = {"artist": await servers.service("artist"), "image": await servers.service("image")}
    seen: list[tuple[str, str, int]] = []  # (request target, Host header, client port)

    async with aiohttp.ClientSession() as upstream:
        async def forward(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peername") if request.transport else ("?", 0)
            seen.append((request.raw_path, request.headers.get("Host", ""), peer[1]))
            target = real[request.url.host or ""] + request.rel_url.path_qs
            async with upstream.get(target) as resp:
                body = await resp.read()
                return web.Response(body=body, status=resp.status, content_type=resp.content_type,
                                    headers={"x-sidemesh-route": "controlplane"})

        proxy_app = web.Application()
        proxy_app.router.add_route("GET", "/{tail:.*}", forward)
        proxy = await servers.start(proxy_app)
        song = await servers.service("song", proxy=proxy, artist_url="http://artist", image_url="http://image")

        for _ in range(2):
            status, doc, _ = await get(client, f"{song}/songs/7/details")
            assert status == 200, doc
            assert doc["via"] == {"artist": "controlplane", "image": "controlplane"}
            assert doc["artist"]["name"] == "Northern Resolver"

    targets = sorted({(t, h) for t, h, _ in seen})
    assert targets == [("http://artist/artists/3", "artist"), ("http://image/images/107", "image")]
    # the second round reused the first round's keep-alive connections (one pooled session)
    assert len(seen) == 4
    assert len({port for _, _, port in seen}) == 2


async def test_downstream_refusing_connections_answers_502_naming_it(
        servers: Servers, client: aiohttp.ClientSession) -> None:
    image = await servers.service("image")
    dead_artist = f"http://{servers.host}:{free_port(servers.host)}"
    song = await servers.service("song", artist_url=dead_artist, image_url=image)
    status, doc, resp = await get(client, f"{song}/songs/1/details")
    assert status == 502
    assert doc["service"] == "artist"
    assert doc["error"].startswith("artist unavailable: ")
    assert doc["upstream_status"] is None
    assert resp.headers["x-served-by"] == "song-1"


async def test_sidecar_503_passes_through_as_503_naming_the_service(
        servers: Servers, client: aiohttp.ClientSession) -> None:
    async def no_endpoints(request: web.Request) -> web.Response:
        return web.json_response({"error": "no endpoints for image", "service": "image", "status": 503},
                                 status=503, headers={"x-sidemesh-route": "dns"})

    artist = await servers.service("artist")
    image = await servers.start(fake_downstream(no_endpoints, "/images/{id}"))
    song = await servers.service("song", artist_url=artist, image_url=image)
    status, doc, _ = await get(client, f"{song}/songs/2/details")
    assert status == 503
    assert doc["service"] == "image" and doc["upstream_status"] == 503
    assert "no endpoints for image" in doc["error"]


@pytest.mark.parametrize("status,body,content_type", [
    (200, b"{not json", "application/json"),
    (200, b"<html><body>hello</body></html>", "text/html"),
    (500, b"Internal Server Error", "text/plain"),
    (404, b'{"error": "artist 1 not found"}', "application/json"),
])
async def test_bad_downstream_answers_become_502_naming_the_service(
        servers: Servers, client: aiohttp.ClientSession, status: int, body: bytes, content_type: str) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type=content_type)

    artist = await servers.start(fake_downstream(broken, "/artists/{id}"))
    image = await servers.service("image")
    song = await servers.service("song", artist_url=artist, image_url=image)
    got_status, doc, _ = await get(client, f"{song}/songs/1/details")
    assert got_status == 502
    assert doc["service"] == "artist"
    assert doc["upstream_status"] == status
    assert "Traceback" not in json.dumps(doc)


async def test_downstream_hanging_past_the_timeout_answers_502_naming_it_in_time(
        servers: Servers, client: aiohttp.ClientSession) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    artist = await servers.service("artist")
    image = await servers.start(fake_downstream(hang, "/images/{id}"))
    song = await servers.service("song", artist_url=artist, image_url=image, timeout_s=0.3)
    started = time.monotonic()
    status, doc, _ = await get(client, f"{song}/songs/1/details")
    elapsed = time.monotonic() - started
    assert status in (502, 504)
    assert doc["service"] == "image"
    assert "timed out" in doc["error"]
    assert 0.3 <= elapsed < 1.5


async def test_song_keeps_serving_after_a_downstream_failure(servers: Servers,
                                                             client: aiohttp.ClientSession) -> None:
    failing = True

    async def flaky(request: web.Request) -> web.Response:
        if failing:
            return web.Response(status=503, text="{}", content_type="application/json")
        return web.json_response(real_document("artist", int(request.match_info["id"])))

    artist = await servers.start(fake_downstream(flaky, "/artists/{id}"))
    image = await servers.service("image")
    song = await servers.service("song", artist_url=artist, image_url=image)
    assert (await get(client, f"{song}/songs/1/details"))[0] == 503
    failing = False
    status, doc, _ = await get(client, f"{song}/songs/1/details")
    assert status == 200 and doc["artist"]["id"] == 1


async def test_serve_finishes_in_flight_requests_when_told_to_stop(servers: Servers,
                                                                   client: aiohttp.ClientSession) -> None:
    async def slow_artist(request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)
        return web.json_response(real_document("artist", int(request.match_info["id"])))

    artist = await servers.start(fake_downstream(slow_artist, "/artists/{id}"))
    image = await servers.service("image")
    port = free_port(servers.host)
    config = ServiceConfig(name="song", host=servers.host, port=port, instance="song-d",
                           artist_url=artist, image_url=image, shutdown_timeout_s=3.0)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(config, stop=stop))
    try:
        for _ in range(100):
            try:
                await get(client, f"http://{servers.host}:{port}/healthz")
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
        in_flight = asyncio.create_task(get(client, f"http://{servers.host}:{port}/songs/1/details"))
        await asyncio.sleep(0.15)
        stop.set()
        status, doc, _ = await in_flight
        assert status == 200 and doc["artist"]["served_by"] == "slow-artist"
        assert await asyncio.wait_for(serving, 5) == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(client, f"http://{servers.host}:{port}/healthz")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 5)
