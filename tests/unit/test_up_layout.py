"""The pure decisions of `sidemesh up`: addresses, arguments, scale plans, DNS records, names."""

from __future__ import annotations

from typing import Any

from pathlib import Path

import dns.message
import pytest

from sidemesh.dnsserver import MeshDnsServer
from sidemesh.layout import (
    HostPort,
    LayoutError,
    MeshLayout,
    dns_records,
    http_url,
    parse_dashboard,
    parse_hostport,
    parse_replicas,
    plan_scale,
    record_addresses,
    resolve_target,
)


def _arg(args: tuple[str, ...], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def _layout(**kw: Any) -> MeshLayout:
    """A secure local mesh (the default) keeps its CA and tokens below a state directory."""
    return MeshLayout(**{"state_dir": "/state", **kw})


def test_default_layout_puts_every_part_where_the_design_says() -> None:
    lay = _layout()
    assert str(lay.default_control) == "127.10.0.1:15100"
    assert lay.controlplane_address == "127.10.0.2"
    assert lay.dns_address == "127.10.0.3"
    assert lay.pod_address("artist", 1) == "127.10.1.1"
    assert lay.pod_address("artist", 2) == "127.10.1.2"
    assert lay.pod_address("song", 1) == "127.10.2.1"
    assert lay.pod_address("image", 1) == "127.10.3.1"


def test_narrow_subnet_packs_service_and_replica_into_the_last_octet() -> None:
    lay = _layout(subnet="127.150.7")
    assert lay.supervisor_address == "127.150.7.1"
    assert lay.controlplane_address == "127.150.7.2"
    assert lay.dns_address == "127.150.7.3"
    assert lay.pod_address("artist", 2) == "127.150.7.12"
    assert lay.pod_address("image", 9) == "127.150.7.39"
    with pytest.raises(LayoutError, match="1-9"):
        lay.pod_address("artist", 10)


@pytest.mark.parametrize("bad", ["10.0", "127", "127.1.2.3", "127.x", "127.300"])
def test_subnet_outside_loopback_or_malformed_is_refused(bad: str) -> None:
    with pytest.raises(LayoutError):
        MeshLayout(subnet=bad)


def test_pod_sidecar_points_at_the_mesh_control_plane_and_dns_and_its_own_app() -> None:
    pod = _layout().pod("artist", 2)
    app, sidecar = pod.processes
    assert (app.role, sidecar.role) == ("app", "sidecar")
    assert app.args[:2] == ("service", "artist")
    assert _arg(app.args, "--host") == ["127.10.1.2"]
    assert _arg(app.args, "--instance") == ["artist-2"]
    assert _arg(app.args, "--proxy") == ["http://127.10.1.2:15001"]
    assert _arg(sidecar.args, "--controlplane") == ["127.10.0.2:15010"]
    assert _arg(sidecar.args, "--dns-server") == ["127.10.0.3:15053"]
    assert _arg(sidecar.args, "--dns-template") == ["{service}.mesh.local"]
    assert "--dns-srv" in sidecar.args  # peers' inbound ports come from the DNS server's SRV records
    assert _arg(sidecar.args, "--app") == ["127.10.1.2:8080"]
    assert _arg(sidecar.args, "--listen") == ["127.10.1.2"]
    assert _arg(sidecar.args, "--outbound-listen") == ["127.10.1.2"]
    assert _arg(sidecar.args, "--address") == ["127.10.1.2"]
    assert _arg(sidecar.args, "--extra-inbound") == []


def test_only_the_first_song_replica_holds_the_published_port() -> None:
    lay = _layout(publish=HostPort("127.0.0.1", 18080))
    assert _arg(lay.pod("song", 1).processes[1].args, "--extra-inbound") == ["127.0.0.1:18080"]
    assert _arg(lay.pod("song", 2).processes[1].args, "--extra-inbound") == []
    assert lay.pod("song", 1).ports["publish"] == 18080


def test_control_plane_and_dns_listen_on_their_own_addresses_with_the_given_ttl() -> None:
    lay = _layout(subnet="127.11", dns_ttl=0.5)
    cp = lay.controlplane().processes[0].args
    dns = lay.dns().processes[0].args
    assert _arg(cp, "--listen") == ["127.11.0.2"]
    assert _arg(dns, "--listen") == ["127.11.0.3"]
    assert _arg(dns, "--ttl") == ["0.5"]
    assert _arg(dns, "--zone") == ["mesh.local"]


def test_initial_units_follow_the_replica_counts() -> None:
    names = [u.name for u in _layout().initial_units({"artist": 2, "song": 1, "image": 0})]
    assert names == ["dns", "controlplane", "artist-1", "artist-2", "song-1"]


def test_listen_sockets_cover_every_fixed_port_and_the_published_one() -> None:
    socks = set(_layout().listen_sockets({"artist": 1, "song": 1, "image": 1}))
    assert ("udp", "127.10.0.3", 15053) in socks
    assert ("tcp", "127.10.0.2", 15010) in socks
    assert ("tcp", "127.10.3.1", 15000) in socks
    assert ("tcp", "127.0.0.1", 8080) in socks


def test_replicas_parse_and_validate() -> None:
    assert parse_replicas(["artist=2", "image=0,song=3"]) == {"artist": 2, "song": 3, "image": 0}
    assert parse_replicas([]) == {"artist": 1, "song": 1, "image": 1}
    for bad in (["artist"], ["nosuch=1"], ["artist=-1"], ["artist=x"], ["artist=300"]):
        with pytest.raises(LayoutError):
            parse_replicas(bad)


def test_hostport_parsing() -> None:
    assert parse_hostport("127.0.0.1:8080") == HostPort("127.0.0.1", 8080)
    assert parse_hostport("controlplane", default_port=15014) == HostPort("controlplane", 15014)
    for bad in ("127.0.0.1", "host:0", "host:x", ":80"):
        with pytest.raises(LayoutError):
            parse_hostport(bad)


def test_scale_up_starts_the_next_replica_numbers() -> None:
    plan = plan_scale({1: "running"}, 3)
    assert plan.start == (2, 3)
    assert plan.remove == ()


def test_scale_down_removes_the_highest_numbered_first() -> None:
    plan = plan_scale({1: "running", 2: "running", 3: "running"}, 1)
    assert plan.start == ()
    assert plan.remove == (3, 2)


def test_scale_restarts_a_killed_replica_within_the_count_and_drops_dead_ones_above_it() -> None:
    plan = plan_scale({1: "killed", 2: "running", 3: "exited"}, 2)
    assert plan.start == (1,)
    assert plan.remove == (3,)


def test_scale_to_the_current_count_does_nothing() -> None:
    plan = plan_scale({1: "running", 2: "running"}, 2)
    assert (plan.start, plan.remove) == ((), ())


def test_dns_records_list_only_running_pods_per_service_with_their_sidecars_inbound_port() -> None:
    lay = _layout()
    units = [(lay.dns(), "running"), (lay.controlplane(), "killed"),
             (lay.pod("artist", 1), "running"), (lay.pod("artist", 2), "killed"),
             (lay.pod("artist", 10), "running"), (lay.pod("song", 1), "running"), (lay.pod("image", 1), "stopped")]
    assert dns_records(units) == {
        "artist": [{"address": "127.10.1.1", "port": 15006, "instance": "artist-1"},
                   {"address": "127.10.1.10", "port": 15006, "instance": "artist-10"}],
        "song": [{"address": "127.10.2.1", "port": 15006, "instance": "song-1"}],
    }


def test_the_records_of_up_are_accepted_by_its_dns_server_which_serves_them_as_srv() -> None:
    lay = _layout()
    records = dns_records([(lay.pod("artist", 1), "running"), (lay.pod("artist", 2), "running")])
    server = MeshDnsServer(lay.zone, 2)
    assert server.set_records(records) == records
    response = dns.message.from_wire(server.handle_wire(
        dns.message.make_query("_mesh-inbound._tcp.artist." + lay.zone, "SRV").to_wire(), tcp=False) or b"")
    assert sorted((r.port, r.target.to_text()) for r in response.answer[0]) == [
        (15006, "artist-1.artist.mesh.local."), (15006, "artist-2.artist.mesh.local.")]


def test_names_resolve_to_one_unit_a_whole_service_or_a_clear_error() -> None:
    lay = _layout()
    specs = lay.initial_units({"artist": 2, "song": 1, "image": 1})
    assert [s.name for s in resolve_target("controlplane", specs)] == ["controlplane"]
    assert [s.name for s in resolve_target("artist", specs)] == ["artist-1", "artist-2"]
    assert [s.name for s in resolve_target("artist-2", specs)] == ["artist-2"]
    with pytest.raises(LayoutError, match="unknown name 'artist-3'.*artist-1"):
        resolve_target("artist-3", specs)
    with pytest.raises(LayoutError, match="no replicas"):
        resolve_target("image", [s for s in specs if s.service != "image"])


async def test_a_pod_enters_dns_only_once_it_is_ready(tmp_path: Path) -> None:
    """A record for a pod whose app is still starting would send callers to a 503 (seen in CI)."""
    from sidemesh.supervisor import Supervisor, Unit

    layout = _layout()
    sup = Supervisor(layout, tmp_path)
    one, two = Unit(layout.pod("artist", 1), state="running", ready=True), Unit(layout.pod("artist", 2), state="running")
    sup.units = {"artist-1": one, "artist-2": two}
    assert record_addresses(sup.records()) == {one.spec.address}
    two.ready = True
    assert record_addresses(sup.records()) == {one.spec.address, two.spec.address}
    two.state = "killed"
    assert record_addresses(sup.records()) == {one.spec.address}


def test_a_secure_mesh_gives_the_control_plane_its_ca_tokens_and_the_demo_policy() -> None:
    args = _layout(cert_ttl="20s").controlplane().processes[0].args
    assert "--insecure" not in args
    def value(flag: str) -> str:
        return args[args.index(flag) + 1]
    assert value("--ca-dir") == "/state/ca" and value("--join-tokens") == "/state/tokens"
    assert value("--allow") == "song->artist,song->image" and value("--cert-ttl") == "20s"


def test_a_secure_pod_gets_its_own_identity_dir_its_service_token_and_the_bundle() -> None:
    args = _layout().pod("artist", 2).processes[1].args
    def value(flag: str) -> str:
        return args[args.index(flag) + 1]
    assert value("--identity-dir") == "/state/pods/artist-2"
    assert value("--join-token-file") == "/state/tokens/artist"
    assert value("--trust-bundle") == "/state/ca/ca.pem"


def test_an_insecure_mesh_passes_insecure_to_everyone_and_needs_no_state() -> None:
    lay = MeshLayout(insecure=True)
    assert "--insecure" in lay.controlplane().processes[0].args
    assert "--insecure" in lay.pod("song", 1).processes[1].args
    assert "--ca-dir" not in lay.controlplane().processes[0].args


def test_a_secure_mesh_without_a_state_directory_is_a_clear_error() -> None:
    with pytest.raises(LayoutError, match="state directory"):
        MeshLayout().controlplane()


def test_the_dashboard_listens_where_asked_and_finds_the_mesh_through_its_control_api() -> None:
    lay = _layout()
    spec = lay.dashboard(HostPort("127.0.0.1", 15080), lay.default_control)
    assert (spec.name, spec.kind, spec.address, dict(spec.ports)) == ("dashboard", "dashboard", "127.0.0.1", {"http": 15080})
    (proc,) = spec.processes
    assert proc.role == "main" and proc.args[0] == "dashboard"
    assert _arg(proc.args, "--listen") == ["127.0.0.1:15080"] and _arg(proc.args, "--control") == ["127.10.0.1:15100"]
    # not part of the mesh: not among its units, and a name `sidemesh kill/start` knows once it runs
    assert "dashboard" not in [u.name for u in lay.initial_units({"artist": 1, "song": 1, "image": 1})]
    assert resolve_target("dashboard", [*lay.initial_units({}), spec]) == [spec]


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:15080", HostPort("127.0.0.1", 15080)),
    ("15081", HostPort("127.0.0.1", 15081)),
    ("127.150.7.1", HostPort("127.150.7.1", 15080)),
    (" 0 ", None), ("off", None), ("OFF", None), ("none", None),
])
def test_the_dashboard_flag_takes_an_address_a_bare_port_or_off(text: str, expected: HostPort | None) -> None:
    assert parse_dashboard(text) == expected


@pytest.mark.parametrize("bad", ["127.0.0.1:99999", "127.0.0.1:http", ":15080"])
def test_a_malformed_dashboard_flag_is_a_clear_error(bad: str) -> None:
    with pytest.raises(LayoutError):
        parse_dashboard(bad)


def test_http_url_brackets_an_ipv6_host() -> None:
    assert http_url(HostPort("127.0.0.1", 15080)) == "http://127.0.0.1:15080/"
    assert http_url(HostPort("::1", 15080), "/healthz") == "http://[::1]:15080/healthz"
