"""Named limits on what a sidecar may send and on what the control plane may push.

Theory of operation. A Hello is copied into every snapshot (its labels) and into
the warm-up gate (its ``known_instances`` / ``known_endpoints``), so a peer that
sends a huge one costs every other sidecar: two 2.2 MB labels once made a 4.5 MB
snapshot, over what sidecars accept, and the whole mesh fell back to DNS for as
long as the sender stayed connected. Three layers keep that from happening:

1. the gRPC transport refuses any request message over ``max_request_bytes``
   (``grpc.max_receive_message_length``) before it is parsed; gRPC reports that
   as RESOURCE_EXHAUSTED itself (gRPC status codes: "sent or received message
   was larger than configured limit");
2. ``check_hello`` holds a parsed Hello to the per-field limits below; the
   stream is aborted with INVALID_ARGUMENT naming the flag and the value;
3. the snapshot budget (``controlplane/budget.py``) refuses a registration that
   would make the encoded snapshot larger than ``snapshot_budget_bytes``, with
   RESOURCE_EXHAUSTED, so the table everybody already has keeps flowing.

Every limit here has a ``--flag`` of the same name (``max_labels`` is
``--max-labels``, added by ``add_limit_arguments``) and a default in
``HelloLimits``; this module is the only place that knows them.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, fields

# What a sidecar accepts in one message: gRPC's default max_receive_message_length
# (4 MiB). The sidecar sets the same value explicitly on its channel, so a snapshot
# within this budget is never refused by the receiving side.
SIDECAR_MAX_RECEIVE_BYTES = 4 * 1024 * 1024
# Room between our budget and the sidecars' limit, for a estimate we may one day
# get wrong and for fields a newer proto adds to every snapshot.
SNAPSHOT_SAFETY_MARGIN_BYTES = 64 * 1024
DEFAULT_SNAPSHOT_BUDGET_BYTES = SIDECAR_MAX_RECEIVE_BYTES - SNAPSHOT_SAFETY_MARGIN_BYTES


@dataclass(frozen=True, slots=True)
class HelloLimits:
    """Largest Hello the control plane accepts, field by field (bytes are UTF-8)."""

    # a sidecar's labels are copied into every snapshot, once per instance
    max_labels: int = 64
    # Kubernetes label keys: a DNS-subdomain prefix (253) + '/' + a name (63)
    max_label_key_bytes: int = 317
    max_label_value_bytes: int = 1024
    max_label_bytes: int = 4096
    # a sidecar's last table: one id per instance it routed to (a 4096-instance mesh)
    max_known_instances: int = 4096
    max_known_endpoints: int = 4096
    # a node_id is meant to be usable as a DNS name: at most 253 characters (RFC 1035 2.3.4)
    max_node_id_bytes: int = 253
    # the longest IPv6 literal (45) plus a zone index ('%' + a 16-byte interface name)
    max_address_bytes: int = 64
    # our versions are decimal milliseconds (13-20 digits); foreign ones are opaque
    max_last_version_bytes: int = 64
    # the whole request message, enforced by gRPC before parsing (RESOURCE_EXHAUSTED);
    # gRPC's own default. Anything under it is parsed and held to the field limits
    # above, so an oversized label is answered INVALID_ARGUMENT naming the limit
    max_request_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(f.name)} must be a positive integer, got {value!r}")


def flag(name: str) -> str:
    """The command-line flag of a limit: ``max_labels`` -> ``--max-labels``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, slots=True)
class Violation:
    """One limit a Hello exceeds: which, by how much, and where."""

    limit: str  # the HelloLimits field, e.g. "max_label_value_bytes"
    value: int
    maximum: int
    what: str  # e.g. "label 'zone' value"

    @property
    def reason(self) -> str:
        unit = "" if self.limit in COUNT_LIMITS else " bytes"
        return f"{self.what} is {self.value}{unit}, over the limit {flag(self.limit)}={self.maximum}"


COUNT_LIMITS = frozenset({"max_labels", "max_known_instances", "max_known_endpoints"})


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _short(text: str) -> str:
    return repr(text[:32] + ("..." if len(text) > 32 else ""))


def _over(limit: str, value: int, maximum: int, what: str) -> Violation | None:
    return Violation(limit, value, maximum, what) if value > maximum else None


