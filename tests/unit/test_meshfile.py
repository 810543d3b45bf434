"""The mesh file: the demo's is what `sidemesh up` always ran, and every bad file is one line
naming the file, the line and the key, with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidemesh.layout import MeshLayout
from sidemesh.meshfile import (
    MeshFileError,
    Policy,
    Publish,
    demo_mesh,
    load_mesh,
    parse_mesh,
    runs_sidemesh,
)
from tests.support import REPO

LYRICS = REPO / "examples" / "lyrics" / "mesh.toml"
GOOD_SERVICE = '[services.a]\ncommand = ["python3", "a.py", "--port", "{port}"]\n'


def _parse(text: str) -> None:
    parse_mesh(text, source="mesh.toml", directory="/srv")


def test_the_demo_file_is_exactly_what_up_used_to_hard_code() -> None:
    mesh = demo_mesh()
    assert mesh.names == ("artist", "song", "image")
    assert [mesh.index(n) for n in mesh.names] == [1, 2, 3]
    assert mesh.publish == Publish("song", 8080, "/songs/1/details")
    assert mesh.allow == ("song->artist", "song->image")
    for spec in mesh.services:
        assert (spec.port, spec.replicas, spec.health, dict(spec.env), spec.policy) == (8080, 1, "/healthz", {}, Policy())
        assert runs_sidemesh(spec.command) and spec.compose.on_sidemesh_image
    assert {s.name: s.compose.replicas for s in mesh.services} == {"artist": 2, "song": 1, "image": 1}
    lay = MeshLayout(state_dir="/state")
    for service, index in (("artist", 1), ("song", 2), ("image", 3)):
        for replica in (1, 2):
            addr = f"127.10.{index}.{replica}"
            app = lay.pod(service, replica).processes[0]
            # the arguments `sidemesh up` gave every demo app before there were mesh files
            assert app.args == ("service", service, "--host", addr, "--port", "8080", "--instance",
                                f"{service}-{replica}", "--proxy", f"http://{addr}:15001")
            assert app.program is None and app.cwd is None


def test_the_lyrics_file_adds_a_foreign_program_its_calls_and_a_policy() -> None:
    mesh = load_mesh(LYRICS)
    assert mesh.names == ("artist", "song", "image", "lyrics")
    assert mesh.allow == ("song->artist", "song->image", "lyrics->song")
    assert mesh.publish == Publish("lyrics", 8081, "/lyrics/1")
    assert mesh.service("song").policy == Policy(timeout_ms=3000)
    lyrics = mesh.service("lyrics")
    assert not runs_sidemesh(lyrics.command)
    assert lyrics.compose.image == "lyrics:latest" and lyrics.compose.build == str(LYRICS.parent)
    assert mesh.build == str(REPO)


def test_a_foreign_app_runs_from_the_mesh_files_directory_with_its_sidecar_as_proxy() -> None:
    lay = MeshLayout(state_dir="/state", mesh=load_mesh(LYRICS))
    app, sidecar = lay.pod("lyrics", 2).processes
    assert app.program == "python3" and app.cwd == str(LYRICS.parent)
    assert app.args == ("lyrics.py", "--host", "127.10.4.2", "--port", "8080", "--instance", "lyrics-2")
    assert app.env["HTTP_PROXY"] == app.env["http_proxy"] == "http://127.10.4.2:15001"
    assert app.env["NO_PROXY"] == "127.0.0.1,localhost,127.10.4.2"
    assert sidecar.args[sidecar.args.index("--app") + 1] == "127.10.4.2:8080"
    assert "--extra-inbound" in lay.pod("lyrics", 1).processes[1].args
    assert "--extra-inbound" not in lay.pod("song", 1).processes[1].args
    cp = lay.controlplane().processes[0].args
    assert cp[cp.index("--allow") + 1] == "song->artist,song->image,lyrics->song"
    assert cp[cp.index("--policy") + 1] == "song=timeout_ms:3000"


def test_defaults_fill_what_a_service_leaves_out() -> None:
    mesh = parse_mesh(GOOD_SERVICE, source="m.toml", directory="/srv")
    (spec,) = mesh.services
    assert (spec.port, spec.replicas, spec.health, spec.policy, spec.compose.replicas) == (8080, 1, "/healthz", Policy(), 1)
    assert spec.compose.command == spec.command and mesh.publish is None and mesh.allow == ()


@pytest.mark.parametrize(("text", "expected"), [
    ("services = [\n", "mesh.toml:1: Invalid value (the file ends inside a value)"),
    ('[services.a]\ncommand = ["x"\nport = 1\n', "mesh.toml:3:1: Unclosed array"),
    ('allow = []\nservics = 1\n', "mesh.toml:2: servics: unknown key"),
    (GOOD_SERVICE + "prot = 8081\n", "mesh.toml:3: services.a.prot: unknown key"),
    ("[services.a]\nport = 8081\n", "mesh.toml:1: services.a: no command"),
    (GOOD_SERVICE + "port = 15001\n", "mesh.toml:3: services.a.port: port 15001 clashes with the sidecar's outbound"),
    (GOOD_SERVICE + "port = 15080\n", "mesh.toml:3: services.a.port: port 15080 clashes with the front door"),
    (GOOD_SERVICE + "port = 70000\n", "mesh.toml:3: services.a.port: 70000 is out of range 1-65535"),
    (GOOD_SERVICE + 'replicas = "2"\n', "mesh.toml:3: services.a.replicas: expected a whole number, got str '2'"),
    (GOOD_SERVICE + "replicas = true\n", "mesh.toml:3: services.a.replicas: expected a whole number, got a boolean"),
    ('allow = ["a->b"]\n' + GOOD_SERVICE, "mesh.toml:1: allow[0]: 'a->b': no service 'b' in this file (a)"),
    ('allow = ["a-b"]\n' + GOOD_SERVICE, "mesh.toml:1: allow[0]: 'a-b': expected CALLER->CALLEE"),
    ('[publish]\nservice = "z"\n' + GOOD_SERVICE, "mesh.toml:2: publish.service: no service 'z' in this file"),
    ('[services.a]\ncommand = ["x", "--host={hots}"]\n', "mesh.toml:2: services.a.command[1]: '--host={hots}': "
                                                         "unknown placeholder {hots}"),
    ('[services.a]\ncommand = []\n', "mesh.toml:2: services.a.command: expected a non-empty list"),
    ('[services.controlplane]\ncommand = ["x"]\n', "mesh.toml:1: services.controlplane: 'controlplane' is the name"),
    ('[services.web-2]\ncommand = ["x"]\n', "mesh.toml:1: services.web-2: a service name may not end in -NUMBER"),
    ('[services.Web]\ncommand = ["x"]\n', "mesh.toml:1: services.Web: a service name is a DNS label"),
    (GOOD_SERVICE + 'env = { HTTP_PROXY = "http://elsewhere" }\n', "mesh.toml:3: services.a.env.HTTP_PROXY: set by the mesh"),
    (GOOD_SERVICE + 'lb = "random"\n', "mesh.toml:3: services.a.lb: 'random': one of round_robin, least_request"),
    (GOOD_SERVICE + 'health = "healthz"\n', "mesh.toml:3: services.a.health: 'healthz': a path that starts with '/'"),
    (GOOD_SERVICE + "[services.a.compose]\nimage = 7\n", "mesh.toml:4: services.a.compose.image: expected a string"),
    (GOOD_SERVICE + "[services.a.compose]\nreplica = 2\n", "mesh.toml:4: services.a.compose.replica: unknown key"),
    ("allow = []\n", "mesh.toml: no services"),
])
def test_a_bad_file_is_one_line_naming_the_file_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(MeshFileError) as info:
        _parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_a_missing_file_says_so() -> None:
    with pytest.raises(MeshFileError, match=r"^/nonexistent/mesh.toml: cannot read the mesh file: No such file"):
        load_mesh("/nonexistent/mesh.toml")


def _sidemesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidemesh", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


@pytest.mark.parametrize("command", ["up", "compose"])
def test_up_and_compose_refuse_a_bad_file_with_one_line_and_exit_status_2(command: str, tmp_path: Path) -> None:
    bad = tmp_path / "mesh.toml"
    bad.write_text(GOOD_SERVICE + "port = 15006\n")
    out = _sidemesh(command, "-f", str(bad))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"sidemesh {command}: {bad}:3: services.a.port: port 15006 clashes with the "
                                       "sidecar's inbound port, which shares the app's network namespace "
                                       "(sidecar ports: 15000, 15001, 15006, 15080)"]
    assert out.stdout == ""


def test_up_refuses_a_program_that_is_not_there_before_starting_anything(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.toml"
    mesh.write_text('[services.a]\ncommand = ["no-such-program-here", "--port", "{port}"]\n')
    out = _sidemesh("up", "-f", str(mesh))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"sidemesh up: {mesh}: services.a.command: program 'no-such-program-here' "
                                       "not found (on PATH) or not executable"]
