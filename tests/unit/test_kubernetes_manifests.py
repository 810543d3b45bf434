"""deploy/kubernetes: schema-valid for the Kubernetes versions we claim, and wired as the design says.

Validation is offline, against the OpenAPI-derived schemas that ``kubernetes-validate`` ships,
in strict mode (an unknown or misspelt field fails). 1.29 is the oldest version where native
sidecar containers (``restartPolicy: Always`` on an init container) are on by default; 1.33 is
where they are GA.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.config import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_IDENTITY_PORT
from dnsfallback.config import INBOUND_SRV_LABELS
from sidecar.config import DEFAULT_ADMIN_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT
from sidemesh.kube import InjectSettings, inject
from tests.support import REPO

KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
DEPLOY = REPO / "deploy" / "kubernetes"
PLAIN_APPS = DEPLOY / "apps"
NAMESPACE = "sidemesh"


def assert_valid(doc: Mapping[str, Any], version: str) -> None:
    """Fails with the schema's complaint when ``doc`` is not a valid object of that Kubernetes version."""
    try:
        kubernetes_validate.validate(dict(doc), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')} is not valid Kubernetes "
                    f"{version}: {exc.message} at {'.'.join(map(str, exc.path))}")


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def deployed() -> list[dict[str, Any]]:
    """What ``kubectl apply -k`` would create: the kustomization's resources in its namespace."""
    docs = [d for name in kustomization()["resources"] for d in load(DEPLOY / name)]
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kustomization()["namespace"]
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] == kind)


def flag(args: list[str], name: str) -> str:
    values = [args[i + 1] for i, a in enumerate(args) if a == name]
    assert len(values) == 1, f"{name} given {len(values)} times in {args}"
    return values[0]


def sidecar_of(deployment: Mapping[str, Any]) -> dict[str, Any]:
    init = deployment["spec"]["template"]["spec"].get("initContainers") or []
    sidecars = [c for c in init if c["name"] == "sidemesh"]
    assert len(sidecars) == 1, f"{deployment['metadata']['name']} has {len(sidecars)} sidecars"
    return sidecars[0]


def meshed_deployments() -> list[dict[str, Any]]:
    return [d for d in of_kind(deployed(), "Deployment") if d["metadata"]["name"] != "controlplane"]


