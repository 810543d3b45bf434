"""Protobuf edge: Hello validation and the serialize-once snapshot encoding."""

from __future__ import annotations

import pytest

from controlplane import convert
from controlplane.model import Endpoint, Instance, KnownEndpoint, ServicePolicy, ServiceRoutes, Snapshot
from meshpb.v1 import discovery_pb2


def hello(**kw: object) -> discovery_pb2.Hello:
    fields: dict[str, object] = dict(node_id="artist-1", service="artist", address="127.10.1.1", port=15006)
    fields.update(kw)
    return discovery_pb2.Hello(**fields)  # type: ignore[arg-type]


def test_valid_hello_converts_to_the_model() -> None:
    msg = hello(labels={"zone": "a"}, last_version="17", known_instances=["song-1", "", "artist-2"])
    h = convert.validate_hello(msg)
    assert (h.node_id, h.service, h.address, h.port) == ("artist-1", "artist", "127.10.1.1", 15006)
    assert h.labels == (("zone", "a"),)
    assert h.last_version == "17"
    assert h.known_instances == {"song-1", "artist-2"}


def test_ipv6_address_is_accepted_and_normalised() -> None:
    assert convert.validate_hello(hello(address="fd00:0::1")).address == "fd00::1"


@pytest.mark.parametrize(("fields", "reason"), [
    ({"node_id": ""}, "node_id is empty"),
    ({"node_id": "a b"}, "node_id"),
    ({"node_id": "a" * 254}, "over the limit --max-node-id-bytes=253"),
    ({"service": ""}, "service is empty"),
    ({"service": "Artist"}, "not a DNS label"),
    ({"service": "-artist"}, "not a DNS label"),
    ({"service": "a" * 64}, "not a DNS label"),
    ({"address": "artist"}, "not an IP literal"),
    ({"address": ""}, "not an IP literal"),
    ({"address": "0.0.0.0"}, "unspecified"),
    ({"port": 0}, "out of range"),
    ({"port": 70000}, "out of range"),
])
def test_invalid_hello_is_rejected_with_a_clear_reason(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(convert.InvalidHello) as info:
        convert.validate_hello(hello(**fields))
    assert reason in info.value.reason


def test_first_message_must_be_a_hello_and_later_ones_acks() -> None:
    ack = discovery_pb2.DiscoveryRequest(ack=discovery_pb2.Ack(version="1", nonce="n"))
    with pytest.raises(convert.ProtocolError, match="first message must be a hello"):
        convert.decode_first(ack)
    with pytest.raises(convert.ProtocolError, match="empty message"):
        convert.decode_first(discovery_pb2.DiscoveryRequest())
    with pytest.raises(convert.ProtocolError, match="second hello"):
        convert.decode_next(discovery_pb2.DiscoveryRequest(hello=hello()))
    with pytest.raises(convert.ProtocolError, match="empty message"):
        convert.decode_next(discovery_pb2.DiscoveryRequest())
    nack = convert.decode_next(discovery_pb2.DiscoveryRequest(ack=discovery_pb2.Ack(
        version="2", nonce="n", accepted=False, error_detail="bad")))
    assert (nack.version, nack.nonce, nack.accepted, nack.error_detail) == ("2", "n", False, "bad")


def test_snapshot_encoded_once_parses_back_with_each_nonce() -> None:
    snap = Snapshot("1700000000000", (
        ServiceRoutes("artist", (Endpoint("127.10.1.1", 15006, "artist-1", (("zone", "a"),)),
                                 Endpoint("127.10.1.2", 15006, "artist-2")),
                      ServicePolicy(2000, 0, "least_request")),
    ))
    base = convert.encode_snapshot(snap)
    for nonce in ("1-1", "2-7"):
        msg = discovery_pb2.Snapshot.FromString(convert.with_nonce(base, nonce))
        assert msg.nonce == nonce
        assert msg == convert.snapshot_to_pb(snap, nonce)
    parsed = discovery_pb2.Snapshot.FromString(convert.with_nonce(base, "x"))
    [svc] = parsed.services
    assert [(e.address, e.instance, dict(e.labels)) for e in svc.endpoints] == [
        ("127.10.1.1", "artist-1", {"zone": "a"}), ("127.10.1.2", "artist-2", {})]
    assert (svc.policy.timeout_ms, svc.policy.retries, svc.policy.lb) == (2000, 0, "least_request")


# --- known_endpoints: hints for the warm-up gate ------------------------------------------

def known(service: str, address: str, port: int) -> discovery_pb2.KnownEndpoint:
    return discovery_pb2.KnownEndpoint(service=service, address=address, port=port)


def test_known_endpoints_convert_with_canonical_addresses() -> None:
    h = convert.validate_hello(hello(known_endpoints=[
        known("song", "127.10.2.1", 15006), known("image", "fd00:0::7", 15006), known("song", "127.10.2.1", 15006),
    ]))
    assert h.known_endpoints == {KnownEndpoint("song", "127.10.2.1", 15006), KnownEndpoint("image", "fd00::7", 15006)}
    assert h.dropped_known_endpoints == ()
    assert h.endpoint == KnownEndpoint("artist", "127.10.1.1", 15006)


@pytest.mark.parametrize(("entry", "why"), [
    (known("Song", "127.10.2.1", 15006), "not a DNS label"),
    (known("", "127.10.2.1", 15006), "not a DNS label"),
    (known("song", "song.mesh.local", 15006), "not an IP literal"),
    (known("song", "::", 15006), "unspecified"),
    (known("song", "127.10.2.1", 0), "out of range"),
    (known("song", "127.10.2.1", 70000), "out of range"),
])
def test_an_unmatchable_known_endpoint_is_dropped_with_its_reason_and_the_hello_kept(
        entry: discovery_pb2.KnownEndpoint, why: str) -> None:
    # no registration could ever match it, so waiting for it would only cost the warm-up timeout;
    # refusing the Hello would cost the sidecar its registration over a hint
    h = convert.validate_hello(hello(known_endpoints=[known("image", "127.10.3.1", 15006), entry]))
    assert h.known_endpoints == {KnownEndpoint("image", "127.10.3.1", 15006)}
    [reason] = h.dropped_known_endpoints
    assert reason.startswith("known_endpoints[1]: ") and why in reason


def test_endpoint_wire_bytes_is_exactly_what_an_endpoint_adds_to_its_service() -> None:
    inst = Instance("artist-1", "artist", "fd00::1", 15006, (("zone", "a"), ("team", "blue" * 40)))
    without = Snapshot("1", (ServiceRoutes("artist", (), ServicePolicy()),))
    with_one = Snapshot("1", (ServiceRoutes("artist", (Endpoint(inst.address, inst.port, inst.node_id, inst.labels),),
                                            ServicePolicy()),))
    grown = len(convert.encode_snapshot(with_one)) - len(convert.encode_snapshot(without))
    # the service's own length prefix may grow by a byte or two as well
    assert convert.endpoint_wire_bytes(inst) <= grown <= convert.endpoint_wire_bytes(inst) + 2
