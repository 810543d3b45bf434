"""Envoy's static configs for the data plane benchmark, plaintext and mutual TLS. Pure.

The plaintext config is the one a mesh would run with Envoy's defaults: a listener whose
HTTP connection manager sends any Host to one cluster, no access log. The mutual-TLS variant
mirrors what a sidemesh sidecar does on its A -> B hop (DESIGN.md, "Identity"):

* both ends TLS 1.3 only, with EC P-256 certificates from one mesh CA, each naming a
  ``spiffe://<td>/service/<name>`` URI SAN;
* A's upstream cluster presents the client's certificate and accepts only a peer whose
  certificate names the service it routes to (the caller's identity check);
* B's listener requires a client certificate from the mesh CA naming the caller's SPIFFE ID
  (``match_typed_subject_alt_names``), the closest Envoy equivalent of sidemesh's inbound
  identity check;
* ALPN ``http/1.1`` on the hop, as sidemesh announces (``identity/tls.py``);
* keep-alive pools as Envoy ships them, unless ``max_requests_per_connection`` forces a new
  upstream connection (a new handshake) per request -- the fresh-connection run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# the ALPN protocol sidemesh negotiates between sidecars (identity.tls.ALPN)
HOP_ALPN = "http/1.1"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """One proxy's certificate, its private key, and the mesh CA (trust bundle), as PEM files."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class HopTls:
    """Mutual TLS on one side of the A -> B hop: our files and the SPIFFE ID the peer must have."""

    files: TlsFiles
    peer_uri: str


def common_tls_context(tls: HopTls) -> dict[str, Any]:
    """TLS 1.3 only, our certificate, the mesh CA, and an exact URI SAN match on the peer."""
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [{"certificate_chain": {"filename": str(tls.files.cert)},
                              "private_key": {"filename": str(tls.files.key)}}],
        "validation_context": {
            "trusted_ca": {"filename": str(tls.files.ca)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": tls.peer_uri}}],
        },
        "alpn_protocols": [HOP_ALPN],
    }


def upstream_tls_socket(tls: HopTls) -> dict[str, Any]:
    """A's cluster: present the client certificate, accept only ``tls.peer_uri`` back."""
    return {"name": TLS_SOCKET, "typed_config": {
        "@type": _TLS_TYPES + "UpstreamTlsContext",
        "common_tls_context": common_tls_context(tls),
    }}


def downstream_tls_socket(tls: HopTls) -> dict[str, Any]:
    """B's listener: a client certificate is required and must name ``tls.peer_uri``."""
    return {"name": TLS_SOCKET, "typed_config": {
        "@type": _TLS_TYPES + "DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": common_tls_context(tls),
    }}


def one_request_per_connection() -> dict[str, Any]:
    """Cluster protocol options that close each upstream connection after one request.

    (The cluster-level ``max_requests_per_connection`` field is deprecated in favour of
    these typed options; the HTTP/1.1 choice must be spelled out beside them.)
    """
    return {_HTTP_OPTIONS: {
        "@type": "type.googleapis.com/" + _HTTP_OPTIONS,
        "common_http_protocol_options": {"max_requests_per_connection": 1},
        "explicit_http_config": {"http_protocol_options": {}},
    }}


def envoy_config(*, listen: str, port: int, admin: str, admin_port: int, to_address: str, to_port: int,
                 listener_tls: HopTls | None = None, upstream_tls: HopTls | None = None,
                 max_requests_per_connection: int | None = None) -> dict[str, Any]:
    """Static Envoy v3 config: listener -> http_connection_manager -> any Host -> one cluster.

    ``listener_tls``: mutual TLS on the listener (Envoy B of the mTLS path); ``upstream_tls``:
    mutual TLS to the next hop (Envoy A); ``max_requests_per_connection=1``: a new upstream
    connection per request. No access log is configured (so none is written); everything else
    keeps Envoy's defaults, as a mesh would run it.
    """
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{
            "name": "any", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "next_hop"}}],
        }]},
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                          "typed_config": hcm}]}
    if listener_tls is not None:
        chain["transport_socket"] = downstream_tls_socket(listener_tls)
    cluster: dict[str, Any] = {
        "name": "next_hop",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "next_hop", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": to_address, "port_value": to_port}}},
        }]}]},
    }
    if upstream_tls is not None:
        cluster["transport_socket"] = upstream_tls_socket(upstream_tls)
    if max_requests_per_connection is not None:
        if max_requests_per_connection != 1:
            raise ValueError("only max_requests_per_connection=1 (a new connection per request) is rendered")
        cluster["typed_extension_protocol_options"] = one_request_per_connection()
    return {
        "admin": {"address": {"socket_address": {"address": admin, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": listen, "port_value": port}},
                "filter_chains": [chain],
            }],
            "clusters": [cluster],
        },
    }


def parse_envoy_stats(text: str) -> dict[str, int]:
    """Counters of Envoy's admin ``/stats`` text (``name: value`` lines); histograms are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def listener_handshakes(stats: dict[str, int]) -> tuple[int, int]:
    """(TLS handshakes, of which resumed sessions) accepted by Envoy's listeners."""
    def total(suffix: str) -> int:
        return sum(v for k, v in stats.items() if k.startswith("listener.") and k.endswith(suffix)
                   and not k.startswith("listener.admin."))
    return total(".ssl.handshake"), total(".ssl.session_reused")
