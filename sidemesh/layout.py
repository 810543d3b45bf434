"""Where everything of a local mesh lives, and the pure decisions of ``sidemesh up``.

Theory of operation: ``sidemesh up`` runs every component on its own loopback
address so the fixed ports of the design (8080, 15000/15001/15006, 15010/15014,
15053/15054) serve side by side, exactly as in compose where every pod has its
own IP. The layout is a pure function of the subnet:

    subnet 127.10 (a /16)               subnet 127.150.7 (a /24, used by tests)
    supervisor API  127.10.0.1:15100     127.150.7.1:15100
    control plane   127.10.0.2           127.150.7.2
    DNS server      127.10.0.3           127.150.7.3
    artist-2        127.10.1.2           127.150.7.12   (service index * 10 + replica)
    song-1          127.10.2.1           127.150.7.21
    image-1         127.10.3.1           127.150.7.31
    dashboard       127.0.0.1:15080      (``--dashboard``; tests give each mesh its own)

The dashboard is not a part of the mesh: it is a reader of every sidecar's admin API and of the
control API, started once the mesh is ready (never part of "ready"), and left out when its
port is taken (the mesh does not need it to serve). Hence not in ``initial_units``.

Which services there are, in which order, and how each app is started come from a
mesh file (``sidemesh.meshfile``; the demo's by default): the n-th service of the file is
service index n above, so the demo (artist, song, image) sits where it always did.

Everything here is pure (no I/O): the supervisor asks this module what to run,
which replicas a scale starts or stops, and what DNS should answer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from sidemesh.meshfile import MeshSpec, demo_mesh, pod_values, render, runs_sidemesh
from sidemesh.ports import (
    ADMIN_PORT,
    APP_PORT,
    CONTROL_PORT,
    CP_HTTP_PORT,
    DASHBOARD_PORT,
    DNS_API_PORT,
    DNS_PORT,
    GRPC_PORT,
    IDENTITY_PORT,
    INBOUND_PORT,
    OUTBOUND_PORT,
)

# the ports are named in sidemesh.ports; imported from here too by the rest of `up`
DEFAULT_CERT_TTL = "24h"

DEFAULT_SUBNET = "127.10"
DEFAULT_PUBLISH = "127.0.0.1:8080"
DEFAULT_ZONE = "mesh.local"
DEFAULT_DNS_TTL = 2.0
DEFAULT_DASHBOARD = f"127.0.0.1:{DASHBOARD_PORT}"

CONTROLPLANE = "controlplane"
DNS = "dns"
DASHBOARD = "dashboard"
# what turns the dashboard off in ``--dashboard``
DASHBOARD_OFF = ("0", "off", "none", "no")

MAX_REPLICAS_WIDE = 254  # /16 subnet: the replica is the last octet
MAX_REPLICAS_NARROW = 9  # /24 subnet: the last octet is index * 10 + replica
MAX_SERVICES_WIDE = 255  # /16 subnet: the service index is the third octet
MAX_SERVICES_NARROW = 24  # /24 subnet: index * 10 + 9 <= 249
# what an app's environment says on top of the user's (whose proxies are dropped): its
# egress is its sidecar, and calls to itself stay in the pod
NO_PROXY_BASE = "127.0.0.1,localhost"


class LayoutError(ValueError):
    """Bad input for the layout (subnet, replica count, name); the message says why."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_hostport(text: str, *, default_port: int | None = None) -> HostPort:
    """``'127.0.0.1:8080'`` -> HostPort; a bare host takes ``default_port`` if given."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = port_text, ""
    if not port_text:
        if default_port is None:
            raise LayoutError(f"{text!r}: expected HOST:PORT")
        return HostPort(host, default_port)
    if not host:
        raise LayoutError(f"{text!r}: expected HOST:PORT")
    try:
        port = int(port_text)
    except ValueError as exc:
        raise LayoutError(f"{text!r}: port {port_text!r} is not a number") from exc
    if not 0 < port < 65536:
        raise LayoutError(f"{text!r}: port {port} out of range 1-65535")
    return HostPort(host.strip("[]"), port)


def parse_dashboard(text: str) -> HostPort | None:
    """``--dashboard``: ``HOST:PORT``, a bare ``PORT`` (on 127.0.0.1), or ``0``/``off`` for none."""
    text = text.strip()
    if text.lower() in DASHBOARD_OFF:
        return None
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return parse_hostport(text, default_port=DASHBOARD_PORT)


def http_url(at: HostPort, path: str = "/") -> str:
    host = f"[{at.host}]" if ":" in at.host else at.host
    return f"http://{host}:{at.port}{path}"


def parse_subnet(text: str) -> tuple[int, ...]:
    """'127.10' or '127.150.7' -> its octets; anything else is a LayoutError."""
    parts = text.strip().strip(".").split(".")
    if len(parts) not in (2, 3) or parts[0] != "127":
        raise LayoutError(f"subnet {text!r}: expected 127.A (a /16) or 127.A.B (a /24) on loopback")
    try:
        octets = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise LayoutError(f"subnet {text!r}: octets must be numbers") from exc
    if any(not 0 <= o <= 255 for o in octets):
        raise LayoutError(f"subnet {text!r}: octets must be 0-255")
    return octets


def parse_replicas(items: Iterable[str], *, max_replicas: int = MAX_REPLICAS_WIDE,
                   mesh: MeshSpec | None = None) -> dict[str, int]:
    """``['artist=2', 'image=0']`` -> ``{'artist': 2, 'image': 0}``; services not named keep
    the mesh file's ``replicas`` (the demo's file when ``mesh`` is None)."""
    mesh = mesh or demo_mesh()
    counts = {s.name: check_replicas(s.name, s.replicas, max_replicas=max_replicas) for s in mesh.services}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            service, sep, count_text = part.partition("=")
            service = service.strip()
            if not sep or service not in counts:
                raise LayoutError(f"{part!r}: expected SERVICE=N with SERVICE one of {', '.join(mesh.names)}")
            counts[service] = check_replicas(service, count_text, max_replicas=max_replicas)
    return counts


def check_replicas(service: str, count: object, *, max_replicas: int) -> int:
    """A replica count as an int in 0..max_replicas, or a LayoutError saying why not."""
    try:
        n = int(str(count).strip())
    except ValueError as exc:
        raise LayoutError(f"{service}={count}: replica count must be a whole number") from exc
    if not 0 <= n <= max_replicas:
        raise LayoutError(f"{service}={n}: replicas must be between 0 and {max_replicas}")
    return n


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One OS process of a unit: its role ('app', 'sidecar', 'main') and its arguments.

    ``program`` None: the arguments are to this sidemesh (``python -m sidemesh ARGS``);
    otherwise the program itself, found on PATH or relative to ``cwd``. ``env`` is added to
    the supervisor's environment; ``cwd`` None: the supervisor's own.
    """

    role: str
    args: tuple[str, ...]
    program: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """Something `sidemesh kill/stop/start` can name: the control plane, DNS, or one pod."""

    name: str
    kind: str  # controlplane | dns | pod | dashboard
    address: str
    ports: Mapping[str, int]
    processes: tuple[ProcessSpec, ...]
    service: str | None = None
    replica: int | None = None


