"""Adapter-affine routing (client/loraforge_client/routing.py), as pure logic."""

from __future__ import annotations

from collections import Counter

from loraforge_client.routing import DEMOTE_S, AffinityRouter, expand_targets

from tests.helpers import Clock

REPLICAS = ["10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"]


def test_an_adapter_set_always_goes_to_the_same_replica_and_sets_spread_evenly() -> None:
    router = AffinityRouter(REPLICAS)
    first = {f"a{i}": router.order([f"a{i}"])[0] for i in range(300)}
    assert all(router.order([a])[0] == r for a, r in first.items())
    assert router.order(["a1", "a2"])[0] == router.order(["a2", "a1"])[0]  # a set, not a list
    share = Counter(first.values())
    assert set(share) == set(REPLICAS) and min(share.values()) > 70  # about 100 each


def test_removing_a_replica_moves_only_the_sets_it_had() -> None:
    before = {f"a{i}": AffinityRouter(REPLICAS).order([f"a{i}"])[0] for i in range(300)}
    smaller = AffinityRouter(REPLICAS[:2])
    for adapter, replica in before.items():
        if replica in REPLICAS[:2]:
            assert smaller.order([adapter])[0] == replica


def test_a_replica_that_holds_the_adapters_comes_first() -> None:
    router = AffinityRouter(REPLICAS)
    preferred = router.order(["x"])[0]
    holder = next(r for r in REPLICAS if r != preferred)
    router.update({holder: ["x", "y"], preferred: ["y"]})
    assert router.order(["x"])[0] == holder
    assert router.order(["x", "y"])[0] == holder
    assert not router.needs_refresh()


def test_a_failed_replica_goes_last_until_its_time_is_up() -> None:
    clock = Clock()
    router = AffinityRouter(REPLICAS, clock=clock)
    preferred = router.order(["x"])[0]
    router.demote(preferred)
    assert router.order(["x"])[-1] == preferred
    clock.now += DEMOTE_S + 1
    assert router.order(["x"])[0] == preferred


def test_requests_without_adapters_spread_round_robin() -> None:
    router = AffinityRouter(REPLICAS)
    assert [router.order([])[0] for _ in range(6)] == REPLICAS * 2


def test_targets_expand_from_a_list_or_a_dns_name() -> None:
    assert expand_targets(REPLICAS, None) == REPLICAS
    assert expand_targets("localhost:50052", True) == ["localhost:50052"]
    assert expand_targets("dns:///localhost:50052", None) == ["dns:///localhost:50052"]
    assert "127.0.0.1:50052" in expand_targets("dns:///localhost:50052", True)


def test_streams_follow_affinity_and_round_robin_as_unary_calls_do() -> None:
    """The clients' choice of replica for a stream (channels to these addresses are made
    lazily: nothing is dialled)."""
    from loraforge_client import GeneratorClient

    with GeneratorClient(REPLICAS, affinity=True) as client:
        chosen = {id(client._stream_stub(["my-dog"])) for _ in range(6)}
        assert len(chosen) == 1  # the adapter's replica every time
    with GeneratorClient(REPLICAS, affinity=False) as client:
        chosen = [id(client._stream_stub(["my-dog"])) for _ in range(6)]
        assert len(set(chosen)) == 3  # round robin, as affinity=False promises
    with GeneratorClient(REPLICAS[0]) as client:
        assert client._stream_stub(["my-dog"]) is client.stub
