"""Named Hello limits: each is enforced at its boundary, named with its flag and the value."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane import convert
from controlplane.limits import HelloLimits, check_hello, flag
from meshpb.v1 import discovery_pb2

SMALL = HelloLimits(
    max_labels=3, max_label_key_bytes=10, max_label_value_bytes=20, max_label_bytes=40,
    max_known_instances=4, max_known_endpoints=2, max_node_id_bytes=12, max_address_bytes=16,
    max_last_version_bytes=8, max_request_bytes=1024,
)


def hello(**kw: Any) -> discovery_pb2.Hello:
    fields: dict[str, Any] = dict(node_id="artist-1", service="artist", address="127.10.1.1", port=15006)
    fields.update(kw)
    return discovery_pb2.Hello(**fields)


def endpoints(n: int, address: str = "127.10.9.9") -> list[discovery_pb2.KnownEndpoint]:
    return [discovery_pb2.KnownEndpoint(service="song", address=address, port=15000 + i) for i in range(n)]


# limit -> (fields at the limit, fields one over it, the value named in the error)
BOUNDARIES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "max_labels": ({"labels": {"a": "1", "b": "2", "c": "3"}}, {"labels": {"a": "1", "b": "2", "c": "3", "d": "4"}}, 4),
    "max_label_key_bytes": ({"labels": {"k" * 10: "v"}}, {"labels": {"k" * 11: "v"}}, 11),
    "max_label_value_bytes": ({"labels": {"k": "v" * 20}}, {"labels": {"k": "v" * 21}}, 21),
    "max_label_bytes": ({"labels": {"a" * 10: "v" * 10, "b" * 10: "w" * 10}},
                        {"labels": {"a" * 10: "v" * 10, "b" * 10: "w" * 11}}, 41),
    "max_known_instances": ({"known_instances": ["a", "b", "c", "d"]}, {"known_instances": ["a", "b", "c", "d", "e"]}, 5),
    "max_known_endpoints": ({"known_endpoints": endpoints(2)}, {"known_endpoints": endpoints(3)}, 3),
    "max_node_id_bytes": ({"node_id": "n" * 12}, {"node_id": "n" * 13}, 13),
    "max_address_bytes": ({"address": "fd00:0:0:0::00:1"}, {"address": "fd00:0:0:0::000:1"}, 17),
    "max_last_version_bytes": ({"last_version": "1" * 8}, {"last_version": "1" * 9}, 9),
}


@pytest.mark.parametrize("limit", list(BOUNDARIES))
def test_each_limit_passes_at_its_value_and_rejects_one_more(limit: str) -> None:
    at, over, value = BOUNDARIES[limit]
    convert.validate_hello(hello(**at), SMALL)  # does not raise
    with pytest.raises(convert.HelloOverLimit) as info:
        convert.validate_hello(hello(**over), SMALL)
    violation = info.value.violation
    assert (violation.limit, violation.value, violation.maximum) == (limit, value, getattr(SMALL, limit))
    assert f"{flag(limit)}={getattr(SMALL, limit)}" in info.value.reason
    assert str(value) in info.value.reason


def test_known_instances_entries_are_held_to_the_node_id_length() -> None:
    with pytest.raises(convert.HelloOverLimit) as info:
        convert.validate_hello(hello(known_instances=["ok", "x" * 13]), SMALL)
    assert info.value.violation.limit == "max_node_id_bytes"
    assert "known_instances entry" in info.value.reason


def test_known_endpoints_addresses_are_held_to_the_address_length() -> None:
    with pytest.raises(convert.HelloOverLimit) as info:
        convert.validate_hello(hello(known_endpoints=endpoints(1, address="1" * 17)), SMALL)
    assert info.value.violation.limit == "max_address_bytes"
    assert "known_endpoints address" in info.value.reason


def test_a_2mb_label_value_is_named_by_its_key_and_size_not_echoed() -> None:
    with pytest.raises(convert.HelloOverLimit) as info:
        convert.validate_hello(hello(labels={"zone": "x" * 2_000_000}))
    assert info.value.reason == "label 'zone' value is 2000000 bytes, over the limit --max-label-value-bytes=1024"


def test_multibyte_text_is_measured_in_utf8_bytes() -> None:
    convert.validate_hello(hello(labels={"k": "\u00e9" * 10}), SMALL)  # 10 characters, 20 bytes: at the limit
    with pytest.raises(convert.HelloOverLimit) as info:
        convert.validate_hello(hello(labels={"k": "\u20ac" * 7}), SMALL)  # 7 characters, 21 bytes
    assert (info.value.violation.limit, info.value.violation.value) == ("max_label_value_bytes", 21)


def test_counts_are_checked_before_entries_are_measured() -> None:
    # five over-long ids: the count limit is what is reported
    violation = check_hello(SMALL, node_id="a", address="127.0.0.1", last_version="", labels={},
                            known_instances=["x" * 100] * 5, known_endpoint_addresses=[])
    assert violation is not None and violation.limit == "max_known_instances"


@pytest.mark.parametrize("field", ["max_labels", "max_request_bytes"])
@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_limits_must_be_positive_integers(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=flag(field)):
        HelloLimits(**{field: bad})  # type: ignore[arg-type]