@dataclass(frozen=True, slots=True)
class IdentityPaths:
    """Where a local mesh keeps its identity material, below one state directory."""

    root: str

    @property
    def ca_dir(self) -> str:
        return f"{self.root}/ca"

    @property
    def bundle(self) -> str:
        return f"{self.root}/ca/ca.pem"

    @property
    def tokens_dir(self) -> str:
        return f"{self.root}/tokens"

    @property
    def pods_dir(self) -> str:
        return f"{self.root}/pods"


@dataclass(frozen=True, slots=True)
class MeshLayout:
    """The addresses and arguments of one local mesh, derived from its subnet."""

    subnet: str = DEFAULT_SUBNET
    publish: HostPort = field(default_factory=lambda: parse_hostport(DEFAULT_PUBLISH))
    zone: str = DEFAULT_ZONE
    dns_ttl: float = DEFAULT_DNS_TTL
    log_level: str = "info"
    # mutual TLS and workload identity (DESIGN.md, "Identity"); state_dir holds the CA, the
    # join tokens and each pod's identity cache (``identity_paths``)
    insecure: bool = False
    state_dir: str = ""
    cert_ttl: str = DEFAULT_CERT_TTL
    # the services, their apps and who may call whom (the demo's mesh file unless given)
    mesh: MeshSpec = field(default_factory=demo_mesh)

    def __post_init__(self) -> None:
        parse_subnet(self.subnet)
        most = MAX_SERVICES_NARROW if self.narrow else MAX_SERVICES_WIDE
        if len(self.mesh.services) > most:
            raise LayoutError(f"{self.mesh.source}: {len(self.mesh.services)} services, but subnet {self.subnet} "
                              f"has room for {most}")

    @property
    def narrow(self) -> bool:
        """True for a /24 subnet (127.A.B), False for a /16 (127.A)."""
        return len(parse_subnet(self.subnet)) == 3

    @property
    def max_replicas(self) -> int:
        return MAX_REPLICAS_NARROW if self.narrow else MAX_REPLICAS_WIDE

    def _host(self, hi: int, lo: int) -> str:
        base = ".".join(str(o) for o in parse_subnet(self.subnet))
        if self.narrow:
            return f"{base}.{hi * 10 + lo if hi else lo}"
        return f"{base}.{hi}.{lo}"

    @property
    def supervisor_address(self) -> str:
        return self._host(0, 1)

    @property
    def default_control(self) -> HostPort:
        return HostPort(self.supervisor_address, CONTROL_PORT)

    @property
    def controlplane_address(self) -> str:
        return self._host(0, 2)

    @property
    def dns_address(self) -> str:
        return self._host(0, 3)

    def pod_address(self, service: str, replica: int) -> str:
        if service not in self.mesh.names:
            raise LayoutError(f"unknown service {service!r}; known: {', '.join(self.mesh.names)}")
        if not 1 <= replica <= self.max_replicas:
            raise LayoutError(f"{service}-{replica}: replica out of range 1-{self.max_replicas}")
        return self._host(self.mesh.index(service), replica)

    def controlplane(self) -> UnitSpec:
        addr = self.controlplane_address
        args: tuple[str, ...] = ("controlplane", "--listen", addr, "--grpc-port", str(GRPC_PORT),
                                 "--http-port", str(CP_HTTP_PORT), "--log-level", self.log_level)
        if self.insecure:
            args += ("--insecure",)
        else:
            paths = self.identity_paths()
            args += ("--ca-dir", paths.ca_dir, "--join-tokens", paths.tokens_dir, "--cert-ttl", self.cert_ttl,
                     "--identity-port", str(IDENTITY_PORT))
            if self.mesh.allow:
                args += ("--allow", ",".join(self.mesh.allow))
        for spec in self.mesh.services:
            policy = spec.policy.flag(spec.name)
            if policy:
                args += ("--policy", policy)
        ports = {"grpc": GRPC_PORT, "http": CP_HTTP_PORT} | ({} if self.insecure else {"identity": IDENTITY_PORT})
        return UnitSpec(CONTROLPLANE, "controlplane", addr, ports,
                        (ProcessSpec("main", args),))

    def dns(self) -> UnitSpec:
        addr = self.dns_address
        args = ("dns", "--listen", addr, "--port", str(DNS_PORT), "--api-port", str(DNS_API_PORT),
                "--zone", self.zone, "--ttl", _num(self.dns_ttl))
        return UnitSpec(DNS, "dns", addr, {"dns": DNS_PORT, "api": DNS_API_PORT}, (ProcessSpec("main", args),))

    def app(self, service: str, replica: int) -> ProcessSpec:
        """The app of one pod, from the mesh file's command, listening on the pod's address."""
        spec = self.mesh.service(service)
        addr = self.pod_address(service, replica)
        proxy = f"http://{addr}:{OUTBOUND_PORT}"
        values = pod_values(spec, replica, host=addr, proxy=proxy)
        argv = tuple(render(a, values) for a in spec.command)
        no_proxy = f"{NO_PROXY_BASE},{addr}"
        env = {k: render(v, values) for k, v in spec.env.items()} | {
            "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": no_proxy, "no_proxy": no_proxy}
        if runs_sidemesh(argv):
            return ProcessSpec("app", argv[1:], env=env)
        return ProcessSpec("app", argv[1:], program=argv[0], env=env, cwd=self.mesh.directory)

    def pod(self, service: str, replica: int) -> UnitSpec:
        addr = self.pod_address(service, replica)
        name = pod_name(service, replica)
        port = self.mesh.service(service).port
        sidecar = ["sidecar", "--service", service, "--instance", name, "--address", addr,
                   "--listen", addr, "--outbound-listen", addr,
                   "--outbound-port", str(OUTBOUND_PORT), "--inbound-port", str(INBOUND_PORT),
                   "--admin-port", str(ADMIN_PORT), "--app", f"{addr}:{port}",
                   "--controlplane", f"{self.controlplane_address}:{GRPC_PORT}",
                   "--dns-server", f"{self.dns_address}:{DNS_PORT}",
                   "--dns-template", "{service}." + self.zone, "--dns-srv"]
        if self.insecure:
            sidecar.append("--insecure")
        else:
            paths = self.identity_paths()
            sidecar += ["--identity-dir", f"{paths.pods_dir}/{name}", "--join-token-file", f"{paths.tokens_dir}/{service}",
                        "--trust-bundle", paths.bundle, "--identity-port", str(IDENTITY_PORT)]
        ports = {"app": port, "outbound": OUTBOUND_PORT, "inbound": INBOUND_PORT, "admin": ADMIN_PORT}
        if self.mesh.publish is not None and service == self.mesh.publish.service and replica == 1:
            # only the first replica can hold the published port: two processes cannot bind it
            sidecar += ["--extra-inbound", str(self.publish)]
            ports["publish"] = self.publish.port
        return UnitSpec(name, "pod", addr, ports,
                        (self.app(service, replica), ProcessSpec("sidecar", tuple(sidecar))),
                        service=service, replica=replica)

    def dashboard(self, listen: HostPort, control: HostPort) -> UnitSpec:
        """``sidemesh dashboard`` on ``listen``, finding the sidecars through this mesh's control API."""
        args = ("dashboard", "--listen", str(listen), "--control", str(control))
        return UnitSpec(DASHBOARD, "dashboard", listen.host, {"http": listen.port}, (ProcessSpec("main", args),))

    def identity_paths(self) -> IdentityPaths:
        if not self.state_dir:
            raise LayoutError("a secure mesh needs a state directory for its CA and join tokens")
        return IdentityPaths(self.state_dir)

    def initial_units(self, replicas: Mapping[str, int]) -> list[UnitSpec]:
        """DNS, control plane, then every pod of ``replicas`` (service -> count)."""
        units = [self.dns(), self.controlplane()]
        for service in self.mesh.services:
            units += [self.pod(service.name, r) for r in range(1, replicas.get(service.name, 1) + 1)]
        return units

    def listen_sockets(self, replicas: Mapping[str, int]) -> list[tuple[str, str, int]]:
        """Every (proto, host, port) the mesh will bind, for a busy-port check before starting."""
        socks: list[tuple[str, str, int]] = [("udp", self.dns_address, DNS_PORT)]
        for unit in self.initial_units(replicas):
            socks += [("tcp", unit.address, p) for k, p in unit.ports.items() if k != "publish"]
        if self.mesh.publish is not None:
            socks.append(("tcp", self.publish.host, self.publish.port))
        return socks


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def pod_name(service: str, replica: int) -> str:
    return f"{service}-{replica}"


