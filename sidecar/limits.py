"""The named limits a hostile (or merely broken) peer meets on a listener, in one place.

DESIGN.md, "Data path": hostile peers meet named limits. Each one bounds a resource a
client could otherwise hold without end; each one has a default, a ``sidemesh sidecar``
flag (``sidecar/config.py``) and a fixed answer:

* ``max_url_bytes`` (``--max-url-bytes``, 8192): a longer request target gets 414 and the
  connection closes (RFC 9112 3: recipients SHOULD support request lines of 8000 octets);
* ``max_header_bytes`` (``--max-header-bytes``, 64 KiB) and ``max_headers``
  (``--max-headers``, 100): a larger header block gets 431 (RFC 6585 5) and a close;
* ``head_timeout_s`` (``--head-timeout``, 10 s): a head not complete in time gets 408
  (RFC 9110 15.5.9) and a close;
* ``idle_timeout_s`` (``--idle-timeout``, 300 s): a kept-alive connection with no request
  begun in that time is closed (RFC 9112 9.5: servers time out inactive connections);
* ``max_connections`` (``--max-connections``, derived from the open-file limit): at the
  limit the oldest connection that has not sent a whole request head yet (a slow or silent
  client) is closed to make room, so a flood of them cannot lock new clients out; when
  every connection has sent a request, the new one is closed at once. Connections that
  sent a request keep working, kept alive between requests or not;
* ``max_pipelined`` (``--max-pipelined``, 32): requests queued behind the one being
  answered; at the limit the client is not read until the queue drains, and requests
  beyond it that already arrived in the same read are left unanswered, the last queued
  answer says ``Connection: close``, and the client retries them (RFC 9112 9.3.2);
* ``linger_s`` (``--close-linger``, 2 s): after refusing a client that may still be sending
  (414, 431, a body left unread), the sidecar half-closes and reads and drops its input for
  this long, so the answer is not destroyed by a reset (RFC 9112 9.6).

The two clocks of a client connection (Go's net/http has the same pair):

* the *head deadline*: a complete request head must arrive within ``head_timeout_s`` of the
  accept (first request) or of its own first byte (later requests on a kept-alive connection);
* the *idle deadline*: between exchanges, the next request must begin within
  ``idle_timeout_s`` of the end of the previous exchange.

Counting a later head from the end of the previous exchange instead would cap the
keep-alive idle time at the head timeout.

``max_connections`` is per listener context (outbound; inbound with its extra listeners).
Its default leaves room in the process's open-file limit for both contexts, one upstream
connection per client connection, and the sidecar's own sockets.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, fields

# file descriptors kept back for what is not a proxied connection: the admin API, the
# discovery stream, DNS, the event loop's own descriptors, log files
_RESERVED_FDS = 128
# per unit of max_connections: a client connection and its upstream, on two listener contexts
_FDS_PER_CONNECTION = 4
_MAX_AUTO_CONNECTIONS = 16384


@dataclass(frozen=True, slots=True)
class Limits:
    """What one listener allows a client; passed to every ``ProxyContext``."""

    max_url_bytes: int = 8192
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    max_connections: int = 4096  # `sidemesh sidecar` derives it from the open-file limit instead
    max_pipelined: int = 32
    linger_s: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"limit {f.name} must be > 0, got {value!r}")

    @property
    def head_guard_bytes(self) -> int:
        """Raw bytes a head may span before it is refused, whatever its shape.

        The callbacks count the request target and each header exactly, but httptools hands
        a header over only once it is complete, so one endless header line is caught here.
        """
        return self.max_url_bytes + self.max_header_bytes

    @property
    def tick_s(self) -> float:
        """How often a connection's one timer looks at its deadlines (see ``proxy.py``)."""
        return min(self.head_timeout_s, self.idle_timeout_s)


DEFAULT_LIMITS = Limits()


def connections_for_open_files(open_files: int) -> int:
    """The default ``max_connections`` for a process allowed ``open_files`` descriptors.

    >>> connections_for_open_files(1024)
    224
    """
    budget = (open_files - _RESERVED_FDS) // _FDS_PER_CONNECTION
    return max(16, min(_MAX_AUTO_CONNECTIONS, budget))


def open_file_limit() -> int:
    """This process's soft RLIMIT_NOFILE (read once, at configuration time)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return int(soft)
