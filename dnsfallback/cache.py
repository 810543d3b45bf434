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
* Every failure is remembered for ``negative_ttl_s`` (RFC 2308 negative
  caching; for transport failures the "failure recheck timer" of RFC 8767
  section 5), so a dead server costs one timeout per name per interval, not
  one per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from dnsfallback.backend import LookupResult
from dnsfallback.config import DnsConfig
from dnsfallback.errors import DnsLookupError

# a watched name is never re-queried more often than this, even with TTL 0 records
MIN_REFRESH_INTERVAL_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The addresses of one service as DNS gave them; times are on the resolver's clock."""

    service: str
    name: str
    addresses: tuple[str, ...]
    port: int
    ttl_s: float
    resolved_at: float
    expires_at: float

    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """``(address, port)`` for every address, in the answer's order."""
        return tuple((address, self.port) for address in self.addresses)


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


def entry_after_success(service: str, name: str, result: LookupResult, now: float, config: DnsConfig) -> Entry:
    """The entry after a lookup that returned addresses."""
    ttl_s = config.clamp_ttl(result.ttl_s)
    answer = DnsAnswer(
        service=service,
        name=name,
        addresses=tuple(result.addresses),
        port=config.port,
        ttl_s=ttl_s,
        resolved_at=now,
        expires_at=now + ttl_s,
    )
    return Entry(answer=answer, error=None, attempted_at=now, failures=0)


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


def outcome_key(lookup: CachedLookup | None) -> tuple[tuple[str, ...] | None, str | None]:
    """What ``on_change`` compares: the addresses and the error reason (None = fresh success)."""
    if lookup is None:
        return (None, None)
    addresses = lookup.answer.addresses if lookup.answer is not None else None
    reason = lookup.error.reason if lookup.error is not None else None
    return (addresses, reason)