def check_hello(
    limits: HelloLimits,
    *,
    node_id: str,
    address: str,
    last_version: str,
    labels: Mapping[str, str],
    known_instances: Collection[str],
    known_endpoint_addresses: Collection[str],
) -> Violation | None:
    """The first limit the Hello's fields exceed, or None."""
    found = _violations(limits, node_id, address, last_version, labels, known_instances, known_endpoint_addresses)
    return next((v for v in found if v is not None), None)


def _violations(
    limits: HelloLimits,
    node_id: str,
    address: str,
    last_version: str,
    labels: Mapping[str, str],
    known_instances: Collection[str],
    known_endpoint_addresses: Collection[str],
) -> Iterator[Violation | None]:
    # lazily, cheapest first: counts before entries, so a long list costs one comparison
    yield _over("max_node_id_bytes", _size(node_id), limits.max_node_id_bytes, "node_id")
    yield _over("max_address_bytes", _size(address), limits.max_address_bytes, "address")
    yield _over("max_last_version_bytes", _size(last_version), limits.max_last_version_bytes, "last_version")
    yield _over("max_labels", len(labels), limits.max_labels, "the number of labels")
    total = 0
    for key, value in labels.items():
        key_size, value_size = _size(key), _size(value)
        yield _over("max_label_key_bytes", key_size, limits.max_label_key_bytes, f"label key {_short(key)}")
        yield _over("max_label_value_bytes", value_size, limits.max_label_value_bytes, f"label {_short(key)} value")
        total += key_size + value_size
    yield _over("max_label_bytes", total, limits.max_label_bytes, "the labels' keys and values together")
    yield _over("max_known_instances", len(known_instances), limits.max_known_instances,
                "the number of known_instances")
    for instance in known_instances:
        yield _over("max_node_id_bytes", _size(instance), limits.max_node_id_bytes,
                    f"known_instances entry {_short(instance)}")
    yield _over("max_known_endpoints", len(known_endpoint_addresses), limits.max_known_endpoints,
                "the number of known_endpoints")
    for address in known_endpoint_addresses:
        yield _over("max_address_bytes", _size(address), limits.max_address_bytes,
                    f"known_endpoints address {_short(address)}")


_LIMIT_HELP = {
    "max_labels": "labels in one Hello",
    "max_label_key_bytes": "bytes of one label key",
    "max_label_value_bytes": "bytes of one label value",
    "max_label_bytes": "bytes of all label keys and values of one Hello together (they are copied into every snapshot)",
    "max_known_instances": "entries in a Hello's known_instances",
    "max_known_endpoints": "entries in a Hello's known_endpoints",
    "max_node_id_bytes": "bytes of node_id (and of each known_instances entry)",
    "max_address_bytes": "bytes of address (and of each known_endpoints address)",
    "max_last_version_bytes": "bytes of last_version",
    "max_request_bytes": ("bytes of one message a sidecar sends (grpc.max_receive_message_length); gRPC "
                          "itself refuses a larger one with RESOURCE_EXHAUSTED before it is parsed"),
}


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {value}")
    return number


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per ``HelloLimits`` field and ``--snapshot-budget-bytes``."""
    group = parser.add_argument_group(
        "limits (hostile peers)",
        "A Hello over any of these is refused: its stream ends with INVALID_ARGUMENT naming the limit "
        "and the value, nothing is registered or pushed, and it is counted in "
        "sidemesh_controlplane_hello_limit_rejections_total{limit=...}.",
    )
    defaults = HelloLimits()
    for name, text in _LIMIT_HELP.items():
        group.add_argument(flag(name), dest=name, type=_positive_int, default=getattr(defaults, name),
                           metavar="N", help=f"most {text} (default %(default)s)")
    group.add_argument(
        "--snapshot-budget-bytes", type=_positive_int, default=DEFAULT_SNAPSHOT_BUDGET_BYTES, metavar="N",
        help=(f"refuse (RESOURCE_EXHAUSTED) a registration that would make the encoded route snapshot "
              f"larger than this; everyone else keeps receiving the current table. Sidecars accept "
              f"messages up to {SIDECAR_MAX_RECEIVE_BYTES} bytes (default %(default)s: that, less a safety margin)"),
    )


def limits_from_args(args: argparse.Namespace) -> HelloLimits:
    """The ``HelloLimits`` of ``add_limit_arguments``' flags."""
    return HelloLimits(**{name: getattr(args, name) for name in _LIMIT_HELP})
