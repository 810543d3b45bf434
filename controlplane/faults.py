"""Injected faults for drills (issue 3 point 8): a control plane that is up but wrong.

``apply_fault(current, request)`` is pure: it turns a ``POST /faults`` body
into the new ``Faults`` value or raises ``FaultError`` saying what is wrong.
``apply_faults_to_services`` applies a fault set to a built route table.

- ``{"fault": "empty-snapshot"}``: snapshots carry zero services.
- ``{"fault": "drop-service", "service": "artist"}``: omit that service; may
  be set for several services.
- ``{"fault": "clear"}``: back to honest snapshots.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.model import DNS_LABEL, Faults, ServiceRoutes

FAULT_EMPTY = "empty-snapshot"
FAULT_DROP = "drop-service"
FAULT_CLEAR = "clear"
FAULT_KINDS = (FAULT_EMPTY, FAULT_DROP, FAULT_CLEAR)


class FaultError(ValueError):
    """A fault request that cannot be applied (HTTP 400)."""


def apply_fault(current: Faults, request: object) -> Faults:
    """The fault set after ``request`` (a decoded JSON body)."""
    if not isinstance(request, Mapping):
        raise FaultError('body must be a JSON object like {"fault": "empty-snapshot"}')
    kind = request.get("fault")
    if kind == FAULT_CLEAR:
        return Faults()
    if kind == FAULT_EMPTY:
        return Faults(empty_snapshot=True, dropped_services=current.dropped_services)
    if kind == FAULT_DROP:
        service = request.get("service")
        if not isinstance(service, str) or not DNS_LABEL.match(service):
            raise FaultError('drop-service needs "service": a DNS label such as "artist"')
        return Faults(
            empty_snapshot=current.empty_snapshot,
            dropped_services=current.dropped_services | {service},
        )
    raise FaultError(f"unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)}")


def apply_faults_to_services(
    services: tuple[ServiceRoutes, ...], faults: Faults
) -> tuple[ServiceRoutes, ...]:
    """The route table as the faulty control plane would push it."""
    if faults.empty_snapshot:
        return ()
    if not faults.dropped_services:
        return services
    return tuple(s for s in services if s.name not in faults.dropped_services)
