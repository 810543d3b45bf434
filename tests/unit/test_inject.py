"""``sidemesh inject``: the sidecar a pod gets, what its app gets, idempotence, and clear refusals."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
import yaml

from sidecar.config import DEFAULT_ADMIN_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT
from sidemesh import inject as cli
from sidemesh.kube import InjectSettings, inject
from tests.support import REPO
from tests.unit.test_kubernetes_manifests import KUBERNETES_VERSIONS, assert_valid, flag

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: lyrics
spec:
  replicas: 2
  selector:
    matchLabels: {app.kubernetes.io/name: lyrics}
  template:
    metadata:
      labels: {app.kubernetes.io/name: lyrics, app: words}
    spec:
      initContainers:
      - {name: migrate, image: lyrics:latest, args: [--migrate]}
      containers:
      - name: lyrics
        image: lyrics:latest
        ports: [{containerPort: 9090}, {containerPort: 9191}]
        env: [{name: NO_PROXY, value: "internal.example"}]
      - name: helper
        image: busybox
        ports: [{containerPort: 7070}]
"""

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: lyrics}
spec:
  clusterIP: None
  selector: {app.kubernetes.io/name: lyrics}
  ports: [{name: mesh-inbound, port: 15006, targetPort: mesh-inbound}]
"""


def run(text: str, *argv: str) -> str:
    out = io.StringIO()
    cli.run(io.StringIO(text), out, cli.settings_from_args(cli.build_parser().parse_args(list(argv))))
    return out.getvalue()


def injected(text: str = DEPLOYMENT, *argv: str) -> dict[str, Any]:
    (doc,) = yaml.safe_load_all(run(text, *argv))
    assert isinstance(doc, dict)
    return doc


def pod(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]
    assert isinstance(spec, dict)
    return spec


def sidecar(doc: dict[str, Any]) -> dict[str, Any]:
    first = pod(doc)["initContainers"][0]
    assert first["name"] == "sidemesh"
    assert isinstance(first, dict)
    return first


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_inject_adds_a_native_sidecar_before_the_pods_own_init_containers() -> None:
    spec = pod(injected())
    assert [c["name"] for c in spec["initContainers"]] == ["sidemesh", "migrate"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["lyrics", "helper"]


def test_sidecar_registers_the_pod_and_fronts_the_first_containers_first_port() -> None:
    car = sidecar(injected())
    assert car["image"] == "sidemesh:latest"
    assert car["args"] == [
        "sidecar", "--service", "lyrics", "--instance", "$(POD_NAME)", "--address", "$(POD_IP)",
        "--listen", "0.0.0.0", "--outbound-listen", "127.0.0.1", "--app", "127.0.0.1:9090",
        "--controlplane", "controlplane.sidemesh.svc.cluster.local:15010",
        "--dns-template", "{service}.$(POD_NAMESPACE).svc.cluster.local", "--dns-srv",
        "--identity-dir", "/var/lib/sidemesh/identity", "--join-token-file", "/var/run/sidemesh/join/token",
        "--trust-bundle", "/var/run/sidemesh/ca/ca.pem",
    ]
    # every $(VAR) in the args is one the kubelet can expand from the container's own env
    assert env_of(car) == {
        "POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
        "POD_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        "POD_IP": {"fieldRef": {"fieldPath": "status.podIP"}},
    }


def test_sidecar_listens_on_the_design_ports_and_is_probed_on_its_admin_port() -> None:
    car = sidecar(injected())
    assert {p["name"]: p["containerPort"] for p in car["ports"]} == {
        "mesh-outbound": DEFAULT_OUTBOUND_PORT, "mesh-inbound": DEFAULT_INBOUND_PORT, "mesh-admin": DEFAULT_ADMIN_PORT}
    assert car["readinessProbe"]["httpGet"] == {"path": "/ready", "port": DEFAULT_ADMIN_PORT}
    assert car["livenessProbe"]["httpGet"] == {"path": "/state", "port": DEFAULT_ADMIN_PORT}
    assert car["startupProbe"]["httpGet"] == {"path": "/state", "port": DEFAULT_ADMIN_PORT}
    assert car["resources"]["requests"] == {"cpu": "100m", "memory": "96Mi"}


def test_every_app_container_sends_its_calls_through_the_sidecar() -> None:
    lyrics, helper = pod(injected())["containers"]
    assert env_of(lyrics) == {"NO_PROXY": "internal.example,127.0.0.1,localhost",
                              "HTTP_PROXY": f"http://127.0.0.1:{DEFAULT_OUTBOUND_PORT}"}
    assert env_of(helper) == {"HTTP_PROXY": f"http://127.0.0.1:{DEFAULT_OUTBOUND_PORT}",
                              "NO_PROXY": "127.0.0.1,localhost"}


def test_join_token_and_trust_bundle_come_from_the_services_secret_and_the_ca_configmap() -> None:
    doc = injected()
    volumes = {v["name"]: v for v in pod(doc)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar(doc)["volumeMounts"]}
    assert volumes[mounts["/var/run/sidemesh/join"]]["secret"]["secretName"] == "sidemesh-join-lyrics"
    assert volumes[mounts["/var/run/sidemesh/join"]]["secret"]["items"] == [{"key": "token", "path": "token"}]
    assert volumes[mounts["/var/run/sidemesh/ca"]]["configMap"]["name"] == "sidemesh-ca"
    assert volumes[mounts["/var/lib/sidemesh/identity"]]["emptyDir"]["medium"] == "Memory"
    assert all("volumeMounts" not in c for c in pod(doc)["containers"])


def test_injecting_twice_changes_nothing() -> None:
    for text in (DEPLOYMENT, SERVICE + "---\n" + DEPLOYMENT):
        once = run(text)
        assert run(once) == once
        assert run(run(text, "--image", "r/sm:2", "--port", "9191"), "--image", "r/sm:2", "--port", "9191") == \
            run(text, "--image", "r/sm:2", "--port", "9191")


def test_injecting_again_with_other_settings_replaces_the_sidecar() -> None:
    doc = injected(run(DEPLOYMENT), "--image", "registry.example/sidemesh:2", "--port", "9191")
    spec = pod(doc)
    assert [c["name"] for c in spec["initContainers"]] == ["sidemesh", "migrate"]
    assert sidecar(doc)["image"] == "registry.example/sidemesh:2"
    assert flag(sidecar(doc)["args"], "--app") == "127.0.0.1:9191"
    assert [v["name"] for v in spec["volumes"]] == ["sidemesh-identity", "sidemesh-join", "sidemesh-ca"]


def test_service_name_comes_from_the_flag_then_the_recommended_label_then_app() -> None:
    assert flag(sidecar(injected(DEPLOYMENT, "--service", "verses"))["args"], "--service") == "verses"
    assert flag(sidecar(injected())["args"], "--service") == "lyrics"
    only_app = DEPLOYMENT.replace("app.kubernetes.io/name: lyrics, app: words", "app: words")
    assert flag(sidecar(injected(only_app))["args"], "--service") == "words"
    assert pod(injected(only_app))["volumes"][1]["secret"]["secretName"] == "sidemesh-join-words"


def test_front_door_listener_comes_from_the_pod_annotation_or_the_flag() -> None:
    annotated = DEPLOYMENT.replace(
        "      labels: {app.kubernetes.io/name: lyrics, app: words}\n",
        "      labels: {app.kubernetes.io/name: lyrics, app: words}\n"
        "      annotations: {sidemesh.local/extra-inbound: '0.0.0.0:15080'}\n")
    car = sidecar(injected(annotated))
    assert flag(car["args"], "--extra-inbound") == "0.0.0.0:15080"
    assert {"name": "mesh-in-15080", "containerPort": 15080, "protocol": "TCP"} in car["ports"]
    car = sidecar(injected(annotated, "--extra-inbound", "0.0.0.0:18080"))
    assert flag(car["args"], "--extra-inbound") == "0.0.0.0:18080"


def test_control_plane_list_cluster_domain_and_trust_domain_pass_through() -> None:
    args = sidecar(injected(DEPLOYMENT, "--controlplane", "cp-0.cp:15010,cp-1.cp:15010",
                            "--cluster-domain", "corp.internal", "--trust-domain", "music.example"))["args"]
    assert flag(args, "--controlplane") == "cp-0.cp:15010,cp-1.cp:15010"
    assert flag(args, "--dns-template") == "{service}.$(POD_NAMESPACE).svc.corp.internal"
    assert flag(args, "--trust-domain") == "music.example"


def test_insecure_injection_mounts_no_identity_material() -> None:
    doc = injected(DEPLOYMENT, "--insecure")
    assert sidecar(doc)["args"][-1] == "--insecure" and "--join-token-file" not in sidecar(doc)["args"]
    assert "volumeMounts" not in sidecar(doc) and "volumes" not in pod(doc)


def test_other_objects_pass_through_and_list_items_are_injected() -> None:
    service, deployment = yaml.safe_load_all(run(SERVICE + "---\n" + DEPLOYMENT + "---\n"))
    assert service == yaml.safe_load(SERVICE)
    assert sidecar(deployment)
    items = {"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(SERVICE), yaml.safe_load(DEPLOYMENT)]}
    (out,) = yaml.safe_load_all(run(yaml.safe_dump(items)))
    assert out["items"][0] == yaml.safe_load(SERVICE) and sidecar(out["items"][1])


def _workload(kind: str) -> dict[str, Any]:
    template: dict[str, Any] = {"metadata": {"labels": {"app": "lyrics"}},
                "spec": {"containers": [{"name": "lyrics", "image": "lyrics", "ports": [{"containerPort": 8080}]}]}}
    api = {"Pod": "v1", "Job": "batch/v1", "CronJob": "batch/v1"}.get(kind, "apps/v1")
    selector: dict[str, Any] = {"selector": {"matchLabels": {"app": "lyrics"}}}
    specs: dict[str, dict[str, Any]] = {
        "Pod": template["spec"],
        "Job": {"template": {**template, "spec": {**template["spec"], "restartPolicy": "Never"}}},
        "CronJob": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": {
            **template, "spec": {**template["spec"], "restartPolicy": "OnFailure"}}}}},
        "StatefulSet": {**selector, "serviceName": "lyrics", "template": template},
    }
    spec = specs.get(kind, {**selector, "template": template})
    meta: dict[str, Any] = {"name": "lyrics", **({"labels": {"app": "lyrics"}} if kind == "Pod" else {})}
    return {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}


@pytest.mark.parametrize("kind", ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"])
def test_every_kind_with_a_pod_template_gets_a_sidecar_that_validates(kind: str) -> None:
    doc = injected(yaml.safe_dump(_workload(kind)))
    path = {"Pod": ["spec"], "CronJob": ["spec", "jobTemplate", "spec", "template", "spec"]}.get(
        kind, ["spec", "template", "spec"])
    spec = doc
    for key in path:
        spec = spec[key]
    assert spec["initContainers"][0]["name"] == "sidemesh"
    for version in KUBERNETES_VERSIONS:
        assert_valid(doc, version)


def test_injected_output_validates_against_the_kubernetes_schemas() -> None:
    for argv in ((), ("--insecure",), ("--extra-inbound", "0.0.0.0:15080", "--trust-domain", "td.example")):
        for doc in yaml.safe_load_all(run(SERVICE + "---\n" + DEPLOYMENT, *argv)):
            for version in KUBERNETES_VERSIONS:
                assert_valid(doc, version)


REFUSALS = [
    ("kind: [unclosed\n", [], "stdin is not YAML at line 2"),
    ("just a string\n", [], "document 1 (?): not a Kubernetes object"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n", [],
     "no Pod or workload with a pod template on stdin (found: ConfigMap)"),
    ("", [], "no Pod or workload with a pod template on stdin (found: nothing)"),
    (DEPLOYMENT.replace("app.kubernetes.io/name: lyrics, app: words", "tier: web"), [],
     "document 1 (Deployment/lyrics): no service name: give --service or label the pod app.kubernetes.io/name or app"),
    (DEPLOYMENT, ["--service", "Lyrics"], "service name 'Lyrics' cannot be used"),
    (DEPLOYMENT.replace("ports: [{containerPort: 9090}, {containerPort: 9191}]", "ports: []"), [],
     "no app port: give --port or declare a containerPort on container 'lyrics'"),
    (DEPLOYMENT, ["--port", "15001"], "app port 15001 is one the sidecar listens on"),
    (DEPLOYMENT.replace("containerPort: 7070", "containerPort: 15000"), [],
     "container 'helper' declares port 15000, which the sidecar listens on"),
    (DEPLOYMENT.replace("      containers:\n", "      hostNetwork: true\n      containers:\n"), [], "hostNetwork"),
    (DEPLOYMENT.replace('value: "internal.example"', 'value: "x"}, {name: HTTP_PROXY, value: "http://squid:3128"'), [],
     "container 'lyrics' sets HTTP_PROXY to 'http://squid:3128'"),
    (SERVICE + "---\n" + DEPLOYMENT.replace("apps/v1", "extensions/v1beta1"), [],
     "no Pod or workload with a pod template on stdin (found: Deployment, Service)"),
    (DEPLOYMENT, ["--controlplane", "controlplane"], "'controlplane' is not HOST:PORT"),
    (DEPLOYMENT, ["--extra-inbound", "0.0.0.0:99999"], "'0.0.0.0:99999' is not HOST:PORT"),
    (DEPLOYMENT, ["--trust-domain", "Music Example"], "--trust-domain: trust domain 'Music Example' is not valid"),
]


@pytest.mark.parametrize(("text", "argv", "message"), REFUSALS, ids=[m[:40] for _, _, m in REFUSALS])
def test_inject_refuses_with_one_line_and_exit_2(text: str, argv: list[str], message: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sidemesh inject: ") and err.count("\n") == 1
    assert message in err


def test_sidemesh_inject_command_pipes_yaml_from_stdin_to_stdout() -> None:
    done = subprocess.run([sys.executable, "-m", "sidemesh", "inject", "--image", "sm:1"], input=DEPLOYMENT,
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    (doc,) = yaml.safe_load_all(done.stdout)
    assert sidecar(doc)["image"] == "sm:1"
    failed = subprocess.run([sys.executable, "-m", "sidemesh", "inject"], input="kind: Service\n",
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr == "sidemesh inject: document 1 (Service/?): not a Kubernetes object " \
                            "(a mapping with apiVersion and kind)\n"
