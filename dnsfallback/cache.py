"""The DNS cache's decisions, without I/O: what an answer is, when it expires, what to serve.

Theory of operation. Per service the cache holds one :class:`Entry`: the last
positive answer (if any), the error of the most recent attempt (if it failed),
when that attempt finished and how many attempts in a row have failed. All
times come from the caller's clock (``time.monotonic`` in production, a fake
in tests); nothing here reads a clock or awaits.

* A successful lookup replaces the answer and clears the error.
* A negative answer (NXDOMAIN, no records) drops the answer: the DNS said the
  name is gone, so serving old addresses would be wrong.
* A transport failure (timeout, unreachable, SERVFAIL, garbage) keeps the old
  answer, which may then be served stale for up to ``stale_max_s`` past its
  expiry (RFC 8767, "Serving Stale Data to Improve DNS Resiliency").
* With SRV on, an SRV answer beats the A/AAAA answer of the same service, and a transport
  failure of SRV after an SRV answer keeps that answer (``srv_decides``): a peer's port
  never silently turns into our own.
* Every failure is remembered for ``negative_ttl_s`` (RFC 2308 negative
  caching; for transport failures the "failure recheck timer" of RFC 8767
  section 5), so a dead server costs one timeout per name per interval, not
  one per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from dnsfallback.backend import LookupResult
from dnsfallback.config import DnsConfig
from dnsfallback.errors import DnsLookupError
from dnsfallback.srv import SrvLookupResult

# a watched name is never re-queried more often than this, even with TTL 0 records
MIN_REFRESH_INTERVAL_S: Final = 0.1

Via = Literal["a", "srv"]
VIA_A: Final = "a"
VIA_SRV: Final = "srv"


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The endpoints of one service as DNS gave them; times are on the resolver's clock.

    ``via``: ``"srv"`` when an SRV answer gave every endpoint its own port (``name`` is then
    the SRV name), ``"a"`` when A/AAAA records gave addresses and each got the configured port.
    """

    service: str
    name: str
    endpoints: tuple[tuple[str, int], ...]
    ttl_s: float
    resolved_at: float
    expires_at: float
    via: Via = VIA_A

    @property
    def addresses(self) -> tuple[str, ...]:
        """The distinct addresses of the endpoints, in the answer's order."""
        return tuple(dict.fromkeys(address for address, _port in self.endpoints))


@dataclass(frozen=True, slots=True)
class CachedLookup:
    """What the cache holds for one service at one moment.

    ``answer``: the last positive answer; kept (stale) across transport
    failures, dropped on NXDOMAIN/no_answer and after ``stale_max_s``.
    ``error``: the outcome of the most recent attempt if it failed.
    ``fresh``: an answer is present, not expired, and the last attempt succeeded.
    """

    answer: DnsAnswer | None
    error: DnsLookupError | None
    fresh: bool


@dataclass(frozen=True, slots=True)
class Entry:
    """The cache's state for one service (internal to the resolver)."""

    answer: DnsAnswer | None
    error: DnsLookupError | None
    attempted_at: float
    failures: int = 0


def entry_after_success(
    service: str, name: str, result: LookupResult | SrvLookupResult, now: float, config: DnsConfig
) -> Entry:
    """The entry after a lookup that returned addresses (each gets ``config.port``) or SRV endpoints."""
    ttl_s = config.clamp_ttl(result.ttl_s)
    via: Via
    if isinstance(result, SrvLookupResult):
        endpoints, via = tuple(result.endpoints), VIA_SRV
    else:
        endpoints, via = tuple((address, config.port) for address in result.addresses), VIA_A
    answer = DnsAnswer(
        service=service,
        name=name,
        endpoints=endpoints,
        ttl_s=ttl_s,
        resolved_at=now,
        expires_at=now + ttl_s,
        via=via,
    )
    return Entry(answer=answer, error=None, attempted_at=now, failures=0)


def srv_decides(srv: SrvLookupResult | DnsLookupError, previous: DnsAnswer | None) -> SrvLookupResult | DnsLookupError | None:
    """What an SRV outcome decides alone; None when the A/AAAA answer decides (pure).

    * SRV endpoints win: they carry each peer's own inbound port.
    * An SRV lookup that failed for transport reasons while the last answer came from SRV is
      a transport failure of the whole lookup: the SRV answer keeps serving stale (RFC 8767)
      rather than being replaced by addresses with a port that may be wrong for them.
    * Otherwise (NXDOMAIN, no records, or a failure before any SRV answer: a DNS without our
      SRV names) the A/AAAA answer decides, with the configured port, as without SRV.
    """
    if isinstance(srv, SrvLookupResult):
        return srv
    if srv.is_transport_failure and previous is not None and previous.via == VIA_SRV:
        return srv
    return None


