"""``sidemesh compose``: the compose file of a mesh file.

    sidemesh compose [-f mesh.toml] [-o docker-compose.yml]

Theory of operation: a compose file is the mesh's fixed parts, and a pod per replica of
every service in the mesh file. The fixed parts are the anchors every container merges
(``x-pod``, ``x-image``: the sidemesh image, ``x-sidecar``) and the infrastructure services,
listed once in ``INFRASTRUCTURE`` (the one-shot ``identity`` service that makes the CA and a
join token per service, and the control plane); another one is a function returning a
``Block`` added to that tuple. A pod is two compose services sharing one network namespace,
as in a Kubernetes pod: the app, and its sidecar with ``network_mode: "service:<app>"``.

Naming: a service with one replica runs as the compose service NAME; with several, as
NAME-1 .. NAME-N, each with the network alias NAME, so Docker's DNS answers NAME with every
replica (the sidecars' DNS fallback: ``--dns-template {service}``). Replica r is always the
instance NAME-r, and its sidecar the compose service ``<app>-sidecar``.

The demo's docker-compose.yml is this command's output for the demo's mesh file, and a test
keeps it so (tests/unit/test_compose_file.py). Paths (build contexts) are written relative
to the compose file's directory, where compose resolves them; strings from the mesh file
have ``$`` doubled, so compose passes them on as written instead of interpolating them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidemesh.composeyaml import Alias, Anchored, Comment, Flow, document
from sidemesh.meshfile import (
    MeshFileError,
    MeshSpec,
    ServiceSpec,
    demo_mesh,
    load_mesh,
    pod_values,
    render,
    runs_sidemesh,
)
from sidemesh.ports import ADMIN_PORT, CP_HTTP_PORT, DASHBOARD_PORT, FRONT_DOOR_PORT, GRPC_PORT, OUTBOUND_PORT

COMPOSE_VERSION = "2.4"
IMAGE = "${SIDEMESH_IMAGE:-sidemesh:latest}"
LOG_LEVEL = "${SIDEMESH_LOG_LEVEL:-info}"
APP_HOST = "127.0.0.1"  # in its pod, an app listens on the pod's loopback: only its sidecar reaches it
PROXY = f"http://127.0.0.1:{OUTBOUND_PORT}"
NO_PROXY = "127.0.0.1,localhost"
JOIN_DIR = "/var/lib/sidemesh/join"  # where a sidecar finds its service's token and the CA certificate
CA_DIR = "/var/lib/sidemesh/ca"
RULE = 96  # width of the "# --- name ---" lines


@dataclass(frozen=True, slots=True)
class Target:
    """What is being written: ``mesh`` as a compose file in directory ``base``, named ``name``."""

    mesh: MeshSpec
    base: Path
    name: str = "docker-compose.yml"

    def relative(self, path: str) -> str:
        """``path`` as compose reads it from the file's directory."""
        return Path(os.path.relpath(path, self.base)).as_posix()


@dataclass(frozen=True, slots=True)
class Block:
    """A compose service: its name, the comment above it, its definition, the volumes it needs."""

    name: str
    comment: str
    definition: dict[object, object]
    volumes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Pod:
    """One replica of a service in compose."""

    service: ServiceSpec
    replica: int
    app: str  # the app's compose service, which owns the network namespace
    alias: bool  # several replicas: each answers to the service's name through a network alias
    front_door: bool

    @property
    def instance(self) -> str:
        return f"{self.service.name}-{self.replica}"

    @property
    def sidecar(self) -> str:
        return f"{self.app}-sidecar"


def pods(mesh: MeshSpec) -> list[Pod]:
    """Every replica of every service, in the mesh file's order."""
    out = []
    for spec in mesh.services:
        n = spec.compose.replicas
        for r in range(1, n + 1):
            front = mesh.publish is not None and mesh.publish.service == spec.name and r == 1
            out.append(Pod(spec, r, spec.name if n == 1 else f"{spec.name}-{r}", n > 1, front))
    return out


def volume(service: str) -> str:
    """The volume holding ``service``'s join token and the CA certificate."""
    return f"identity-{service}"


