"""The mesh file: which services a mesh runs, read once from TOML into frozen values.

``sidemesh up -f mesh.toml`` runs what a mesh file lists, ``sidemesh compose -f mesh.toml``
writes it as a compose file; without ``-f`` both take the demo's, ``sidemesh/meshes/demo.toml``.
docs/onboarding.md is the reference of every key; in short::

    allow = ["web->api"]            who may call whom (CALLER->CALLEE); none: nothing enforced
    [publish]                       the front door: service, port (on the host), path (to curl)
    [compose]                       build: sidemesh's build context, for compose
    [services.NAME]                 command (argv), port, replicas, health, env,
                                    timeout_ms, retries, lb (its routing policy)
    [services.NAME.compose]         replicas, image, build, command, healthcheck

Services keep the file's order: the n-th one gets the n-th block of loopback addresses in
``sidemesh up`` (``sidemesh.layout``). A command is any program; ``{host}``, ``{port}``,
``{instance}``, ``{service}``, ``{replica}`` and ``{proxy}`` in it (and in ``env``) become
the pod's values, and a command whose program is ``sidemesh`` runs this sidemesh.

Parsing is strict, because a typo should not start a mesh that quietly lacks something: an
unknown key, a wrong type, an unknown service in ``allow`` or ``publish``, an app port its
sidecar holds, a missing command. Each is a ``MeshFileError`` of one line naming the file,
the line where it can be found, and the key (``services.web.port``). TOML's own syntax
errors keep the line and column ``tomllib`` gives.

Pure, but for ``load_mesh`` and ``demo_mesh``, which read a file.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.authz import RuleError, parse_rule
from controlplane.model import DNS_LABEL, LB_POLICIES
from sidemesh.ports import APP_PORT, SIDECAR_PORTS

SIDEMESH_PROGRAM = "sidemesh"
DEFAULT_HEALTH = "/healthz"
DEFAULT_PUBLISH_PATH = "/"
# what a command and env values may name, and what it stands for (docs/onboarding.md)
PLACEHOLDERS: Mapping[str, str] = {
    "host": "the address the app listens on (its pod's address locally, 127.0.0.1 in compose)",
    "port": "the service's port",
    "instance": "the replica's name, e.g. web-1",
    "service": "the service's name",
    "replica": "the replica's number, 1, 2, ...",
    "proxy": "its sidecar's outbound port as an HTTP proxy URL (what HTTP_PROXY is set to)",
}
# the mesh's own parts, locally and in compose: no service may take their names
RESERVED_NAMES = ("controlplane", "dns", "identity", "etcd", "dashboard")
# set by the mesh for every app: the sidecar is its egress
MESH_ENV = ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# instance names are SERVICE-N and sidecars SERVICE-sidecar: a service named like one would be ambiguous
_GENERATED_SUFFIX = re.compile(r"-(\d+|sidecar)\Z")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*\Z")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*\Z")
_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGNMENT = re.compile(r"^\s*([A-Za-z0-9_.\"' -]+?)\s*=")

TOP_KEYS = ("allow", "publish", "compose", "services")
PUBLISH_KEYS = ("service", "port", "path")
MESH_COMPOSE_KEYS = ("build",)
SERVICE_KEYS = ("command", "port", "replicas", "health", "env", "timeout_ms", "retries", "lb", "compose")
SERVICE_COMPOSE_KEYS = ("replicas", "image", "build", "command", "healthcheck")

KeyPath = tuple[str | int, ...]


class MeshFileError(ValueError):
    """A mesh file that cannot be used; ``str()`` is one line: ``FILE[:LINE]: KEY: why``."""


@dataclass(frozen=True, slots=True)
class Policy:
    """A service's routing policy; ``None``: the control plane's default."""

    timeout_ms: int | None = None
    retries: int | None = None
    lb: str | None = None

    def flag(self, service: str) -> str | None:
        """The control plane's ``--policy`` value (``artist=timeout_ms:2000,lb:least_request``), or
        None when every field is the default."""
        parts = [f"{k}:{v}" for k, v in (("timeout_ms", self.timeout_ms), ("retries", self.retries),
                                           ("lb", self.lb)) if v is not None]
        return f"{service}={','.join(parts)}" if parts else None


@dataclass(frozen=True, slots=True)
class ComposeSpec:
    """How a service runs in compose. ``image``/``build`` unset: the sidemesh image."""

    replicas: int
    command: tuple[str, ...]
    image: str | None = None
    build: str | None = None  # absolute directory
    healthcheck: tuple[str, ...] | None = None

    @property
    def on_sidemesh_image(self) -> bool:
        return self.image is None and self.build is None


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One service of the mesh: its app and how many replicas of it run."""

    name: str
    command: tuple[str, ...]
    compose: ComposeSpec
    port: int = APP_PORT
    replicas: int = 1
    health: str = DEFAULT_HEALTH  # "" : an open port is health enough
    env: Mapping[str, str] = field(default_factory=dict)
    policy: Policy = Policy()


