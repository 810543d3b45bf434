"""meshpb/ is committed; it must be exactly what scripts/genproto makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def test_generated_protobuf_code_matches_the_proto_files(tmp_path: Path) -> None:
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    subprocess.run(["bash", str(REPO / "scripts" / "genproto"), str(tmp_path)], check=True, env={"PATH": env_path})
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "genproto produced nothing"
    stale = [str(rel) for rel in generated if (REPO / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"meshpb/ is out of date with proto/ (run scripts/genproto): {stale}"


def test_only_conversion_modules_import_the_generated_messages() -> None:
    """Protobuf stays at the edge (STYLE.md 12)."""
    allowed = {"sidecar/convert.py", "sidecar/discovery.py", "sidecar/certmanager.py", "controlplane/convert.py", "controlplane/server.py",
               "controlplane/session.py", "controlplane/app.py", "controlplane/plane.py", "controlplane/push.py"}
    offenders = []
    for pkg in ("sidecar", "controlplane", "services", "dnsfallback", "sidemesh", "identity"):
        for path in (REPO / pkg).rglob("*.py"):
            rel = str(path.relative_to(REPO))
            if "meshpb" in path.read_text() and rel not in allowed:
                offenders.append(rel)
    assert not offenders, f"these modules import generated protobuf code: {offenders}"


def test_packages_respect_the_design_import_rules() -> None:
    """DESIGN.md: services -> nothing of the mesh; dnsfallback and identity -> nothing of ours;
    no sidecar <-> controlplane."""
    forbidden = {
        "identity": ("sidecar", "controlplane", "services", "dnsfallback", "sidemesh", "meshpb"),
        "services": ("sidecar", "controlplane", "dnsfallback", "sidemesh", "meshpb"),
        "dnsfallback": ("sidecar", "controlplane", "services", "sidemesh", "meshpb"),
        "controlplane": ("sidecar", "services", "dnsfallback", "sidemesh"),
        "sidecar": ("controlplane", "services", "sidemesh"),
    }
    bad = []
    for pkg, banned in forbidden.items():
        for path in (REPO / pkg).rglob("*.py"):
            for line in path.read_text().splitlines():
                stripped = line.strip()
                if stripped.startswith(("import ", "from ")):
                    mod = stripped.split()[1].split(".")[0]
                    if mod in banned:
                        bad.append(f"{path.relative_to(REPO)}: {stripped}")
    assert not bad, "\n".join(bad)
