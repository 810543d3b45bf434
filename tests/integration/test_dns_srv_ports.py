"""No shared-port assumption, end to end: real `sidemesh sidecar` processes and a real `sidemesh dns`,
no control plane at all (every sidecar serves through DNS), and a callee whose sidecar listens on an
inbound port that is not the callers' own. Its SRV record says which; a caller that asks for it gets
through, a caller that does not knocks on its own port number and finds nobody there."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.integration.sidecar_harness import SidecarProcess, start_app, start_sidecar_process, wait_ready
from tests.support import ProcessGroup, free_port, loopback_address, wait_for_http

pytestmark = pytest.mark.timeout(90)

CALLEE_INBOUND = 15106
ZONE = "mesh.local"


def artist_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"service": "artist", "path": request.path})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


def put_records(api: str, records: dict[str, Any]) -> None:
    request = urllib.request.Request(f"{api}/records", data=json.dumps(records).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=2) as resp:
        assert resp.status == 200


async def get_via(caller: SidecarProcess, url: str) -> tuple[int, dict[str, str], bytes]:
    """A call as the caller's app makes it: through its sidecar's outbound listener."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url, proxy=f"http://{caller.address}:{caller.outbound_port}") as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def admin_state(sp: SidecarProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{sp.address}:{sp.admin_port}/state") as resp:
            return await resp.json()  # type: ignore[no-any-return]


async def test_in_dns_mode_a_peer_on_another_inbound_port_is_reached_through_srv_and_missed_without_it(
    procs: ProcessGroup,
) -> None:
    dns_host = loopback_address()
    dns_port, api_port = free_port(dns_host), free_port(dns_host)
    procs.start("dns", "dns", "--listen", dns_host, "--port", str(dns_port), "--api-port", str(api_port),
                "--zone", ZONE, "--ttl", "1")
    api = f"http://{dns_host}:{api_port}"
    await asyncio.to_thread(wait_for_http, f"{api}/healthz")

    dns_flags = ("--dns-template", "{service}." + ZONE, "--initial-fetch-timeout", "0.5")
    async with start_app(artist_app()) as artist_at:
        callee = start_sidecar_process(procs, None, app=artist_at, service="artist", dns=(dns_host, dns_port),
                                       inbound_port=CALLEE_INBOUND, extra=(*dns_flags, "--dns-srv"))
        # what `sidemesh up` tells its DNS server: the pod, and the port its sidecar listens on
        await asyncio.to_thread(put_records, api, {
            "artist": [{"address": callee.address, "port": CALLEE_INBOUND, "instance": "artist-1"}]})
        with_srv = start_sidecar_process(procs, None, app=artist_at, service="song", dns=(dns_host, dns_port),
                                         extra=(*dns_flags, "--dns-srv"))
        without_srv = start_sidecar_process(procs, None, app=artist_at, service="image", dns=(dns_host, dns_port),
                                            extra=dns_flags)
        await asyncio.gather(wait_ready(callee), wait_ready(with_srv), wait_ready(without_srv))

        status, headers, body = await get_via(with_srv, "http://artist/artists/7")
        assert (status, json.loads(body)) == (200, {"service": "artist", "path": "/artists/7"})
        assert headers["x-sidemesh-route"] == "dns"
        state = await admin_state(with_srv)
        assert state["mode"] == "dns"
        assert [(e["address"], e["port"]) for e in state["services"]["artist"]["endpoints"]] == [
            (callee.address, CALLEE_INBOUND)]

        # the same records without SRV: the address, on the caller's own inbound port, where nobody listens
        status, _headers, body = await get_via(without_srv, "http://artist/artists/7")
        assert status in (502, 503), body
        state = await admin_state(without_srv)
        assert [(e["address"], e["port"]) for e in state["services"]["artist"]["endpoints"]] == [
            (callee.address, 15006)]
    assert "Traceback" not in procs.logs()
