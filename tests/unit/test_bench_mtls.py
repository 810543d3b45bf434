"""The mutual-TLS parts of the data plane benchmark: Envoy's TLS configs, the sidemesh flags,
certificates from the mesh CA, the fresh-connection client's summary, and the ratio line."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.envoyconfig import HopTls, TlsFiles, envoy_config, listener_handshakes, parse_envoy_stats
from benchmarks.handshake import (
    HANDSHAKE_JSON_MARK, HandshakeResult, merge_handshakes, parse_handshake, request_bytes,
)
from benchmarks.loadtools import FixedRateResult, WrkResult
from benchmarks.meshcerts import MeshCa, issue_files
from benchmarks.procs import BenchError
from benchmarks.report import (
    HandshakeRun, PathResult, ProxyUsage, format_table, handshake_ratios, ratio_line, ratios, summary_line,
    write_json,
)
from benchmarks.servers import (
    CP_IDENTITY_PORT, Layout, controlplane_security_args, sidecar_args, sidecar_security_args,
    sidemesh_inbound_handshakes, state_identity_usable,
)
from identity.certs import cert_from_pem, spiffe_id_of, uris_of, verify_issued_by
from identity.store import load_or_create_ca

CLIENT_URI = "spiffe://sidemesh.local/service/client"
UPSTREAM_URI = "spiffe://sidemesh.local/service/upstream"
FILES = TlsFiles(cert=Path("/tmp/b/cert.pem"), key=Path("/tmp/b/key.pem"), ca=Path("/tmp/ca.pem"))


def tls_of(socket: dict[str, Any]) -> dict[str, Any]:
    assert socket["name"] == "envoy.transport_sockets.tls"
    return socket["typed_config"]


# ---------------------------------------------------------------- Envoy's configs


def test_envoy_b_requires_a_tls13_client_certificate_naming_the_callers_spiffe_id() -> None:
    cfg = envoy_config(listen="127.77.8.1", port=15006, admin="127.77.8.1", admin_port=15000,
                       to_address="127.77.2.1", to_port=8080, listener_tls=HopTls(FILES, CLIENT_URI))
    chain = cfg["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = tls_of(chain["transport_socket"])
    assert tls["@type"].endswith("tls.v3.DownstreamTlsContext")
    assert tls["require_client_certificate"] is True
    common = tls["common_tls_context"]
    assert common["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_3",
                                    "tls_maximum_protocol_version": "TLSv1_3"}
    assert common["tls_certificates"] == [{"certificate_chain": {"filename": "/tmp/b/cert.pem"},
                                           "private_key": {"filename": "/tmp/b/key.pem"}}]
    assert common["validation_context"] == {
        "trusted_ca": {"filename": "/tmp/ca.pem"},
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": CLIENT_URI}}],
    }
    assert common["alpn_protocols"] == ["http/1.1"]
    # B's cluster to nginx stays plaintext, like a sidecar's hop to its own app
    assert "transport_socket" not in cfg["static_resources"]["clusters"][0]


def test_envoy_a_presents_its_certificate_upstream_and_accepts_only_the_routed_service() -> None:
    cfg = envoy_config(listen="127.77.7.1", port=15001, admin="127.77.7.1", admin_port=15000,
                       to_address="127.77.8.1", to_port=15006, upstream_tls=HopTls(FILES, UPSTREAM_URI))
    cluster = cfg["static_resources"]["clusters"][0]
    tls = tls_of(cluster["transport_socket"])
    assert tls["@type"].endswith("tls.v3.UpstreamTlsContext")
    common = tls["common_tls_context"]
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    assert common["tls_certificates"][0]["certificate_chain"] == {"filename": "/tmp/b/cert.pem"}
    assert common["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": UPSTREAM_URI}}]
    # keep-alive as Envoy ships it: no per-connection request limit
    assert "typed_extension_protocol_options" not in cluster
    assert "transport_socket" not in cfg["static_resources"]["listeners"][0]["filter_chains"][0]


def test_fresh_connection_envoy_closes_each_upstream_connection_after_one_request() -> None:
    cfg = envoy_config(listen="127.77.9.1", port=15001, admin="127.77.9.1", admin_port=15000,
                       to_address="127.77.8.1", to_port=15006, upstream_tls=HopTls(FILES, UPSTREAM_URI),
                       max_requests_per_connection=1)
    options = cfg["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert http["@type"] == "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    assert http["common_http_protocol_options"] == {"max_requests_per_connection": 1}
    assert http["explicit_http_config"] == {"http_protocol_options": {}}  # HTTP/1.1 upstream, as before
    with pytest.raises(ValueError):
        envoy_config(listen="x", port=1, admin="x", admin_port=2, to_address="y", to_port=3,
                     max_requests_per_connection=5)


def test_plaintext_envoy_config_is_unchanged_by_the_tls_options() -> None:
    cfg = envoy_config(listen="127.77.3.1", port=15001, admin="127.77.3.1", admin_port=15000,
                       to_address="127.77.4.1", to_port=15006)
    assert "transport_socket" not in cfg["static_resources"]["listeners"][0]["filter_chains"][0]
    assert set(cfg["static_resources"]["clusters"][0]) == {"name", "type", "connect_timeout", "load_assignment"}
    json.dumps(cfg)  # written to disk as JSON


def test_envoy_listener_handshakes_are_read_from_admin_stats_leaving_out_the_admin_listener() -> None:
    stats = parse_envoy_stats(
        "listener.127.77.8.1_15006.ssl.handshake: 2886\n"
        "listener.127.77.8.1_15006.ssl.session_reused: 331\n"
        "listener.127.77.8.1_15006.ssl.connection_error: 0\n"
        "listener.admin.ssl.handshake: 7\n"
        "cluster.next_hop.ssl.handshake: 40\n"
        "listener.127.77.8.1_15006.downstream_cx_length_ms: P0(nan,0) P25(nan,1)\n")
    assert stats["cluster.next_hop.ssl.handshake"] == 40
    assert "listener.127.77.8.1_15006.downstream_cx_length_ms" not in stats  # a histogram
    assert listener_handshakes(stats) == (2886, 331)


def test_sidecar_inbound_handshakes_count_only_successful_inbound_ones() -> None:
    metrics = (
        "# TYPE sidemesh_tls_handshakes_total counter\n"
        'sidemesh_tls_handshakes_total{direction="inbound",outcome="ok"} 50.0\n'
        'sidemesh_tls_handshakes_total{direction="inbound",outcome="failed"} 3.0\n'
        'sidemesh_tls_handshakes_total{direction="outbound",outcome="ok"} 9.0\n')
    assert sidemesh_inbound_handshakes(metrics) == 50
    assert sidemesh_inbound_handshakes("") == 0


# ---------------------------------------------------------------- sidemesh in secure mode


def test_secure_sidemesh_gets_the_ca_and_tokens_and_plaintext_stays_insecure(tmp_path: Path) -> None:
    ca = MeshCa(tmp_path / "ca")
    assert controlplane_security_args(None) == ["--insecure"]
    cp = controlplane_security_args(ca)
    assert "--insecure" not in cp
    assert cp[cp.index("--ca-dir") + 1] == str(tmp_path / "ca")
    assert cp[cp.index("--join-tokens") + 1] == str(tmp_path / "ca" / "tokens")
    assert cp[cp.index("--identity-port") + 1] == str(CP_IDENTITY_PORT)

    flags = sidecar_security_args(ca, "upstream", tmp_path / "pods" / "b")
    assert flags[flags.index("--join-token-file") + 1] == str(tmp_path / "ca" / "tokens" / "upstream")
    assert flags[flags.index("--trust-bundle") + 1] == str(tmp_path / "ca" / "ca.pem")
    assert flags[flags.index("--identity-dir") + 1] == str(tmp_path / "pods" / "b")
    argv = sidecar_args(service="upstream", address="127.77.6.1", app="127.77.2.1:8080",
                        controlplane="127.77.0.3", security=flags)
    assert "--insecure" not in argv and argv[argv.index("--controlplane") + 1] == "127.77.0.3:15010"
    assert sidecar_args(service="client", address="a", app="a:8080", controlplane="c")[-1] == "--insecure"


def test_a_sidecar_is_ready_for_mtls_only_with_a_usable_certificate() -> None:
    assert state_identity_usable({"identity": {"usable": True}})
    assert not state_identity_usable({"identity": {"usable": False, "problem": "no workload certificate yet"}})
    assert not state_identity_usable({"mode": "connecting"})


def test_secure_control_plane_listens_on_its_join_token_port_too() -> None:
    layout = Layout("127.77")
    assert (layout.controlplane_mtls, CP_IDENTITY_PORT) in layout.listeners()
    assert (layout.controlplane, CP_IDENTITY_PORT) not in layout.listeners()


def test_envoy_certificates_come_from_the_mesh_ca_with_the_services_spiffe_id(tmp_path: Path) -> None:
    now = time.time()
    authority = load_or_create_ca(tmp_path / "ca", "sidemesh.local", now)
    ca = MeshCa(tmp_path / "ca")
    files = issue_files(ca, "client", tmp_path / "envoy-a", now=now)
    cert = cert_from_pem(files.cert.read_bytes())
    assert uris_of(cert) == [CLIENT_URI] and spiffe_id_of(cert).service == "client"
    verify_issued_by(cert, authority.cert, now)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert files.ca == tmp_path / "ca" / "ca.pem"
    assert files.key.stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------- the fresh-connection client


def summary(connections: int, duration: float, *, errors: dict[str, int] | None = None, p99: float = 5.0,
            cpu: float = 1.0) -> str:
    return HANDSHAKE_JSON_MARK + json.dumps({
        "connections": connections, "duration_s": duration, "errors": errors or {},
        "latency_ms": {"p50": p99 / 2, "p90": p99 / 1.5, "p99": p99, "p99.9": p99 * 2},
        "client_cpu_s": cpu, "clients": 2})


def test_handshake_summary_is_read_from_its_json_line() -> None:
    result = parse_handshake("noise\n" + summary(900, 3.0, errors={"ssl:CERTIFICATE_VERIFY_FAILED": 2}) + "\n")
    assert result.rate == pytest.approx(300.0)
    assert result.error_count == 2 and result.clients == 2
    assert result.latency_ms["p99"] == pytest.approx(5.0)
    with pytest.raises(BenchError, match="no handshake summary"):
        parse_handshake("Traceback (most recent call last):\n")
    with pytest.raises(BenchError, match="malformed"):
        parse_handshake(HANDSHAKE_JSON_MARK + '{"connections": 1}')


def test_handshake_rounds_add_up_and_keep_the_median_rounds_latency() -> None:
    rounds = [parse_handshake(summary(300, 3.0, p99=4.0)), parse_handshake(summary(600, 3.0, p99=9.0, cpu=2.0)),
              parse_handshake(summary(450, 3.0, p99=6.0, errors={"status": 1}))]
    merged = merge_handshakes(rounds)
    assert merged.connections == 1350 and merged.duration_s == pytest.approx(9.0)
    assert merged.rate == pytest.approx(150.0)
    assert merged.latency_ms["p99"] == pytest.approx(6.0)  # the 450-connection round is the median
    assert merged.errors == {"status": 1} and merged.client_cpu_s == pytest.approx(4.0)


def test_each_fresh_connection_asks_for_one_response_and_the_close() -> None:
    assert request_bytes("upstream") == b"GET / HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n"


# ---------------------------------------------------------------- ratios and the last line


def path(name: str, *, rps: float, p99: float, cpu: float = 1.0) -> PathResult:
    return PathResult(
        name=name,
        saturation=WrkResult(requests=int(rps * 10), duration_s=10.0, errors={"read": 0},
                             latency_ms={"p50": 1.0, "p99": 2.0}),
        fixed_rate=FixedRateResult(target_rps=1000, achieved_rps=1000.0, requests=10_000, ok=10_000, failed=0,
                                   latency_ms={"p50": p99 / 3, "p90": p99 / 2, "p99": p99, "p99.9": p99 * 2,
                                               "max": p99 * 3, "mean": p99 / 3}),
        proxies=[ProxyUsage(name=f"{name}-a", pid=1, cpu_s_saturation=cpu, cpu_s_fixed_rate=0.5,
                            idle_rss_mb=50, peak_rss_mb=60)],
    )


def run(name: str, connections: int, server_cpu_s: float) -> HandshakeRun:
    result = HandshakeResult(connections=connections, duration_s=10.0, errors={}, latency_ms={"p50": 1.0,
                             "p99": 2.0}, client_cpu_s=5.0, clients=2)
    return HandshakeRun(name=name, proxy=f"{name}-b", result=result, server_cpu_s=server_cpu_s)


def test_mtls_ratios_compare_the_mtls_paths_only() -> None:
    paths = {"sidemesh": path("sidemesh", rps=12_000, p99=0.6), "envoy": path("envoy", rps=8_000, p99=0.8),
             "sidemesh-mtls": path("sidemesh-mtls", rps=9_000, p99=1.2),
             "envoy-mtls": path("envoy-mtls", rps=7_500, p99=0.8)}
    assert ratios(paths)["throughput"] == pytest.approx(1.5)
    mtls = ratios(paths, "mtls")
    assert mtls["throughput"] == pytest.approx(1.2)
    assert mtls["p99"] == pytest.approx(1.5)


def test_handshake_ratios_are_connections_per_second_and_cpu_per_connection() -> None:
    runs = {"sidemesh-mtls": run("sidemesh-mtls", 3_000, server_cpu_s=7.5),   # 300/s, 2.5 ms each
            "envoy-mtls": run("envoy-mtls", 6_000, server_cpu_s=6.0)}        # 600/s, 1.0 ms each
    assert runs["sidemesh-mtls"].server_cpu_ms_per_conn == pytest.approx(2.5)
    hs = handshake_ratios(runs)
    assert hs["handshakes"] == pytest.approx(0.5)
    assert hs["cpu_per_handshake"] == pytest.approx(2.5)
    assert handshake_ratios({"envoy-mtls": runs["envoy-mtls"]}) == {"handshakes": None, "cpu_per_handshake": None}
    assert math.isnan(run("x", 0, 1.0).server_cpu_ms_per_conn)


def test_last_line_puts_the_mtls_ratios_next_to_the_plaintext_ones() -> None:
    paths = {"sidemesh": path("sidemesh", rps=12_000, p99=0.6), "envoy": path("envoy", rps=8_000, p99=0.8),
             "sidemesh-mtls": path("sidemesh-mtls", rps=9_000, p99=1.2),
             "envoy-mtls": path("envoy-mtls", rps=7_500, p99=0.8)}
    runs = {"sidemesh-mtls": run("sidemesh-mtls", 3_000, 7.5), "envoy-mtls": run("envoy-mtls", 6_000, 6.0)}
    expected = ("sidemesh/envoy throughput=1.50 p99=0.75; "
                "sidemesh/envoy mtls throughput=1.20 p99=1.50 handshakes=0.50")
    assert summary_line(paths, runs) == expected
    table = format_table(paths, {"rate": 1000, "connections": 50, "duration": 15, "latency_duration": 15,
                                 "rounds": 3, "handshake_duration": 9}, runs)
    assert table.splitlines()[-1] == expected
    assert "mtls ratios:" in table and "cpu/handshake=2.50" in table


def test_last_line_without_mtls_is_the_plaintext_one_alone_and_mtls_alone_says_mtls() -> None:
    plain = {"sidemesh": path("sidemesh", rps=12_000, p99=0.6), "envoy": path("envoy", rps=8_000, p99=0.8)}
    assert summary_line(plain) == "sidemesh/envoy throughput=1.50 p99=0.75"
    mtls = {"sidemesh-mtls": path("sidemesh-mtls", rps=9_000, p99=1.2)}
    assert summary_line(mtls) == "sidemesh/envoy mtls throughput=n/a p99=n/a"
    assert ratio_line(ratios(mtls, "mtls"), "mtls", {"handshakes": None}) == \
        "sidemesh/envoy mtls throughput=n/a p99=n/a handshakes=n/a"


def test_json_has_mtls_ratios_the_handshake_runs_and_the_summary(tmp_path: Path) -> None:
    paths = {"sidemesh-mtls": path("sidemesh-mtls", rps=9_000, p99=1.2),
             "envoy-mtls": path("envoy-mtls", rps=7_500, p99=0.8)}
    runs = {"sidemesh-mtls": run("sidemesh-mtls", 3_000, 7.5), "envoy-mtls": run("envoy-mtls", 6_000, 6.0)}
    out = tmp_path / "dataplane.json"
    write_json(out, paths, {"tls": "mtls"}, {"notes": []}, runs)
    doc = json.loads(out.read_text())
    assert doc["ratios_sidemesh_over_envoy_mtls"]["throughput"] == pytest.approx(1.2)
    assert doc["ratios_sidemesh_over_envoy_mtls"]["handshakes"] == pytest.approx(0.5)
    assert doc["handshakes"]["envoy-mtls"]["rate"] == pytest.approx(600.0)
    assert doc["summary"].startswith("sidemesh/envoy mtls throughput=1.20")