def mount_source(pod_spec: Mapping[str, Any], container: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The volume that holds file ``path`` in ``container`` (its mount is a parent directory)."""
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{path} is under {len(mounts)} mounts of {container['name']}"
    volumes = [v for v in pod_spec.get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1
    return volumes[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = load(path)
    assert docs
    for doc in docs:
        assert_valid(doc, version)


def test_kustomization_lists_every_manifest_except_the_plain_apps() -> None:
    listed = {DEPLOY / name for name in kustomization()["resources"]}
    assert listed == {p for p in manifest_files() if PLAIN_APPS not in p.parents}
    assert kustomization()["namespace"] == NAMESPACE


@pytest.mark.parametrize("name", ["artist", "song", "image"])
def test_demo_pods_are_what_sidemesh_inject_makes_of_the_plain_apps(name: str) -> None:
    (plain,) = load(PLAIN_APPS / f"{name}.yaml")
    (meshed,) = load(DEPLOY / "demo" / f"{name}.yaml")
    assert inject(plain, InjectSettings()) == meshed


def test_the_demo_runs_artist_twice_and_song_and_image_once() -> None:
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in meshed_deployments()}
    assert replicas == {"artist": 2, "song": 1, "image": 1}


def test_every_meshed_pod_has_a_native_sidecar_on_the_design_ports() -> None:
    for deployment in meshed_deployments():
        pod = deployment["spec"]["template"]["spec"]
        sidecar = sidecar_of(deployment)
        assert pod["initContainers"][0] is sidecar and sidecar["restartPolicy"] == "Always"
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert (ports["mesh-outbound"], ports["mesh-inbound"], ports["mesh-admin"]) == (
            DEFAULT_OUTBOUND_PORT, DEFAULT_INBOUND_PORT, DEFAULT_ADMIN_PORT)
        args = sidecar["args"]
        assert flag(args, "--service") == deployment["metadata"]["name"]
        app_port = pod["containers"][0]["ports"][0]["containerPort"]
        assert flag(args, "--app") == f"127.0.0.1:{app_port}"
        assert app_port not in ports.values()
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert sidecar[probe]["httpGet"]["port"] == DEFAULT_ADMIN_PORT, probe
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert sidecar["resources"]["requests"]
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["HTTP_PROXY"] == f"http://127.0.0.1:{DEFAULT_OUTBOUND_PORT}"
            assert env["NO_PROXY"] == "127.0.0.1,localhost"
            assert container["resources"]["requests"]


def test_headless_services_select_their_pods_and_answer_with_the_inbound_port() -> None:
    docs = deployed()
    headless = {s["metadata"]["name"]: s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"}
    meshed = {flag(sidecar_of(d)["args"], "--service"): d for d in meshed_deployments()}
    assert set(headless) == set(meshed)
    for name, service in headless.items():
        selector = service["spec"]["selector"]
        selected = [d["metadata"]["name"] for d in of_kind(docs, "Deployment")
                    if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert selected == [meshed[name]["metadata"]["name"]], name
        (port,) = service["spec"]["ports"]
        assert port["port"] == DEFAULT_INBOUND_PORT
        targets = {p["name"]: p["containerPort"] for p in sidecar_of(meshed[name])["ports"]}
        assert targets[port["targetPort"]] == DEFAULT_INBOUND_PORT
        # the sidecars look peers up as {service}.<pod namespace>.svc.cluster.local: this Service
        dns = flag(sidecar_of(meshed[name])["args"], "--dns-template")
        assert dns.format(service=name).replace("$(POD_NAMESPACE)", NAMESPACE) == \
            f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
        # and first as SRV, which cluster DNS serves for the port named as the SRV name's first label,
        # with each pod's own port number for it: peers need not share our inbound port
        assert "--dns-srv" in sidecar_of(meshed[name])["args"]
        assert INBOUND_SRV_LABELS == f"_{port['name']}._{port['protocol'].lower()}"


def test_song_front_door_reaches_the_song_sidecars_extra_inbound_listener() -> None:
    docs = deployed()
    (door,) = (s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "song-frontdoor")
    (song,) = (d for d in meshed_deployments() if d["metadata"]["name"] == "song")
    ports = {p["name"]: p["containerPort"] for p in sidecar_of(song)["ports"]}
    (port,) = door["spec"]["ports"]
    assert flag(sidecar_of(song)["args"], "--extra-inbound") == f"0.0.0.0:{ports[port['targetPort']]}"
    assert door["spec"]["selector"].items() <= song["spec"]["template"]["metadata"]["labels"].items()


def test_sidecars_reach_the_control_plane_service_on_its_ports() -> None:
    docs = deployed()
    (cp,) = (d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "controlplane")
    (svc,) = (s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "controlplane")
    (container,) = cp["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == {"grpc": DEFAULT_GRPC_PORT, "identity": DEFAULT_IDENTITY_PORT, "http": DEFAULT_HTTP_PORT}
    service_ports = {p["name"]: (p["port"], container_ports[p["targetPort"]]) for p in svc["spec"]["ports"]}
    assert service_ports == {name: (port, port) for name, port in container_ports.items()}
    assert svc["spec"]["selector"].items() <= cp["spec"]["template"]["metadata"]["labels"].items()
    for deployment in meshed_deployments():
        # the sidecar asks for its certificate on the identity port of the same host
        target = flag(sidecar_of(deployment)["args"], "--controlplane")
        assert target == f"controlplane.{NAMESPACE}.svc.cluster.local:{DEFAULT_GRPC_PORT}"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": DEFAULT_HTTP_PORT}


def test_control_plane_has_a_disruption_budget_that_never_blocks_a_drain() -> None:
    docs = deployed()
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    (cp,) = (d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "controlplane")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= cp["spec"]["template"]["metadata"]["labels"].items()
    # with one replica, minAvailable: 1 would refuse every eviction
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def test_control_plane_authorizes_only_calls_between_deployed_services() -> None:
    (cp,) = (d for d in of_kind(deployed(), "Deployment") if d["metadata"]["name"] == "controlplane")
    rules = flag(cp["spec"]["template"]["spec"]["containers"][0]["args"], "--allow").split(",")
    services = {flag(sidecar_of(d)["args"], "--service") for d in meshed_deployments()}
    assert rules == ["song->artist", "song->image"]
    assert {name for rule in rules for name in rule.split("->")} <= services


def test_identity_flags_point_at_mounted_secrets_and_the_ca_configmap() -> None:
    docs = deployed()
    (cp,) = (d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "controlplane")
    cp_pod = cp["spec"]["template"]["spec"]
    args = cp_pod["containers"][0]["args"]
    ca = mount_source(cp_pod, cp_pod["containers"][0], flag(args, "--ca-dir") + "/ca.pem")
    tokens = mount_source(cp_pod, cp_pod["containers"][0], flag(args, "--join-tokens") + "/artist")
    assert ca["secret"]["secretName"] == "sidemesh-ca-key" and ca["secret"]["defaultMode"] == 0o400
    assert tokens["secret"]["secretName"] == "sidemesh-join-tokens" and tokens["secret"]["defaultMode"] == 0o400
    for deployment in meshed_deployments():
        pod, sidecar = deployment["spec"]["template"]["spec"], sidecar_of(deployment)
        service = flag(sidecar["args"], "--service")
        token = mount_source(pod, sidecar, flag(sidecar["args"], "--join-token-file"))
        assert token["secret"]["secretName"] == f"sidemesh-join-{service}"
        assert token["secret"]["items"] == [{"key": "token", "path": "token"}]
        bundle = mount_source(pod, sidecar, flag(sidecar["args"], "--trust-bundle"))
        assert bundle["configMap"] == {"name": "sidemesh-ca", "items": [{"key": "ca.pem", "path": "ca.pem"}]}
        cache = mount_source(pod, sidecar, flag(sidecar["args"], "--identity-dir") + "/cert.pem")
        assert cache["emptyDir"]["medium"] == "Memory"
        # the app containers never see the token
        assert all(not c.get("volumeMounts") for c in pod["containers"])


KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (Debian: apt-get install kubectl)")


@needs_kubectl
def test_kubectl_kustomize_builds_the_resources_in_the_sidemesh_namespace() -> None:
    out = subprocess.run([str(KUBECTL), "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    built = [d for d in yaml.safe_load_all(out) if d]

    def key(d: Mapping[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(map(key, built)) == sorted(map(key, deployed()))
    for doc in built:
        assert_valid(doc, KUBERNETES_VERSIONS[0])
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE


@needs_kubectl
def test_identity_script_makes_every_secret_and_configmap_the_pods_mount(tmp_path: Path) -> None:
    env = {"PATH": f"{REPO / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin", "KUBECTL": str(KUBECTL),
           "SIDEMESH": str(REPO / ".venv" / "bin" / "sidemesh"), "HOME": str(tmp_path)}
    script = [str(DEPLOY / "identity.sh"), "--print", "--dir", str(tmp_path / "id")]

    def objects() -> dict[tuple[str, str], dict[str, Any]]:
        out = subprocess.run(script, capture_output=True, text=True, check=True, env=env, timeout=120).stdout
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}

    made = objects()
    for doc in made.values():
        assert_valid(doc, KUBERNETES_VERSIONS[0])
        assert doc["metadata"]["namespace"] == NAMESPACE
    mounted = {("Secret", "sidemesh-ca-key"), ("Secret", "sidemesh-join-tokens"), ("ConfigMap", "sidemesh-ca")}
    mounted |= {("Secret", f"sidemesh-join-{flag(sidecar_of(d)['args'], '--service')}") for d in meshed_deployments()}
    assert set(made) == mounted
    assert set(made["Secret", "sidemesh-ca-key"]["data"]) == {"ca.pem", "ca-key.pem"}
    assert set(made["ConfigMap", "sidemesh-ca"]["data"]) == {"ca.pem"}
    tokens = made["Secret", "sidemesh-join-tokens"]["data"]
    assert set(tokens) == {"artist", "song", "image"}
    for service, token in tokens.items():
        assert made["Secret", f"sidemesh-join-{service}"]["data"] == {"token": token}
    # run again: the same CA and tokens, so nothing already handed out changes
    assert objects() == made


def test_lyrics_example_injects_into_valid_kubernetes_objects() -> None:
    docs = load(REPO / "examples" / "lyrics" / "kubernetes.yaml")
    (deployment,) = of_kind(docs, "Deployment")
    meshed = inject(deployment, InjectSettings())
    for version in KUBERNETES_VERSIONS:
        assert_valid(meshed, version)
        for doc in docs:
            assert_valid(doc, version)
    assert flag(sidecar_of(meshed)["args"], "--service") == "lyrics"
    (service,) = of_kind(docs, "Service")
    assert service["metadata"]["name"] == "lyrics" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in sidecar_of(meshed)["ports"]}
