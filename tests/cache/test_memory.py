"""MemoryStore: map semantics, byte bound, eviction callback, get vs peek."""

from __future__ import annotations

import random

import pytest

from verge.cache.memory import MemoryStore


@pytest.fixture(params=["lru", "s3fifo"])
def policy(request: pytest.FixtureRequest) -> str:
    return request.param


def recording(store: MemoryStore[str]) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    store.on_evict = lambda key, value: calls.append((key, value))
    return calls


def test_put_get_peek_remove(policy: str) -> None:
    store: MemoryStore[str] = MemoryStore(100, policy)
    assert store.put("a", "A", 10) == []
    assert store.get("a") == "A"
    assert store.peek("a") == "A"
    assert "a" in store and len(store) == 1
    assert list(store.keys()) == ["a"]
    assert store.remove("a") == "A"
    assert store.remove("a") is None
    assert store.get("a") is None and store.peek("a") is None
    assert "a" not in store and len(store) == 0 and store.used_bytes == 0


def test_replace_keeps_one_entry_and_new_size(policy: str) -> None:
    store: MemoryStore[str] = MemoryStore(100, policy)
    store.put("a", "old", 30)
    assert store.put("a", "new", 50) == []
    assert store.get("a") == "new"
    assert len(store) == 1 and store.used_bytes == 50


def test_capacity_is_never_exceeded_and_evictions_are_reported(policy: str) -> None:
    rng = random.Random(1)
    store: MemoryStore[str] = MemoryStore(1_000, policy)
    calls = recording(store)
    model: dict[str, str] = {}
    for i in range(2_000):
        key = f"k{rng.randrange(200)}"
        if rng.random() < 0.6:
            value, reported = f"v{i}", len(calls)
            evicted = store.put(key, value, rng.randrange(1, 300))
            model[key] = value
            assert calls[reported:] == [(k, model.pop(k)) for k in evicted]
        else:
            assert store.get(key) == model.get(key)
        assert store.used_bytes <= store.capacity_bytes
        assert len(store) == len(model)
    assert calls, "the workload must have evicted something"
    assert sorted(store.keys()) == sorted(model)


def test_on_evict_gets_the_evicted_values(policy: str) -> None:
    store: MemoryStore[str] = MemoryStore(30, policy)
    calls = recording(store)
    store.put("a", "A", 10)
    store.put("b", "B", 10)
    store.put("c", "C", 10)
    assert store.put("d", "D", 20) == ["a", "b"]
    assert calls == [("a", "A"), ("b", "B")]
    assert "a" not in store and store.peek("d") == "D"


def test_oversized_values_are_refused(policy: str) -> None:
    store: MemoryStore[str] = MemoryStore(100, policy, max_object_bytes=40)
    calls = recording(store)
    store.put("a", "small", 10)
    assert store.put("a", "big", 41) == ["a"]
    assert "a" not in store and store.used_bytes == 0  # no stale copy left behind
    assert calls == [("a", "big")]
    assert store.put("b", "whole", 101) == ["b"]  # over capacity too


def test_value_bigger_than_capacity_is_refused_without_max_object_bytes(policy: str) -> None:
    store: MemoryStore[str] = MemoryStore(100, policy)
    store.put("a", "A", 50)
    assert store.put("b", "B", 101) == ["b"]
    assert "b" not in store and store.peek("a") == "A"


def test_none_is_not_storable(policy: str) -> None:
    store: MemoryStore[str | None] = MemoryStore(100, policy)
    with pytest.raises(ValueError):
        store.put("a", None, 1)


def test_get_counts_as_a_hit_and_peek_does_not(policy: str) -> None:
    """Ten 10-byte objects fill 100 bytes; the eleventh evicts "k0" unless k0 was hit."""

    def eviction_after(touch: str) -> list[str]:
        store: MemoryStore[str] = MemoryStore(100, policy)
        for i in range(10):
            store.put(f"k{i}", f"v{i}", 10)
        getattr(store, touch)("k0")
        return store.put("new", "v", 10)

    assert eviction_after("peek") == ["k0"]
    assert "k0" not in eviction_after("get")


def test_keys_is_a_snapshot(policy: str) -> None:
    store: MemoryStore[str] = MemoryStore(100, policy)
    for key in ("/a/1", "/a/2", "/b/1"):
        store.put(key, key, 1)
    for key in store.keys():  # noqa: SIM118 -- MemoryStore is not iterable; keys() is the API
        store.remove(key)
    assert len(store) == 0


def test_unknown_policy_is_an_error() -> None:
    with pytest.raises(ValueError):
        MemoryStore(100, "random")
