"""TieredCache: memory over disk, Vary variants, derived (compressed) variants, purge."""

from __future__ import annotations

import time

import pytest

from verge.cache import policy
from verge.cache.disk import DiskStore
from verge.cache.memory import MemoryStore
from verge.cache.store import CacheEntry, TieredCache, purge_disk


def fresh(vary=()) -> policy.Freshness:
    now = time.time()
    return policy.Freshness(response_time=now, corrected_initial_age=0, lifetime=60, vary=vary)


@pytest.fixture
def cache(tmp_path):
    disk = DiskStore(tmp_path, 1 << 30)
    yield TieredCache(MemoryStore(1 << 20), disk, max_memory_object=1 << 16)
    disk.close()


def store(cache: TieredCache, key: str, body: bytes, variant: str = "", vary=(), tags=()):
    entry = CacheEntry(key=key, variant=variant, status=200, reason="OK",
                       headers=[("Content-Type", "text/plain")], freshness=fresh(vary),
                       tags=frozenset(tags), body_size=len(body))
    writer = cache.disk.writer(key, variant)
    writer.write(body)
    entry.disk = writer.commit(entry.to_meta(), entry.tags)
    entry.body = body if len(body) <= cache.max_memory_object else None
    cache.put(entry, vary)
    return entry


def test_memory_hit_and_disk_promotion(cache, tmp_path):
    store(cache, "h/a", b"alpha")
    assert cache.lookup_memory("h/a", {}).body == b"alpha"
    # a second worker (fresh memory tier, same disk) finds it on disk
    other = TieredCache(MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 30), 1 << 16)
    assert other.lookup_memory("h/a", {}) is None
    found = other.lookup("h/a", {})
    assert found.body == b"alpha" and found.status == 200
    assert other.lookup_memory("h/a", {}) is found  # promoted


def test_vary_variants_are_separate(cache):
    vary = ("accept-language",)
    for lang, body in (("en", b"english"), ("fr", b"french")):
        store(cache, "h/v", body, policy.secondary_key(vary, {"accept-language": lang}), vary)
    assert cache.lookup("h/v", {"accept-language": "en"}).body == b"english"
    assert cache.lookup("h/v", {"accept-language": "fr"}).body == b"french"
    assert cache.lookup("h/v", {"accept-language": "de"}) is None


def test_purge_memory_and_disk_by_url_prefix_tag(cache):
    store(cache, "h/p/1", b"1", tags=["red"])
    store(cache, "h/p/2", b"2", tags=["blue"])
    store(cache, "h/q/3", b"3", tags=["blue"])
    assert cache.purge_memory("tag", "blue", soft=False) == 2
    assert purge_disk(cache.disk, "tag", "blue", soft=False) == 2
    assert cache.lookup("h/p/2", {}) is None and cache.lookup("h/q/3", {}) is None
    assert cache.purge_memory("prefix", "h/p/", soft=False) == 1
    assert purge_disk(cache.disk, "url", "h/p/1", soft=False) == 1
    assert cache.lookup("h/p/1", {}) is None


def test_soft_purge_marks_stale_in_both_tiers(cache, tmp_path):
    store(cache, "h/s", b"s")
    cache.purge_memory("url", "h/s", soft=True)
    purge_disk(cache.disk, "url", "h/s", soft=True)
    assert cache.lookup("h/s", {}).freshness.invalidated
    other = TieredCache(MemoryStore(1 << 20), DiskStore(tmp_path, 1 << 30), 1 << 16)
    assert other.lookup("h/s", {}).freshness.invalidated


def test_derived_variants_dropped_when_the_entry_is_replaced(cache):
    entry = store(cache, "h/c", b"x" * 100)
    derived = CacheEntry(key="h/c", variant="", status=200, reason="OK", headers=[],
                         freshness=entry.freshness, body=b"gz", body_size=2, encoding="gzip")
    cache.put_derived(entry, "gzip", derived)
    assert cache.derived(entry, "gzip") is derived
    store(cache, "h/c", b"y" * 100)
    assert cache.derived(entry, "gzip") is None


def test_large_bodies_stay_on_disk(cache):
    big = b"b" * (1 << 17)
    entry = store(cache, "h/big", big)
    assert entry.body is None
    assert cache.lookup("h/big", {}).read_body(10, 20) == big[10:20]
