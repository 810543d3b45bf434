"""The benchmark's ratios, table, RSS trend and control-plane bookkeeping (pure parts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.controlplane import all_synced, goals_met, parse_sidecars, split
from benchmarks.loadtools import FixedRateResult, WrkResult
from benchmarks.memory import RssTrend, slope_per_minute
from benchmarks.report import PathResult, ProxyUsage, format_table, ratio_line, ratios, write_json
from benchmarks.envoyconfig import envoy_config
from benchmarks.servers import Layout, nginx_conf, state_has_route

NO_ERRORS = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}


def path(name: str, *, rps: float, p99: float, cpu: float = 1.0, rss: float = 50.0) -> PathResult:
    requests = int(rps * 10)
    return PathResult(
        name=name,
        saturation=WrkResult(requests=requests, duration_s=10.0, errors=dict(NO_ERRORS),
                             latency_ms={"p50": 1.0, "p99": 2.0}),
        fixed_rate=FixedRateResult(target_rps=1000, achieved_rps=1000.0, requests=10_000, ok=10_000, failed=0,
                                   latency_ms={"p50": p99 / 3, "p90": p99 / 2, "p99": p99, "p99.9": p99 * 2,
                                               "max": p99 * 3, "mean": p99 / 3}),
        proxies=[ProxyUsage(name=f"{name}-a", pid=1, cpu_s_saturation=cpu, cpu_s_fixed_rate=0.5,
                            idle_rss_mb=rss - 5, peak_rss_mb=rss),
                 ProxyUsage(name=f"{name}-b", pid=2, cpu_s_saturation=cpu, cpu_s_fixed_rate=0.5,
                            idle_rss_mb=rss - 5, peak_rss_mb=rss - 1)],
    )


def test_ratios_are_sidemesh_over_envoy() -> None:
    paths = {"sidemesh": path("sidemesh", rps=20_000, p99=0.6, cpu=4.0, rss=40),
             "envoy": path("envoy", rps=16_000, p99=1.2, cpu=2.0, rss=80)}
    r = ratios(paths)
    assert r["throughput"] == pytest.approx(1.25)
    assert r["p99"] == pytest.approx(0.5)
    # cpu per 10k: (4+4)/200k vs (2+2)/160k
    assert r["cpu_per_10k"] == pytest.approx((8 / 200_000) / (4 / 160_000))
    assert r["peak_rss"] == pytest.approx(0.5)


def test_cpu_per_10k_requests_sums_both_proxies_of_a_path() -> None:
    r = path("envoy", rps=10_000, p99=1.0, cpu=1.5)  # 100k requests, 3 CPU seconds
    assert r.cpu_s_per_10k == pytest.approx(0.3)
    assert r.cpu_s_per_10k_fixed_rate == pytest.approx(1.0)  # 0.5 + 0.5 s over 10k requests
    assert r.peak_rss_mb == 50


def test_table_ends_with_the_exact_ratio_line() -> None:
    paths = {"direct": PathResult("direct", path("d", rps=80_000, p99=0.1).saturation,
                                  path("d", rps=80_000, p99=0.1).fixed_rate),
             "sidemesh": path("sidemesh", rps=15_000, p99=1.5),
             "envoy": path("envoy", rps=16_000, p99=1.2)}
    table = format_table(paths, {"rate": 1000, "connections": 50, "duration": 10, "latency_duration": 10})
    assert table.splitlines()[-1] == "sidemesh/envoy throughput=0.94 p99=1.25"
    rows = [line.split()[0] for line in table.splitlines()[3:6]]
    assert rows == ["direct", "sidemesh", "envoy"]


def test_ratio_line_says_n_a_when_a_path_was_skipped() -> None:
    assert ratio_line(ratios({"sidemesh": path("sidemesh", rps=1, p99=1)})) == "sidemesh/envoy throughput=n/a p99=n/a"


def test_json_holds_settings_paths_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "results" / "dataplane.json"
    write_json(out, {"sidemesh": path("sidemesh", rps=20_000, p99=0.6), "envoy": path("envoy", rps=10_000, p99=1.2)},
               {"rate": 1000}, {"notes": []})
    doc = json.loads(out.read_text())
    assert doc["settings"] == {"rate": 1000}
    assert doc["ratios_sidemesh_over_envoy"]["throughput"] == pytest.approx(2.0)
    assert doc["paths"]["envoy"]["saturation"]["rps"] == pytest.approx(10_000)
    assert doc["paths"]["envoy"]["fixed_rate"]["sustained"] is True


def test_rss_slope_is_least_squares_per_minute_and_flat_needs_no_growth() -> None:
    assert slope_per_minute([50.0] * 30) == pytest.approx(0.0)
    assert slope_per_minute([50.0 + 0.1 * i for i in range(30)]) == pytest.approx(6.0)  # 0.1 MB/s
    warming = RssTrend("sidecar-a", [40.0, 45.0, 48.0] + [50.0] * 57, settle=5)
    assert warming.flat  # growth during the settle period does not count
    leaking = RssTrend("sidecar-a", [50.0 + 0.05 * i for i in range(60)], settle=5)
    assert not leaking.flat
    assert leaking.summary()["max_mb"] == pytest.approx(50.0 + 0.05 * 59)


def test_sidecar_state_routes_only_with_an_endpoint() -> None:
    assert state_has_route({"services": {"upstream": {"endpoints": [{"address": "127.77.2.1"}]}}}, "upstream")
    assert not state_has_route({"services": {"upstream": {"endpoints": []}}}, "upstream")
    assert not state_has_route({"services": {}}, "upstream")
    assert not state_has_route({"mode": "connecting"}, "upstream")


def test_envoy_config_forwards_any_host_to_the_next_hop_and_nginx_serves_12_bytes(tmp_path: Path) -> None:
    cfg = envoy_config(listen="127.77.3.1", port=15001, admin="127.77.3.1", admin_port=15000,
                       to_address="127.77.4.1", to_port=15006)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["route_config"]["virtual_hosts"][0]["domains"] == ["*"]
    assert "access_log" not in hcm
    endpoint = cfg["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "127.77.4.1", "port_value": 15006}
    conf = nginx_conf(prefix=tmp_path, address="127.77.2.1", port=8080)
    assert "worker_processes 1;" in conf and "access_log off;" in conf and "listen 127.77.2.1:8080;" in conf
    assert 'return 200 "hello world\\n";' in conf


def test_layout_puts_every_pod_on_its_own_loopback_address() -> None:
    layout = Layout("127.77")
    addresses = {layout.controlplane, layout.pod_a, layout.pod_b, layout.envoy_a, layout.envoy_b,
                 layout.controlplane_mtls, layout.pod_a_mtls, layout.pod_b_mtls, layout.envoy_a_mtls,
                 layout.envoy_b_mtls, layout.envoy_a_fresh}
    assert len(addresses) == 11 and all(a.startswith("127.77.") for a in addresses)
    assert len(set(layout.listeners())) == len(layout.listeners())


def test_control_plane_status_counts_as_synced_only_when_all_are_on_its_version() -> None:
    synced = {"version": "v2", "sidecars": [{"synced": True, "acked_version": "v2"}] * 3}
    assert all_synced(synced, 3) == "v2"
    assert all_synced(synced, 4) is None
    behind = {"version": "v2", "sidecars": [{"synced": True, "acked_version": "v2"},
                                            {"synced": False, "acked_version": "v1"}]}
    assert all_synced(behind, 2) is None


def test_streams_are_split_evenly_over_load_processes_and_goals_apply_from_1000() -> None:
    assert split(1000, 3) == [334, 333, 333]
    assert split(2, 5) == [1, 1]
    assert parse_sidecars("100,1000") == [100, 1000]
    ok = {"sidecars": 1000, "change_to_last_ack_ms": 420.0, "cp_peak_rss_mb": 150.0, "change_seen_in_snapshot": True}
    assert goals_met(ok)
    assert not goals_met({**ok, "change_to_last_ack_ms": 615.0})
    assert not goals_met({**ok, "cp_peak_rss_mb": 600.0})
    assert goals_met({**ok, "sidecars": 100, "change_to_last_ack_ms": 9999.0})
