"""ServiceResolver: service name -> addresses through DNS, cached, shared, refreshed in the background.

The decisions (expiry, serve-stale, when to refresh) are the pure functions of
``cache.py``; this module only runs lookups and keeps tasks. As in aiohttp's
``_DNSCacheTable``/``_resolve_host``, shared state is read before the first
``await``, concurrent lookups of one name share one query, and that query is
shielded from the cancellation of any one caller, so its answer still lands
in the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, Final, TypeVar

from dnsfallback.backend import DnspythonBackend, LookupBackend, LookupResult
from dnsfallback.cache import (
    CachedLookup,
    DnsAnswer,
    Entry,
    cached_outcome,
    entry_after_failure,
    entry_after_success,
    fallback_to_a,
    next_refresh_at,
    outcome_key,
    outcome_of,
    srv_decides,
    view,
)
from dnsfallback.config import DnsConfig
from dnsfallback.errors import BAD_RESPONSE, TIMEOUT, UNREACHABLE, DnsLookupError
from dnsfallback.srv import SrvLookupResult

log = logging.getLogger("dnsfallback")

# consecutive transport failures of one name before we warn (earlier ones log at debug)
PERSISTENT_FAILURES: Final = 3
# the backend enforces the lookup's time limit; this is the safety net above it
LOOKUP_DEADLINE_FACTOR: Final = 2.0
LOOKUP_DEADLINE_SLACK_S: Final = 0.5

ChangeCallback = Callable[[str, CachedLookup], None]
_R = TypeVar("_R")


class ServiceResolver:
    """Resolve mesh service names to endpoints through DNS.

    ``clock`` (monotonic seconds) and ``sleep`` drive expiry and background
    refresh; ``backend`` does the lookups (default: dnspython against
    ``config.nameservers`` or the system configuration). Create and use it
    inside a running event loop; ``close()`` it when done.
    """

    def __init__(
        self,
        config: DnsConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        backend: LookupBackend | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._backend: LookupBackend = (
            backend if backend is not None else DnspythonBackend(config.nameservers, timeout_s=config.timeout_s)
        )
        self._entries: dict[str, Entry] = {}
        self._inflight: dict[str, asyncio.Task[Entry]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._callbacks: list[ChangeCallback] = []
        self._srv_status: dict[str, str] = {}  # per service: "ok" or the reason its SRV lookup failed
        self._closed = False

    @property
    def config(self) -> DnsConfig:
        """The configuration this resolver was built with."""
        return self._config

    def peek(self, service: str) -> CachedLookup | None:
        """What the cache holds for ``service`` now (no I/O); None if it was never looked up."""
        entry = self._entries.get(service)
        return None if entry is None else view(entry, self._clock(), self._config)

    async def resolve(self, service: str) -> DnsAnswer:
        """The addresses of ``service``: from the cache while valid, else from one shared DNS query.

        When the DNS cannot be reached the last answer is returned stale (its
        ``expires_at`` lies in the past) for up to ``stale_max_s``; otherwise
        raises :class:`DnsLookupError`.
        """
        # read the cache before any await (a concurrent caller may be filling it)
        if self._closed:
            raise self._closed_error(service)
        outcome = cached_outcome(self._entries.get(service), self._clock(), self._config)
        if outcome is None:
            entry = await self._shared_lookup(service)
            outcome = outcome_of(entry, self._clock(), self._config)
        if isinstance(outcome, DnsLookupError):
            raise outcome.for_service(service)
        return outcome

    def watch(self, services: Iterable[str]) -> None:
        """Keep these names fresh in the background (must be called in a running loop)."""
        if self._closed:
            raise RuntimeError("ServiceResolver is closed")
        loop = asyncio.get_running_loop()
        for service in services:
            if service in self._watchers:
                continue
            task = loop.create_task(self._watch_loop(service), name=f"dnsfallback-watch-{service}")
            self._watchers[service] = task
            self._track(task)
            log.debug("event=dns_watch service=%s name=%s", service, self._config.name_for(service))

    def unwatch(self, services: Iterable[str] | None = None) -> None:
        """Stop refreshing these names (None: all). Their cached entries stay."""
        names = list(self._watchers) if services is None else list(services)
        for service in names:
            task = self._watchers.pop(service, None)
            if task is not None:
                task.cancel()
                log.debug("event=dns_unwatch service=%s", service)

    def watched(self) -> frozenset[str]:
        """The names being kept fresh."""
        return frozenset(self._watchers)

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(service, lookup)`` whenever a name's addresses change or it becomes failed/fresh."""
        self._callbacks.append(callback)

    async def close(self) -> None:
        """Cancel refreshers and in-flight lookups and wait for them; idempotent."""
        self._closed = True
        self._watchers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()

    # -- internals ---------------------------------------------------------

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shared_lookup(self, service: str) -> Entry:
        """Join the in-flight query of ``service`` or start one; our cancellation does not cancel it."""
        task = self._inflight.get(service)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(service), name=f"dnsfallback-lookup-{service}")
            self._inflight[service] = task
            task.add_done_callback(partial(self._lookup_done, service))
            self._track(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and self._closed and (current is None or current.cancelling() == 0):
                raise self._closed_error(service) from None
            raise

    def _lookup_done(self, service: str, task: asyncio.Task[Entry]) -> None:
        if self._inflight.get(service) is task:
            del self._inflight[service]

    async def _lookup(self, service: str) -> Entry:
        name = self._config.name_for(service)
        outcome: LookupResult | SrvLookupResult | DnsLookupError
        if self._config.srv:
            srv_name = self._config.srv_name_for(service)
            outcome = await self._lookup_srv_or_a(service, srv_name, name)
            if isinstance(outcome, SrvLookupResult):
                name = srv_name
        else:
            outcome = await self._attempt(service, name, self._backend.lookup)
        if isinstance(outcome, DnsLookupError):
            entry = entry_after_failure(self._entries.get(service), outcome, self._clock(), self._config)
        else:
            entry = entry_after_success(service, name, outcome, self._clock(), self._config)
        self._store(service, entry)
        return entry

    async def _lookup_srv_or_a(
        self, service: str, srv_name: str, name: str
    ) -> LookupResult | SrvLookupResult | DnsLookupError:
        """SRV and A/AAAA at once; the A/AAAA answer is waited for only when SRV does not decide."""
        loop = asyncio.get_running_loop()
        a_task = loop.create_task(self._attempt(service, name, self._backend.lookup), name=f"dnsfallback-a-{service}")
        self._track(a_task)  # so close() waits for it too
        try:
            srv = await self._attempt(service, srv_name, self._backend.lookup_srv)
            previous = self._entries.get(service)
            decided = srv_decides(srv, previous.answer if previous is not None else None)
            self._note_srv(service, srv, fallback=decided is None)
            if decided is not None:
                return decided
            assert isinstance(srv, DnsLookupError)
            return fallback_to_a(srv, await a_task)
        finally:
            a_task.cancel()

    async def _attempt(
        self, service: str, name: str, lookup: Callable[[str], Awaitable[_R]]
    ) -> _R | DnsLookupError:
        """One backend lookup within its deadline; every failure comes back as a DnsLookupError."""
        deadline = self._config.timeout_s * LOOKUP_DEADLINE_FACTOR + LOOKUP_DEADLINE_SLACK_S
        try:
            async with asyncio.timeout(deadline):
                return await lookup(name)
        except DnsLookupError as exc:
            return exc.for_service(service)
        except TimeoutError as exc:
            error = DnsLookupError(service, name, TIMEOUT, f"no result within {deadline:.1f}s")
            error.__cause__ = exc
            return error
        except Exception as exc:  # noqa: BLE001 - a broken backend must not break the callers
            log.exception("event=dns_backend_error service=%s name=%s", service, name)
            error = DnsLookupError(service, name, BAD_RESPONSE, f"backend error {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            return error

    def _note_srv(self, service: str, srv: SrvLookupResult | DnsLookupError, *, fallback: bool) -> None:
        """Log what the SRV lookup of ``service`` gave when that changes (every time at debug)."""
        status = "ok" if isinstance(srv, SrvLookupResult) else srv.reason
        changed = self._srv_status.get(service) != status
        self._srv_status[service] = status
        if isinstance(srv, SrvLookupResult):
            if changed:
                log.debug("event=dns_srv_answer service=%s endpoints=%s", service, _endpoints_text(srv.endpoints))
            return
        level = logging.DEBUG
        if changed:
            # garbage is worth a warning; a DNS without our SRV names is the normal case elsewhere
            level = logging.WARNING if srv.reason == BAD_RESPONSE else logging.INFO
        log.log(level, "event=dns_srv_unusable service=%s name=%s reason=%s then=%s detail=%s",
                service, srv.name, srv.reason, "a_records" if fallback else "last_srv_answer", srv.detail or "-")

    def _store(self, service: str, entry: Entry) -> None:
        previous = self._entries.get(service)
        self._entries[service] = entry
        now = self._clock()
        before = None if previous is None else view(previous, now, self._config)
        after = view(entry, now, self._config)
        self._log_transition(service, previous, entry)
        if outcome_key(before) == outcome_key(after):
            return
        for callback in list(self._callbacks):
            try:
                callback(service, after)
            except Exception:  # noqa: BLE001 - one bad subscriber must not starve the others
                log.exception("event=dns_on_change_callback_failed service=%s", service)

    def _log_transition(self, service: str, previous: Entry | None, entry: Entry) -> None:
        name = self._config.name_for(service)
        old_addresses = previous.answer.addresses if previous is not None and previous.answer is not None else None
        old_endpoints = previous.answer.endpoints if previous is not None and previous.answer is not None else None
        if entry.error is None:
            assert entry.answer is not None
            if previous is not None and previous.error is not None and previous.error.is_transport_failure:
                log.info(
                    "event=dns_lookup_recovered service=%s name=%s failures=%d", service, name, previous.failures
                )
            if entry.answer.endpoints != old_endpoints:
                log.info(
                    "event=dns_answer_changed service=%s name=%s addresses=%s endpoints=%s via=%s ttl_s=%g",
                    service,
                    entry.answer.name,
                    ",".join(entry.answer.addresses),
                    _endpoints_text(entry.answer.endpoints),
                    entry.answer.via,
                    entry.answer.ttl_s,
                )
            return
        error = entry.error
        if error.is_negative:
            if previous is None or previous.error is None or previous.error.reason != error.reason:
                log.info(
                    "event=dns_negative_answer service=%s name=%s reason=%s dropped=%s",
                    service,
                    name,
                    error.reason,
                    ",".join(old_addresses) if old_addresses else "-",
                )
            return
        stale = ",".join(entry.answer.addresses) if entry.answer is not None else "-"
        if entry.failures == PERSISTENT_FAILURES:
            log.warning(
                "event=dns_lookup_failing service=%s name=%s reason=%s failures=%d stale=%s detail=%s",
                service,
                name,
                error.reason,
                entry.failures,
                stale,
                error.detail,
            )
        else:
            log.debug(
                "event=dns_lookup_failed service=%s name=%s reason=%s failures=%d stale=%s detail=%s",
                service,
                name,
                error.reason,
                entry.failures,
                stale,
                error.detail,
            )
        if old_addresses and entry.answer is None:
            log.warning("event=dns_stale_answer_expired service=%s name=%s dropped=%s", service, name, old_addresses)

    async def _watch_loop(self, service: str) -> None:
        while True:
            entry = self._entries.get(service)
            if entry is not None:
                delay = next_refresh_at(entry, self._config) - self._clock()
                if delay > 0:
                    await self._sleep(delay)
                    continue  # someone may have refreshed it meanwhile: decide again
            await self._shared_lookup(service)

    def _closed_error(self, service: str) -> DnsLookupError:
        return DnsLookupError(service, self._config.name_for(service), UNREACHABLE, "resolver is closed")


def _endpoints_text(endpoints: Iterable[tuple[str, int]]) -> str:
    return ",".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in endpoints) or "-"
