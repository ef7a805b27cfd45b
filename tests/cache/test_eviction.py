"""Eviction policies: byte accounting, eviction order, S3-FIFO queues and ghost, hit ratio."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from verge.cache.eviction import LRU, MIN_GHOST, S3FIFO, EvictionPolicy, make_policy

POLICY_NAMES = ["lru", "s3fifo"]


@pytest.fixture(params=POLICY_NAMES)
def policy_name(request: pytest.FixtureRequest) -> str:
    return request.param


def fill(policy: EvictionPolicy, keys: list[str], size: int, hit: bool = False) -> list[str]:
    evicted: list[str] = []
    for key in keys:
        evicted += policy.insert(key, size)
        if hit:
            policy.access(key)
    return evicted


# -- both policies ------------------------------------------------------------------------


def test_make_policy_names() -> None:
    assert isinstance(make_policy("lru", 10), LRU)
    assert isinstance(make_policy("s3fifo", 10), S3FIFO)
    assert isinstance(make_policy("S3FIFO", 10), S3FIFO)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("arc", 10)


def test_insert_tracks_bytes_and_membership(policy_name: str) -> None:
    policy = make_policy(policy_name, 100)
    assert policy.insert("a", 30) == []
    assert policy.insert("b", 20) == []
    assert "a" in policy and "b" in policy and "c" not in policy
    assert len(policy) == 2
    assert policy.used == 50


def test_oversized_object_is_rejected(policy_name: str) -> None:
    policy = make_policy(policy_name, 100)
    policy.insert("a", 60)
    assert policy.insert("huge", 101) == ["huge"]
    assert "huge" not in policy
    assert "a" in policy and policy.used == 60


def test_object_of_exactly_capacity_fits(policy_name: str) -> None:
    policy = make_policy(policy_name, 100)
    policy.insert("a", 60)
    assert policy.insert("whole", 100) == ["a"]
    assert policy.used == 100 and "whole" in policy


def test_negative_size_is_an_error(policy_name: str) -> None:
    with pytest.raises(ValueError):
        make_policy(policy_name, 100).insert("a", -1)


def test_remove(policy_name: str) -> None:
    policy = make_policy(policy_name, 100)
    policy.insert("a", 40)
    assert policy.remove("a") is True
    assert policy.remove("a") is False
    assert "a" not in policy and policy.used == 0 and len(policy) == 0


def test_access_of_unknown_key_is_a_no_op(policy_name: str) -> None:
    policy = make_policy(policy_name, 100)
    policy.access("nobody")
    assert len(policy) == 0


def test_replace_changes_size_without_duplicating(policy_name: str) -> None:
    policy = make_policy(policy_name, 100)
    policy.insert("a", 40)
    policy.insert("b", 40)
    assert policy.insert("a", 10) == []
    assert len(policy) == 2 and policy.used == 50
    evicted = policy.insert("a", 70)  # grows: something else must go, never "a" itself
    assert evicted == ["b"]
    assert "a" in policy and policy.used == 70


def test_replace_with_oversized_drops_the_key(policy_name: str) -> None:
    policy = make_policy(policy_name, 100)
    policy.insert("a", 40)
    assert policy.insert("a", 200) == ["a"]
    assert "a" not in policy and policy.used == 0


def test_random_operations_keep_the_byte_accounting_exact(policy_name: str) -> None:
    rng = random.Random(1)
    capacity = 10_000
    policy = make_policy(policy_name, capacity)
    model: dict[str, int] = {}  # what should be resident, with sizes
    for _ in range(20_000):
        key = f"k{rng.randrange(300)}"
        roll = rng.random()
        if roll < 0.5:
            size = rng.choice([0, 1, rng.randrange(2_000), rng.randrange(12_000)])
            evicted = policy.insert(key, size)
            assert len(evicted) == len(set(evicted))
            for gone in evicted:
                assert gone in model or gone == key
                model.pop(gone, None)
            if key not in evicted:
                model[key] = size
            else:
                assert size > capacity
        elif roll < 0.9:
            policy.access(key)
        else:
            assert policy.remove(key) is (model.pop(key, None) is not None)
        assert policy.used == sum(model.values()) <= capacity
        assert len(policy) == len(model)
    assert all(key in policy for key in model)


# -- LRU ----------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used() -> None:
    policy = LRU(30)
    fill(policy, ["a", "b", "c"], 10)
    policy.access("a")
    assert policy.insert("d", 10) == ["b"]
    assert policy.insert("e", 20) == ["c", "a"]


# -- S3-FIFO ------------------------------------------------------------------------------


def s3fifo_of_ten() -> S3FIFO:
    """100 bytes, a 10-byte small queue: with 10-byte objects, small holds one of them."""
    return S3FIFO(100, small_fraction=0.1)


def test_s3fifo_new_objects_enter_small_and_hit_ones_move_to_main() -> None:
    policy = s3fifo_of_ten()
    fill(policy, ["hot"], 10, hit=True)
    fill(policy, [f"once{i}" for i in range(9)], 10)
    assert not policy.in_main("hot")
    assert policy.insert("new", 10) == ["once0"]  # the older, hit object survives
    assert policy.in_main("hot")


def test_s3fifo_one_hit_objects_go_before_popular_older_ones() -> None:
    policy, lru = s3fifo_of_ten(), LRU(100)
    for cache in (policy, lru):
        fill(cache, [f"pop{i}" for i in range(5)], 10, hit=True)
        fill(cache, [f"scan{i}" for i in range(20)], 10)
    assert all(f"pop{i}" in policy for i in range(5))
    assert not any(f"pop{i}" in lru for i in range(5))  # a scan flushes LRU


def test_s3fifo_small_evictions_go_to_ghost_and_come_back_to_main() -> None:
    policy = s3fifo_of_ten()
    fill(policy, [f"k{i}" for i in range(10)], 10)
    assert policy.insert("new", 10) == ["k0"]
    assert policy.in_ghost("k0") and "k0" not in policy
    policy.insert("k0", 10)
    assert "k0" in policy and policy.in_main("k0")
    assert not policy.in_ghost("k0")


def test_s3fifo_removed_keys_do_not_go_to_ghost() -> None:
    policy = s3fifo_of_ten()
    policy.insert("a", 10)
    policy.remove("a")
    assert not policy.in_ghost("a")


def test_s3fifo_ghost_is_bounded_by_entry_count() -> None:
    policy = s3fifo_of_ten()
    keys = [f"k{i}" for i in range(5_000)]
    evicted = fill(policy, keys, 10)
    # 10 objects resident -> the ghost keeps MIN_GHOST keys (its floor), the most recent ones.
    assert all(policy.in_ghost(key) for key in evicted[-MIN_GHOST:])
    assert not any(policy.in_ghost(key) for key in evicted[:-MIN_GHOST])


def test_s3fifo_main_reinserts_hit_objects() -> None:
    policy = s3fifo_of_ten()
    fill(policy, [f"m{i}" for i in range(10)], 10, hit=True)
    assert policy.insert("x1", 10) == ["m0"]  # m0..m8 promoted, freq reset, m0 first out
    policy.access("m1")
    evicted = fill(policy, [f"x{i}" for i in range(2, 12)], 10)
    assert "m1" in policy and "m2" in evicted


def test_s3fifo_frequency_is_capped_at_three() -> None:
    policy = s3fifo_of_ten()
    fill(policy, [f"f{i}" for i in range(10)], 10, hit=True)
    policy.insert("x0", 10)  # promotes f0..f8 into main, then evicts f0 from main
    for _ in range(10):
        policy.access("f1")
    for _ in range(3):
        policy.access("f2")
    # Newcomers hit once each keep promoting into main, so main keeps evicting.
    evicted = fill(policy, [f"x{i}" for i in range(1, 200)], 10, hit=True)
    # Both counters sit at the cap, so the FIFO order decides: f1 goes first.
    assert evicted.index("f1") < evicted.index("f2")


# -- hit ratio on a skewed workload --------------------------------------------------------


def zipf_trace(
    objects: int, requests: int, alpha: float, rng: random.Random
) -> tuple[list[int], list[int]]:
    """(object ids requested, size of every object): log-normal sizes in 1 KiB..1 MiB."""
    sizes = [
        min(1 << 20, max(1 << 10, int(rng.lognormvariate(math.log(24 << 10), 1.5))))
        for _ in range(objects)
    ]
    cum_weights = list(itertools.accumulate(1.0 / r**alpha for r in range(1, objects + 1)))
    return rng.choices(range(objects), cum_weights=cum_weights, k=requests), sizes


def byte_hit_ratio(policy: EvictionPolicy, trace: list[int], sizes: list[int]) -> float:
    hit_bytes = total_bytes = 0
    for obj in trace:
        key, size = str(obj), sizes[obj]
        total_bytes += size
        if key in policy:
            hit_bytes += size
            policy.access(key)
        else:
            policy.insert(key, size)
    return hit_bytes / total_bytes


@pytest.mark.parametrize(("alpha", "cache_fraction"), [(0.9, 0.05), (1.0, 0.1)])
def test_s3fifo_beats_lru_on_zipf_by_byte_hit_ratio(alpha: float, cache_fraction: float) -> None:
    trace, sizes = zipf_trace(20_000, 120_000, alpha, random.Random(1))
    capacity = int(sum(sizes[obj] for obj in set(trace)) * cache_fraction)
    lru = byte_hit_ratio(LRU(capacity), trace, sizes)
    s3fifo = byte_hit_ratio(S3FIFO(capacity), trace, sizes)
    assert s3fifo > lru + 0.03, (s3fifo, lru)
