"""Where answers come from: the narrow :class:`LookupBackend` interface and its dnspython implementation.

A backend turns one DNS name into ``(addresses, ttl_s)``, and an SRV name into
``(endpoints, ttl_s)``, or raises :class:`~dnsfallback.errors.DnsLookupError`. The cache and the refresher in
``resolver.py`` only ever see this interface, so unit tests pass a fake one
(``FakeBackend`` in the tests) and the real one talks to real DNS servers.

:class:`DnspythonBackend` asks for A and AAAA at the same time through
``dns.asyncresolver`` and merges them; for an SRV name it asks for SRV, then for the
addresses of the targets the additional section did not give (``srv.py`` says which). It is strict about what comes back: a
datagram that does not parse, whose id does not match, or that is truncated
and cannot be completed over TCP fails the lookup as ``bad_response`` at once
instead of being skipped until the time limit (dnspython's stub default is to
ignore such datagrams). Every dnspython exception is converted here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, cast

import dns.asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from dnsfallback.errors import (
    BAD_RESPONSE,
    NO_ANSWER,
    NXDOMAIN,
    SERVFAIL,
    TIMEOUT,
    UNREACHABLE,
    DnsLookupError,
    Reason,
)
from dnsfallback.srv import SrvLookupResult, finish_srv, plan_srv

log = logging.getLogger("dnsfallback.backend")

QUERY_TYPES = ("A", "AAAA")


class LookupResult(NamedTuple):
    """The addresses of one name (A and AAAA together, sorted) and the smallest TTL among them."""

    addresses: tuple[str, ...]
    ttl_s: float


class LookupBackend(Protocol):
    """Resolve one DNS name. The only thing the cache needs from the network."""

    async def lookup(self, name: str) -> LookupResult:
        """Addresses of ``name``; raises :class:`DnsLookupError` (service left empty)."""
        ...

    async def lookup_srv(self, name: str) -> SrvLookupResult:
        """Endpoints of the SRV name ``name``; raises :class:`DnsLookupError` (service left empty)."""
        ...


class StrictNameserver(dns.nameserver.Do53Nameserver):
    """Do53 that fails a UDP query on the first malformed or mismatched datagram.

    dnspython's resolver passes ``ignore_errors=True`` (keep waiting for a good
    datagram); we want garbage to surface as ``bad_response`` at once rather
    than as a timeout. Datagrams from other addresses are still ignored
    (``ignore_unexpected``), as a stub resolver should (RFC 5452).
    """

    async def async_query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        backend: dns.asyncbackend.Backend,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        if max_size:
            return await dns.asyncquery.tcp(
                request,
                self.address,
                timeout=timeout,
                port=self.port,
                source=source,
                source_port=source_port,
                backend=backend,
                one_rr_per_rrset=one_rr_per_rrset,
                ignore_trailing=ignore_trailing,
            )
        return await dns.asyncquery.udp(
            request,
            self.address,
            timeout=timeout,
            port=self.port,
            source=source,
            source_port=source_port,
            raise_on_truncation=True,
            backend=backend,
            one_rr_per_rrset=one_rr_per_rrset,
            ignore_trailing=ignore_trailing,
            ignore_errors=False,
            ignore_unexpected=True,
        )


def _system_resolver() -> dns.asyncresolver.Resolver:
    """Read /etc/resolv.conf (blocking file I/O: call it in a thread)."""
    return dns.asyncresolver.Resolver(configure=True)


class DnspythonBackend:
    """Real DNS through ``dns.asyncresolver``.

    ``nameservers`` empty means the system configuration, read once (in a
    thread, so the loop never blocks) on the first lookup; its search list
    applies to relative names as it would for libc. Explicit nameservers use
    no search list: the name is queried as given (made absolute).
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout_s: float = 1.0,
        read_system_config: Callable[[], dns.asyncresolver.Resolver] = _system_resolver,
    ) -> None:
        self._nameservers = tuple(nameservers)
        self._timeout_s = timeout_s
        self._read_system_config = read_system_config
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._search = False
        self._configuring: asyncio.Lock | None = None

    async def lookup(self, name: str) -> LookupResult:
        """Query A and AAAA for ``name`` concurrently and merge the records."""
        resolver = await self._get_resolver(name)
        outcomes = await asyncio.gather(*(self._query(resolver, name, rdtype) for rdtype in QUERY_TYPES))
        return merge_outcomes(name, outcomes)

    async def lookup_srv(self, name: str) -> SrvLookupResult:
        """Query SRV for ``name``, then A/AAAA of the targets whose addresses were not in the answer."""
        resolver = await self._get_resolver(name)
        outcome = await self._query(resolver, name, "SRV")
        if isinstance(outcome, DnsLookupError):
            raise outcome
        plan = plan_srv(name, outcome.rrset, _answer_ttl(outcome), outcome.response.additional)
        if plan.skipped:
            log.debug("event=dns_srv_records_skipped name=%s skipped=%d", name, plan.skipped)
        resolved = await asyncio.gather(*(self._lookup_target(target) for target, _port in plan.unresolved))
        return finish_srv(name, plan, resolved)

    async def _lookup_target(self, target: str) -> LookupResult | DnsLookupError:
        try:
            return await self.lookup(target)
        except DnsLookupError as exc:
            log.debug("event=dns_srv_target_failed target=%s reason=%s detail=%s", target, exc.reason, exc.detail)
            return exc

    async def _query(
        self, resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
    ) -> dns.resolver.Answer | DnsLookupError:
        try:
            return await resolver.resolve(
                name, rdtype, raise_on_no_answer=False, lifetime=self._timeout_s, search=self._search
            )
        except Exception as exc:  # noqa: BLE001 - every library error is converted at this boundary
            err = convert_error(exc, name)
            err.__cause__ = exc
            return err

    async def _get_resolver(self, name: str) -> dns.asyncresolver.Resolver:
        if self._resolver is not None:
            return self._resolver
        if self._configuring is None:
            self._configuring = asyncio.Lock()
        async with self._configuring:
            if self._resolver is None:
                self._resolver = await self._build_resolver(name)
        return self._resolver

    async def _build_resolver(self, name: str) -> dns.asyncresolver.Resolver:
        if self._nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.search = []
            resolver.domain = dns.name.root
            servers: list[str | dns.nameserver.Nameserver] = [
                StrictNameserver(host, port) for host, port in self._nameservers
            ]
            self._search = False
        else:
            try:
                resolver = await asyncio.to_thread(self._read_system_config)
            except (dns.resolver.NoResolverConfiguration, OSError) as exc:
                # not cached: the file may be fixed; the next lookup reads it again
                raise DnsLookupError("", name, UNREACHABLE, "no usable system resolver configuration") from exc
            servers = []
            for ns in resolver.nameservers:
                if isinstance(ns, str) and _is_ip(ns):
                    servers.append(StrictNameserver(ns, resolver.nameserver_ports.get(ns, resolver.port)))
                elif isinstance(ns, dns.nameserver.Do53Nameserver):
                    servers.append(StrictNameserver(ns.address, ns.port))
                else:
                    servers.append(ns)
            self._search = True
            log.info(
                "event=dns_system_config nameservers=%s search=%s",
                ",".join(str(s) for s in servers),
                ",".join(str(s) for s in resolver.search) or "-",
            )
        resolver.nameservers = servers
        resolver.cache = None  # our own cache is in resolver.py
        resolver.timeout = self._timeout_s
        resolver.lifetime = self._timeout_s
        resolver.retry_servfail = False
        return resolver


