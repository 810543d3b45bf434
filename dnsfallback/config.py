"""Configuration of the DNS fallback: one frozen dataclass, validated once.

The sidecar builds a :class:`DnsConfig` from its flags (``--dns-server HOST:PORT``,
``--dns-template``, ``--dns-srv``); :func:`parse_nameserver` turns one such flag value into the
``(host, port)`` pair the config holds.

The SRV name of a service, ``_mesh-inbound._tcp.{name}`` (RFC 2782's ``_Service._Proto.Name``),
is defined here once: the mesh's DNS server answers it, and so does Kubernetes' cluster DNS for
a headless Service whose port is named ``mesh-inbound``.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Final

DEFAULT_TEMPLATE: Final = "{service}"
DEFAULT_PORT: Final = 15006  # the sidecar's inbound port: every resolved endpoint is a sidecar
# the service and protocol labels of the SRV name that gives each pod's sidecar inbound port
INBOUND_SRV_LABELS: Final = "_mesh-inbound._tcp"
DEFAULT_DNS_PORT: Final = 53
DEFAULT_TIMEOUT_S: Final = 1.0
DEFAULT_NEGATIVE_TTL_S: Final = 1.0
DEFAULT_MIN_TTL_S: Final = 1.0
DEFAULT_MAX_TTL_S: Final = 300.0
DEFAULT_REFRESH_AHEAD: Final = 0.8
DEFAULT_STALE_MAX_S: Final = 86400.0  # RFC 8767 suggests 1 to 3 days


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """How service names are resolved through DNS.

    ``nameservers``: ``(ip, port)`` pairs; empty means the system resolver
    configuration (``/etc/resolv.conf``, with its search list), read once.
    ``template``: the DNS name of a service, e.g. ``"{service}.mesh.local"``.
    ``port``: the port given to every address of an A/AAAA answer (the peer sidecar's
    inbound port, assumed to be the same as ours).
    ``srv``: ask for ``_mesh-inbound._tcp.{name}`` SRV records first, which give every peer
    sidecar's own inbound port; without a usable SRV answer the A/AAAA answer serves with
    ``port`` (see ``cache.srv_decides``).
    TTLs of answers are clamped to ``[min_ttl_s, max_ttl_s]``; negative
    answers and failures are remembered for ``negative_ttl_s``; watched names
    are refreshed at ``refresh_ahead`` of their TTL; an answer whose refresh
    fails for transport reasons keeps serving (stale) up to ``stale_max_s``
    past its expiry (RFC 8767).
    """

    nameservers: tuple[tuple[str, int], ...] = ()
    template: str = DEFAULT_TEMPLATE
    port: int = DEFAULT_PORT
    srv: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    negative_ttl_s: float = DEFAULT_NEGATIVE_TTL_S
    min_ttl_s: float = DEFAULT_MIN_TTL_S
    max_ttl_s: float = DEFAULT_MAX_TTL_S
    refresh_ahead: float = DEFAULT_REFRESH_AHEAD
    stale_max_s: float = DEFAULT_STALE_MAX_S

    def __post_init__(self) -> None:
        for host, port in self.nameservers:
            _check_ip(host)
            _check_port(port, "nameserver port")
        if "{service}" not in self.template:
            raise ValueError(f"DNS template {self.template!r} must contain '{{service}}'")
        try:
            self.template.format(service="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"DNS template {self.template!r} is not a valid template: {exc}") from exc
        _check_port(self.port, "endpoint port")
        for field_name in ("timeout_s", "negative_ttl_s", "max_ttl_s"):
            _check_positive(field_name, getattr(self, field_name))
        for field_name in ("min_ttl_s", "stale_max_s"):
            value = getattr(self, field_name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{field_name} must be a finite number >= 0, got {value!r}")
        if self.min_ttl_s > self.max_ttl_s:
            raise ValueError(f"min_ttl_s ({self.min_ttl_s}) must not exceed max_ttl_s ({self.max_ttl_s})")
        if not 0 < self.refresh_ahead <= 1:
            raise ValueError(f"refresh_ahead must be in (0, 1], got {self.refresh_ahead!r}")

    def name_for(self, service: str) -> str:
        """The DNS name queried for ``service`` (the template filled in)."""
        return self.template.format(service=service)

    def srv_name_for(self, service: str) -> str:
        """The SRV name queried for ``service`` when ``srv`` is on: ``_mesh-inbound._tcp.`` + its name."""
        return f"{INBOUND_SRV_LABELS}.{self.name_for(service)}"

    def clamp_ttl(self, ttl_s: float) -> float:
        """The TTL an answer is cached for: the record's TTL within the configured bounds."""
        return min(max(float(ttl_s), self.min_ttl_s), self.max_ttl_s)


def parse_nameserver(text: str, *, default_port: int = DEFAULT_DNS_PORT) -> tuple[str, int]:
    """Parse ``"10.0.0.2"``, ``"10.0.0.2:5353"``, ``"::1"`` or ``"[::1]:5353"`` into ``(ip, port)``.

    Raises ``ValueError`` with a message fit for a command-line error.
    """
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad DNS server {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad DNS server {text!r}: expected ':PORT' after ']'")
            port = _parse_port(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _parse_port(port_text, text)
    try:
        _check_ip(host)
    except ValueError as exc:
        raise ValueError(f"bad DNS server {text!r}: {exc}") from None
    return host, port


def _parse_port(port_text: str, whole: str) -> int:
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad DNS server {whole!r}: port {port_text!r} is not a number") from None
    _check_port(port, f"port of DNS server {whole!r}")
    return port


def _check_ip(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (a DNS server must be given by address)") from None


def _check_port(port: int, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{what} must be an integer in 1..65535, got {port!r}")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
