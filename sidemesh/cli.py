"""The ``sidemesh`` command: one entry point, one subcommand per component.

Each subcommand lives in the module that owns it and exposes ``main(argv)``
(its own argparse parser with ``prog="sidemesh <sub>"``), so ``--help`` of each
explains every option. This module only dispatches; it imports the chosen
module lazily so ``sidemesh status`` does not pay for grpc, and so on.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("sidemesh.up", "run the whole mesh locally in the foreground (no Docker)"),
    "scale": ("sidemesh.ctl", "set the replica count of a service in the running `sidemesh up`"),
    "kill": ("sidemesh.ctl", "SIGKILL a component of the running `sidemesh up` (like docker compose kill)"),
    "stop": ("sidemesh.ctl", "stop (SIGTERM) a component of the running `sidemesh up`"),
    "start": ("sidemesh.ctl", "start a stopped component of the running `sidemesh up`"),
    "status": ("sidemesh.status", "show the control plane and every sidecar: mode, route version, age (--watch)"),
    "dashboard": ("sidemesh.dashboard.app", "serve a live web page of the mesh (graph, modes, timeline) on :15080"),
    "fault": ("sidemesh.ctl", "inject a fault into the control plane (empty-snapshot, drop-service NAME, clear)"),
    "demo": ("sidemesh.demo", "drills under load: `demo failover` (a control-plane outage), "
             "`demo chaos` (seeded random faults)"),
    "controlplane": ("controlplane.app", "run the control plane (gRPC :15010, HTTP :15014)"),
    "sidecar": ("sidecar.app", "run one sidecar proxy (outbound :15001, inbound :15006, admin :15000)"),
    "service": ("services.app", "run a demo service: artist, song or image (:8080)"),
    "dns": ("sidemesh.dnsserver", "run the local authoritative DNS server for the mesh zone"),
    "identity": ("sidemesh.identitycli", "`sidemesh identity init`: the mesh CA and a join token per service"),
    "compose": ("sidemesh.compose", "write a docker-compose.yml from a mesh file (default: the demo's)"),
    "inject": ("sidemesh.inject", "add the sidecar to Kubernetes Pod/Deployment YAML read on stdin"),
}


def _usage() -> str:
    lines = [
        "usage: sidemesh COMMAND [options]   (sidemesh COMMAND --help for details)",
        "",
        "A service mesh whose sidecars keep services talking when the control plane dies.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<13} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "quickstart:  sidemesh up   then   curl 127.0.0.1:8080/songs/1/details"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"sidemesh: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    if COMMANDS[command][0] == "sidemesh.ctl":
        return int(module.main([command, *rest]) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
