"""The snapshot budget: a cheap running estimate that never undercounts the real encoding."""

from __future__ import annotations

import random

import pytest

from controlplane import convert
from controlplane.budget import SnapshotBudget
from controlplane.model import Instance, ServicePolicy, Snapshot
from controlplane.push import build_services

POLICIES = {"song": ServicePolicy(2000, 0, "least_request"), "image": ServicePolicy(4_000_000_000, 9, "round_robin")}


def policy_for(name: str) -> ServicePolicy:
    return POLICIES.get(name, ServicePolicy())


def budget(limit: int = 10**9) -> SnapshotBudget:
    return SnapshotBudget(limit, fixed_bytes=convert.SNAPSHOT_FIXED_BYTES,
                          service_bytes=lambda name: convert.service_frame_bytes(name, policy_for(name)))


def encoded_size(instances: list[Instance]) -> int:
    """What a sidecar receives: the snapshot at a 20-digit version, with the longest nonce we make."""
    snapshot = Snapshot("9" * 20, build_services(instances, policy_for))
    return len(convert.with_nonce(convert.encode_snapshot(snapshot), f"{'9' * 20}-{'9' * 20}"))


def random_instance(rng: random.Random, i: int) -> Instance:
    service = rng.choice(["artist", "song", "image", "s" * 63, "a"])
    address = rng.choice([f"127.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
                          f"fd00::{rng.randrange(65536):x}", "2001:db8:85a3:0:0:8a2e:370:7334"])
    labels = tuple(sorted({f"k{j}" * rng.randrange(1, 30): "v" * rng.randrange(0, 300)
                           for j in range(rng.randrange(0, 5))}.items()))
    return Instance(f"{service[:8]}-{i}" * rng.randrange(1, 4), service, address, rng.randrange(1, 65536), labels)


@pytest.mark.parametrize("seed", range(20))
def test_the_estimate_is_never_below_the_real_encoded_size(seed: int) -> None:
    rng = random.Random(seed)
    b = budget()
    registered: dict[str, Instance] = {}
    for step in range(rng.randrange(1, 120)):
        if registered and rng.random() < 0.3:
            node = rng.choice(sorted(registered))
            del registered[node]
            b.remove(node)
        else:
            inst = random_instance(rng, step)
            if registered and rng.random() < 0.2:  # a newer stream for a node_id replaces the old one
                inst = Instance(rng.choice(sorted(registered)), inst.service, inst.address, inst.port, inst.labels)
            registered[inst.node_id] = inst
            b.add(inst.node_id, inst.service, convert.endpoint_wire_bytes(inst))
        real = encoded_size(list(registered.values()))
        assert real <= b.estimate, (step, real, b.estimate)
    # and it stays a useful bound, not a wild one
    assert b.estimate <= encoded_size(list(registered.values())) + convert.SNAPSHOT_FIXED_BYTES + 6 * 5


def test_a_registration_that_would_pass_the_limit_is_refused_and_changes_nothing() -> None:
    small = Instance("artist-1", "artist", "127.10.1.1", 15006)
    cost = convert.endpoint_wire_bytes(small)
    b = budget()
    b.add("artist-1", "artist", cost)
    limit = b.estimate + cost  # room for exactly one more endpoint of artist
    b = budget(limit)
    b.add("artist-1", "artist", cost)
    assert b.decide("artist-2", "artist", cost).admitted is True
    refused = b.decide("artist-2", "artist", cost + 1)
    assert (refused.admitted, refused.estimate, refused.limit) == (False, limit + 1, limit)
    assert "--snapshot-budget-bytes" in refused.reason and str(limit + 1) in refused.reason
    # a new service costs its framing too
    assert b.decide("song-1", "song", cost).admitted is False
    assert b.estimate == limit - cost


def test_a_replacement_is_counted_once_and_a_removal_frees_its_bytes() -> None:
    b = budget()
    empty = b.estimate
    b.add("artist-1", "artist", 100)
    one = b.estimate
    assert b.decide("artist-1", "artist", 100).estimate == one  # same node_id: replaces, not adds
    b.add("artist-1", "artist", 300)
    assert b.estimate == one + 200
    b.remove("artist-1")
    b.remove("artist-1")  # a second end of the same stream changes nothing
    assert b.estimate == empty


def test_a_budget_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError):
        budget(0)