def python_check(code: str) -> Flow:
    """A healthcheck in the image's own python3, isolated (-I -S: no site, no env, no user paths)."""
    return Flow(["CMD", "python3", "-I", "-S", "-c", code])


def http_check(port: int, path: str) -> Flow:
    url = f"http://127.0.0.1:{port}{path}"
    return python_check("import sys, urllib.request as u; sys.exit(u.build_opener(u.ProxyHandler({}))"
                        f".open({url!r}, timeout=2).status != 200)")


def port_check(port: int) -> Flow:
    return python_check(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()")


def healthcheck(test: Flow, *, interval: str) -> dict[object, object]:
    return {"test": test, "interval": interval, "timeout": "3s", "retries": 15, "start_period": "10s"}


def literal(text: str) -> str:
    """A mesh file's string as compose must see it to pass it on unchanged (no ``${...}``)."""
    return text.replace("$", "$$")


# ---- the fixed parts ------------------------------------------------------------


def anchors(target: Target) -> dict[object, object]:
    """The blocks every container merges: the pod's process settings, the sidemesh image, a sidecar."""
    image: dict[object, object] = {"<<": Alias("pod"), "image": IMAGE}
    if target.mesh.build is not None:
        image["build"] = {"context": target.relative(target.mesh.build),
                          "args": {"BASE": "${SIDEMESH_BASE_IMAGE:-python:3.11-slim}", "WHEELS": "${SIDEMESH_WHEELS:-}"}}
    return {
        Comment("every container: an init that reaps, 5 s to leave on stop, never restarted behind a drill's back"):
            None,
        "x-pod": Anchored("pod", {"init": True, "stop_grace_period": "5s", "restart": "no"}),
        Comment(""): None,
        Comment("The sidemesh image. `up` builds it when missing (online: python:3.11-slim + PyPI); the\n"
                "offline path builds and tags it first (scripts/offline-build), or set SIDEMESH_BASE_IMAGE\n"
                "and SIDEMESH_WHEELS to build that way through compose. Every service on it carries the same\n"
                "build so that both compose versions find it without a registry; the builds after the\n"
                "first one are cache hits." if target.mesh.build is not None else
                "The sidemesh image, built or pulled beforehand (docker build -t sidemesh:latest <sidemesh's "
                "checkout>)"): None,
        "x-image": Anchored("image", image),
        Comment(""): None,
        Comment("a sidecar container; its pod's network namespace is given per pod (network_mode)"): None,
        "x-sidecar": Anchored("sidecar", {
            "<<": Alias("image"),
            "environment": {"SIDEMESH_LOG_LEVEL": LOG_LEVEL},
            "healthcheck": {
                Comment("200 once the sidecar can route (mode controlplane or dns), 503 while connecting"): None,
                **healthcheck(http_check(ADMIN_PORT, "/ready"), interval="3s"),
            },
        }),
    }


def identity_service(target: Target) -> Block:
    names = target.mesh.names
    command: list[object] = ["identity", "init", "--ca-dir", "/identity/ca", "--services", ",".join(names)]
    for name in names:
        command += ["--export", f"{name}=/identity/{name}"]
    return Block(
        "identity",
        "identity: the mesh CA and one join token per service, made once (kept in volumes).\n"
        "The control plane gets the CA and every token; each service's sidecars mount only their\n"
        "own token and the public CA certificate (sidemesh identity init --help).",
        {"<<": Alias("image"), "command": Flow(command),
         "volumes": ["identity-ca:/identity/ca", *(f"{volume(n)}:/identity/{n}" for n in names)]},
        volumes=("identity-ca", *(volume(n) for n in names)),
    )


def controlplane_service(target: Target) -> Block:
    mesh = target.mesh
    command: list[object] = ["controlplane", "--listen", "0.0.0.0", "--ca-dir", CA_DIR,
                             "--join-tokens", f"{CA_DIR}/tokens"]
    if mesh.allow:
        command += ["--allow", ",".join(mesh.allow)]
        who = f"who may call whom: {', '.join(mesh.allow)}; nobody else may call anyone"
    else:
        who = "the mesh file allows no calls by name, so authorization is not enforced"
    for spec in mesh.services:
        policy = spec.policy.flag(spec.name)
        if policy:
            command += ["--policy", policy]
    return Block(
        "controlplane",
        "controlplane: routes for every sidecar, and certificates from the CA (mutual TLS on 15010,\n"
        f"join tokens on 15012); {who}",
        {
            "<<": Alias("image"),
            "command": Flow(command),
            "volumes": [f"identity-ca:{CA_DIR}"],
            "depends_on": {"identity": {"condition": "service_completed_successfully"}},
            "environment": {
                "SIDEMESH_LOG_LEVEL": LOG_LEVEL,
                Comment("POST /faults from outside the container (the host comes in through the bridge\n"
                        "gateway) needs this bearer token; unset, only the container's own loopback may post\n"
                        "(docker compose exec controlplane sidemesh fault ... --controlplane-http 127.0.0.1:15014)"):
                    None,
                "SIDEMESH_ADMIN_TOKEN": "${SIDEMESH_ADMIN_TOKEN:-}",
            },
            Comment(f"its HTTP status API for the host: curl localhost:{CP_HTTP_PORT}/status"): None,
            "ports": [f"127.0.0.1:${{SIDEMESH_CONTROLPLANE_HTTP_PORT:-{CP_HTTP_PORT}}}:{CP_HTTP_PORT}"],
            "healthcheck": healthcheck(http_check(CP_HTTP_PORT, "/healthz"), interval="3s"),
        },
    )


def dashboard_service(target: Target) -> Block:
    pod_list = pods(target.mesh)
    seed = next((p for p in pod_list if p.front_door), pod_list[0])
    return Block(
        "dashboard",
        "dashboard: the live page of the mesh (docs/dashboard.md). It starts from one sidecar's admin\n"
        "API (every sidecar that one knows is asked too) and asks the control plane's /status only when\n"
        "it answers, so it keeps showing the mesh while the control plane is dead. No depends_on: it\n"
        "waits for nobody and nobody waits for it.",
        {
            "<<": Alias("image"),
            "command": Flow(["dashboard", "--listen", f"0.0.0.0:{DASHBOARD_PORT}", "--admin", f"{seed.app}:{ADMIN_PORT}",
                             "--controlplane-http", f"controlplane:{CP_HTTP_PORT}"]),
            "ports": [f"127.0.0.1:${{SIDEMESH_DASHBOARD_PORT:-{DASHBOARD_PORT}}}:{DASHBOARD_PORT}"],
            "healthcheck": {
                Comment("200 while its rounds of questions complete (whether or not the mesh answers them)"): None,
                **healthcheck(http_check(DASHBOARD_PORT, "/healthz"), interval="3s"),
            },
        },
    )


# The mesh's own services, in the order they are written. One more is a function like these
# added here; its name must be one of meshfile.RESERVED_NAMES.
INFRASTRUCTURE: tuple[Callable[[Target], Block], ...] = (identity_service, controlplane_service, dashboard_service)


# ---- the pods -------------------------------------------------------------------


def app_anchor(target: Target, spec: ServiceSpec) -> dict[object, object]:
    """What every replica of ``spec``'s app shares: image, environment, healthcheck."""
    compose = spec.compose
    base: dict[object, object]
    if compose.on_sidemesh_image:
        base = {"<<": Alias("image")}
    else:
        base = {"<<": Alias("pod")}
        if compose.image is not None:
            base["image"] = literal(compose.image)
        if compose.build is not None:
            base["build"] = {"context": target.relative(compose.build)}
    env: dict[object, object] = {"HTTP_PROXY": PROXY, "NO_PROXY": NO_PROXY}
    if compose.on_sidemesh_image:
        env["SIDEMESH_LOG_LEVEL"] = LOG_LEVEL
    values = pod_values(spec, 1, host=APP_HOST, proxy=PROXY)
    env |= {k: literal(render(v, values)) for k, v in spec.env.items()}
    if compose.healthcheck is not None:
        test = Flow([literal(a) for a in compose.healthcheck])
    elif spec.health:
        test = http_check(spec.port, spec.health)
    else:
        test = port_check(spec.port)
    return {**base, "environment": env, "healthcheck": {
        Comment("its sidecar starts once this passes (depends_on: service_healthy), hence the short interval"): None,
        **healthcheck(test, interval="1s")}}


def app_service(target: Target, pod: Pod) -> dict[object, object]:
    spec = pod.service
    argv = [render(a, pod_values(spec, pod.replica, host=APP_HOST, proxy=PROXY)) for a in spec.compose.command]
    if spec.compose.on_sidemesh_image and runs_sidemesh(argv):
        argv = argv[1:]  # the image's entry point is sidemesh
    out: dict[object, object] = {"<<": Alias(f"app-{spec.name}"), "command": Flow([literal(a) for a in argv])}
    if pod.alias:
        out["networks"] = {"default": {"aliases": Flow([spec.name])}}
    if pod.front_door and target.mesh.publish is not None:
        out[Comment(f"the pod's ports are published on the app container (its sidecar shares its network):\n"
                    f"host 127.0.0.1:{target.mesh.publish.port} -> {spec.name}'s sidecar front door "
                    f"{FRONT_DOOR_PORT} (plaintext ingress;\nthe mesh port 15006 speaks mutual TLS only) -> "
                    f"{spec.name} app 127.0.0.1:{spec.port}")] = None
        out["ports"] = [f"127.0.0.1:${{SIDEMESH_PORT:-{target.mesh.publish.port}}}:{FRONT_DOOR_PORT}"]
    return out


def sidecar_service(pod: Pod) -> dict[object, object]:
    command: list[object] = [
        "sidecar", "--service", pod.service.name, "--instance", pod.instance,
        "--controlplane", f"controlplane:{GRPC_PORT}", "--app", f"127.0.0.1:{pod.service.port}",
        "--listen", "0.0.0.0", "--outbound-listen", "127.0.0.1", "--dns-template", "{service}",
    ]
    if pod.front_door:
        command += ["--extra-inbound", f"0.0.0.0:{FRONT_DOOR_PORT}"]
    command += ["--join-token-file", f"{JOIN_DIR}/token", "--trust-bundle", f"{JOIN_DIR}/ca.pem"]
    return {
        "<<": Alias("sidecar"),
        "network_mode": f"service:{pod.app}",
        "volumes": [f"{volume(pod.service.name)}:{JOIN_DIR}:ro"],
        "depends_on": {pod.app: {"condition": "service_healthy"},
                       "identity": {"condition": "service_completed_successfully"}},
        "command": Flow(command),
    }


def _rule(text: str) -> Comment:
    head = f"--- {text} "
    return Comment(head + "-" * max(3, RULE - len(head)))


def _service_title(mesh: MeshSpec, spec: ServiceSpec) -> str:
    n = spec.compose.replicas
    title = f"{spec.name}: {n} replicas, all answer to the DNS name \"{spec.name}\"" if n > 1 else spec.name
    if mesh.publish is not None and mesh.publish.service == spec.name:
        title += f"; the front door, on 127.0.0.1:{mesh.publish.port}"
    return title


# ---- the file ---------------------------------------------------------------------


def header(target: Target) -> str:
    mesh = target.mesh
    source = target.relative(str(Path(mesh.source).resolve()))
    names = ", ".join(f"{s.name} x{s.compose.replicas}" if s.compose.replicas > 1 else s.name for s in mesh.services)
    front = next((p for p in pods(mesh) if p.front_door), None)
    status_from = front.sidecar if front else pods(mesh)[0].sidecar
    lines = [
        f"GENERATED from the mesh file {source}: do not edit this file. Change that one",
        "and run, in this file's directory:",
        f"    sidemesh compose -f {source} -o {target.name}",
        "",
        "The mesh as containers: the control plane, and every service as a \"pod\" of two containers,",
        "the app and its sidecar, sharing one network namespace (the sidecar runs with network_mode",
        f"\"service:<app>\"), like a Kubernetes pod. Services: {names}.",
        "",
        "  docker compose up --build -d                 # online: base python:3.11-slim, deps from PyPI",
    ]
    if mesh.build is not None:
        offline = target.relative(str(Path(mesh.build) / "scripts" / "offline-build"))
        lines.append(f"  {offline} && docker compose up -d" + " " * max(1, 23 - len(offline))
                     + "# no registry: see scripts/offline-build")
    if mesh.publish is not None:
        curl = f"curl localhost:{mesh.publish.port}{mesh.publish.path}"
        lines.append(f"  {curl:<44} # through the front door ({mesh.publish.service}), via the mesh")
    lines += [
        "  docker compose kill controlplane             # the outage: sidecars switch to DNS",
        f"  docker compose exec {status_from} sidemesh status",
        "  docker compose start controlplane            # sidecars re-sync and leave DNS",
        f"  open http://127.0.0.1:{DASHBOARD_PORT}/                 # the dashboard: watch it all happen",
        "",
        "Each app listens on 127.0.0.1 inside its pod and reaches the others only through",
        f"HTTP_PROXY={PROXY} (its sidecar's outbound port). Sidecars register with the",
        f"control plane (controlplane:{GRPC_PORT}) and fall back to Docker's DNS (127.0.0.11 in",
        "/etc/resolv.conf), where every pod answers to its service name; the replicas of a service",
        "all answer to its name. Sidecar-to-sidecar hops (15006) are mutual TLS with certificates the",
        "control plane issues (the one-shot `identity` service makes the CA and the join tokens).",
    ]
    if mesh.publish is not None:
        lines += [f"Published on the host: the plaintext front door ({mesh.publish.service}'s sidecar, {FRONT_DOOR_PORT}) "
                  f"on 127.0.0.1:{mesh.publish.port},",
                  f"the control plane's HTTP API on 127.0.0.1:{CP_HTTP_PORT} and the dashboard on 127.0.0.1:{DASHBOARD_PORT}."]
    else:
        lines += [f"Published on the host: the control plane's HTTP API on 127.0.0.1:{CP_HTTP_PORT} and the dashboard "
                  f"on 127.0.0.1:{DASHBOARD_PORT}."]
    lines += [
        "",
        "Format 2.4: valid for `docker compose` (v2) and Debian's docker-compose 1.29, and the last",
        "format where 1.29 honours depends_on conditions. No depends_on on the control plane, on",
        "purpose: a sidecar must start and serve without it, and `docker compose stop controlplane`",
        "(v2 stops dependents too) must not take the sidecars with it.",
    ]
    return "\n".join(lines)


def compose_file(target: Target) -> str:
    """The text of the compose file of ``target.mesh``."""
    mesh = target.mesh
    top: dict[object, object] = {Comment(header(target)): None, "version": COMPOSE_VERSION, Comment(""): None}
    top |= anchors(target)
    services: dict[object, object] = {}
    volumes: list[str] = []
    for make in INFRASTRUCTURE:
        block = make(target)
        services[Comment(block.comment)] = None
        services[block.name] = block.definition
        services[Comment("")] = None
        volumes += block.volumes
    for spec in mesh.services:
        top[Comment("")] = None
        top[Comment(f"the app of every {spec.name} replica")] = None
        top[f"x-app-{spec.name}"] = Anchored(f"app-{spec.name}", app_anchor(target, spec))
        services[_rule(_service_title(mesh, spec))] = None
        for pod in (p for p in pods(mesh) if p.service is spec):
            services[pod.app] = app_service(target, pod)
            services[Comment("")] = None
            services[pod.sidecar] = sidecar_service(pod)
            services[Comment("")] = None
    top[Comment("")] = None
    top["services"] = services
    top["volumes"] = {v: None for v in dict.fromkeys(volumes)}
    return document(top)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sidemesh compose",
        description="Write a docker-compose.yml from a mesh file: the control plane, the identity service, and "
        "for every replica of every service its app and its sidecar sharing one network namespace "
        "(docs/onboarding.md explains each part).",
    )
    p.add_argument("-f", "--file", metavar="MESH.toml", help="the mesh file (default: the demo's)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="where to write it (default: standard output; relative paths in it then start at the "
                   "current directory)")
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        mesh = load_mesh(args.file) if args.file else demo_mesh()
    except MeshFileError as exc:
        print(f"sidemesh compose: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else None
    target = Target(mesh, (out.parent if out else Path.cwd()).resolve(), out.name if out else "docker-compose.yml")
    text = compose_file(target)
    if out is None:
        sys.stdout.write(text)
        return 0
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"sidemesh compose: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0

