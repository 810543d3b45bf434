"""State-changing HTTP endpoints need an allowed peer address or the admin token: the control
plane's POST /faults, the DNS server's PUT /records and `sidemesh up`'s control API.

A real non-allowed peer over loopback: each server allows only 127.0.0.1/32, and the client binds
its socket to 127.0.0.9 (any 127/8 address is a local source on Linux)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controlplane.adminauth import AdminPolicy as CpAdminPolicy
from controlplane.adminauth import parse_networks as cp_networks
from sidemesh.adminauth import AdminPolicy, parse_networks
from sidemesh.controlapi import make_app
from sidemesh.layout import MeshLayout, parse_hostport
from sidemesh.supervisor import Supervisor
from tests.integration.test_controlplane_stream import CpFactory, make_cp  # noqa: F401 - fixture
from tests.support import REPO, ProcessGroup, free_port, loopback_address, wait_for_http

pytestmark = pytest.mark.timeout(60)

OUTSIDER = "127.0.0.9"
TOKEN = "s3cret-admin-token"


async def call(method: str, url: str, body: Any = None, token: str | None = None,
               source: str = OUTSIDER) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.request(method, url, json=body, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidemesh", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDEMESH_ADMIN")}
    return {**env, **extra}


# --- control plane: POST /faults --------------------------------------------------------------

async def test_a_fault_from_a_peer_outside_admin_allow_is_refused_403_unless_it_carries_the_token(
        make_cp: CpFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="controlplane.admin")
    cp = await make_cp(admin=CpAdminPolicy(cp_networks("127.0.0.1/32"), TOKEN))
    base = f"http://{cp.plane.config.listen}:{cp.http_port}"

    status, body = await call("POST", f"{base}/faults", {"fault": "empty-snapshot"})
    assert status == 403 and body["status"] == 403
    assert "POST /faults" in body["error"] and "127.0.0.1/32" in body["error"] and OUTSIDER in body["error"]
    assert "Bearer" in body["error"]
    status, body = await call("POST", f"{base}/faults", {"fault": "empty-snapshot"}, token="guess")
    assert status == 403 and "does not match" in body["error"]
    assert cp.plane.publisher.faults.active is False  # nothing changed
    assert f"event=admin_denied peer={OUTSIDER} method=POST path=/faults reason=no_token" in caplog.text
    assert "reason=bad_token" in caplog.text
    assert TOKEN not in caplog.text

    status, body = await call("POST", f"{base}/faults", {"fault": "empty-snapshot"}, token=TOKEN)
    assert (status, body) == (200, {"empty_snapshot": True, "dropped_services": []})
    assert cp.plane.publisher.faults.active is True

    for path in ("/healthz", "/status", "/metrics", "/faults"):  # reads stay open
        assert (await call("GET", f"{base}{path}"))[0] == 200, path


async def test_a_control_plane_without_a_token_explains_how_to_configure_one(make_cp: CpFactory) -> None:
    cp = await make_cp(admin=CpAdminPolicy(cp_networks("127.0.0.1/32"), None))
    status, body = await call("POST", f"http://{cp.plane.config.listen}:{cp.http_port}/faults",
                              {"fault": "clear"}, token="anything")
    assert status == 403
    assert "no admin token" in body["error"] and "--admin-token-file" in body["error"]


async def test_by_default_every_loopback_peer_may_set_faults_so_sidemesh_up_needs_no_token(
        make_cp: CpFactory) -> None:
    cp = await make_cp()
    status, _ = await call("POST", f"http://{cp.plane.config.listen}:{cp.http_port}/faults", {"fault": "clear"})
    assert status == 200


async def test_sidemesh_fault_sends_the_token_from_its_environment(make_cp: CpFactory) -> None:
    cp = await make_cp(admin=CpAdminPolicy((), TOKEN))  # no address allowed: the token is the only way in
    target = f"{cp.plane.config.listen}:{cp.http_port}"
    code, out = await run_cli("fault", "controlplane", "drop-service", "artist", "--controlplane-http", target,
                              env=clean_env())
    assert code == 1 and "HTTP 403" in out, out
    assert cp.plane.publisher.faults.active is False
    code, out = await run_cli("fault", "controlplane", "drop-service", "artist", "--controlplane-http", target,
                              env=clean_env(SIDEMESH_ADMIN_TOKEN=TOKEN))
    assert code == 0, out
    assert cp.plane.publisher.faults.dropped_services == {"artist"}


# --- DNS server: PUT /records ------------------------------------------------------------------

def raw_http(method: str, host: str, port: int, path: str, body: Any = None,
             token: str | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=5, source_address=(OUTSIDER, 0))
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_dns_records_can_be_replaced_from_outside_admin_allow_only_with_the_token(procs: ProcessGroup) -> None:
    host = loopback_address()
    api_port = free_port(host)
    proc = procs.start("dns", "dns", "--listen", host, "--port", str(free_port(host)), "--api-port", str(api_port),
                       "--record", "artist=127.10.1.1", "--admin-allow", "127.0.0.1/32",
                       env=clean_env(SIDEMESH_ADMIN_TOKEN=TOKEN))
    wait_for_http(f"http://{host}:{api_port}/healthz")

    status, body = raw_http("PUT", host, api_port, "/records", {"artist": ["10.6.6.6"]})
    assert status == 403 and body["status"] == 403 and "PUT /records" in body["error"]
    assert raw_http("GET", host, api_port, "/records") == (200, {"artist": ["127.10.1.1"]})  # unchanged, and open

    status, body = raw_http("PUT", host, api_port, "/records", {"artist": ["127.10.1.2"]}, token=TOKEN)
    assert (status, body) == (200, {"artist": ["127.10.1.2"]})
    log = proc.log()
    assert f"event=admin_denied peer={OUTSIDER} method=PUT path=/records reason=no_token" in log
    assert TOKEN not in log


@pytest.mark.parametrize("args", [["--admin-allow", "nope"], ["--admin-token", ""],
                                  ["--admin-token-file", "/nonexistent/token"]])
def test_sidemesh_dns_rejects_bad_admin_options_with_usage_errors(
        args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from sidemesh.dnsserver import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert "usage: sidemesh dns" in capsys.readouterr().err


# --- `sidemesh up`'s control API: POST /scale, /kill, /stop, /start -----------------------------

@pytest.fixture
async def serve_control_api(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(allow: str) -> str:
        host = loopback_address()
        port = free_port(host)
        sup = Supervisor(MeshLayout(), tmp_path)  # no units: an action on "ghost" answers 404 once let in
        app = make_app(sup, parse_hostport(f"{host}:{port}"), admin=AdminPolicy(parse_networks(allow), TOKEN))
        runner = web.AppRunner(app, access_log=None)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return f"{host}:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(("path", "body"), [
    ("/kill", {"name": "ghost"}), ("/stop", {"name": "ghost"}), ("/start", {"name": "ghost"}),
    ("/scale", {"service": "ghost", "replicas": 0}),
])
async def test_control_api_actions_need_an_allowed_peer_or_the_token(
        path: str, body: dict[str, Any], serve_control_api: Callable[[str], Awaitable[str]]) -> None:
    control_api = await serve_control_api("127.0.0.1/32")
    status, answer = await call("POST", f"http://{control_api}{path}", body)
    assert status == 403 and f"POST {path}" in answer["error"]
    status, answer = await call("POST", f"http://{control_api}{path}", body, token=TOKEN)
    assert status in (400, 404) and "ghost" in answer["error"], answer  # let in; the supervisor answered
    status, answer = await call("POST", f"http://{control_api}{path}", body, source="127.0.0.1")
    assert status in (400, 404) and "ghost" in answer["error"], answer  # an allowed peer needs no token
    assert (await call("GET", f"http://{control_api}/pods"))[0] == 200


async def test_sidemesh_kill_sends_the_token_from_its_environment(
        serve_control_api: Callable[[str], Awaitable[str]]) -> None:
    control_api = await serve_control_api("")  # no address allowed: the token is the only way in
    code, out = await run_cli("kill", "ghost", "--control", control_api, env=clean_env())
    assert code == 1 and "POST /kill changes state" in out, out
    code, out = await run_cli("kill", "ghost", "--control", control_api, env=clean_env(SIDEMESH_ADMIN_TOKEN=TOKEN))
    assert code == 1 and "ghost" in out and "changes state" not in out, out  # let in, and told the name is unknown
