"""Opening an upstream connection against a peer that accepts and at once resets it, as a pod
that is stopping (or a full listener) does: real sockets, both event loops, plaintext and TLS.

The race it pins down: the reset arrives after the TCP connect completed but before the task
that asked for the connection resumes. The connection must then count as a refused connect
(nothing was sent, another endpoint may be tried), never be handed out dead (a request written
into it waits for the route's whole timeout) and never hang the TLS handshake (``start_tls`` on a
transport lost meanwhile does not return on its own).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import Counter
from pathlib import Path

import pytest
import uvloop

from identity.store import IdentityFiles
from identity.tls import client_context
from sidecar.errors import UpstreamConnectError
from sidecar.upstream import UpstreamPool
from tests.integration.sidecar_harness import MeshCa

pytestmark = pytest.mark.timeout(120)

ATTEMPTS = 40


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


def resetting_listener(count: int) -> tuple[int, threading.Thread]:
    """A loopback listener that accepts ``count`` connections and resets each one at once."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def run() -> None:
        with srv:
            for _ in range(count):
                conn, _ = srv.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return srv.getsockname()[1], thread


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_a_peer_that_resets_on_accept_is_a_refused_connect_never_a_hang_or_a_dead_connection(
    tls: bool, tmp_path: Path
) -> None:
    context = None
    if tls:
        files = IdentityFiles(MeshCa(tmp_path / "ca").mint("song"))
        context = client_context(files.cert, files.key, files.bundle)
    port, listener = resetting_listener(ATTEMPTS)
    pool = UpstreamPool(connect_timeout_s=1.0)
    outcome: Counter[str] = Counter()

    async def connect() -> str:
        conn = await pool.connect(("127.0.0.1", port), tls=context)
        # judged in the same step as the exchange attaches to it: it must be alive now
        # (a reset that comes later is the exchange's to see, through connection_lost)
        usable = conn.usable
        conn.abort()
        return "usable" if usable else "handed out dead"

    for _ in range(ATTEMPTS):
        try:
            outcome[await asyncio.wait_for(connect(), 3.0)] += 1
        except UpstreamConnectError:
            outcome["refused"] += 1
        except TimeoutError:
            outcome["hung"] += 1
    listener.join(timeout=5)
    print(f"{'tls' if tls else 'plaintext'}: {dict(outcome)}")
    assert outcome["hung"] == 0 and outcome["handed out dead"] == 0, dict(outcome)
    assert sum(outcome.values()) == ATTEMPTS
