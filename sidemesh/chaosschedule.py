"""The chaos drill's schedule: which faults hit the mesh, when, and for how long.

Theory of operation
-------------------
A schedule is a pure function of (seed, duration, faults per minute, profile): the same
inputs give the same faults at the same offsets, so a drill that failed is replayed with
its ``--seed``. Nothing here does I/O; ``sidemesh.chaos`` carries the steps out.

A fault is a short script of steps on one *resource* (the control plane, the DNS server,
the artist replicas) whose last step restores what the first one broke: what was killed
is started, what was frozen is thawed, injected faults are cleared, artist goes back to
its base replica count. Kinds are drawn from a shuffled bag holding every kind once,
refilled when empty, so each kind shows up once a drill is long enough for one bag, and
no kind can starve another however the dice fall.

Primary faults come one after another, each starting at least RECOVERY_GAP_S after the
previous one ended (so each one's recovery is measured on its own) and on average
60 / faults-per-minute seconds after the previous one started. Some primaries on the
control plane carry one companion fault on another resource, strictly inside them:
these are the overlaps the design promises to survive,

* DNS killed while the control plane is down, frozen or dropping a service: sidecars
  must serve from last-known-good, the hardest case of all;
* artist scaled, or one replica killed, while the control plane is down: DNS alone must
  carry the change.

Nothing else overlaps. Two faults on one resource mean nothing (a fault cannot be posted
to a dead control plane), and an artist change while the control plane is frozen would
stall ``sidemesh up``'s own steering, which waits for the control plane to answer
before it reports a scale or a start done.

Limits: artist keeps between 1 and ``Profile.max_artists`` replicas (never 0), a replica
is killed only while another runs, and the mesh ends as it started. ``violations()``
replays a schedule on a model of the mesh and names every broken rule; the builder
never returns a schedule that has one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from sidemesh.meshfile import demo_mesh

# the drill is the demo's (it scales and kills artist): its services are the demo mesh file's
SERVICES = demo_mesh().names


class Kind(StrEnum):
    CP_KILL = "cp-kill"
    CP_FREEZE = "cp-freeze"
    CP_RESTART_BURST = "cp-restart-burst"
    CP_EMPTY_SNAPSHOT = "cp-empty-snapshot"
    CP_DROP_SERVICE = "cp-drop-service"
    DNS_KILL = "dns-kill"
    ARTIST_SCALE = "artist-scale"
    ARTIST_KILL = "artist-kill"


class Resource(StrEnum):
    CONTROLPLANE = "controlplane"
    DNS = "dns"
    ARTIST = "artist"


class Verb(StrEnum):
    KILL = "kill"  # SIGKILL (docker compose kill)
    START = "start"
    FREEZE = "freeze"  # SIGSTOP (docker compose pause)
    THAW = "thaw"  # SIGCONT (docker compose unpause)
    FAULT = "fault"  # the control plane's POST /faults
    CLEAR = "clear"
    SCALE = "scale"


CONTROLPLANE = "controlplane"
DNS = "dns"
ARTIST = "artist"

RESOURCE_OF: dict[Kind, Resource] = {
    Kind.CP_KILL: Resource.CONTROLPLANE,
    Kind.CP_FREEZE: Resource.CONTROLPLANE,
    Kind.CP_RESTART_BURST: Resource.CONTROLPLANE,
    Kind.CP_EMPTY_SNAPSHOT: Resource.CONTROLPLANE,
    Kind.CP_DROP_SERVICE: Resource.CONTROLPLANE,
    Kind.DNS_KILL: Resource.DNS,
    Kind.ARTIST_SCALE: Resource.ARTIST,
    Kind.ARTIST_KILL: Resource.ARTIST,
}

# how long each kind lasts, first step to restoring step (a burst is built from its cycles)
DURATION_S: dict[Kind, tuple[float, float]] = {
    Kind.CP_KILL: (2.0, 6.0),
    # the sidecars' gRPC keepalive notices a frozen peer in about 2.5 s: some freezes end
    # before it does (the stream just resumes), most after (a trip to dns and back)
    Kind.CP_FREEZE: (2.0, 7.0),
    Kind.CP_EMPTY_SNAPSHOT: (2.0, 5.0),
    Kind.CP_DROP_SERVICE: (2.0, 5.0),
    Kind.DNS_KILL: (2.0, 6.0),
    Kind.ARTIST_SCALE: (3.0, 6.0),
    Kind.ARTIST_KILL: (2.0, 5.0),
}
BURST_RESTARTS = (2, 4)
BURST_DOWN_S = (0.3, 1.2)
BURST_UP_S = (0.3, 1.0)

# companions a primary may carry, strictly inside it (see the module docstring)
COMPANIONS: dict[Kind, tuple[Kind, ...]] = {
    Kind.CP_KILL: (Kind.DNS_KILL, Kind.ARTIST_SCALE, Kind.ARTIST_KILL),
    Kind.CP_FREEZE: (Kind.DNS_KILL,),
    Kind.CP_DROP_SERVICE: (Kind.DNS_KILL,),
}
COMPANION_PROBABILITY = 0.4
COMPANION_MIN_ROOM_S = 3.0  # a primary shorter than this has no room for a companion inside it
COMPANION_MIN_S = 1.0

WARMUP_S = 4.0  # steady load before the first fault: the figures need a baseline
TAIL_S = 10.0  # no step in the last seconds: the last fault must recover while load still runs
RECOVERY_GAP_S = 5.0
MIN_DURATION_S = 30.0
DEFAULT_FAULTS_PER_MINUTE = 6.0
MAX_ARTISTS = 4


@dataclass(frozen=True, slots=True)
class Step:
    at_s: float  # seconds after the load started
    verb: Verb
    target: str  # controlplane | dns | artist | artist-N
    args: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.verb is Verb.SCALE:
            return f"scale {self.target}={self.args[0]}"
        return " ".join((self.verb.value, self.target, *self.args))


@dataclass(frozen=True, slots=True)
class Fault:
    number: int  # 1-based, in the order the faults start
    kind: Kind
    steps: tuple[Step, ...]
    detail: str
    inside: int | None = None  # the primary fault this companion runs inside

    @property
    def start_s(self) -> float:
        return self.steps[0].at_s

    @property
    def end_s(self) -> float:
        return self.steps[-1].at_s

    @property
    def episode(self) -> int:
        """The primary fault's number: a primary and its companion form one episode."""
        return self.inside if self.inside is not None else self.number