@dataclass(frozen=True, slots=True)
class ScalePlan:
    """What a scale does: replicas to start (new or not running) and replicas to stop and remove."""

    start: tuple[int, ...]
    remove: tuple[int, ...]


def plan_scale(states: Mapping[int, str], desired: int) -> ScalePlan:
    """Scale to ``desired`` replicas, like compose: replicas 1..desired run, higher ones go.

    ``states`` maps the replica numbers that exist to their state. Replicas up to
    ``desired`` that are not running are started (the lowest numbers first, new
    ones get the next numbers); every replica above ``desired`` is stopped and
    removed, highest first.
    """
    start = tuple(r for r in range(1, desired + 1) if states.get(r) != "running")
    remove = tuple(sorted((r for r in states if r > desired), reverse=True))
    return ScalePlan(start, remove)


# what ``sidemesh up`` tells its DNS server: service -> its pods (``sidemesh.dnszone`` reads them)
DnsRecords = dict[str, list[dict[str, str | int]]]


def dns_records(units: Iterable[tuple[UnitSpec, str]]) -> DnsRecords:
    """The DNS server's records: each service -> its running pods, by address.

    A pod is its address, its sidecar's inbound port (served as SRV, so a caller reaches it
    on that port, whatever its own) and its name. Services with no running pod are left out,
    so DNS answers NXDOMAIN for them (the truth) and sidecars keep their last-known-good
    endpoints.
    """
    records: DnsRecords = {}
    for spec, state in units:
        if spec.kind == "pod" and state == "running" and spec.service:
            records.setdefault(spec.service, []).append(
                {"address": spec.address, "port": spec.ports["inbound"], "instance": spec.name})
    return {s: sorted(pods, key=lambda p: ipaddress.ip_address(p["address"])) for s, pods in sorted(records.items())}