@dataclass(frozen=True, slots=True)
class Publish:
    """The front door: the service whose first replica's sidecar also serves plain HTTP."""

    service: str
    port: int = APP_PORT
    path: str = DEFAULT_PUBLISH_PATH


@dataclass(frozen=True, slots=True)
class MeshSpec:
    """A parsed mesh file. ``directory`` is where the relative paths of its commands start."""

    source: str
    directory: str
    services: tuple[ServiceSpec, ...]
    allow: tuple[str, ...] = ()
    publish: Publish | None = None
    build: str | None = None  # sidemesh's build context for compose, absolute

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.services)

    def service(self, name: str) -> ServiceSpec:
        for spec in self.services:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def index(self, name: str) -> int:
        """1 for the first service of the file, 2 for the second, ..."""
        return self.names.index(name) + 1


def runs_sidemesh(argv: Sequence[str]) -> bool:
    """True for a command this sidemesh runs itself (``["sidemesh", "service", ...]``)."""
    return bool(argv) and argv[0] == SIDEMESH_PROGRAM


def render(template: str, values: Mapping[str, object]) -> str:
    """``"--port={port}"`` with ``values`` filled in (placeholders were checked when parsed)."""
    return template.format_map({k: values[k] for k in PLACEHOLDERS})


def pod_values(spec: ServiceSpec, replica: int, *, host: str, proxy: str) -> dict[str, object]:
    """What the placeholders of ``spec``'s replica stand for."""
    return {"host": host, "port": spec.port, "instance": f"{spec.name}-{replica}", "service": spec.name,
            "replica": replica, "proxy": proxy}


def load_mesh(path: str | Path) -> MeshSpec:
    """Read and parse the mesh file at ``path``; MeshFileError when it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MeshFileError(f"{path}: cannot read the mesh file: {why}") from exc
    return parse_mesh(text, source=str(path), directory=str(Path(path).resolve().parent))


@functools.cache
def demo_mesh() -> MeshSpec:
    """The demo's mesh file, shipped with sidemesh: the default of ``up`` and ``compose``.
    Cached: it is immutable and the same for the life of the process."""
    resource = importlib.resources.files("sidemesh") / "meshes" / "demo.toml"
    with importlib.resources.as_file(resource) as path:
        return load_mesh(path)


def parse_mesh(text: str, *, source: str, directory: str) -> MeshSpec:
    """Parse a mesh file's ``text``; ``source`` names it in errors, ``directory`` anchors its paths."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position:
            raise MeshFileError(f"{source}:{position[1]}:{position[2]}: {message[: position.start()]}") from exc
        end = _TOML_END.search(message)
        if end:  # the document stopped inside something: the last line is where
            raise MeshFileError(f"{source}:{max(1, len(text.splitlines()))}: {message[: end.start()]} "
                                "(the file ends inside a value)") from exc
        raise MeshFileError(f"{source}: {message}") from exc
    return _Parser(source, directory, text).mesh(doc)


