"""The control plane's HTTP API (faults, metrics) and its process life cycle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.app import RunningControlPlane
from tests.integration.test_controlplane_stream import (  # noqa: F401 - fixtures
    FakeSidecar,
    cp,
    get_status,
    in_both_modes,
    instances,
    make_cp,
    sidecars,
    target,
)
from tests.support import REPO, ProcessGroup, free_port, loopback_address, wait_for_http

pytestmark = pytest.mark.timeout(60)


async def post_fault(cp: RunningControlPlane, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        url = f"http://{cp.plane.config.listen}:{cp.http_port}/faults"
        async with http.post(url, data=json.dumps(body) if not isinstance(body, bytes) else body) as resp:
            return resp.status, await resp.json()


@in_both_modes
async def test_faults_change_what_is_pushed_and_clear_restores_it(sidecars: Any, cp: Any) -> None:
    a = await sidecars("artist-1", "artist")
    s = await sidecars("song-1", "song")
    full = await s.snapshot_where(lambda x: len(x.services) == 2)
    await a.snapshot_where(lambda x: len(x.services) == 2)

    status, faults = await post_fault(cp, {"fault": "drop-service", "service": "artist"})
    assert (status, faults) == (200, {"empty_snapshot": False, "dropped_services": ["artist"]})
    dropped = await s.next_snapshot(timeout=1.0)
    assert instances(dropped) == {"song": {"song-1"}}
    assert int(dropped.version) > int(full.version)

    status, faults = await post_fault(cp, {"fault": "empty-snapshot"})
    assert (status, faults) == (200, {"empty_snapshot": True, "dropped_services": ["artist"]})
    empty = await s.next_snapshot(timeout=1.0)
    assert list(empty.services) == [] and int(empty.version) > int(dropped.version)
    assert (await get_status(cp))["faults"] == faults

    status, faults = await post_fault(cp, {"fault": "clear"})
    assert (status, faults) == (200, {"empty_snapshot": False, "dropped_services": []})
    restored = await s.next_snapshot(timeout=1.0)
    assert instances(restored) == instances(full) and int(restored.version) > int(empty.version)
    # the registry itself never changed: every sidecar is still connected
    assert {x["node_id"] for x in (await get_status(cp))["sidecars"]} == {"artist-1", "song-1"}


async def test_two_dropped_services_are_both_omitted(sidecars: Any, cp: Any) -> None:
    s = await sidecars("song-1", "song")
    await sidecars("artist-1", "artist")
    await sidecars("image-1", "image")
    await s.snapshot_where(lambda x: len(x.services) == 3)
    await post_fault(cp, {"fault": "drop-service", "service": "artist"})
    _, faults = await post_fault(cp, {"fault": "drop-service", "service": "image"})
    assert faults["dropped_services"] == ["artist", "image"]
    snap = await s.snapshot_where(lambda x: len(x.services) == 1, timeout=1.0)
    assert instances(snap) == {"song": {"song-1"}}


@pytest.mark.parametrize("body", [
    {"fault": "explode"}, {"fault": "drop-service"}, {"fault": "drop-service", "service": "Not A Label"},
    ["clear"], b"{not json",
])
async def test_bad_fault_request_is_answered_400_and_changes_nothing(body: Any, cp: Any) -> None:
    status, answer = await post_fault(cp, body)
    assert status == 400 and answer["error"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{cp.plane.config.listen}:{cp.http_port}/faults") as resp:
            assert await resp.json() == {"empty_snapshot": False, "dropped_services": []}


@in_both_modes
async def test_metrics_parse_as_prometheus_text_and_count_what_happened(sidecars: Any, cp: Any) -> None:
    a = await sidecars("artist-1")
    snap = await a.next_snapshot()
    await a.ack(snap)
    bad = FakeSidecar(target(cp), "bad", port=0)
    await bad.send_hello()
    await bad.status_code()
    await bad.close()
    await get_status(cp)  # let the ack land
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{cp.plane.config.listen}:{cp.http_port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    samples = {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples["sidemesh_controlplane_connected_sidecars"].value == 1
    assert samples["sidemesh_controlplane_pushes_total"].value >= 1
    assert samples["sidemesh_controlplane_acks_total"].value == 1
    assert samples["sidemesh_controlplane_nacks_total"].value == 0
    assert samples["sidemesh_controlplane_rejected_hellos_total"].value == 1
    assert samples["sidemesh_controlplane_snapshot_info"].labels == {"version": snap.version}
    assert samples["sidemesh_controlplane_push_ack_seconds_count"].value == 1


async def test_healthz_answers_ok(cp: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{cp.plane.config.listen}:{cp.http_port}/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "ok")


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "sidemesh", "controlplane", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout.startswith("usage: sidemesh controlplane")
    for option in ("--listen", "--grpc-port", "--http-port", "--coalesce-ms", "--warmup-timeout",
                   "--policy", "--hello-timeout", "--grace", "--log-level",
                   "--max-labels", "--max-label-key-bytes", "--max-label-value-bytes", "--max-label-bytes",
                   "--max-known-instances", "--max-known-endpoints", "--max-node-id-bytes", "--max-address-bytes",
                   "--max-last-version-bytes", "--max-request-bytes", "--snapshot-budget-bytes",
                   "--admin-allow", "--admin-token", "--admin-token-file",
                   "--insecure", "--ca-dir", "--trust-domain", "--cert-ttl", "--join-tokens", "--identity-port",
                   "--server-name", "--allow"):
        assert option in out.stdout
    for env in ("SIDEMESH_CP_INSECURE", "SIDEMESH_CP_CA_DIR", "SIDEMESH_CP_TRUST_DOMAIN", "SIDEMESH_CP_CERT_TTL",
                "SIDEMESH_CP_JOIN_TOKENS", "SIDEMESH_CP_IDENTITY_PORT", "SIDEMESH_CP_SERVER_NAMES", "SIDEMESH_CP_ALLOW"):
        assert env in out.stdout
    assert out.stdout.count("(default") + out.stdout.count("; default") >= 30


def test_bad_arguments_exit_2_with_a_message() -> None:
    # (every bad-input case is covered in tests/unit/test_controlplane_config.py)
    out = subprocess.run([sys.executable, "-m", "sidemesh", "controlplane", "--grpc-port", "70000"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "sidemesh controlplane: error:" in out.stderr


def test_process_answers_healthz_and_stops_cleanly_on_sigterm(procs: ProcessGroup, tmp_path: Path) -> None:
    host = loopback_address()
    grpc_port, http_port, identity_port = free_port(host), free_port(host), free_port(host)
    proc = procs.start("controlplane", "controlplane", "--listen", host, "--grpc-port", str(grpc_port),
                       "--http-port", str(http_port), "--identity-port", str(identity_port),
                       "--ca-dir", str(tmp_path / "ca"))
    assert wait_for_http(f"http://{host}:{http_port}/healthz") == b"ok"
    with urllib.request.urlopen(f"http://{host}:{http_port}/status", timeout=2) as resp:
        status = json.load(resp)
    assert status["sidecars"] == [] and status["warming_up"] is False
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=10) == 0
    assert "event=stopped" in proc.log()
