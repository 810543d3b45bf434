"""Identity on a real `sidemesh up` mesh (mutual TLS is its default): hijacks of the control
plane refused, an impostor behind DNS never reached, authorization enforced in controlplane and
dns mode. Real processes, real TLS, real DNS; the attacker is a grpcio client or a TLS socket.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from meshpb.v1 import discovery_pb2 as pb
from meshpb.v1 import discovery_pb2_grpc as pb_grpc

from identity.certs import CertificateAuthority, cert_to_pem, generate_key, key_to_pem, make_csr
from identity.spiffe import SpiffeId
from identity.store import IdentityFiles
from identity.tls import client_context, server_context
from tests.mesh import Mesh, get_json

pytestmark = [pytest.mark.timeout(180)]

TD = "sidemesh.local"


def _info(mesh: Mesh) -> dict[str, Any]:
    return dict(get_json(f"http://{mesh.control}/mesh"))


def _state_dir(mesh: Mesh) -> Path:
    return mesh.logdir / "identity"


def _tables(mesh: Mesh) -> dict[str, dict[str, list[str]]]:
    """instance -> service -> endpoint addresses, from every sidecar's /state."""
    return {name: {svc: sorted(ep["address"] for ep in entry["endpoints"]) for svc, entry in st["services"].items()}
            for name, st in mesh.sidecar_states().items()}


