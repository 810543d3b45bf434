"""The mesh zone of `sidemesh dns`: its records and the answer to one query, pure (no I/O, no clock).

Records map each service to its pods. A pod is an address (``"127.10.1.1"``) or, so callers
need not assume that every sidecar listens on their own inbound port, an object naming the
port its sidecar's inbound listener holds: ``{"address": "127.10.1.1", "port": 15006,
"instance": "artist-1"}`` (``instance`` is a DNS label; without it the address makes one,
``127-10-1-1``, as Kubernetes names pods). A service's pods all give a port or none does.

What the zone answers (RFC 1034/1035 semantics, built on dnspython; no packet is parsed or
built by hand), ``{zone}`` being e.g. ``mesh.local``:

* ``{service}.{zone}`` A/AAAA (and ANY): the distinct IPv4/IPv6 addresses of its pods,
  authoritative (AA), with the zone's TTL.
* ``_mesh-inbound._tcp.{service}.{zone}`` SRV (RFC 2782), for services whose pods give
  ports: one record per pod, priority 0, weight 1, its port, target
  ``{instance}.{service}.{zone}``; the targets' A/AAAA records ride in the additional section,
  so one query gives a caller every endpoint.
* ``{instance}.{service}.{zone}`` A/AAAA: that pod's address (the SRV target; Kubernetes
  names the pods of a headless Service the same way).
* ``_tcp.{service}.{zone}`` is an empty non-terminal: NODATA, never NXDOMAIN, which would
  deny the SRV name below it (RFC 8020) to resolvers that minimise query names (RFC 9156).
* a known name without records of the asked type: NOERROR/NODATA; any other name inside the
  zone: NXDOMAIN; names outside it: REFUSED.
* negative answers carry the zone's SOA in the authority section, whose TTL and MINIMUM equal
  the zone's TTL, so resolvers cache them that long (RFC 2308).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from dnsfallback.config import INBOUND_SRV_LABELS

# RFC 1123 LDH label: letters, digits, hyphens; no leading/trailing hyphen; 1..63 chars
_LABEL_RE: Final = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SRV_LABELS: Final = tuple(INBOUND_SRV_LABELS.split("."))  # ("_mesh-inbound", "_tcp")
_POD_KEYS: Final = frozenset({"address", "port", "instance"})
SRV_PRIORITY: Final = 0
SRV_WEIGHT: Final = 1


class RecordsError(ValueError):
    """A records update that is not a mapping of DNS labels to lists of pods; the message says why."""


@dataclass(frozen=True, slots=True)
class PodRecord:
    """One pod of a service: its address and, when known, its sidecar's inbound port and its name."""

    address: str
    port: int | None = None
    instance: str = ""  # a DNS label; set whenever port is

    def as_json(self) -> str | dict[str, str | int]:
        """What ``GET /records`` shows: the address alone, or the pod object."""
        if self.port is None:
            return self.address
        return {"address": self.address, "port": self.port, "instance": self.instance}


Records = Mapping[str, tuple[PodRecord, ...]]


def address_label(address: str) -> str:
    """A DNS label made of an address: ``127-10-1-1``, or the IPv6 address written out with dashes."""
    ip = ipaddress.ip_address(address)
    return str(ip).replace(".", "-") if ip.version == 4 else ip.exploded.replace(":", "-")


def pod_name(zone: dns.name.Name, service: str, instance: str) -> dns.name.Name:
    """``{instance}.{service}.{zone}``, the SRV target of a pod; raises dnspython's NameTooLong."""
    return dns.name.Name((instance.encode("ascii"), service.encode("ascii"))).concatenate(zone)


def validate_records(data: object, zone: dns.name.Name | None = None) -> dict[str, tuple[PodRecord, ...]]:
    """Check a ``{service: [pod, ...]}`` mapping and normalise it (lower-case names, canonical IPs).

    With ``zone``, also check that every pod's name fits in it.
    """
    if not isinstance(data, Mapping):
        raise RecordsError("records must be a JSON object mapping service names to lists of IP addresses")
    records: dict[str, tuple[PodRecord, ...]] = {}
    for name, pods in data.items():
        if not isinstance(name, str) or not _LABEL_RE.match(name.lower()):
            raise RecordsError(f"service name {name!r} is not a DNS label (letters, digits, '-', 1-63 chars)")
        key = name.lower()
        if key in records:
            raise RecordsError(f"service name {name!r} appears twice (names are case-insensitive)")
        if not isinstance(pods, list | tuple):
            raise RecordsError(f"addresses of {name!r} must be a list of strings (addresses) or objects (pods)")
        records[key] = _validate_pods(key, pods, zone)
    return records


def _validate_pods(service: str, pods: Sequence[object], zone: dns.name.Name | None) -> tuple[PodRecord, ...]:
    out: dict[tuple[str, int | None], PodRecord] = {}
    for pod in pods:
        record = _validate_pod(service, pod)
        out.setdefault((record.address, record.port), record)
    records = tuple(out.values())
    if len({r.port is None for r in records}) > 1:
        raise RecordsError(f"pods of {service!r} must all give a port or none")
    where: dict[str, str] = {}
    for r in records:
        if r.port is None:
            continue
        if where.setdefault(r.instance, r.address) != r.address:
            raise RecordsError(f"instance {r.instance!r} of {service!r} has two addresses")
        if zone is not None:
            try:
                pod_name(zone, service, r.instance)
            except dns.exception.DNSException as exc:
                raise RecordsError(f"pod {r.instance!r} of {service!r} makes too long a name in {zone}: {exc}") from None
    return records


