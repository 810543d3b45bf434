"""The sidemesh sidecar in a Kubernetes pod: pure functions over parsed manifests (plain dicts).

Theory of operation (DESIGN.md, "Beyond one machine", "Ports", "Identity"). ``inject`` turns a
workload -- a Pod, or anything with a pod template -- into the same workload with its sidecar:

- the sidecar is a *native sidecar* (an ``initContainers`` entry with ``restartPolicy: Always``,
  Kubernetes >= 1.29): it starts before the app containers and outlives them, and it comes first
  so that the pod's other init containers can use the mesh too;
- it runs ``sidemesh sidecar`` for the pod's service, registering the pod's own name and IP
  (downward API) and the app's port on the pod's loopback; its DNS fallback asks cluster DNS
  for ``{service}.<pod namespace>.svc.<cluster domain>``, which a headless Service answers
  with the IPs of the service's ready pods;
- readiness is its admin API's ``/ready``; liveness and startup are ``/state``, which answers
  whenever the sidecar's listeners are up (``/ready`` fails during a long control-plane
  outage by design, and a restart would not help);
- identity: the join token from the Secret ``sidemesh-join-<service>`` (key ``token``), the
  trust bundle from the ConfigMap ``sidemesh-ca`` (key ``ca.pem``), and the key and
  certificate cached in a memory-backed ``emptyDir``, which survives a sidecar restart;
- every app container gets ``HTTP_PROXY`` (the sidecar's outbound port) and ``NO_PROXY``
  (the pod's loopback), which is all an app needs to call ``http://<service>/...``.

Injecting is a function of the plain workload and the settings: an earlier injection is
removed first, so injecting twice changes nothing and injecting again with other settings
replaces the sidecar. Anything that would make the result wrong (no service name, no app port,
a port the sidecar needs, ``hostNetwork``, an app that already sends its calls elsewhere) is an
``InjectError`` that says what to change.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from identity.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId
from sidecar.config import DEFAULT_ADMIN_PORT, DEFAULT_IDENTITY_DIR, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT

SIDECAR_NAME = "sidemesh"
DEFAULT_IMAGE = "sidemesh:latest"
DEFAULT_CONTROLPLANE = "controlplane.sidemesh.svc.cluster.local:15010"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"

# pod labels that name the service, in order of preference (Kubernetes' recommended label first)
SERVICE_LABELS = ("app.kubernetes.io/name", "app")
# per-workload: more plaintext inbound listeners (a front door), "HOST:PORT,HOST:PORT"
EXTRA_INBOUND_ANNOTATION = "sidemesh.local/extra-inbound"

JOIN_SECRET_PREFIX = "sidemesh-join-"
JOIN_SECRET_KEY = "token"
CA_CONFIGMAP = "sidemesh-ca"
CA_CONFIGMAP_KEY = "ca.pem"

# port names are unique in a pod: ours carry a prefix an app is unlikely to use
PORT_NAMES = {"mesh-outbound": DEFAULT_OUTBOUND_PORT, "mesh-inbound": DEFAULT_INBOUND_PORT,
              "mesh-admin": DEFAULT_ADMIN_PORT}
INBOUND_PORT_NAME = "mesh-inbound"
PROXY_ENV = {"HTTP_PROXY": f"http://127.0.0.1:{DEFAULT_OUTBOUND_PORT}"}
NO_PROXY_HOSTS = ("127.0.0.1", "localhost")

IDENTITY_VOLUME, JOIN_VOLUME, CA_VOLUME = "sidemesh-identity", "sidemesh-join", "sidemesh-ca"
JOIN_DIR, CA_DIR = "/var/run/sidemesh/join", "/var/run/sidemesh/ca"

# where the pod template sits in each kind of workload
POD_TEMPLATE_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("v1", "Pod"): (),
    ("apps/v1", "Deployment"): ("spec", "template"),
    ("apps/v1", "StatefulSet"): ("spec", "template"),
    ("apps/v1", "DaemonSet"): ("spec", "template"),
    ("apps/v1", "ReplicaSet"): ("spec", "template"),
    ("batch/v1", "Job"): ("spec", "template"),
    ("batch/v1", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}


class InjectError(ValueError):
    """A manifest the sidecar cannot be added to, or a setting that cannot be used; says why."""


@dataclass(frozen=True, slots=True)
class InjectSettings:
    """What ``sidemesh inject`` was told; ``None`` fields come from each workload instead."""

    image: str = DEFAULT_IMAGE
    controlplane: str = DEFAULT_CONTROLPLANE
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    service: str | None = None
    app_port: int | None = None
    extra_inbound: tuple[str, ...] | None = None
    trust_domain: str | None = None
    insecure: bool = False


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); InjectError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InjectError(f"{text!r} is not HOST:PORT with a port in 1-65535")
    return host.strip("[]"), int(port)


def pod_template(doc: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Path to the pod template of a workload, or None for anything that has none."""
    return POD_TEMPLATE_PATHS.get((str(doc.get("apiVersion")), str(doc.get("kind"))))