async def _issue(target: str, bundle: bytes, csr: bytes, token: str | None) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(root_certificates=bundle)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "controlplane")]) as ch:
        try:
            await pb_grpc.IdentityStub(ch).Issue(pb.IssueRequest(csr_pem=csr.decode(), node_id="x"),
                                                 metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_registration_hijacks_are_refused_and_routing_does_not_change(mesh: Mesh) -> None:
    info = _info(mesh)
    cp = info["controlplane"]["address"]
    state = _state_dir(mesh)
    bundle = (state / "ca" / "ca.pem").read_bytes()
    artist_token = (state / "tokens" / "artist").read_text().strip()
    before = _tables(mesh)

    # 1. no token at all: no certificate, and the mutual-TLS port refuses a plaintext or certificate-less peer
    key = generate_key()
    assert await _issue(f"{cp}:15012", bundle, make_csr(key, SpiffeId(TD, "artist"), "thief-1"), None) \
        == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(f"{cp}:15010") as ch:
        call = pb_grpc.DiscoveryStub(ch).Stream()
        with pytest.raises(grpc.aio.AioRpcError):
            await call.write(pb.DiscoveryRequest(hello=pb.Hello(node_id="thief-1", service="artist",
                                                                address="127.0.0.99", port=15006)))
            await asyncio.wait_for(call.read(), 5)

    # 2. artist's token claiming image
    assert await _issue(f"{cp}:15012", bundle, make_csr(key, SpiffeId(TD, "image"), "image-9"), artist_token) \
        == grpc.StatusCode.PERMISSION_DENIED

    # 3. a legitimate artist certificate with another key reusing artist-1's node id
    ca_dir = state / "ca"
    ca = CertificateAuthority.load((ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca-key.pem").read_bytes())
    thief = IdentityFiles(state / "thief")
    thief_key = thief.load_or_create_key()
    thief.save(cert_to_pem(ca.issue_workload(make_csr(thief_key, SpiffeId(TD, "artist"), "artist-1"),
                                             SpiffeId(TD, "artist"), ttl_s=600, now=time.time())), bundle)
    creds = grpc.ssl_channel_credentials(root_certificates=bundle, private_key=key_to_pem(thief_key),
                                         certificate_chain=thief.cert.read_bytes())
    artist_1 = next(p for p in mesh.pods() if p["name"] == "artist-1")
    async with grpc.aio.secure_channel(f"{cp}:15010", creds,
                                       options=[("grpc.ssl_target_name_override", "controlplane")]) as ch:
        call = pb_grpc.DiscoveryStub(ch).Stream()
        await call.write(pb.DiscoveryRequest(hello=pb.Hello(node_id="artist-1", service="artist",
                                                            address=artist_1["address"], port=15006)))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call.read(), 5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
    print("hijacks: no token -> UNAUTHENTICATED; artist token for image -> PERMISSION_DENIED; "
          f"artist-1's node id with another key -> {refused.value.code().name}: {refused.value.details()}")
    assert _tables(mesh) == before
    assert all(st["mode"] == "controlplane" for st in mesh.sidecar_states().values())


@pytest.mark.parametrize("impostor", ["image's certificate", "no TLS at all"])
async def test_in_dns_mode_an_impostor_answering_dns_for_artist_never_gets_a_call(
    mesh: Mesh, impostor: str, tmp_path: Path
) -> None:
    info = _info(mesh)
    state = _state_dir(mesh)
    host = mesh.subnet + ".250"  # inside the mesh's loopback subnet, unused by pods
    seen: list[bytes] = []
    ctx = None
    if impostor == "image's certificate":
        files = IdentityFiles(state / "pods" / "image-1")
        ctx = server_context(files.cert, files.key, files.bundle)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if data:
                seen.append(data)
                body = b'{"id": 1, "name": "IMPOSTOR"}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (OSError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, 15006, ssl=ctx)
    try:
        await asyncio.to_thread(mesh.ok, "kill", "controlplane")
        await asyncio.to_thread(mesh.wait_until, "all sidecars in dns",
                                lambda: {st["mode"] for st in mesh.sidecar_states().values()} == {"dns"}, 5.0)
        real = sorted(p["address"] for p in mesh.running_pods() if p["service"] == "artist")
        records = {**info["records"], "artist": [host]}
        await asyncio.to_thread(mesh.put_records, records)
        await asyncio.sleep(2.5)  # past the DNS TTL (1 s) and its refresh
        status, body, headers = await asyncio.to_thread(mesh.get, "/songs/1/details")
        print(f"[{impostor}] DNS names only the impostor: {status} {body[:300]}")
        assert status == 503 or (status == 200 and json.loads(body)["artist"]["name"] != "IMPOSTOR")
        if status == 503:
            assert "artist" in body.decode()
        records["artist"] = sorted([host, *real])
        await asyncio.to_thread(mesh.put_records, records)
        await asyncio.sleep(2.5)
        ok = 0
        for _ in range(20):
            status, body, _ = await asyncio.to_thread(mesh.get, "/songs/1/details")
            assert status == 200, body[:300]
            assert json.loads(body)["artist"]["name"] != "IMPOSTOR"
            ok += 1
        print(f"[{impostor}] DNS names impostor + real artist: {ok}/20 served by the real artist")
        assert seen == [] or all(not d.startswith(b"GET ") for d in seen), f"the impostor got a request: {seen[:1]}"
    finally:
        server.close()
        await asyncio.to_thread(mesh.put_records, info["records"])
        await asyncio.to_thread(mesh.ok, "start", "controlplane")
        await asyncio.to_thread(mesh.wait_until, "every sidecar synced", mesh.all_synced, 15)


@pytest.mark.parametrize("mode", ["controlplane", "dns"])
async def test_a_caller_the_policy_does_not_allow_gets_403_in_controlplane_and_dns_mode(mesh: Mesh, mode: str) -> None:
    state = _state_dir(mesh)
    artist = IdentityFiles(state / "pods" / "artist-1")  # artist is allowed to call nobody
    ctx = client_context(artist.cert, artist.key, artist.bundle)
    image = next(p for p in mesh.pods() if p["name"] == "image-1")
    if mode == "dns":
        await asyncio.to_thread(mesh.ok, "kill", "controlplane")
        await asyncio.to_thread(mesh.wait_until, "all sidecars in dns",
                                lambda: {st["mode"] for st in mesh.sidecar_states().values()} == {"dns"}, 5.0)
    try:
        reader, writer = await asyncio.open_connection(image["address"], 15006, ssl=ctx, server_hostname="")
        writer.write(b"GET /images/1 HTTP/1.1\r\nhost: image\r\nconnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n")[0].decode()
        print(f"[{mode}] artist -> image: {status_line} {body[:200].decode()}")
        assert head.startswith(b"HTTP/1.1 403")
        doc = json.loads(body)
        assert "artist" in doc["error"] and "image" in doc["error"] and "song" in doc["error"], doc
    finally:
        if mode == "dns":
            await asyncio.to_thread(mesh.ok, "start", "controlplane")
            await asyncio.to_thread(mesh.wait_until, "every sidecar synced", mesh.all_synced, 15)
    # the allowed pair is served all the while: song -> image through the front door
    status, body, _ = await asyncio.to_thread(mesh.get, "/songs/1/details")
    assert status == 200, body[:300]


def _renewals(mesh: Mesh) -> dict[str, tuple[int, float]]:
    """instance -> (renewals so far, certificate not_after) from every sidecar's /state."""
    return {name: (st["identity"]["renewals"], st["identity"]["cert_not_after"])
            for name, st in mesh.sidecar_states().items()}


@pytest.mark.timeout(240)
async def test_certificates_of_20s_are_renewed_on_time_under_load_and_through_a_short_outage() -> None:
    from sidemesh.load import LoadGenerator, song_details_problem
    from tests.mesh import running_mesh

    with running_mesh("--cert-ttl", "20s") as mesh:
        load = LoadGenerator(lambda i: mesh.url(f"/songs/{i % 20 + 1}/details"), rate=100, duration_s=50,
                             check=song_details_problem)
        task = asyncio.ensure_future(load.run())
        start = _renewals(mesh)
        # half-life of 20 s is 10 s: within 25 s every sidecar has renewed at least twice more
        await asyncio.to_thread(mesh.wait_until, "two renewals each",
                                lambda: all(r[0] >= start[n][0] + 2 for n, r in _renewals(mesh).items()), 30)
        now = time.time()
        lifetimes = {n: round(na - now, 1) for n, (_, na) in _renewals(mesh).items()}
        print(f"renewed under load; seconds of life left per sidecar: {lifetimes}")
        assert all(left > 5 for left in lifetimes.values()), lifetimes
        # an outage shorter than the remaining lifetime: nothing fails, renewal resumes after
        await asyncio.to_thread(mesh.ok, "kill", "controlplane")
        outage_from = time.time()
        await asyncio.sleep(6)
        before_return = _renewals(mesh)
        await asyncio.to_thread(mesh.ok, "start", "controlplane")
        back = await asyncio.to_thread(
            mesh.wait_until, "renewal resumed",
            lambda: all(r[0] > before_return[n][0] for n, r in _renewals(mesh).items()), 20)
        print(f"outage of {time.time() - outage_from - back:.1f}s; every sidecar renewed again {back:.2f}s after the start")
        stats = await task
    failures = stats.failures
    print(f"cert-ttl 20s under 100 req/s for 50 s: {len(stats.results)} requests, {len(failures)} failed")
    assert not failures, [f.error for f in failures[:5]]