@dataclass(frozen=True, slots=True)
class Profile:
    """What a deployment lets the drill do."""

    name: str
    kinds: tuple[Kind, ...]
    services: tuple[str, ...]  # candidates for drop-service
    base_artists: int
    max_artists: int
    scale_targets: tuple[int, ...]
    note: str = ""  # what this profile leaves out or adapts, and why


LOCAL = Profile("local", tuple(Kind), SERVICES, base_artists=2, max_artists=MAX_ARTISTS, scale_targets=(1, 3, 4))
COMPOSE = Profile(
    "compose",
    tuple(k for k in Kind if k is not Kind.DNS_KILL),
    SERVICES,
    base_artists=2,
    max_artists=2,
    scale_targets=(1,),
    note="compose: no dns-kill (Docker's embedded DNS is not a container the drill can kill); artist runs as "
    "the two fixed services artist-1 and artist-2, so artist-scale goes to 1 (stops artist-2's pod) and back "
    "to 2, never to 3 or 4; cp-freeze is docker compose pause/unpause",
)
PROFILES: dict[str, Profile] = {p.name: p for p in (LOCAL, COMPOSE)}


@dataclass(frozen=True, slots=True)
class Schedule:
    seed: int
    duration_s: float
    faults_per_minute: float
    profile: Profile
    faults: tuple[Fault, ...]

    def steps(self) -> list[tuple[Fault, Step]]:
        """Every step of every fault in the order they run (ties: lower fault number first)."""
        pairs = [(f, s) for f in self.faults for s in f.steps]
        return sorted(pairs, key=lambda fs: (fs[1].at_s, fs[0].number))

    def kinds(self) -> set[Kind]:
        return {f.kind for f in self.faults}


def _r(x: float) -> float:
    return round(x, 1)


