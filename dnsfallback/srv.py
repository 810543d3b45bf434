"""SRV answers turned into endpoints, so no caller assumes that its peers share its inbound port.

Theory of operation. With ``DnsConfig.srv`` on, a service is looked up as
``_mesh-inbound._tcp.{name}`` SRV (RFC 2782) beside ``{name}`` A/AAAA. Each SRV record names
one pod: the port its sidecar's inbound listener holds and a target name whose A/AAAA
records hold its address. This module is the pure part: from the SRV records and the
response's additional section to ``(address, port)`` endpoints. The backend runs the
queries; ``cache.srv_decides`` chooses between the SRV and the A/AAAA answer.

The rules, in order:

* a target of ``.`` means the service is decidedly not offered there (RFC 2782), and port 0
  is no port: such records are skipped;
* only the records of the lowest priority are used (RFC 2782: the lowest that can be reached
  is contacted first; the balancer then spreads calls over them and skips ejected ones);
  weights are not used, every pod of a mesh service is an equal;
* at most :data:`MAX_SRV_RECORDS` records are used, so a hostile answer cannot make us look
  up thousands of targets;
* a target's addresses come from the additional section when the server put them there
  (RFC 2782 asks servers to), else from an A/AAAA lookup of the target; a target that does
  not resolve is left out;
* the answer lives as long as the shortest TTL among the records used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from dnsfallback.errors import NO_ANSWER, DnsLookupError

# records of one SRV answer that are used at most (the rest are ignored, and logged by the caller)
MAX_SRV_RECORDS: Final = 64

Endpoints = tuple[tuple[str, int], ...]


class SrvLookupResult(NamedTuple):
    """The endpoints an SRV name gives (sorted, deduplicated) and the smallest TTL among its records."""

    endpoints: Endpoints
    ttl_s: float


@dataclass(frozen=True, slots=True)
class SrvPlan:
    """What one SRV answer says: endpoints known now, targets still to look up, and the TTL so far.

    ``skipped``: records left out (no target, port 0, higher priority, over the limit).
    """

    endpoints: Endpoints
    unresolved: tuple[tuple[str, int], ...]  # (absolute target name, port)
    ttl_s: float
    skipped: int = 0


def plan_srv(name: str, rrset: dns.rrset.RRset | None, ttl_s: float,
             additional: Iterable[dns.rrset.RRset] = ()) -> SrvPlan:
    """The endpoints an SRV rrset names, with the addresses the additional section gives (pure).

    ``ttl_s``: the SRV answer's TTL (the smallest along any CNAME chain). Raises
    :class:`DnsLookupError` ``no_answer`` when no record names a usable target.
    """
    records = [] if rrset is None or rrset.rdtype != dns.rdatatype.SRV else list(rrset)
    usable = [r for r in records if r.port != 0 and r.target != dns.name.root]
    if not usable:
        raise DnsLookupError("", name, NO_ANSWER, "no SRV records with a target" if records else "no SRV records")
    lowest = min(r.priority for r in usable)
    chosen = sorted((r for r in usable if r.priority == lowest), key=lambda r: (r.target.to_text(), r.port))
    chosen = chosen[:MAX_SRV_RECORDS]
    known = _addresses_by_name(additional)
    endpoints: list[tuple[str, int]] = []
    unresolved: list[tuple[str, int]] = []
    ttls = [ttl_s]
    for record in chosen:
        found = known.get(record.target)
        if found is None:
            unresolved.append((record.target.to_text(), record.port))
            continue
        addresses, ttl = found
        ttls.append(ttl)
        endpoints += [(address, record.port) for address in addresses]
    return SrvPlan(sort_endpoints(endpoints), tuple(unresolved), min(ttls), len(records) - len(chosen))


def finish_srv(name: str, plan: SrvPlan,
               resolved: Sequence[tuple[tuple[str, ...], float] | DnsLookupError]) -> SrvLookupResult:
    """The plan's endpoints plus those of its looked-up targets (``resolved``, in ``unresolved`` order).

    Targets that failed are left out. Without any endpoint, a transport failure of a target
    lookup is raised (the DNS could not say), else ``no_answer``.
    """
    endpoints = list(plan.endpoints)
    ttls = [plan.ttl_s]
    failures: list[DnsLookupError] = []
    for (_target, port), outcome in zip(plan.unresolved, resolved, strict=True):
        if isinstance(outcome, DnsLookupError):
            failures.append(outcome)
            continue
        addresses, ttl = outcome
        if addresses:
            ttls.append(ttl)
            endpoints += [(address, port) for address in addresses]
    if endpoints:
        return SrvLookupResult(sort_endpoints(endpoints), min(ttls))
    for failure in failures:
        if failure.is_transport_failure:
            raise DnsLookupError("", name, failure.reason, f"SRV target {failure.name}: {failure.detail or failure.reason}")
    raise DnsLookupError("", name, NO_ANSWER, "no SRV target has an address")


def sort_endpoints(endpoints: Iterable[tuple[str, int]]) -> Endpoints:
    """Deduplicated; IPv4 before IPv6, numerically, then by port: a stable order to compare answers by."""
    parsed = {(ipaddress.ip_address(address), port) for address, port in endpoints}
    ordered = sorted(parsed, key=lambda ep: (ep[0].version, int(ep[0]), ep[1]))
    return tuple((str(address), port) for address, port in ordered)


def _addresses_by_name(rrsets: Iterable[dns.rrset.RRset]) -> dict[dns.name.Name, tuple[list[str], float]]:
    """A and AAAA records of the additional section: name -> (addresses, smallest TTL)."""
    out: dict[dns.name.Name, tuple[list[str], float]] = {}
    for rrset in rrsets:
        if rrset.rdclass != dns.rdataclass.IN or rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            continue
        addresses, ttl = out.get(rrset.name, ([], float(rrset.ttl)))
        addresses += [rdata.address for rdata in rrset]
        out[rrset.name] = (addresses, min(ttl, float(rrset.ttl)))
    return out