def _validate_pod(service: str, pod: object) -> PodRecord:
    if isinstance(pod, str):
        return PodRecord(_address(service, pod))
    if not isinstance(pod, Mapping):
        raise RecordsError(f"addresses of {service!r} must be a list of strings (addresses) or objects (pods)")
    unknown = sorted(str(k) for k in pod if k not in _POD_KEYS)
    if unknown or "address" not in pod or "port" not in pod:
        raise RecordsError(f"a pod of {service!r} is an object with address, port and optionally instance; "
                           f"got keys {', '.join(sorted(map(str, pod))) or 'none'}")
    address = pod["address"]
    if not isinstance(address, str):
        raise RecordsError(f"address {address!r} of {service!r} is not an IPv4 or IPv6 literal")
    address = _address(service, address)
    port = pod["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise RecordsError(f"port {port!r} of a pod of {service!r} is not an integer in 1..65535")
    instance = pod.get("instance", address_label(address))
    if not isinstance(instance, str) or not _LABEL_RE.match(instance.lower()):
        raise RecordsError(f"instance {instance!r} of {service!r} is not a DNS label (letters, digits, '-', 1-63 chars)")
    return PodRecord(address, port, instance.lower())


def _address(service: str, address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise RecordsError(f"address {address!r} of {service!r} is not an IPv4 or IPv6 literal") from None


def build_response(
    query: dns.message.Message,
    zone: dns.name.Name,
    records: Records,
    ttl: int,
    serial: int,
) -> dns.message.Message:
    """The answer to one parsed query (pure: no I/O, no clock)."""
    response = dns.message.make_response(query)
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    question = query.question[0]
    qname, qtype = question.name, question.rdtype
    if question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY) or not qname.is_subdomain(zone):
        response.set_rcode(dns.rcode.REFUSED)  # not our zone: we are no recursor
        return response
    response.flags |= dns.flags.AA
    soa = _soa(zone, ttl, serial)
    if qname == zone:
        if qtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
            response.answer.append(soa)
        else:
            response.authority.append(soa)  # NODATA
        return response
    labels = tuple(label.decode("ascii", "replace").lower() for label in qname.relativize(zone).labels)
    *below, service = labels
    pods = records.get(service)
    ported = tuple(p for p in pods or () if p.port is not None)
    if pods is None:
        exists = False
    elif not below:
        exists = True
        response.answer += _address_rrsets(qname, qtype, [p.address for p in pods], ttl)
    elif tuple(below) == _SRV_LABELS and ported:
        exists = True
        if qtype in (dns.rdatatype.SRV, dns.rdatatype.ANY):
            srv, additional = _srv_rrsets(qname, zone, service, ported, ttl)
            response.answer.append(srv)
            response.additional += additional
    elif len(below) == 1 and ported:
        pod_addresses = [p.address for p in ported if p.instance == below[0]]
        exists = bool(pod_addresses) or below[0] == _SRV_LABELS[-1]  # _tcp: an empty non-terminal
        response.answer += _address_rrsets(qname, qtype, pod_addresses, ttl)
    else:
        exists = False
    if not exists:
        response.set_rcode(dns.rcode.NXDOMAIN)
    if not response.answer:
        response.authority.append(soa)  # NXDOMAIN or NODATA
    return response


def _address_rrsets(qname: dns.name.Name, qtype: int, addresses: Sequence[str], ttl: int) -> list[dns.rrset.RRset]:
    """The A and/or AAAA rrsets of ``addresses`` that ``qtype`` asks for (distinct addresses, in order)."""
    out = []
    for rdtype, version in ((dns.rdatatype.A, 4), (dns.rdatatype.AAAA, 6)):
        if qtype not in (rdtype, dns.rdatatype.ANY):
            continue
        wanted = list(dict.fromkeys(a for a in addresses if ipaddress.ip_address(a).version == version))
        if wanted:
            out.append(dns.rrset.from_text_list(qname, ttl, dns.rdataclass.IN, rdtype, wanted))
    return out


def _srv_rrsets(qname: dns.name.Name, zone: dns.name.Name, service: str, pods: Sequence[PodRecord],
                ttl: int) -> tuple[dns.rrset.RRset, list[dns.rrset.RRset]]:
    """The SRV rrset of a service's pods and, for the additional section, their targets' addresses."""
    texts = []
    additional: list[dns.rrset.RRset] = []
    targets: dict[dns.name.Name, list[str]] = {}
    for pod in sorted(pods, key=lambda p: (p.instance, p.port or 0)):
        target = pod_name(zone, service, pod.instance)
        texts.append(f"{SRV_PRIORITY} {SRV_WEIGHT} {pod.port} {target.to_text()}")
        targets.setdefault(target, []).append(pod.address)
    for target, addresses in targets.items():
        additional += _address_rrsets(target, dns.rdatatype.ANY, addresses, ttl)
    return dns.rrset.from_text_list(qname, ttl, dns.rdataclass.IN, dns.rdatatype.SRV, texts), additional


def _soa(zone: dns.name.Name, ttl: int, serial: int) -> dns.rrset.RRset:
    origin = zone.to_text()
    # refresh/retry/expire matter only to secondaries, which we do not have; MINIMUM is the negative TTL
    text = f"ns.{origin} hostmaster.{origin} {serial} 3600 600 86400 {ttl}"
    return dns.rrset.from_text(zone, ttl, dns.rdataclass.IN, dns.rdatatype.SOA, text)