class _Parser:
    """Walks a decoded TOML document; every error names the key path and, found by a scan
    of the text (``tomllib`` keeps no positions), the line that sets it."""

    def __init__(self, source: str, directory: str, text: str) -> None:
        self.source = source
        self.directory = Path(directory)
        self.lines = _key_lines(text)

    def error(self, path: KeyPath, message: str) -> MeshFileError:
        line = self._line(path)
        where = f"{self.source}:{line}" if line else self.source
        return MeshFileError(f"{where}: {_dotted(path)}: {message}")

    def _line(self, path: KeyPath) -> int | None:
        keys = tuple(p for p in path if isinstance(p, str))
        for n in range(len(keys), 0, -1):
            if keys[:n] in self.lines:
                return self.lines[keys[:n]]
        return None

    # ---- the document ----------------------------------------------------

    def mesh(self, doc: dict[str, Any]) -> MeshSpec:
        self.table(doc, (), TOP_KEYS)
        raw_services = doc.get("services")
        if raw_services is None:
            raise MeshFileError(f"{self.source}: no services: add one as [services.NAME] with a command")
        services_table = self.table(raw_services, ("services",), None)
        if not services_table:
            raise self.error(("services",), "no services: add one as [services.NAME] with a command")
        services = tuple(self.service(name, value) for name, value in services_table.items())
        names = tuple(s.name for s in services)
        allow = self.allow(doc.get("allow", []), names)
        publish = self.publish(doc["publish"], names) if "publish" in doc else None
        compose = self.table(doc.get("compose", {}), ("compose",), MESH_COMPOSE_KEYS)
        build = self.path(compose["build"], ("compose", "build")) if "build" in compose else None
        return MeshSpec(self.source, str(self.directory), services, allow, publish, build)

    def service(self, name: str, value: object) -> ServiceSpec:
        at: KeyPath = ("services", name)
        if not DNS_LABEL.match(name):
            raise self.error(at, "a service name is a DNS label: a-z, 0-9 and '-', at most 63, no '-' at either end")
        if name in RESERVED_NAMES:
            raise self.error(at, f"{name!r} is the name of a part of the mesh itself ({', '.join(RESERVED_NAMES)})")
        if _GENERATED_SUFFIX.search(name):
            raise self.error(at, "a service name may not end in -NUMBER or -sidecar: its replicas and sidecars "
                             "are named that way")
        table = self.table(value, at, SERVICE_KEYS)
        if "command" not in table:
            raise self.error(at, 'no command: the argv that runs the app, e.g. command = ["python3", "app.py", '
                             '"--port", "{port}"]')
        command = self.argv(table["command"], (*at, "command"))
        port = self.port(table.get("port", APP_PORT), (*at, "port"))
        replicas = self.count(table.get("replicas", 1), (*at, "replicas"), minimum=0)
        health = self.string(table.get("health", DEFAULT_HEALTH), (*at, "health"))
        if health and not health.startswith("/"):
            raise self.error((*at, "health"), f"{health!r}: a path that starts with '/', or \"\" for "
                             "'an open port is enough'")
        env = self.env(table.get("env", {}), (*at, "env"))
        policy = Policy(
            timeout_ms=self.count(table["timeout_ms"], (*at, "timeout_ms"), minimum=1) if "timeout_ms" in table else None,
            retries=self.count(table["retries"], (*at, "retries"), minimum=0) if "retries" in table else None,
            lb=self.choice(table["lb"], (*at, "lb"), LB_POLICIES) if "lb" in table else None,
        )
        compose = self.compose(table.get("compose", {}), (*at, "compose"), command=command, replicas=replicas)
        return ServiceSpec(name, command, compose, port, replicas, health, env, policy)

    def compose(self, value: object, at: KeyPath, *, command: tuple[str, ...], replicas: int) -> ComposeSpec:
        table = self.table(value, at, SERVICE_COMPOSE_KEYS)
        image = self.string(table["image"], (*at, "image")) if "image" in table else None
        if image is not None and not image.strip():
            raise self.error((*at, "image"), "empty image name")
        build = self.path(table["build"], (*at, "build")) if "build" in table else None
        healthcheck = self.argv(table["healthcheck"], (*at, "healthcheck")) if "healthcheck" in table else None
        return ComposeSpec(
            replicas=self.count(table.get("replicas", max(replicas, 1)), (*at, "replicas"), minimum=1),
            command=self.argv(table["command"], (*at, "command")) if "command" in table else command,
            image=image, build=build, healthcheck=healthcheck,
        )

    def allow(self, value: object, names: tuple[str, ...]) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(("allow",), 'a list of "CALLER->CALLEE" rules, e.g. allow = ["web->api"]')
        rules: list[str] = []
        for i, item in enumerate(value):
            at: KeyPath = ("allow", i)
            rule = self.string(item, at)
            try:
                caller, callee = parse_rule(rule)
            except RuleError as exc:
                raise self.error(at, str(exc).removeprefix("--allow ")) from exc
            for who in (caller, callee):
                if who not in names:
                    raise self.error(at, f"{rule!r}: no service {who!r} in this file ({', '.join(names)})")
            rules.append(f"{caller}->{callee}")
        return tuple(dict.fromkeys(rules))

    def publish(self, value: object, names: tuple[str, ...]) -> Publish:
        at: KeyPath = ("publish",)
        table = self.table(value, at, PUBLISH_KEYS)
        if "service" not in table:
            raise self.error(at, "which service is the front door? e.g. service = \"song\"")
        service = self.string(table["service"], (*at, "service"))
        if service not in names:
            raise self.error((*at, "service"), f"no service {service!r} in this file ({', '.join(names)})")
        path = self.string(table.get("path", DEFAULT_PUBLISH_PATH), (*at, "path"))
        if not path.startswith("/"):
            raise self.error((*at, "path"), f"{path!r}: a path starts with '/'")
        return Publish(service, self.number(table.get("port", APP_PORT), (*at, "port"), 1, 65535), path)

    # ---- values ----------------------------------------------------------

    def table(self, value: object, at: KeyPath, known: Sequence[str] | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(at, f"expected a table, got {_kind(value)}")
        if known is not None:
            for key in value:
                if key not in known:
                    raise self.error((*at, key), f"unknown key (known here: {', '.join(known)})")
        return value

    def string(self, value: object, at: KeyPath) -> str:
        if not isinstance(value, str):
            raise self.error(at, f"expected a string, got {_kind(value)}")
        return value

    def number(self, value: object, at: KeyPath, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(at, f"expected a whole number, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            raise self.error(at, f"{value} is out of range {low}-{high}" if high is not None else f"{value} is below {low}")
        return value

    def count(self, value: object, at: KeyPath, *, minimum: int) -> int:
        return self.number(value, at, minimum)

    def port(self, value: object, at: KeyPath) -> int:
        port = self.number(value, at, 1, 65535)
        if port in SIDECAR_PORTS:
            raise self.error(at, f"port {port} clashes with {SIDECAR_PORTS[port]}, which shares the app's "
                             f"network namespace (sidecar ports: {', '.join(map(str, sorted(SIDECAR_PORTS)))})")
        return port

    def choice(self, value: object, at: KeyPath, choices: Sequence[str]) -> str:
        text = self.string(value, at)
        if text not in choices:
            raise self.error(at, f"{text!r}: one of {', '.join(choices)}")
        return text

    def argv(self, value: object, at: KeyPath) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(at, 'expected a non-empty list of strings (an argv), e.g. ["python3", "app.py"]')
        items = tuple(self.template(item, (*at, i)) for i, item in enumerate(value))
        if not items[0].strip():
            raise self.error((*at, 0), "the program is empty")
        return items

    def template(self, value: object, at: KeyPath) -> str:
        text = self.string(value, at)
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
        except ValueError as exc:
            raise self.error(at, f"{text!r}: {exc} (write {{{{ and }}}} for literal braces)") from exc
        for name, spec, conv in fields:
            if name not in PLACEHOLDERS or spec or conv:
                raise self.error(at, f"{text!r}: unknown placeholder {{{name}}} "
                                 f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
        return text

    def env(self, value: object, at: KeyPath) -> dict[str, str]:
        table = self.table(value, at, None)
        env: dict[str, str] = {}
        for key, item in table.items():
            if not _ENV_NAME.match(key):
                raise self.error((*at, key), "not an environment variable name")
            if key in MESH_ENV:
                raise self.error((*at, key), "set by the mesh: the app's HTTP proxy is its sidecar")
            env[key] = self.template(item, (*at, key))
        return env

    def path(self, value: object, at: KeyPath) -> str:
        text = self.string(value, at)
        if not text.strip():
            raise self.error(at, "empty path")
        return str((self.directory / text).resolve())


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Key path -> the first line that opens it as a table or assigns it, for error messages.

    A scan, not a parser: table headers and ``key =`` lines, dotted keys split, quotes
    dropped. Good enough to point at the line; an error it cannot place names the key alone.
    """
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = _split_key(header[1])
            found.setdefault(table, number)
            continue
        assignment = _ASSIGNMENT.match(line)
        if assignment:
            found.setdefault(table + _split_key(assignment[1]), number)
    return found


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
