"""The fixed ports of a mesh (DESIGN.md, "Ports"), named once for `up`, `compose` and the mesh file.

Every pod, local or in compose, holds the same ports on its own address: the app's, and its
sidecar's outbound, inbound and admin ports. An app may listen on any port but those its
sidecar holds in the same network namespace (``SIDECAR_PORTS``).
"""

from __future__ import annotations

from collections.abc import Mapping

APP_PORT = 8080
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
# the plaintext front door of the published service in compose (`--extra-inbound 0.0.0.0:15080`);
# locally `sidemesh up --publish` puts it on an address of its own
FRONT_DOOR_PORT = 15080
GRPC_PORT = 15010
IDENTITY_PORT = 15012
CP_HTTP_PORT = 15014
DNS_PORT = 15053
DNS_API_PORT = 15054
CONTROL_PORT = 15100
# `sidemesh dashboard` (its own address under `sidemesh up`, its own container in compose)
DASHBOARD_PORT = 15080

# what the sidecar holds in its pod, by name, for messages about a clash
SIDECAR_PORTS: Mapping[int, str] = {
    OUTBOUND_PORT: "the sidecar's outbound port",
    INBOUND_PORT: "the sidecar's inbound port",
    ADMIN_PORT: "the sidecar's admin port",
    FRONT_DOOR_PORT: "the front door's port in compose",
}