def describe(doc: Mapping[str, Any]) -> str:
    """``Deployment/artist`` for messages."""
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return f"{doc.get('kind', '?')}/{name or '?'}"


def inject(doc: Mapping[str, Any], settings: InjectSettings) -> dict[str, Any]:
    """A copy of workload ``doc`` with the sidecar in its pod template (see the module doc)."""
    path = pod_template(doc)
    if path is None:
        raise InjectError(f"{describe(doc)} ({doc.get('apiVersion')}) has no pod template sidemesh knows")
    out = copy.deepcopy(dict(doc))
    template: Any = out
    for key in path:
        template = template.get(key)
        if not isinstance(template, dict):
            raise InjectError(f"{'.'.join(path)} is missing or not a mapping")
    meta = template.setdefault("metadata", {})
    spec = template.get("spec")
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise InjectError(f"{'.'.join((*path, 'spec'))} is missing or not a mapping")
    _inject_pod(meta, spec, settings)
    return out


def _inject_pod(meta: dict[str, Any], spec: dict[str, Any], settings: InjectSettings) -> None:
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers or not all(isinstance(c, dict) for c in containers):
        raise InjectError("the pod has no containers")
    if spec.get("hostNetwork"):
        raise InjectError("the pod uses hostNetwork: its sidecar's ports would be the node's; "
                          "a meshed pod needs a network of its own")
    init = [c for c in _list(spec, "initContainers") if c.get("name") != SIDECAR_NAME]
    volumes = [v for v in _list(spec, "volumes") if v.get("name") not in (IDENTITY_VOLUME, JOIN_VOLUME, CA_VOLUME)]
    service = _service_name(meta, settings)
    app_port = settings.app_port if settings.app_port is not None else _first_port(containers)
    extra = _extra_inbound(meta, settings)
    _check_clashes([*init, *containers], app_port, extra)
    sidecar = sidecar_container(service, app_port, extra, settings)
    if "initContainers" in spec:
        spec["initContainers"] = [sidecar, *init]
    else:
        # first-time injection: put initContainers just before containers, where readers look
        at = list(spec).index("containers")
        items = list(spec.items())
        spec.clear()
        spec.update([*items[:at], ("initContainers", [sidecar]), *items[at:]])
    if not settings.insecure:
        volumes += identity_volumes(service)
    if volumes:
        spec["volumes"] = volumes
    else:
        spec.pop("volumes", None)
    for container in containers:
        _set_proxy_env(container)


def sidecar_container(service: str, app_port: int, extra_inbound: Sequence[tuple[str, int]],
                      settings: InjectSettings) -> dict[str, Any]:
    """The native sidecar container of one pod of ``service``."""
    dns = f"{{service}}.$(POD_NAMESPACE).svc.{settings.cluster_domain}"
    args = ["sidecar", "--service", service, "--instance", "$(POD_NAME)", "--address", "$(POD_IP)",
            "--listen", "0.0.0.0", "--outbound-listen", "127.0.0.1", "--app", f"127.0.0.1:{app_port}",
            "--controlplane", settings.controlplane, "--dns-template", dns,
            # cluster DNS serves _mesh-inbound._tcp.{service}... for the headless Service's port named
            # mesh-inbound, with each pod's own port: peers are reached on theirs, not on ours
            "--dns-srv"]
    for host, port in extra_inbound:
        args += ["--extra-inbound", f"{host}:{port}"]
    if settings.insecure:
        args.append("--insecure")
    else:
        args += ["--identity-dir", DEFAULT_IDENTITY_DIR, "--join-token-file", f"{JOIN_DIR}/{JOIN_SECRET_KEY}",
                 "--trust-bundle", f"{CA_DIR}/{CA_CONFIGMAP_KEY}"]
        if settings.trust_domain is not None:
            args += ["--trust-domain", settings.trust_domain]
    ports = [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in PORT_NAMES.items()]
    ports += [{"name": f"mesh-in-{port}", "containerPort": port, "protocol": "TCP"} for _, port in extra_inbound]
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "args": args,
        "env": [_field_env("POD_NAME", "metadata.name"), _field_env("POD_NAMESPACE", "metadata.namespace"),
                _field_env("POD_IP", "status.podIP")],
        "ports": ports,
        # the app starts once the sidecar's listeners are up, so its first call finds its egress
        "startupProbe": _probe("/state", period=1, failures=30),
        "readinessProbe": _probe("/ready", period=2, failures=2),
        "livenessProbe": _probe("/state", period=10, failures=6, timeout=3),
        "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}},
        # it writes only to its identity volume and binds ports above 1024
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    mounts = [{"name": IDENTITY_VOLUME, "mountPath": DEFAULT_IDENTITY_DIR},
              {"name": JOIN_VOLUME, "mountPath": JOIN_DIR, "readOnly": True},
              {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True}]
    if not settings.insecure:
        container["volumeMounts"] = mounts
    return container


