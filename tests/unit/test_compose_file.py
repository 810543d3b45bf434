"""The committed compose files are `sidemesh compose` of their mesh files, and valid compose.

Regenerate after changing a mesh file or the generator (in the repository's root):

    sidemesh compose -f sidemesh/meshes/demo.toml -o docker-compose.yml
    sidemesh compose -f examples/lyrics/mesh.toml -o examples/lyrics/docker-compose.yml
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidemesh.compose import INFRASTRUCTURE, Target, compose_file
from sidemesh.composeyaml import Flow, document, scalar
from sidemesh.meshfile import RESERVED_NAMES, MeshSpec, demo_mesh, load_mesh, parse_mesh
from tests.support import REPO

DEMO = REPO / "docker-compose.yml"
LYRICS = REPO / "examples" / "lyrics" / "docker-compose.yml"
CASES = [(demo_mesh, DEMO), (lambda: load_mesh(LYRICS.parent / "mesh.toml"), LYRICS)]


def _generated(mesh: MeshSpec, out: Path) -> str:
    return compose_file(Target(mesh, out.parent, out.name))


@pytest.mark.parametrize(("mesh", "committed"), CASES, ids=["demo", "lyrics"])
def test_the_committed_compose_file_is_the_output_of_sidemesh_compose(mesh: Any, committed: Path) -> None:
    assert committed.read_text() == _generated(mesh(), committed), (
        f"{committed.relative_to(REPO)} is not `sidemesh compose` of its mesh file; regenerate it (see this "
        "test's docstring)")


def test_the_command_writes_the_same_file(tmp_path: Path) -> None:
    out = tmp_path / "docker-compose.yml"
    done = subprocess.run([sys.executable, "-m", "sidemesh", "compose", "-o", str(out)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == _generated(demo_mesh(), out)


def _load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(("mesh", "committed"), CASES, ids=["demo", "lyrics"])
def test_every_replica_is_a_pod_of_app_and_sidecar_wired_as_the_design_says(mesh: Any, committed: Path) -> None:
    spec: MeshSpec = mesh()
    services = _load(committed)["services"]
    infrastructure = {"identity", "controlplane", "dashboard"}
    apps = {name: s for name, s in services.items() if "network_mode" not in s and name not in infrastructure}
    expected = {(s.name if s.compose.replicas == 1 else f"{s.name}-{r}") for s in spec.services
                for r in range(1, s.compose.replicas + 1)}
    assert set(apps) == expected
    for name, app in apps.items():
        sidecar = services[f"{name}-sidecar"]
        service = sidecar["command"][sidecar["command"].index("--service") + 1]
        assert sidecar["network_mode"] == f"service:{name}"
        assert sidecar["depends_on"][name] == {"condition": "service_healthy"}
        assert f"identity-{service}:/var/lib/sidemesh/join:ro" in sidecar["volumes"]
        assert app["environment"]["HTTP_PROXY"] == "http://127.0.0.1:15001"
        assert app["environment"]["NO_PROXY"] == "127.0.0.1,localhost"
        assert "healthcheck" in app and "15000/ready" in " ".join(sidecar["healthcheck"]["test"])
        if name != service:  # one of several replicas: it answers to the service's name
            assert app["networks"]["default"]["aliases"] == [service]
    assert spec.publish is not None
    front = [n for n, s in services.items() if "--extra-inbound" in (s.get("command") or [])]
    assert len(front) == 1 and services[front[0]]["network_mode"].endswith(spec.publish.service)
    cp = services["controlplane"]["command"]
    assert cp[cp.index("--allow") + 1] == ",".join(spec.allow)
    identity = services["identity"]["command"]
    assert identity[identity.index("--services") + 1] == ",".join(spec.names)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed "
                    "(scripts/test installs it unless -m 'not docker')")
@pytest.mark.parametrize("committed", [DEMO, LYRICS], ids=["demo", "lyrics"])
def test_docker_compose_accepts_the_file(committed: Path) -> None:
    done = subprocess.run(["docker-compose", "-f", str(committed), "config", "-q"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_generators_own_services_have_names_no_mesh_service_may_take() -> None:
    names = {make(Target(demo_mesh(), REPO)).name for make in INFRASTRUCTURE}
    assert names <= set(RESERVED_NAMES)


def test_strings_from_the_mesh_file_reach_the_container_as_written(tmp_path: Path) -> None:
    mesh = parse_mesh('[services.a]\ncommand = ["sh", "-c", "echo $HOME ${{X:-y}}: yes", "{instance}"]\n'
                      '[services.a.compose]\nimage = "busybox"\n', source=str(tmp_path / "m.toml"),
                      directory=str(tmp_path))
    text = compose_file(Target(mesh, tmp_path))
    (tmp_path / "docker-compose.yml").write_text(text)
    app = yaml.safe_load(text)["services"]["a"]
    assert app["command"] == ["sh", "-c", "echo $$HOME $${X:-y}: yes", "a-1"]  # compose makes $$ a $
    assert app["image"] == "busybox" and "build" not in app


@pytest.mark.parametrize("value", ["no", "on", "1.5", "10", "a: b", "#x", "-x", "*a", "&a", "{x}", "[x]", "", "'",
                                   '"', "5s", "a b", "@x", "%x", "!x", "|", ">", "~", "null", "True", "0x1f", "1e3"])
def test_every_scalar_reads_back_as_the_same_string(value: str) -> None:
    text = document({"key": value, "list": Flow([value, value]), "block": [value]})
    assert yaml.safe_load(text) == {"key": value, "list": [value, value], "block": [value]}, (scalar(value), text)


@pytest.mark.parametrize(("committed", "seed"), [(DEMO, "song:15000"), (LYRICS, "lyrics:15000")], ids=["demo", "lyrics"])
def test_the_dashboard_reads_the_front_doors_sidecar_and_is_published_on_loopback_only(committed: Path, seed: str) -> None:
    dashboard = _load(committed)["services"]["dashboard"]
    command = dashboard["command"]
    assert command[0] == "dashboard"
    assert command[command.index("--admin") + 1] == seed
    assert command[command.index("--controlplane-http") + 1] == "controlplane:15014"
    assert dashboard["ports"] == ["127.0.0.1:${SIDEMESH_DASHBOARD_PORT:-15080}:15080"]
    assert "/healthz" in " ".join(dashboard["healthcheck"]["test"])
    assert "depends_on" not in dashboard  # it waits for nobody and nobody waits for it
