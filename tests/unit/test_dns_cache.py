"""ServiceResolver's cache, sharing, serve-stale and refresh logic, driven by a fake clock and a fake backend.

No sockets here: the backend is a fake passed in explicitly (STYLE.md 5) and
time only moves when a test says so, so every expiry is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from dnsfallback import CachedLookup, DnsAnswer, DnsConfig, DnsLookupError, LookupResult, ServiceResolver
from dnsfallback.cache import Entry, cached_outcome, entry_after_failure, entry_after_success, next_refresh_at

T0 = 1000.0


class FakeClock:
    """Monotonic time that moves only on ``advance``; ``sleep`` waits for the fake deadline."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = (self.now + delay, fut)
        self._sleepers.append(item)
        try:
            await fut
        finally:
            self._sleepers.remove(item)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, fut in list(self._sleepers):
            if deadline <= self.now + 1e-9 and not fut.done():
                fut.set_result(None)
        await settle()


async def settle(rounds: int = 30) -> None:
    """Let every ready task run until nothing is left to do."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeBackend:
    """Answers from a dict; counts calls; can hold lookups until ``release()``."""

    def __init__(self) -> None:
        self.outcomes: dict[str, LookupResult | str | Exception] = {}
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    def set(self, name: str, addresses: tuple[str, ...] | str | Exception, ttl: float = 5.0) -> None:
        self.outcomes[name] = LookupResult(addresses, ttl) if isinstance(addresses, tuple) else addresses

    def hold(self) -> None:
        self.gate = asyncio.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()

    async def lookup(self, name: str) -> LookupResult:
        self.calls.append(name)
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.outcomes.get(name, "nxdomain")
        if isinstance(outcome, str):
            raise DnsLookupError("", name, outcome)  # type: ignore[arg-type]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


CONFIG = DnsConfig(template="{service}.mesh.local", port=15006, negative_ttl_s=1.0, stale_max_s=60.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def make_resolver(
    clock: FakeClock, backend: FakeBackend
) -> AsyncIterator[Callable[..., ServiceResolver]]:
    made: list[ServiceResolver] = []

    def make(config: DnsConfig = CONFIG) -> ServiceResolver:
        resolver = ServiceResolver(config, clock=clock, backend=backend, sleep=clock.sleep)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()
    lingering = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert lingering == [], f"tasks left behind: {lingering}"


async def test_answer_is_served_from_cache_until_its_ttl_expires(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1", "10.0.0.2"), ttl=5)
    resolver = make_resolver()

    first = await resolver.resolve("artist")
    assert first.addresses == ("10.0.0.1", "10.0.0.2")
    assert first.endpoints == (("10.0.0.1", 15006), ("10.0.0.2", 15006)) and first.via == "a"
    assert first.name == "artist.mesh.local" and first.service == "artist"
    assert first.expires_at == T0 + 5
    await clock.advance(4.9)
    assert await resolver.resolve("artist") is first
    assert len(backend.calls) == 1

    backend.set("artist.mesh.local", ("10.0.0.3",), ttl=5)
    await clock.advance(0.2)
    second = await resolver.resolve("artist")
    assert second.addresses == ("10.0.0.3",)
    assert len(backend.calls) == 2


async def test_ttl_is_clamped_to_the_configured_bounds(make_resolver, backend) -> None:
    backend.set("zero.mesh.local", ("10.0.0.1",), ttl=0)
    backend.set("huge.mesh.local", ("10.0.0.2",), ttl=10**6)
    resolver = make_resolver(DnsConfig(template="{service}.mesh.local", min_ttl_s=2.0, max_ttl_s=30.0))

    assert (await resolver.resolve("zero")).ttl_s == 2.0
    assert (await resolver.resolve("huge")).ttl_s == 30.0


async def test_nxdomain_is_cached_for_the_negative_ttl_then_asked_again(make_resolver, backend, clock) -> None:
    resolver = make_resolver()

    with pytest.raises(DnsLookupError) as first:
        await resolver.resolve("ghost")
    assert first.value.reason == "nxdomain" and first.value.service == "ghost"
    await clock.advance(0.9)
    with pytest.raises(DnsLookupError):
        await resolver.resolve("ghost")
    assert len(backend.calls) == 1

    backend.set("ghost.mesh.local", ("10.0.0.9",))
    await clock.advance(0.2)
    assert (await resolver.resolve("ghost")).addresses == ("10.0.0.9",)
    assert len(backend.calls) == 2


async def test_ten_concurrent_resolves_share_one_backend_call(make_resolver, backend) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",))
    backend.hold()
    resolver = make_resolver()

    waiters = [asyncio.create_task(resolver.resolve("artist")) for _ in range(10)]
    await settle()
    assert len(backend.calls) == 1
    backend.release()
    answers = await asyncio.gather(*waiters)

    assert len(backend.calls) == 1
    assert all(a is answers[0] for a in answers)


async def test_cancelling_one_waiter_does_not_cancel_the_shared_lookup(make_resolver, backend) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",))
    backend.hold()
    resolver = make_resolver()

    impatient = asyncio.create_task(resolver.resolve("artist"))
    patient = asyncio.create_task(resolver.resolve("artist"))
    await settle()
    impatient.cancel()
    await settle()
    backend.release()

    assert (await patient).addresses == ("10.0.0.1",)
    assert impatient.cancelled()
    assert len(backend.calls) == 1


async def test_a_lookup_whose_only_caller_gave_up_still_fills_the_cache(make_resolver, backend) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",))
    backend.hold()
    resolver = make_resolver()

    waiter = asyncio.create_task(resolver.resolve("artist"))
    await settle()
    waiter.cancel()
    await settle()
    backend.release()
    await settle()

    cached = resolver.peek("artist")
    assert cached is not None and cached.fresh and cached.answer is not None
    assert cached.answer.addresses == ("10.0.0.1",)
    assert (await resolver.resolve("artist")).addresses == ("10.0.0.1",)
    assert len(backend.calls) == 1


async def test_stale_answer_is_served_when_the_refresh_times_out(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=5)
    resolver = make_resolver()
    await resolver.resolve("artist")

    backend.set("artist.mesh.local", "timeout")
    await clock.advance(6)
    stale = await resolver.resolve("artist")

    assert stale.addresses == ("10.0.0.1",)
    assert stale.expires_at < clock.now
    cached = resolver.peek("artist")
    assert cached is not None and not cached.fresh
    assert cached.error is not None and cached.error.reason == "timeout"
    assert cached.answer == stale


async def test_nxdomain_drops_the_old_answer_instead_of_serving_it_stale(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=5)
    resolver = make_resolver()
    await resolver.resolve("artist")

    backend.set("artist.mesh.local", "nxdomain")
    await clock.advance(6)
    with pytest.raises(DnsLookupError) as err:
        await resolver.resolve("artist")

    assert err.value.reason == "nxdomain"
    cached = resolver.peek("artist")
    assert cached is not None and cached.answer is None and not cached.fresh


async def test_no_answer_drops_the_old_answer_too(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=5)
    resolver = make_resolver()
    await resolver.resolve("artist")

    backend.set("artist.mesh.local", "no_answer")
    await clock.advance(6)
    with pytest.raises(DnsLookupError, match="no_answer"):
        await resolver.resolve("artist")


async def test_stale_answer_is_dropped_after_stale_max(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=5)
    resolver = make_resolver(DnsConfig(template="{service}.mesh.local", stale_max_s=10.0))
    await resolver.resolve("artist")
    backend.set("artist.mesh.local", "unreachable")

    await clock.advance(5 + 9)
    assert (await resolver.resolve("artist")).addresses == ("10.0.0.1",)
    await clock.advance(2)
    with pytest.raises(DnsLookupError, match="unreachable"):
        await resolver.resolve("artist")
    cached = resolver.peek("artist")
    assert cached is not None and cached.answer is None


async def test_a_transport_failure_is_remembered_so_requests_do_not_each_wait_for_it(
    make_resolver, backend, clock
) -> None:
    backend.set("artist.mesh.local", "timeout")
    resolver = make_resolver()

    for _ in range(3):
        with pytest.raises(DnsLookupError, match="timeout"):
            await resolver.resolve("artist")
    assert len(backend.calls) == 1

    await clock.advance(1.0)
    with pytest.raises(DnsLookupError):
        await resolver.resolve("artist")
    assert len(backend.calls) == 2


async def test_an_unexpired_answer_serves_even_when_its_early_refresh_failed(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=10)
    resolver = make_resolver()
    resolver.watch(["artist"])
    await settle()

    backend.set("artist.mesh.local", "servfail")
    await clock.advance(8)  # refresh at 0.8 * TTL fails
    assert len(backend.calls) == 2
    answer = await resolver.resolve("artist")

    assert answer.addresses == ("10.0.0.1",) and answer.expires_at > clock.now
    cached = resolver.peek("artist")
    assert cached is not None and not cached.fresh and cached.error is not None


async def test_watch_refreshes_a_name_before_it_expires(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=10)
    resolver = make_resolver()

    resolver.watch(["artist"])
    await settle()
    assert len(backend.calls) == 1
    await clock.advance(7.9)
    assert len(backend.calls) == 1
    await clock.advance(0.1)
    assert len(backend.calls) == 2

    for _ in range(5):  # requests never wait: the answer is always fresh
        await clock.advance(8)
        cached = resolver.peek("artist")
        assert cached is not None and cached.fresh
        await resolver.resolve("artist")
    assert len(backend.calls) == 7


async def test_watch_sees_new_addresses_and_reports_them_through_on_change(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=10)
    resolver = make_resolver()
    changes: list[tuple[str, CachedLookup]] = []
    resolver.on_change(lambda service, lookup: changes.append((service, lookup)))

    resolver.watch(["artist"])
    await settle()
    backend.set("artist.mesh.local", ("10.0.0.1", "10.0.0.2"), ttl=10)
    await clock.advance(8)

    assert [(s, c.answer.addresses if c.answer else None) for s, c in changes] == [
        ("artist", ("10.0.0.1",)),
        ("artist", ("10.0.0.1", "10.0.0.2")),
    ]
    assert all(c.fresh for _, c in changes)


async def test_watch_retries_a_negative_name_after_the_negative_ttl(make_resolver, backend, clock) -> None:
    resolver = make_resolver()
    resolver.watch(["newcomer"])
    await settle()
    assert len(backend.calls) == 1

    backend.set("newcomer.mesh.local", ("10.0.0.5",))
    await clock.advance(1.0)

    assert len(backend.calls) == 2
    cached = resolver.peek("newcomer")
    assert cached is not None and cached.fresh


async def test_on_change_fires_only_when_the_outcome_changes(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=5)
    resolver = make_resolver()
    seen: list[tuple[tuple[str, ...] | None, str | None, bool]] = []
    resolver.on_change(
        lambda _s, c: seen.append(
            (c.answer.addresses if c.answer else None, c.error.reason if c.error else None, c.fresh)
        )
    )

    await resolver.resolve("artist")  # new: fires
    await clock.advance(6)
    await resolver.resolve("artist")  # same addresses: silent
    backend.set("artist.mesh.local", "timeout")
    await clock.advance(6)
    await resolver.resolve("artist")  # became error (stale): fires
    await clock.advance(2)
    await resolver.resolve("artist")  # same error again: silent
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=5)
    await clock.advance(2)
    await resolver.resolve("artist")  # fresh again: fires

    assert seen == [
        (("10.0.0.1",), None, True),
        (("10.0.0.1",), "timeout", False),
        (("10.0.0.1",), None, True),
    ]


async def test_a_failing_callback_does_not_stop_the_others(make_resolver, backend) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",))
    resolver = make_resolver()
    got: list[str] = []

    def broken(_service: str, _lookup: CachedLookup) -> None:
        raise RuntimeError("subscriber bug")

    resolver.on_change(broken)
    resolver.on_change(lambda service, _lookup: got.append(service))
    assert (await resolver.resolve("artist")).addresses == ("10.0.0.1",)
    assert got == ["artist"]


async def test_unwatch_stops_the_background_refresh(make_resolver, backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",), ttl=10)
    backend.set("song.mesh.local", ("10.0.0.2",), ttl=10)
    resolver = make_resolver()
    resolver.watch(["artist", "song"])
    await settle()

    resolver.unwatch(["artist"])
    await clock.advance(8)
    assert backend.calls.count("artist.mesh.local") == 1
    assert backend.calls.count("song.mesh.local") == 2
    assert resolver.watched() == frozenset({"song"})

    resolver.unwatch()
    await clock.advance(8)
    assert backend.calls.count("song.mesh.local") == 2
    assert resolver.watched() == frozenset()


async def test_close_cancels_refreshers_and_lookups_and_leaves_no_tasks(backend, clock) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",))
    resolver = ServiceResolver(CONFIG, clock=clock, backend=backend, sleep=clock.sleep)
    resolver.watch(["artist", "song", "image"])
    await settle()
    backend.hold()
    hanging = asyncio.create_task(resolver.resolve("other"))
    await settle()

    await resolver.close()

    with pytest.raises(DnsLookupError, match="closed"):
        await hanging
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert others == []
    with pytest.raises(DnsLookupError, match="closed"):
        await resolver.resolve("artist")
    await resolver.close()  # idempotent


async def test_a_backend_that_raises_something_unexpected_yields_bad_response(make_resolver, backend) -> None:
    backend.set("artist.mesh.local", KeyError("bug in backend"))
    resolver = make_resolver()

    with pytest.raises(DnsLookupError) as err:
        await resolver.resolve("artist")
    assert err.value.reason == "bad_response"
    assert isinstance(err.value.__cause__, KeyError)


async def test_a_backend_that_hangs_is_cut_off_as_a_timeout(backend) -> None:
    backend.set("artist.mesh.local", ("10.0.0.1",))
    backend.hold()  # never released
    resolver = ServiceResolver(DnsConfig(timeout_s=0.05), backend=backend)
    try:
        with pytest.raises(DnsLookupError, match="timeout"):
            await asyncio.wait_for(resolver.resolve("artist"), 5)
    finally:
        await resolver.close()


async def test_peek_is_none_for_a_name_never_looked_up(make_resolver) -> None:
    assert make_resolver().peek("never") is None


# ---- the pure decisions -------------------------------------------------------------------------


def _answer_entry(now: float = T0, ttl: float = 10) -> Entry:
    return entry_after_success("artist", "artist.mesh.local", LookupResult(("10.0.0.1",), ttl), now, CONFIG)


def test_a_fresh_entry_is_answered_without_a_lookup() -> None:
    entry = _answer_entry()
    outcome = cached_outcome(entry, T0 + 9.99, CONFIG)
    assert isinstance(outcome, DnsAnswer) and outcome.addresses == ("10.0.0.1",)
    assert cached_outcome(entry, T0 + 10, CONFIG) is None


def test_refresh_is_due_at_the_refresh_ahead_fraction_of_the_ttl() -> None:
    assert next_refresh_at(_answer_entry(ttl=10), CONFIG) == pytest.approx(T0 + 8)
    failed = entry_after_failure(None, DnsLookupError("artist", "artist.mesh.local", "timeout"), T0, CONFIG)
    assert next_refresh_at(failed, CONFIG) == pytest.approx(T0 + CONFIG.negative_ttl_s)


def test_a_failure_counts_consecutive_attempts_and_keeps_the_answer_only_for_transport_errors() -> None:
    entry = _answer_entry()
    timeout = DnsLookupError("artist", "artist.mesh.local", "timeout")
    once = entry_after_failure(entry, timeout, T0 + 11, CONFIG)
    twice = entry_after_failure(once, timeout, T0 + 12, CONFIG)
    assert twice.failures == 2 and twice.answer == entry.answer
    gone = entry_after_failure(twice, DnsLookupError("artist", "artist.mesh.local", "nxdomain"), T0 + 13, CONFIG)
    assert gone.answer is None and gone.failures == 3


def test_lookup_errors_reject_unknown_reasons_and_keep_their_cause() -> None:
    with pytest.raises(ValueError):
        DnsLookupError("artist", "artist", "weird")  # type: ignore[arg-type]
    root = OSError("boom")
    err = DnsLookupError("", "artist.mesh.local", "unreachable")
    err.__cause__ = root
    labelled = err.for_service("artist")
    assert labelled.service == "artist" and labelled.reason == "unreachable" and labelled.__cause__ is root
    assert labelled.is_transport_failure and not labelled.is_negative
