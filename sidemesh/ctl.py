"""``sidemesh scale|kill|stop|start|fault``: steer a running ``sidemesh up`` like a small compose.

scale/kill/stop/start are clients of the control API of ``sidemesh up`` (see
``sidemesh.controlapi``); ``fault`` posts to the control plane's own ``/faults``,
found through the control API's ``/mesh`` or given with ``--controlplane-http``
(in compose: ``controlplane:15014``). Both send ``Authorization: Bearer
$SIDEMESH_ADMIN_TOKEN`` when that variable is set, for servers that do not
serve state changes to the caller's address without it (``sidemesh.adminauth``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import uvloop

from sidemesh.adminauth import ENV_ADMIN_TOKEN, client_headers
from sidemesh.layout import CONTROL_PORT, DEFAULT_SUBNET, LayoutError, MeshLayout, parse_hostport

ENV_CONTROL = "SIDEMESH_CONTROL"
DEFAULT_CONTROL = str(MeshLayout(subnet=DEFAULT_SUBNET).default_control)
# start and scale wait for the new processes to answer (up to 15 s), so allow more than that
REQUEST_TIMEOUT_S = 40.0


class CtlError(Exception):
    """A failure to report to the user as one line, exit status 1."""

    exit_status = 1


class CtlUsageError(CtlError):
    """A command line the running mesh cannot take (a service it does not have): exit status 2."""

    exit_status = 2


EPILOG = (f"environment: {ENV_ADMIN_TOKEN}, when set, is sent as 'Authorization: Bearer <token>' with every "
          "state change; servers ask for it from addresses outside their --admin-allow (default loopback).")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidemesh", description="Steer a running `sidemesh up`.", epilog=EPILOG)
    control = argparse.ArgumentParser(add_help=False)
    control.add_argument("--control", default=os.environ.get(ENV_CONTROL, DEFAULT_CONTROL), metavar="ADDR:PORT",
                         help=f"control API of the running `sidemesh up`; env {ENV_CONTROL}; default %(default)s")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scale", parents=[control], prog="sidemesh scale", epilog=EPILOG,
                       help="set replica counts", description="Run replicas 1..N of a service: new ones start "
                       "(next numbers) and are waited for; those above N are stopped and removed.")
    s.add_argument("counts", nargs="+", metavar="SERVICE=N", help="e.g. artist=3 (several allowed)")
    for verb, what in (("kill", "SIGKILL every process of NAME, like `docker compose kill`"),
                       ("stop", "stop NAME: SIGTERM, wait, SIGKILL what is left"),
                       ("start", "start NAME again with the same address and arguments, and wait till it answers")):
        v = sub.add_parser(verb, parents=[control], prog=f"sidemesh {verb}", help=what, description=what + ".",
                           epilog=EPILOG)
        v.add_argument("name", metavar="NAME",
                       help="controlplane, dns, a service (all its replicas: artist) or one replica (artist-2)")
    f = sub.add_parser("fault", parents=[control], prog="sidemesh fault", help="inject a control-plane fault", epilog=EPILOG,
                       description="Inject a fault into the control plane for drills: empty-snapshot (push a snapshot "
                       "with no services), drop-service NAME (push snapshots without NAME), clear (back to normal).")
    f.add_argument("target", choices=("controlplane",), help="what to fault (only the control plane takes faults)")
    f.add_argument("fault", choices=("empty-snapshot", "drop-service", "clear"), help="the fault")
    f.add_argument("service", nargs="?", help="the service to drop (drop-service only)")
    f.add_argument("--controlplane-http", metavar="HOST:PORT",
                   help="the control plane's HTTP address (compose: controlplane:15014); "
                   "default: asked from the running `sidemesh up`")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "fault" and (args.fault == "drop-service") != bool(args.service):
        print("usage: sidemesh fault controlplane {empty-snapshot | drop-service SERVICE | clear}\n"
              "sidemesh fault: error: drop-service needs a SERVICE; the other faults take none", file=sys.stderr)
        return 2
    try:
        control = parse_hostport(args.control, default_port=CONTROL_PORT)
    except LayoutError as exc:
        parser.error(f"--control: {exc}")
    try:
        return uvloop.run(_run(args, str(control)))
    except CtlError as exc:
        print(f"sidemesh {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status


async def _run(args: argparse.Namespace, control: str) -> int:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=2.0)
    async with aiohttp.ClientSession(timeout=timeout, headers=client_headers(os.environ)) as session:
        api = ControlClient(session, control)
        if args.command == "scale":
            counts = [item.partition("=") for item in args.counts]
            for item, (_, sep, _) in zip(args.counts, counts, strict=True):
                if not sep:
                    raise CtlError(f"{item!r}: expected SERVICE=N, e.g. artist=3")
            check_services([service for service, _, _ in counts], await api.get("/mesh"))
            for service, _, n in counts:
                print(describe_scale(await api.post("/scale", {"service": service, "replicas": n})))
        elif args.command == "fault":
            target = args.controlplane_http or (await api.get("/mesh"))["controlplane"]["http"]
            body: dict[str, str] = {"fault": args.fault}
            if args.service:
                body["service"] = args.service
            print(f"control plane {target} faults: {await post_fault(session, target, body)}")
        else:
            result = await api.post(f"/{args.command}", {"name": args.name})
            for unit in result["units"]:
                print(describe_action(args.command, unit))
    return 0


class ControlClient:
    """Talks JSON to the control API; turns connection failures and error bodies into CtlError."""

    def __init__(self, session: aiohttp.ClientSession, control: str, *,
                 headers: Mapping[str, str] | None = None) -> None:
        self._session = session
        self.control = control
        # the admin token from the environment unless the caller says otherwise
        self._headers = dict(client_headers(os.environ) if headers is None else headers)

    async def get(self, path: str) -> Any:
        return await self._call("GET", path, None)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        try:
            async with self._session.request(method, f"http://{self.control}{path}", json=body,
                                             headers=self._headers) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise CtlError(f"no running `sidemesh up` at {self.control}; start one with `sidemesh up` "
                           f"(or point --control / ${ENV_CONTROL} at it)") from exc
        except ValueError as exc:
            raise CtlError(f"{self.control} did not answer like `sidemesh up` (not JSON)") from exc
        if resp.status != 200:
            raise CtlError(data.get("error", f"HTTP {resp.status}") if isinstance(data, dict) else str(data))
        return data


def check_services(services: Sequence[str], mesh: Any) -> None:
    """CtlUsageError naming the first of ``services`` that the running mesh (its ``/mesh``) lacks."""
    known = mesh.get("services") if isinstance(mesh, dict) else None
    if not isinstance(known, list):
        return  # a `sidemesh up` that does not list its services: it checks them itself
    for service in services:
        if service not in known:
            raise CtlUsageError(f"unknown service {service!r}; the mesh ({mesh.get('mesh_file', '?')}) has "
                                f"{', '.join(map(str, known))}")


async def post_fault(session: aiohttp.ClientSession, target: str, body: dict[str, str]) -> Any:
    try:
        async with session.post(f"http://{target}/faults", json=body, headers=client_headers(os.environ)) as resp:
            text = await resp.text()
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise CtlError(f"control plane at {target} not reachable ({type(exc).__name__}: {exc})") from exc
    if resp.status != 200:
        raise CtlError(f"control plane at {target} refused {body}: HTTP {resp.status} {text[:300]}")
    return text.strip()


def _pids(unit: dict[str, Any], key: str = "pids") -> str:
    pids = unit.get(key) or []
    return f" (pid {', '.join(map(str, pids))})" if pids else ""


def describe_action(verb: str, unit: dict[str, Any]) -> str:
    """One line per unit for kill/stop/start, e.g. 'killed artist-2 (pid 4242, 4243)'."""
    name, state = unit["name"], unit["state"]
    if not unit.get("changed") and verb != "start":
        return f"{name} was already {state}"
    if verb == "start":
        if not unit.get("changed") and unit.get("before") == "running":
            return f"{name} already running{_pids(unit)}"
        ready = "ready" if unit.get("ready") else "NOT ready yet (see its logs)"
        return f"started {name} at {unit['address']}{_pids(unit)}, {ready}"
    return f"{'killed' if verb == 'kill' else 'stopped'} {name}{_pids(unit, 'before_pids')}"


def describe_scale(result: dict[str, Any]) -> str:
    """'artist: started artist-2 (ready in 0.71 s); now artist-1 running, artist-2 running'."""
    parts = []
    for name in result["started"]:
        t = result["ready_s"].get(name)
        parts.append(f"started {name} " + (f"(ready in {t:.2f} s)" if t is not None else "(NOT ready, see its logs)"))
    parts += [f"removed {name}" for name in result["removed"]]
    now = ", ".join(f"{p['name']} {p['state']}" for p in result["pods"]) or "no replicas"
    return f"{result['service']}: {'; '.join(parts) or 'nothing to do'}; now {now}"
