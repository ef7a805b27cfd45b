"""TieredCache: memory over disk, Vary variants, derived (compressed) variants, purge."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.cache.test_disk import FAST, index_lock_held, read_in_another_process
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
    entry = CacheEntry(
        key=key,
        variant=variant,
        status=200,
        reason="OK",
        headers=[("Content-Type", "text/plain")],
        freshness=fresh(vary),
        tags=frozenset(tags),
        body_size=len(body),
    )
    writer = cache.disk.writer(key, variant)
    writer.write(body)
    entry.disk = writer.commit(entry.to_meta(), entry.tags, vary)
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
    derived = CacheEntry(
        key="h/c",
        variant="",
        status=200,
        reason="OK",
        headers=[],
        freshness=entry.freshness,
        body=b"gz",
        body_size=2,
        encoding="gzip",
    )
    cache.put_derived(entry, "gzip", derived)
    assert cache.derived(entry, "gzip") is derived
    store(cache, "h/c", b"y" * 100)
    assert cache.derived(entry, "gzip") is None


def test_large_bodies_stay_on_disk(cache):
    big = b"b" * (1 << 17)
    entry = store(cache, "h/big", big)
    assert entry.body is None
    assert cache.lookup("h/big", {}).read_body(10, 20) == big[10:20]


# ----- a contended index never stalls the event loop -------------------------------------------
def new_entry(key: str, body: bytes, tags=()) -> CacheEntry:
    return CacheEntry(
        key=key,
        variant="",
        status=200,
        reason="OK",
        headers=[("Content-Type", "text/plain")],
        freshness=fresh(),
        tags=frozenset(tags),
        body_size=len(body),
    )


async def test_a_locked_index_stalls_neither_memory_hits_nor_disk_lookups(cache, tmp_path):
    """Another process holds the index write lock while this one stores, refreshes and
    invalidates: hits from memory and from disk are answered at once all the same."""
    hot = store(cache, "h/hot", b"hot")
    store(cache, "h/cold", b"cold")
    store(cache, "h/gone", b"gone")
    cache.purge_memory("url", "h/cold", soft=False)  # on disk only
    writer = cache.disk.writer("h/new", "")
    writer.write(b"new body")
    entry = new_entry("h/new", b"new body", tags=["fresh"])
    with index_lock_held(tmp_path) as release:
        started = time.monotonic()
        commit = asyncio.ensure_future(cache.commit_async(writer, entry, ()))
        await asyncio.sleep(0)  # the commit is with the writer thread, which waits for the lock
        refreshed = cache.refresh(hot, [("Content-Type", "text/html")], fresh())
        invalidated = cache.invalidate("h/gone")
        for _ in range(100):
            assert cache.lookup_memory("h/hot", {}) is hot
        assert cache.lookup("h/cold", {}).body == b"cold"  # disk hit, promoted, touched
        cache.disk.flush()
        assert cache.lookup("h/gone", {}) is None  # invalidated: hidden until removed
        assert time.monotonic() - started < FAST
        assert not (commit.done() or refreshed.done() or invalidated.done())
        release()
        disk_entry = await asyncio.wait_for(commit, 10)
        assert await asyncio.wait_for(asyncio.wrap_future(refreshed), 10) is True
        assert await asyncio.wait_for(asyncio.wrap_future(invalidated), 10) == 1
    entry.disk = disk_entry
    cache.put(entry, ())
    assert cache.lookup_memory("h/new", {}) is entry
    # what this process stored, refreshed and removed, a newly started one sees
    body, meta, vary = read_in_another_process(tmp_path, "h/new")
    assert (body, meta["tags"], vary) == ("new body", ["fresh"], [])
    assert read_in_another_process(tmp_path, "h/hot")[1]["headers"] == [
        ["Content-Type", "text/html"]
    ]
    assert read_in_another_process(tmp_path, "h/gone") is None


async def test_disk_purge_from_a_worker_is_queued_and_hides_its_keys(cache, tmp_path):
    store(cache, "h/p/1", b"1", tags=["red"])
    store(cache, "h/p/2", b"2")
    store(cache, "h/q/3", b"3", tags=["red"])
    for key in ("h/p/1", "h/p/2", "h/q/3"):
        cache.purge_memory("url", key, soft=False)
    with index_lock_held(tmp_path) as release:
        by_prefix = cache.purge_disk("prefix", "h/p/", soft=False)
        by_tag = cache.purge_disk("tag", "red", soft=False)
        assert [cache.lookup(k, {}) for k in ("h/p/1", "h/p/2", "h/q/3")] == [None] * 3
        assert not by_prefix.done()
        release()
        assert await asyncio.wait_for(asyncio.wrap_future(by_prefix), 10) == 2
        assert await asyncio.wait_for(asyncio.wrap_future(by_tag), 10) == 1
    assert cache._hidden == {}
    assert cache.disk.keys_with_prefix("h/") == []
    store(cache, "h/p/1", b"again")  # a later store of a purged key is found again
    cache.purge_memory("url", "h/p/1", soft=False)
    assert cache.lookup("h/p/1", {}).body == b"again"


async def test_commit_async_reports_a_failed_store_as_oserror(cache):
    writer = cache.disk.writer("h/x", "")
    writer.write(b"x")
    entry = new_entry("h/x", b"x")
    entry.headers = [("X-Bad", object())]  # not JSON: the meta cannot be written
    with pytest.raises(TypeError):
        await cache.commit_async(writer, entry, ())
    assert cache.disk.lookup("h/x", "") is None and writer.fd == -1