def merge_outcomes(name: str, outcomes: Sequence[dns.resolver.Answer | DnsLookupError]) -> LookupResult:
    """Combine the A and AAAA outcomes of one name (pure).

    Any records win (a family without records is fine, and a failure of the
    other family only costs its addresses). Without records: NXDOMAIN from
    either query wins, then a transport failure (the other family might have
    records), and only two empty answers make ``no_answer``.
    """
    addresses: list[str] = []
    ttls: list[float] = []
    errors: list[DnsLookupError] = []
    for outcome in outcomes:
        if isinstance(outcome, DnsLookupError):
            errors.append(outcome)
            continue
        rrset = outcome.rrset
        if rrset is None or len(rrset) == 0:
            continue
        ttls.append(_answer_ttl(outcome))
        for rdata in rrset:
            address = getattr(rdata, "address", None)
            if isinstance(address, str):
                addresses.append(address)
    if addresses:
        for err in errors:
            log.debug("event=dns_partial_answer name=%s reason=%s detail=%s", name, err.reason, err.detail)
        return LookupResult(sort_addresses(addresses), min(ttls))
    for err in errors:
        if err.reason == NXDOMAIN:
            raise err
    for err in errors:
        if err.is_transport_failure:
            raise err
    raise DnsLookupError("", name, NO_ANSWER, "no A or AAAA records")


