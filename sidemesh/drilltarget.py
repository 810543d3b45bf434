"""The mesh a drill steers: a local ``sidemesh up``, or a docker compose project.

Both answer the same verbs (kill, start, freeze, thaw, fault, scale, restore), so the
drills (``sidemesh demo failover``, ``sidemesh demo chaos``) do not care where the mesh
runs.

Locally the verbs go to ``sidemesh up``'s control API, except freeze and thaw: the
control API has no such verb, so the drill sends SIGSTOP/SIGCONT itself to the pid that
``GET /pods`` reports (same host, same user) and remembers it, so a thaw reaches the very
process it froze.

In compose they act on the project's containers (found with ``docker compose ps``) as
``docker compose kill/start/stop/pause/unpause`` would. A replica is its pod, two
containers: the app, whose network namespace the sidecar joins, and the sidecar; the
sidecar goes down first and comes up last (the order compose uses itself). Faults are
posted from inside the control-plane container to its own loopback, where
``POST /faults`` is taken without a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from typing import Any

import aiohttp

from sidemesh.ctl import ControlClient, CtlError, post_fault

CONTROLPLANE = "controlplane"
COMPOSE_ARTISTS = 2  # artist-1 and artist-2 are fixed services in docker-compose.yml
CP_HTTP_PORT = 15014
COMPOSE_CP_HTTP = f"127.0.0.1:{CP_HTTP_PORT}"  # the control plane's HTTP port, seen from inside its container
STOP_GRACE_S = "5"  # stop_grace_period in docker-compose.yml


class LocalMesh:
    """A running ``sidemesh up``, steered through its control API."""

    kind = "local"

    def __init__(self, control: str, admin: str | None = None) -> None:
        self.control = control
        self.admin = admin or "127.0.0.1:15000"
        self.controlplane_http: str | None = None  # status asks `sidemesh up`'s /mesh
        self._frozen: dict[str, int] = {}  # unit name -> pid we sent SIGSTOP

    async def check(self, session: aiohttp.ClientSession) -> None:
        await ControlClient(session, self.control).get("/pods")

    async def units(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Every unit as the supervisor sees it (``GET /pods``)."""
        return list(await ControlClient(session, self.control).get("/pods"))

    async def kill(self, session: aiohttp.ClientSession, name: str) -> None:
        await ControlClient(session, self.control).post("/kill", {"name": name})

    async def start(self, session: aiohttp.ClientSession, name: str) -> None:
        await ControlClient(session, self.control).post("/start", {"name": name})

    async def freeze(self, session: aiohttp.ClientSession, name: str) -> None:
        unit = next((u for u in await self.units(session) if u["name"] == name), None)
        if unit is None or unit.get("state") != "running" or not unit.get("pid"):
            raise CtlError(f"cannot freeze {name}: it is {unit.get('state') if unit else 'not in the mesh'}")
        pid = int(unit["pid"])
        os.kill(pid, signal.SIGSTOP)
        self._frozen[name] = pid

    async def thaw(self, session: aiohttp.ClientSession, name: str) -> None:
        pid = self._frozen.pop(name, None)
        if pid is None:
            raise CtlError(f"cannot thaw {name}: this drill did not freeze it")
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError as exc:
            raise CtlError(f"cannot thaw {name}: pid {pid} is gone") from exc

    async def fault(self, session: aiohttp.ClientSession, fault: str, service: str | None = None) -> None:
        mesh = await ControlClient(session, self.control).get("/mesh")
        body = {"fault": fault, **({"service": service} if service else {})}
        await post_fault(session, mesh["controlplane"]["http"], body)

    async def scale(self, session: aiohttp.ClientSession, service: str, replicas: int) -> None:
        await ControlClient(session, self.control).post("/scale", {"service": service, "replicas": replicas})

    async def replicas(self, session: aiohttp.ClientSession, service: str) -> int:
        return sum(1 for u in await self.units(session) if u.get("kind") == "pod" and u.get("service") == service)

    async def restore(self, session: aiohttp.ClientSession) -> list[str]:
        """Thaw what we froze, start every unit that is down, clear faults; what was done."""
        done = []
        for name, pid in list(self._frozen.items()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self._frozen.pop(name, None)
            done.append(f"thaw {name}")
        for unit in await self.units(session):
            if unit.get("state") != "running":
                await self.start(session, unit["name"])
                done.append(f"start {unit['name']}")
        mesh = await ControlClient(session, self.control).get("/mesh")
        with contextlib.suppress(CtlError):
            await post_fault(session, mesh["controlplane"]["http"], {"fault": "clear"})
            done.append("fault clear")
        return done


class ComposeMesh:
    """A docker compose project of docker-compose.yml.

    Kill, start, stop, pause, unpause and exec go to the project's containers with the plain
    ``docker`` CLI, which is what ``docker compose kill/start/...`` do underneath: Debian's
    docker-compose 1.29 takes over a second per command, which would stretch a restart burst
    of four cycles from five seconds to ten. Container ids come from ``compose ps`` once.
    """

    kind = "compose"

    def __init__(self, compose_file: str | None, project: str | None, admin: str | None = None) -> None:
        self.base = compose_command()
        if compose_file:
            self.base += ["-f", compose_file]
        if project:
            self.base += ["-p", project]
        self.control = "-"  # no `sidemesh up`: status discovers sidecars from a seed admin
        self.admin = admin or ""
        # the sidecars know the control plane as controlplane:15010, a name only the compose network
        # resolves; from the host it is the port compose publishes (found in check())
        self.controlplane_http: str | None = None
        self._ids: dict[str, str] = {}

    async def check(self, session: aiohttp.ClientSession) -> None:
        # every container id at once, so no step later pays a compose command's second
        ids = (await run([*self.base, "ps", "-q", "-a"])).split()
        if ids:
            labels = await run(["docker", "inspect", "-f",
                                '{{.Id}} {{index .Config.Labels "com.docker.compose.service"}}', *ids])
            for line in labels.splitlines():
                cid, _, service = line.partition(" ")
                if service:
                    self._ids.setdefault(service, cid)
        if not self.admin:
            cid = await self._id("song")
            ip = (await run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                             cid])).split()
            if not ip:
                raise CtlError(f"container {cid[:12]} has no IP address")
            self.admin = f"{ip[0]}:15000"
        with contextlib.suppress(CtlError):  # not published: status then reports it unreachable
            published = (await run([*self.base, "port", CONTROLPLANE, str(CP_HTTP_PORT)])).strip()
            host, _, port = published.rpartition(":")
            if port.isdigit():
                self.controlplane_http = f"{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{port}"

    async def _id(self, service: str) -> str:
        if service not in self._ids:
            out = (await run([*self.base, "ps", "-q", "-a", service])).split()
            if not out:
                raise CtlError(f"no `{service}` container: start the mesh with `docker compose up -d`")
            self._ids[service] = out[0]
        return self._ids[service]

    async def _docker(self, verb: str, services: list[str], *options: str) -> None:
        """``docker VERB`` on each service's container, one at a time and in order."""
        for service in services:
            await run(["docker", verb, *options, await self._id(service)])

    async def units(self, session: aiohttp.ClientSession) -> None:
        """Compose has no cheap listing of its units; the drill judges the mesh by its sidecars alone."""
        return None

    async def kill(self, session: aiohttp.ClientSession, name: str) -> None:
        await self._docker("kill", pod_services(name, going_down=True))

    async def start(self, session: aiohttp.ClientSession, name: str) -> None:
        await self._docker("start", pod_services(name, going_down=False))

    async def freeze(self, session: aiohttp.ClientSession, name: str) -> None:
        await self._docker("pause", pod_services(name, going_down=True))

    async def thaw(self, session: aiohttp.ClientSession, name: str) -> None:
        await self._docker("unpause", pod_services(name, going_down=False))

    async def fault(self, session: aiohttp.ClientSession, fault: str, service: str | None = None) -> None:
        # from inside the control plane's container to its own loopback, where /faults needs no token
        await run(["docker", "exec", await self._id(CONTROLPLANE), "sidemesh", "fault", CONTROLPLANE, fault,
                   *([service] if service else []), "--controlplane-http", COMPOSE_CP_HTTP])

    async def scale(self, session: aiohttp.ClientSession, service: str, replicas: int) -> None:
        """artist between 1 and 2: the replicas above ``replicas`` are stopped, those below started."""
        if service != "artist" or not 1 <= replicas <= COMPOSE_ARTISTS:
            raise CtlError(f"compose runs {service} as fixed services: cannot scale it to {replicas}")
        for r in range(replicas + 1, COMPOSE_ARTISTS + 1):
            await self._docker("stop", pod_services(f"artist-{r}", going_down=True), "--time", STOP_GRACE_S)
        for r in range(1, replicas + 1):
            await self._docker("start", pod_services(f"artist-{r}", going_down=False))

    async def replicas(self, session: aiohttp.ClientSession, service: str) -> int:
        return COMPOSE_ARTISTS if service == "artist" else 1

    async def restore(self, session: aiohttp.ClientSession) -> list[str]:
        """Unpause and start everything the drill touches, clear faults; what was done."""
        done = []
        with contextlib.suppress(CtlError):  # unpause of a container that is not paused fails
            await self._docker("unpause", [CONTROLPLANE])
            done.append("unpause controlplane")
        pods = [s for r in range(1, COMPOSE_ARTISTS + 1) for s in pod_services(f"artist-{r}", going_down=False)]
        await self._docker("start", [CONTROLPLANE, *pods])
        done.append(f"start {CONTROLPLANE} {' '.join(pods)}")
        with contextlib.suppress(CtlError):
            await self.fault(session, "clear")
            done.append("fault clear")
        return done


def pod_services(name: str, *, going_down: bool) -> list[str]:
    """Compose services of a unit: 'controlplane' itself; 'artist-2' is its app and its sidecar."""
    if name == CONTROLPLANE:
        return [CONTROLPLANE]
    if name == "dns":
        raise CtlError("compose has no DNS server to steer: Docker's embedded DNS answers the names")
    service, sep, replica = name.rpartition("-")
    if not sep or not replica.isdigit():
        raise CtlError(f"{name!r}: expected controlplane or a replica such as artist-2")
    app = name if service == "artist" else service  # only artist is replicated in docker-compose.yml
    pod = [f"{app}-sidecar", app]
    return pod if going_down else pod[::-1]


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        return ["docker", "compose"]
    raise CtlError("neither `docker compose` nor `docker-compose` is installed")


async def run(cmd: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise CtlError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {err.decode(errors='replace').strip()[:500]}")
    return out.decode()