def build_schedule(
    seed: int,
    duration_s: float,
    faults_per_minute: float = DEFAULT_FAULTS_PER_MINUTE,
    profile: Profile = LOCAL,
) -> Schedule:
    """The faults of a drill of ``duration_s`` seconds; ValueError for inputs that allow none."""
    if duration_s < MIN_DURATION_S:
        raise ValueError(f"duration must be at least {MIN_DURATION_S:g}s (got {duration_s:g})")
    if not faults_per_minute > 0:
        raise ValueError(f"faults per minute must be > 0 (got {faults_per_minute:g})")
    rng = random.Random(seed)
    spacing = 60.0 / faults_per_minute
    last_step = duration_s - TAIL_S
    faults: list[Fault] = []
    bag: list[Kind] = []
    t = WARMUP_S
    while True:
        if not bag:
            bag = list(profile.kinds)
            rng.shuffle(bag)
        kind = bag.pop()
        steps, detail = _script(kind, t, rng, profile)
        if steps[-1].at_s > last_step:
            break
        primary = Fault(len(faults) + 1, kind, steps, detail)
        faults.append(primary)
        companion = _companion(primary, len(faults) + 1, rng, profile)
        if companion is not None:
            faults.append(companion)
        t = _r(max(primary.end_s + RECOVERY_GAP_S, primary.start_s + rng.uniform(0.5, 1.5) * spacing))
    schedule = Schedule(seed, duration_s, faults_per_minute, profile, tuple(faults))
    problems = violations(schedule)
    if problems:  # a bug in this module, never the user's input
        raise AssertionError(f"schedule for seed {seed} breaks its own rules: {problems}")
    return schedule


def _script(
    kind: Kind, t: float, rng: random.Random, profile: Profile, length: float | None = None
) -> tuple[tuple[Step, ...], str]:
    """The steps of one fault starting at ``t`` (lasting ``length`` if given), and a short detail."""
    if kind is Kind.CP_RESTART_BURST:
        return _burst(t, rng)
    lo, hi = DURATION_S[kind]
    d = _r(rng.uniform(lo, hi) if length is None else length)
    end = _r(t + d)
    if kind is Kind.CP_KILL:
        return (Step(t, Verb.KILL, CONTROLPLANE), Step(end, Verb.START, CONTROLPLANE)), f"down {d:.1f}s"
    if kind is Kind.CP_FREEZE:
        return (Step(t, Verb.FREEZE, CONTROLPLANE), Step(end, Verb.THAW, CONTROLPLANE)), f"frozen {d:.1f}s"
    if kind is Kind.CP_EMPTY_SNAPSHOT:
        return (Step(t, Verb.FAULT, CONTROLPLANE, ("empty-snapshot",)),
                Step(end, Verb.CLEAR, CONTROLPLANE)), f"empty snapshots for {d:.1f}s"
    if kind is Kind.CP_DROP_SERVICE:
        service = rng.choice(profile.services)
        return (Step(t, Verb.FAULT, CONTROLPLANE, ("drop-service", service)),
                Step(end, Verb.CLEAR, CONTROLPLANE)), f"without {service} for {d:.1f}s"
    if kind is Kind.DNS_KILL:
        return (Step(t, Verb.KILL, DNS), Step(end, Verb.START, DNS)), f"down {d:.1f}s"
    if kind is Kind.ARTIST_SCALE:
        n = rng.choice(profile.scale_targets)
        base = profile.base_artists
        return (Step(t, Verb.SCALE, ARTIST, (str(n),)),
                Step(end, Verb.SCALE, ARTIST, (str(base),))), f"artist={n} for {d:.1f}s, then {base}"
    if kind is Kind.ARTIST_KILL:
        name = f"{ARTIST}-{rng.randint(1, profile.base_artists)}"
        return (Step(t, Verb.KILL, name), Step(end, Verb.START, name)), f"{name} down {d:.1f}s"
    raise ValueError(f"no script for {kind}")


def _burst(t: float, rng: random.Random) -> tuple[tuple[Step, ...], str]:
    n = rng.randint(*BURST_RESTARTS)
    steps: list[Step] = []
    at = t
    for _ in range(n):
        up = _r(at + rng.uniform(*BURST_DOWN_S))
        steps += [Step(at, Verb.KILL, CONTROLPLANE), Step(up, Verb.START, CONTROLPLANE)]
        at = _r(up + rng.uniform(*BURST_UP_S))
    return tuple(steps), f"{n} restarts in {steps[-1].at_s - t:.1f}s"