def _answer_ttl(answer: dns.resolver.Answer) -> float:
    """The TTL of an answer: the smallest along its CNAME chain."""
    return float(answer.chaining_result.minimum_ttl)


def sort_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    """Deduplicated, IPv4 before IPv6, numerically sorted: a stable order to compare answers by."""
    parsed = {ipaddress.ip_address(a) for a in addresses}
    return tuple(str(a) for a in sorted(parsed, key=lambda a: (a.version, int(a))))


def convert_error(exc: BaseException, name: str) -> DnsLookupError:
    """Map a dnspython (or socket) exception to a :class:`DnsLookupError` reason (pure)."""
    if isinstance(exc, DnsLookupError):
        return exc
    if isinstance(exc, (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN)):
        return DnsLookupError("", name, NXDOMAIN)
    if isinstance(exc, dns.resolver.NoAnswer):
        return DnsLookupError("", name, NO_ANSWER)
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return DnsLookupError("", name, UNREACHABLE, "no nameservers configured")
    if isinstance(exc, dns.name.NameTooLong | dns.name.LabelTooLong | dns.name.EmptyLabel):
        return DnsLookupError("", name, NXDOMAIN, f"not a valid DNS name: {exc}")
    if isinstance(exc, dns.resolver.NoNameservers | dns.exception.Timeout):
        per_server = cast(list[tuple[object, ...]], getattr(exc, "kwargs", {}).get("errors") or [])
        default: Reason = TIMEOUT if isinstance(exc, dns.exception.Timeout) else UNREACHABLE
        return DnsLookupError("", name, classify_server_errors(per_server, default), _summary(per_server))
    if isinstance(exc, OSError | EOFError):
        return DnsLookupError("", name, UNREACHABLE, str(exc) or type(exc).__name__)
    return DnsLookupError("", name, BAD_RESPONSE, f"{type(exc).__name__}: {exc}")


def classify_server_errors(per_server: Sequence[tuple[object, ...]], default: Reason) -> Reason:
    """The reason for a resolution that ran out of servers or time, from dnspython's per-attempt errors.

    Each entry is ``(server, tcp, port, exception_or_rcode_text, response)``.
    Garbage from a server outranks an error rcode, which outranks a network error.
    """
    kinds: set[Reason] = set()
    for entry in per_server:
        problem = entry[3] if len(entry) > 3 else None
        if isinstance(problem, str):
            kinds.add(SERVFAIL)  # an rcode such as SERVFAIL or REFUSED
        elif isinstance(problem, OSError | EOFError):
            kinds.add(UNREACHABLE)
        elif isinstance(problem, dns.exception.Timeout):
            kinds.add(TIMEOUT)
        elif isinstance(problem, BaseException):
            kinds.add(BAD_RESPONSE)  # FormError, BadResponse, Truncated, parse errors, ...
    order: tuple[Reason, ...] = (BAD_RESPONSE, SERVFAIL, UNREACHABLE, TIMEOUT)
    for reason in order:
        if reason in kinds:
            return reason
    return default


def _summary(per_server: Sequence[tuple[object, ...]]) -> str:
    parts = []
    for entry in per_server[:4]:
        server, tcp, _port, problem = (list(entry) + [None] * 4)[:4]
        what = problem if isinstance(problem, str) else f"{type(problem).__name__}: {problem}"
        parts.append(f"{server}{'/tcp' if tcp else ''} {what}")
    return "; ".join(parts)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