def fallback_to_a(srv: DnsLookupError, a: LookupResult | DnsLookupError) -> LookupResult | DnsLookupError:
    """The A/AAAA outcome when SRV did not decide; a failure keeps the SRV cause in its detail (pure)."""
    if not isinstance(a, DnsLookupError):
        return a
    detail = "; ".join(part for part in (a.detail, f"SRV {srv.name}: {srv.reason}") if part)
    error = DnsLookupError(a.service, a.name, a.reason, detail)
    error.__cause__ = a.__cause__ if a.__cause__ is not None else a
    return error


def entry_after_failure(previous: Entry | None, error: DnsLookupError, now: float, config: DnsConfig) -> Entry:
    """The entry after a failed lookup: negative answers drop the old answer, transport failures keep it."""
    failures = (previous.failures if previous is not None else 0) + 1
    answer = previous.answer if previous is not None else None
    if error.is_negative or (answer is not None and not within_stale_bound(answer, now, config)):
        answer = None
    return Entry(answer=answer, error=error, attempted_at=now, failures=failures)


def within_stale_bound(answer: DnsAnswer, now: float, config: DnsConfig) -> bool:
    """True while an answer may still be served, fresh or stale."""
    return now <= answer.expires_at + config.stale_max_s


def usable_answer(entry: Entry, now: float, config: DnsConfig) -> DnsAnswer | None:
    """The answer that may be served now (fresh, or stale within the bound), if any."""
    if entry.answer is None or not within_stale_bound(entry.answer, now, config):
        return None
    return entry.answer


def view(entry: Entry, now: float, config: DnsConfig) -> CachedLookup:
    """The public picture of an entry at ``now``."""
    answer = usable_answer(entry, now, config)
    fresh = answer is not None and entry.error is None and now < answer.expires_at
    return CachedLookup(answer=answer, error=entry.error, fresh=fresh)


def cached_outcome(entry: Entry | None, now: float, config: DnsConfig) -> DnsAnswer | DnsLookupError | None:
    """What ``resolve()`` returns without asking the DNS, or None when it must ask.

    An unexpired answer is served even if its last refresh failed. A failure
    is remembered for ``negative_ttl_s``: meanwhile a stale answer serves, or
    the failure is raised again.
    """
    if entry is None:
        return None
    if entry.answer is not None and now < entry.answer.expires_at:
        return entry.answer
    if entry.error is not None and now < entry.attempted_at + config.negative_ttl_s:
        return outcome_of(entry, now, config)
    return None


def outcome_of(entry: Entry, now: float, config: DnsConfig) -> DnsAnswer | DnsLookupError:
    """The result of a completed lookup for its callers: the answer, a stale answer, or the error."""
    if entry.error is None and entry.answer is not None:
        return entry.answer
    assert entry.error is not None, "an entry has an answer or an error"
    if entry.error.is_transport_failure:
        stale = usable_answer(entry, now, config)
        if stale is not None:
            return stale
    return entry.error


def next_refresh_at(entry: Entry, config: DnsConfig) -> float:
    """When a watched name should be queried again.

    A good answer is refreshed at ``refresh_ahead`` of its TTL, before it
    expires, so requests never wait for DNS; failures are retried after
    ``negative_ttl_s``.
    """
    if entry.error is None and entry.answer is not None:
        due = entry.answer.resolved_at + config.refresh_ahead * entry.answer.ttl_s
    else:
        due = entry.attempted_at + config.negative_ttl_s
    return max(due, entry.attempted_at + MIN_REFRESH_INTERVAL_S)


def outcome_key(lookup: CachedLookup | None) -> tuple[tuple[tuple[str, int], ...] | None, str | None]:
    """What ``on_change`` compares: the endpoints (addresses and ports) and the error reason (None = fresh success)."""
    if lookup is None:
        return (None, None)
    endpoints = lookup.answer.endpoints if lookup.answer is not None else None
    reason = lookup.error.reason if lookup.error is not None else None
    return (endpoints, reason)