def _companion(primary: Fault, number: int, rng: random.Random, profile: Profile) -> Fault | None:
    choices = [k for k in COMPANIONS.get(primary.kind, ()) if k in profile.kinds]
    if not choices or rng.random() >= COMPANION_PROBABILITY:
        return None
    room = primary.end_s - primary.start_s
    if room < COMPANION_MIN_ROOM_S:
        return None
    kind = rng.choice(choices)
    # start at least 0.5 s in (the primary has taken effect) and end at least 0.5 s before it does
    start = _r(primary.start_s + rng.uniform(0.5, room - COMPANION_MIN_S - 0.5))
    latest_end = _r(primary.end_s - 0.5)
    length = _r(rng.uniform(COMPANION_MIN_S, latest_end - start))
    steps, detail = _script(kind, start, rng, profile, length=length)
    return Fault(number, kind, steps, detail, inside=primary.number)


# ----- the rules, checked by replaying a schedule on a model of the mesh -----


@dataclass
class MeshModel:
    """What the drill has done to the mesh so far: enough to say whether a step makes sense."""

    base_artists: int
    max_artists: int
    controlplane: str = "running"  # running | killed | frozen
    faults: frozenset[str] = frozenset()
    dns: str = "running"  # running | killed
    artists: dict[int, str] = field(default_factory=dict)  # replica -> running | killed

    def __post_init__(self) -> None:
        if not self.artists:
            self.artists = {r: "running" for r in range(1, self.base_artists + 1)}

    def key(self) -> tuple[object, ...]:
        return (self.controlplane, self.faults, self.dns, tuple(sorted(self.artists.items())))

    def apply(self, step: Step) -> str | None:
        """Carry out ``step``; a description of the broken rule, or None."""
        if step.target == CONTROLPLANE:
            return self._controlplane(step)
        if step.target == DNS:
            return self._dns(step)
        if step.target == ARTIST and step.verb is Verb.SCALE:
            return self._scale(step)
        if step.target.startswith(f"{ARTIST}-") and step.target[len(ARTIST) + 1:].isdigit():
            return self._replica(int(step.target[len(ARTIST) + 1:]), step)
        return f"{step.describe()}: unknown target"

    def _controlplane(self, step: Step) -> str | None:
        state, v = self.controlplane, step.verb
        need = {Verb.KILL: "running", Verb.START: "killed", Verb.FREEZE: "running", Verb.THAW: "frozen",
                Verb.FAULT: "running", Verb.CLEAR: "running"}.get(v)
        if need is None:
            return f"{step.describe()}: not a control-plane verb"
        if state != need:
            return f"{step.describe()} while the control plane is {state}"
        if v is Verb.KILL:
            # a restarted control plane starts with no faults: they live in its memory
            self.controlplane, self.faults = "killed", frozenset()
        elif v in (Verb.START, Verb.THAW):
            self.controlplane = "running"
        elif v is Verb.FREEZE:
            self.controlplane = "frozen"
        elif v is Verb.FAULT:
            self.faults = self.faults | {" ".join(step.args)}
        elif v is Verb.CLEAR:
            if not self.faults:
                return "clear with no fault injected"
            self.faults = frozenset()
        return None

    def _dns(self, step: Step) -> str | None:
        need = {Verb.KILL: "running", Verb.START: "killed"}.get(step.verb)
        if need is None:
            return f"{step.describe()}: not a DNS verb"
        if self.dns != need:
            return f"{step.describe()} while DNS is {self.dns}"
        self.dns = "killed" if step.verb is Verb.KILL else "running"
        return None

    def _scale(self, step: Step) -> str | None:
        n = int(step.args[0])
        if not 1 <= n <= self.max_artists:
            return f"{step.describe()}: artist must keep 1..{self.max_artists} replicas"
        if any(s != "running" for s in self.artists.values()):
            return f"{step.describe()} while a replica is killed"
        self.artists = {r: "running" for r in range(1, n + 1)}
        return None

    def _replica(self, replica: int, step: Step) -> str | None:
        state = self.artists.get(replica)
        if step.verb is Verb.KILL:
            if state != "running":
                return f"{step.describe()}: it is {state or 'not there'}"
            if sum(1 for s in self.artists.values() if s == "running") < 2:
                return f"{step.describe()} would leave artist without a replica"
            self.artists[replica] = "killed"
            return None
        if step.verb is Verb.START:
            if state != "killed":
                return f"{step.describe()}: it is {state or 'not there'}"
            self.artists[replica] = "running"
            return None
        return f"{step.describe()}: not a replica verb"