def identity_volumes(service: str) -> list[dict[str, Any]]:
    """The pod volumes the sidecar's identity needs: its cache, its join token, the trust bundle."""
    return [
        # memory-backed: the workload key never touches the node's disk
        {"name": IDENTITY_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": JOIN_VOLUME, "secret": {"secretName": join_secret_name(service), "defaultMode": 0o400,
                                         "items": [{"key": JOIN_SECRET_KEY, "path": JOIN_SECRET_KEY}]}},
        {"name": CA_VOLUME, "configMap": {"name": CA_CONFIGMAP,
                                          "items": [{"key": CA_CONFIGMAP_KEY, "path": CA_CONFIGMAP_KEY}]}},
    ]


def join_secret_name(service: str) -> str:
    return f"{JOIN_SECRET_PREFIX}{service}"


def _probe(path: str, *, period: int, failures: int, timeout: int = 1) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": DEFAULT_ADMIN_PORT}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _list(spec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = spec.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InjectError(f"{key} is not a list of mappings")
    return items


def _service_name(meta: dict[str, Any], settings: InjectSettings) -> str:
    labels = meta.get("labels") or {}
    name = settings.service
    if name is None:
        name = next((str(labels[k]) for k in SERVICE_LABELS if isinstance(labels, dict) and labels.get(k)), None)
    if name is None:
        raise InjectError(f"no service name: give --service or label the pod {' or '.join(SERVICE_LABELS)}")
    try:
        SpiffeId(settings.trust_domain or DEFAULT_TRUST_DOMAIN, name)
    except IdentityError as exc:
        raise InjectError(f"service name {name!r} cannot be used: {exc}") from exc
    return name


def _first_port(containers: list[dict[str, Any]]) -> int:
    ports = containers[0].get("ports") or []
    port = ports[0].get("containerPort") if isinstance(ports, list) and ports and isinstance(ports[0], dict) else None
    if not isinstance(port, int) or isinstance(port, bool):
        raise InjectError(f"no app port: give --port or declare a containerPort on container "
                          f"{containers[0].get('name', '?')!r}, the pod's first")
    return port


def _extra_inbound(meta: dict[str, Any], settings: InjectSettings) -> list[tuple[str, int]]:
    if settings.extra_inbound is not None:
        return [parse_hostport(item) for item in settings.extra_inbound]
    annotations = meta.get("annotations") or {}
    text = str(annotations.get(EXTRA_INBOUND_ANNOTATION, "")) if isinstance(annotations, dict) else ""
    return [parse_hostport(item) for item in text.split(",") if item.strip()]


def _check_clashes(containers: list[dict[str, Any]], app_port: int, extra: Sequence[tuple[str, int]]) -> None:
    ours = {**PORT_NAMES, **{f"mesh-in-{port}": port for _, port in extra}}
    if app_port in ours.values():
        taken = ", ".join(map(str, sorted(ours.values())))
        raise InjectError(f"app port {app_port} is one the sidecar listens on ({taken})")
    for container in containers:
        if container.get("name") == SIDECAR_NAME:
            raise InjectError(f"a container is already named {SIDECAR_NAME!r}, the sidecar's name")
        for port in container.get("ports") or []:
            if not isinstance(port, dict):
                raise InjectError(f"container {container.get('name')!r}: ports is not a list of mappings")
            if port.get("containerPort") in ours.values():
                raise InjectError(f"container {container.get('name')!r} declares port {port.get('containerPort')}, "
                                  "which the sidecar listens on")
            if port.get("name") in ours:
                raise InjectError(f"container {container.get('name')!r} has a port named {port.get('name')!r}, "
                                  "a name the sidecar's port needs")


def _set_proxy_env(container: dict[str, Any]) -> None:
    """HTTP_PROXY and NO_PROXY, added or completed; an app that already proxies elsewhere is an error."""
    env = container.get("env")
    if env is None:
        env = container["env"] = []
    if not isinstance(env, list) or not all(isinstance(e, dict) for e in env):
        raise InjectError(f"container {container.get('name')!r}: env is not a list of mappings")
    by_name = {e.get("name"): e for e in env}
    for name, value in PROXY_ENV.items():
        for spelling in (name, name.lower()):
            have = by_name.get(spelling)
            if have is not None and have.get("value") != value:
                raise InjectError(f"container {container.get('name')!r} sets {spelling} "
                                  f"to {have.get('value', 'a valueFrom')!r}: its calls would not reach its sidecar "
                                  f"({value}); remove it")
        if name not in by_name:
            env.append({"name": name, "value": value})
    no_proxy = by_name.get("NO_PROXY")
    if no_proxy is None:
        env.append({"name": "NO_PROXY", "value": ",".join(NO_PROXY_HOSTS)})
    elif "value" not in no_proxy:
        raise InjectError(f"container {container.get('name')!r} takes NO_PROXY from valueFrom; "
                          f"set it to a value that includes {','.join(NO_PROXY_HOSTS)}")
    else:
        hosts = [h.strip() for h in str(no_proxy["value"]).split(",") if h.strip()]
        no_proxy["value"] = ",".join([*hosts, *(h for h in NO_PROXY_HOSTS if h not in hosts)])