def record_addresses(records: DnsRecords) -> set[str]:
    """Every address the records name."""
    return {str(pod["address"]) for pods in records.values() for pod in pods}


def records_text(records: DnsRecords) -> str:
    """For the log: ``artist=127.10.1.1:15006,127.10.1.2:15006 song=...``."""
    return " ".join(f"{service}=" + ",".join(f"{pod['address']}:{pod['port']}" for pod in pods)
                    for service, pods in records.items()) or "none"


def resolve_target(name: str, specs: Iterable[UnitSpec], *, services: Collection[str] | None = None) -> list[UnitSpec]:
    """The units a NAME stands for: 'controlplane', 'dns', a service (all its replicas), 'artist-2'.

    ``services`` are the mesh's (the demo's when None), so a service scaled to 0 is named as
    such. Raises LayoutError naming the known names when nothing matches.
    """
    specs = list(specs)
    known_services = demo_mesh().names if services is None else services
    exact = [s for s in specs if s.name == name]
    if exact:
        return exact
    group = sorted((s for s in specs if s.kind == "pod" and s.service == name), key=lambda s: s.replica or 0)
    if group or name in known_services:
        if not group:
            raise LayoutError(f"service {name!r} has no replicas (scale it up with `sidemesh scale {name}=1`)")
        return group
    known = sorted({s.name for s in specs} | {s.service for s in specs if s.service})
    raise LayoutError(f"unknown name {name!r}; known: {', '.join(known)}")