def violations(schedule: Schedule) -> list[str]:
    """Every rule the schedule breaks (see the module docstring); empty when it is sound."""
    prof = schedule.profile
    problems: list[str] = []

    def model() -> MeshModel:
        return MeshModel(prof.base_artists, prof.max_artists)

    mesh = model()
    for fault, step in schedule.steps():
        if not 0 <= step.at_s <= schedule.duration_s - TAIL_S:
            problems.append(f"#{fault.number} {fault.kind}: {step.describe()} at +{step.at_s}s is outside "
                            f"0..{schedule.duration_s - TAIL_S:g}s")
        if (why := mesh.apply(step)) is not None:
            problems.append(f"#{fault.number} {fault.kind} at +{step.at_s}s: {why}")
    if mesh.key() != model().key():
        problems.append(f"the mesh does not end as it started: {mesh.key()}")
    for fault in schedule.faults:
        if fault.kind not in prof.kinds:
            problems.append(f"#{fault.number} {fault.kind} is not allowed in profile {prof.name}")
        if [s.at_s for s in fault.steps] != sorted(s.at_s for s in fault.steps):
            problems.append(f"#{fault.number} {fault.kind}: steps out of order")
        alone = model()  # each fault, run on its own, must put back what it changed
        for step in fault.steps:
            alone.apply(step)
        if alone.key() != model().key():
            problems.append(f"#{fault.number} {fault.kind} does not restore the mesh: {alone.key()}")
    problems += _overlap_problems(schedule.faults)
    return problems


def _overlap_problems(faults: Iterable[Fault]) -> list[str]:
    problems = []
    ordered = sorted(faults, key=lambda f: f.start_s)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b.start_s > a.end_s:
                break
            if RESOURCE_OF[a.kind] is RESOURCE_OF[b.kind]:
                problems.append(f"#{a.number} {a.kind} and #{b.number} {b.kind} overlap on {RESOURCE_OF[a.kind]}")
            elif b.inside != a.number and a.inside != b.number:
                problems.append(f"#{a.number} {a.kind} and #{b.number} {b.kind} overlap without being companions")
            elif (b.inside == a.number and b.kind not in COMPANIONS.get(a.kind, ())) or (
                a.inside == b.number and a.kind not in COMPANIONS.get(b.kind, ())
            ):
                problems.append(f"#{a.number} {a.kind} and #{b.number} {b.kind} may not overlap")
            inner, outer = (b, a) if b.inside == a.number else (a, b)
            if not (outer.start_s < inner.start_s and inner.end_s < outer.end_s):
                problems.append(f"companion #{inner.number} is not strictly inside #{outer.number}")
    return problems


def render_schedule(schedule: Schedule) -> str:
    """The schedule as printed before the drill starts: one line per fault, with its steps."""
    s = schedule
    lines = [f"schedule seed={s.seed} duration={s.duration_s:g}s faults_per_minute={s.faults_per_minute:g} "
             f"target={s.profile.name} faults={len(s.faults)} kinds={len(s.kinds())}/{len(s.profile.kinds)}"]
    if s.profile.note:
        lines.append(f"  note: {s.profile.note}")
    for f in s.faults:
        inside = f" (inside #{f.inside})" if f.inside is not None else ""
        steps = ", ".join(f"+{st.at_s:.1f}s {st.describe()}" for st in f.steps)
        span = f"+{f.start_s:.1f}s..+{f.end_s:.1f}s"
        lines.append(f"  #{f.number:<3} {span:<17} {f.kind.value:<18} {f.detail}{inside}: {steps}")
    return "\n".join(lines)
