"""DNS fallback: resolve mesh service names through plain DNS, independent of the control plane.

Imports nothing of ours, so it keeps working when everything else is gone.
The sidecar builds on exactly this API::

    resolver = ServiceResolver(DnsConfig(nameservers=(("127.10.0.3", 15053),), template="{service}.mesh.local",
                                         srv=True))
    answer = await resolver.resolve("artist")      # DnsAnswer; raises DnsLookupError
    answer.endpoints                               # (("127.10.1.1", 15006), ...): SRV ports, else config.port
    resolver.watch(["artist", "image"])            # keep them fresh in the background
    resolver.peek("artist")                        # CachedLookup | None, no I/O
    await resolver.close()
"""

from dnsfallback.backend import DnspythonBackend, LookupBackend, LookupResult
from dnsfallback.cache import CachedLookup, DnsAnswer
from dnsfallback.config import DnsConfig, parse_nameserver
from dnsfallback.errors import DnsLookupError
from dnsfallback.resolver import ServiceResolver
from dnsfallback.srv import SrvLookupResult

__all__ = [
    "CachedLookup",
    "DnsAnswer",
    "DnsConfig",
    "DnsLookupError",
    "DnspythonBackend",
    "LookupBackend",
    "LookupResult",
    "ServiceResolver",
    "SrvLookupResult",
    "parse_nameserver",
]
