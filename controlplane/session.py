"""One sidecar's stream as the control plane sees it: push slot and ACK state.

Push slot: a latest-value slot. The publisher ``offer``s each new version; the
stream's writer takes whatever is newest when it is ready to write, so a slow
stream skips intermediate versions instead of queueing them (issue 5: one slow
sidecar must not hold memory or time for the other 999).

ACK state: every push gets a fresh nonce; an Ack is matched by nonce to the
version it answers. An ACK moves ``acked_version``; a NACK records
``last_nack`` (version, reason) and changes nothing else; an Ack with a nonce
this stream never sent (or no longer remembers) is ignored.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from controlplane.authn import PeerCertificate
from controlplane.model import AckMessage, Hello, Nack, PreparedSnapshot

# pushes remembered per stream for matching Acks; older ones count as unknown
MAX_OUTSTANDING = 16

STATUS_SYNCED = "synced"
STATUS_BEHIND = "behind"
STATUS_NACKED = "nacked"


class Fanout:
    """Counts the streams that still have to write one version (backpressure).

    The publisher waits for the previous version's fan-out before building the
    next one, so during a storm of joins the push rate adapts to what the
    server can write instead of queueing a version every ``coalesce_ms``.
    """

    def __init__(self, count: int) -> None:
        self._remaining = count
        self._drained = asyncio.Event()
        if count <= 0:
            self._drained.set()

    @property
    def remaining(self) -> int:
        return self._remaining

    def done_one(self) -> None:
        """One stream wrote this version, skipped it for a newer one, or closed."""
        self._remaining -= 1
        if self._remaining <= 0:
            self._drained.set()

    async def wait(self, timeout: float) -> bool:
        """True if every stream finished within ``timeout`` seconds."""
        if self._drained.is_set():
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a sidecar's Ping, written before any pending push (it is tiny)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Push:
    """One snapshot handed to one stream's writer; call ``done()`` when written."""

    prepared: PreparedSnapshot
    fanout: Fanout | None = None

    def done(self) -> None:
        if self.fanout is not None:
            self.fanout.done_one()


class AckKind(Enum):
    ACK = "ack"
    NACK = "nack"
    UNKNOWN_NONCE = "unknown_nonce"
    STALE_NONCE = "stale_nonce"
    VERSION_MISMATCH = "version_mismatch"


@dataclass(frozen=True, slots=True)
class AckOutcome:
    """What an Ack meant; ``latency_s`` is push-to-ack time for matched ones."""

    kind: AckKind
    version: str
    latency_s: float | None = None


@dataclass(frozen=True, slots=True)
class CloseReason:
    """Why a stream is being closed; ``code`` is a grpc.StatusCode name or None (OK)."""

    reason: str
    code: str | None = None
    detail: str = ""


def sync_status(acked_version: str | None, last_nack: Nack | None, current_version: str | None) -> str:
    """synced | nacked | behind, for /status."""
    if current_version is not None and acked_version == current_version:
        return STATUS_SYNCED
    if last_nack is not None and last_nack.version == current_version:
        return STATUS_NACKED
    return STATUS_BEHIND


class Session:
    """Per-stream state; created after a valid Hello, the registry's lease object."""

    _ids = itertools.count(1)

    def __init__(self, hello: Hello, *, connected_at: float, peer: str = "",
                 certificate: PeerCertificate | None = None) -> None:
        self.id = next(Session._ids)
        self.hello = hello
        self.peer = peer
        # the verified client certificate the stream was opened with (None when insecure)
        self.certificate = certificate
        self.connected_at = connected_at
        self.offered_version: str | None = None
        self.sent_version: str | None = None
        self.acked_version: str | None = None
        self.last_nack: Nack | None = None
        self.pushes = 0
        self.close_reason: CloseReason | None = None
        # True while the writer is inside a write (a slow or stuck peer)
        self.writing = False
        self._pending: Push | None = None
        self._pong = 0
        self._wake = asyncio.Event()
        self._seq = itertools.count(1)
        self._outstanding: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @property
    def node_id(self) -> str:
        return self.hello.node_id

    # --- push slot -------------------------------------------------------
    def offer(self, prepared: PreparedSnapshot, fanout: Fanout | None = None) -> None:
        """Make ``prepared`` the next thing to write (replacing, skipping, an unsent one)."""
        if self._pending is not None:
            self._pending.done()
        self._pending = Push(prepared, fanout)
        self.offered_version = prepared.version
        self._wake.set()

    def close(self, reason: CloseReason) -> None:
        """Ask the stream's writer to finish (first reason wins)."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._pending is not None:
            self._pending.done()
            self._pending = None
        self._wake.set()

    def ping(self, seq: int) -> None:
        """The sidecar asked whether the stream is alive: answer the newest ping next."""
        self._pong = max(self._pong, seq)
        self._wake.set()

    async def next_push(self) -> Push | Pong | None:
        """Wait for the next thing to write: a pong, else the newest offered snapshot;
        None once the session is closing.

        The caller must call ``done()`` on a returned push once written.
        """
        while True:
            if self.close_reason is not None:
                return None
            if self._pong:
                seq, self._pong = self._pong, 0
                return Pong(seq)
            pending, self._pending = self._pending, None
            if pending is not None:
                return pending
            self._wake.clear()
            await self._wake.wait()

    def record_sent(self, version: str, now: float) -> str:
        """Allocate the nonce for a push of ``version`` and remember it."""
        nonce = f"{self.id}-{next(self._seq)}"
        self._outstanding[nonce] = (version, now)
        while len(self._outstanding) > MAX_OUTSTANDING:
            self._outstanding.popitem(last=False)
        self.sent_version = version
        self.pushes += 1
        return nonce

    # --- acks ----------------------------------------------------------------
    def on_ack(self, ack: AckMessage, now: float) -> AckOutcome:
        """Apply an Ack/NACK; never touches anything but this session's ACK state."""
        sent = self._outstanding.get(ack.nonce)
        if sent is None:
            stale = ack.nonce.startswith(f"{self.id}-") and ack.nonce[len(f"{self.id}-"):].isdigit()
            return AckOutcome(AckKind.STALE_NONCE if stale else AckKind.UNKNOWN_NONCE, ack.version)
        version, sent_at = sent
        if ack.version and ack.version != version:
            return AckOutcome(AckKind.VERSION_MISMATCH, ack.version)
        del self._outstanding[ack.nonce]
        latency = max(0.0, now - sent_at)
        if ack.accepted:
            self.acked_version = version
            return AckOutcome(AckKind.ACK, version, latency)
        self.last_nack = Nack(version=version, reason=ack.error_detail or "(no reason given)")
        return AckOutcome(AckKind.NACK, version, latency)

    def status(self, current_version: str | None) -> str:
        return sync_status(self.acked_version, self.last_nack, current_version)
