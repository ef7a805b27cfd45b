"""The cache as the edge sees it: a memory tier over a disk tier, Vary-aware, purgeable.

Keys: the *primary* key is what :mod:`verge.cache.keys` builds from host, URL and rule
headers. A response with ``Vary`` is stored once per *variant* (the normalised values of
the varying request fields, RFC 9111 §4.1); the memory tier's storage key is then
``primary + "\\0" + variant``, and the Vary field names of each primary key are remembered
so that a lookup computes the variant of the request before probing.

The memory tier holds :class:`CacheEntry` objects: headers, freshness, and either the body
bytes (small objects) or only a reference to the body file on disk (large objects, sent
with sendfile). The disk tier is shared by all workers of a node; the memory tier is per
worker, so purges are applied to the disk once (by the node's supervisor) and to every
worker's memory (see :meth:`TieredCache.purge_memory`).

Nothing here waits for the disk tier's index writes (see :mod:`verge.cache.disk`): a fill is
published with :meth:`TieredCache.commit_async`, and refreshes, invalidations and the
worker's disk purges are queued on the disk's writer thread, in order. Until a queued
removal is done, disk look-ups of the keys it removes miss, so a worker never serves from
disk what it has just invalidated.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from verge.cache.disk import DiskEntry, DiskStore, DiskWriter
from verge.cache.memory import MemoryStore
from verge.cache.policy import Freshness, secondary_key
from verge.cache.purge import TagIndex, parse_surrogate_keys

T = TypeVar("T")

# Bookkeeping bytes charged per entry on top of its body (headers, objects).
ENTRY_OVERHEAD = 512


@dataclass(slots=True, eq=False)
class CacheEntry:
    """One stored response variant."""

    key: str
    variant: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    freshness: Freshness
    tags: frozenset[str] = frozenset()
    body_size: int = 0
    body: bytes | None = None
    disk: DiskEntry | None = None
    encoding: str | None = None  # Content-Encoding of this body when the edge made it
    compressible: bool | None = None  # may the edge compress it (decided on first delivery)
    rendered: tuple | None = field(default=None, repr=False)  # deliver phase's head cache
    # (valid until, plan, generation, response): a plain full hit's bytes while Age holds
    hot: tuple | None = field(default=None, repr=False)

    @property
    def storage_key(self) -> str:
        return storage_key(self.key, self.variant)

    @property
    def charge(self) -> int:
        """Bytes this entry costs the memory tier."""
        return ENTRY_OVERHEAD + (len(self.body) if self.body is not None else 0)

    def to_meta(self) -> dict:
        return {
            "key": self.key,
            "variant": self.variant,
            "status": self.status,
            "reason": self.reason,
            "headers": [list(h) for h in self.headers],
            "freshness": self.freshness.to_dict(),
            "tags": sorted(self.tags),
            "encoding": self.encoding,
        }

    @classmethod
    def from_disk(cls, entry: DiskEntry) -> CacheEntry:
        meta = entry.meta
        return cls(
            key=meta["key"],
            variant=meta["variant"],
            status=meta["status"],
            reason=meta["reason"],
            headers=[(n, v) for n, v in meta["headers"]],
            freshness=Freshness.from_dict(meta["freshness"]),
            tags=frozenset(meta.get("tags", ())),
            body_size=entry.body_size,
            disk=entry,
            encoding=meta.get("encoding"),
        )

    def read_body(self, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of the body, from memory or the disk file."""
        end = self.body_size if end is None else end
        if self.body is not None:
            return self.body[start:end]
        fd = self.disk.open()
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)


def storage_key(key: str, variant: str) -> str:
    return key + "\0" + variant if variant else key


class TieredCache:
    """Memory over disk, with Vary handling and purge by URL, prefix and tag."""

    def __init__(self, memory: MemoryStore, disk: DiskStore, max_memory_object: int) -> None:
        self.memory = memory
        self.disk = disk
        self.max_memory_object = max_memory_object
        self._vary: dict[str, tuple[str, ...]] = {}
        self._by_key: dict[str, set[str]] = {}
        self._tags = TagIndex()
        # (kind, value) -> removals queued on the disk's writer thread and not done yet
        self._hidden: dict[tuple[str, str], int] = {}
        self._hidden_lock = threading.Lock()  # the writer thread says when one is done
        memory.on_evict = self._forget

    # ----- lookup ---------------------------------------------------------------------
    def lookup(self, key: str, request_headers: Mapping[str, str]) -> CacheEntry | None:
        """The stored variant for this request, from memory, else disk (then promoted)."""
        fields = self._vary.get(key)
        if fields is None:
            entry = self.memory.get(key)
        else:
            entry = self.memory.get(storage_key(key, secondary_key(fields, request_headers)))
        if entry is not None:
            return entry
        return self._lookup_disk(key, request_headers)

    def lookup_memory(self, key: str, request_headers: Mapping[str, str]) -> CacheEntry | None:
        """Memory tier only: the hot path must not touch the disk."""
        fields = self._vary.get(key)
        if fields is None:
            return self.memory.get(key)
        return self.memory.get(storage_key(key, secondary_key(fields, request_headers)))

    def _lookup_disk(self, key: str, request_headers: Mapping[str, str]) -> CacheEntry | None:
        if self._hidden and self._is_hidden(key):
            return None
        fields = self.disk.get_vary(key)
        if fields is None:
            return None
        variant = secondary_key(fields, request_headers)
        found = self.disk.lookup(key, variant)
        if found is None:
            return None
        entry = CacheEntry.from_disk(found)
        if entry.body_size <= self.max_memory_object:
            entry.body = entry.read_body()
        self.disk.touch(key, variant)
        self._remember(entry, fields)
        return entry

    def derived(self, entry: CacheEntry, suffix: str) -> CacheEntry | None:
        """A variant the edge made from ``entry`` (e.g. a compressed body), memory only."""
        return self.memory.get(entry.storage_key + "\0" + suffix)

    def put_derived(self, entry: CacheEntry, suffix: str, derived: CacheEntry) -> None:
        skey = entry.storage_key + "\0" + suffix
        self.memory.put(skey, derived, derived.charge)
        self._by_key.setdefault(entry.key, set()).add(skey)
        if entry.tags:
            self._tags.add(skey, entry.tags)

    # ----- store ------------------------------------------------------------------------
    async def commit_async(
        self, writer: DiskWriter, entry: CacheEntry, fields: tuple[str, ...]
    ) -> DiskEntry:
        """Publish a fill's body on disk as ``entry`` (meta, tags) with the key's Vary
        ``fields``; the index work runs on the disk's writer thread while the loop goes on.

        Raises OSError when the object could not be stored (the write is aborted then).
        """
        try:
            return await writer.commit_async(entry.to_meta(), entry.tags, fields)
        except sqlite3.Error as exc:  # e.g. the index stayed locked past the busy timeout
            raise OSError(f"disk index: {exc}") from exc

    def put(self, entry: CacheEntry, fields: tuple[str, ...]) -> None:
        """Index a complete entry in memory. Its disk copy (``entry.disk``), with the Vary
        ``fields``, was published by :meth:`commit_async` (or ``DiskWriter.commit``)."""
        self._drop_derived(entry.key, entry.variant)
        self._remember(entry, fields)

    def _remember(self, entry: CacheEntry, fields: tuple[str, ...]) -> None:
        if fields:
            self._vary[entry.key] = fields
        else:
            self._vary.pop(entry.key, None)
        skey = entry.storage_key
        self.memory.put(skey, entry, entry.charge)
        if skey in self.memory:
            self._by_key.setdefault(entry.key, set()).add(skey)
            if entry.tags:
                self._tags.add(skey, entry.tags)

    def refresh(
        self, entry: CacheEntry, headers: list[tuple[str, str]], freshness: Freshness
    ) -> Future[bool] | None:
        """After a 304: new headers and freshness for the stored entry, in memory now and
        on disk by the writer thread (its future; None for a memory-only entry)."""
        entry.headers = headers
        entry.freshness = freshness
        entry.rendered = entry.hot = None
        entry.compressible = None
        self._drop_derived(entry.key, entry.variant)
        if entry.disk is None:
            return None
        return self.disk.later(self.disk.update_meta, entry.key, entry.variant, entry.to_meta())

    def _forget(self, skey: str, entry: CacheEntry) -> None:
        keys = self._by_key.get(entry.key)
        if keys is not None:
            keys.discard(skey)
            if not keys:
                del self._by_key[entry.key]
        self._tags.remove(skey)

    def _drop_derived(self, key: str, variant: str) -> None:
        prefix = storage_key(key, variant) + "\0"
        for skey in [k for k in self._by_key.get(key, ()) if k.startswith(prefix)]:
            self._remove_skey(skey)

    def _remove_skey(self, skey: str) -> None:
        entry = self.memory.remove(skey)
        if entry is not None:
            self._forget(skey, entry)

    # ----- invalidation and purge ---------------------------------------------------------
    def invalidate(self, key: str) -> Future[int]:
        """RFC 9111 §4.4 after an unsafe method: every variant of ``key`` goes, both tiers.

        Memory at once; the disk removal is queued (its future), and this process's disk
        look-ups of ``key`` miss until it is done.
        """
        self.purge_memory("url", key, soft=False)
        return self._hide_until_done([("url", key)], self.disk.remove, key)

    def purge_memory(self, kind: str, value: str, soft: bool) -> int:
        """Purge this process's memory tier. kind: 'url' (a primary key), 'prefix', 'tag'."""
        skeys = self._matching_memory(kind, value)
        for skey in skeys:
            if soft:
                entry = self.memory.peek(skey)
                if entry is not None:
                    entry.freshness.invalidated = True
                    entry.hot = None
            else:
                self._remove_skey(skey)
        if not soft and kind == "url":
            self._vary.pop(value, None)
        return len(skeys)

    def _matching_memory(self, kind: str, value: str) -> list[str]:
        if kind == "url":
            return list(self._by_key.get(value, ()))
        if kind == "prefix":
            return [s for k, ks in self._by_key.items() if k.startswith(value) for s in ks]
        if kind == "tag":
            return list(self._tags.keys_for(value))
        raise ValueError(f"unknown purge kind {kind!r}")

    def purge_disk(self, kind: str, value: str, soft: bool) -> Future[int]:
        """Purge the shared disk tier from this worker (see :func:`purge_disk`), queued on
        the writer thread; its future gives the count. Until it is done, this process's disk
        look-ups of the purged keys miss (for a tag: the keys tagged now)."""
        if kind == "tag":
            keys = sorted({k for k, _ in self.disk.keys_with_tag(value)})
            hidden = [("url", k) for k in keys]
        elif kind in ("url", "prefix"):
            hidden = [(kind, value)]
        else:
            raise ValueError(f"unknown purge kind {kind!r}")
        return self._hide_until_done(hidden, purge_disk, self.disk, kind, value, soft)

    def _hide_until_done(
        self, pairs: list[tuple[str, str]], fn: Callable[..., T], *args: object
    ) -> Future[T]:
        """Queue ``fn(*args)`` on the disk's writer thread; disk look-ups matching ``pairs``
        (("url", key) or ("prefix", prefix)) miss until it is done."""
        with self._hidden_lock:
            for pair in pairs:
                self._hidden[pair] = self._hidden.get(pair, 0) + 1
        try:
            future = self.disk.later(fn, *args)
        except BaseException:
            self._unhide(pairs)
            raise
        future.add_done_callback(lambda _: self._unhide(pairs))
        return future

    def _unhide(self, pairs: list[tuple[str, str]]) -> None:
        with self._hidden_lock:
            for pair in pairs:
                left = self._hidden.get(pair, 0) - 1
                if left > 0:
                    self._hidden[pair] = left
                else:
                    self._hidden.pop(pair, None)

    def _is_hidden(self, key: str) -> bool:
        with self._hidden_lock:
            return any(
                key == value if kind == "url" else key.startswith(value)
                for kind, value in self._hidden
            )

    def stats(self) -> dict[str, int]:
        return {"memory_bytes": self.memory.used_bytes, "memory_objects": len(self.memory)}


def tags_of(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Surrogate keys of a response (Surrogate-Key / Cache-Tag)."""
    return parse_surrogate_keys({n.lower(): v for n, v in headers})


def purge_disk(disk: DiskStore, kind: str, value: str, soft: bool) -> int:
    """Purge the shared disk tier (once per node). kind: 'url' (a primary key), 'prefix', 'tag'.

    Blocks until the disk's writer thread made the changes (the node supervisor's purges);
    a worker's event loop queues it instead (:meth:`TieredCache.purge_disk`).
    """
    if kind == "url":
        targets = [(k, v) for k, v in disk.keys_with_prefix(value) if k == value]
    elif kind == "prefix":
        targets = disk.keys_with_prefix(value)
    elif kind == "tag":
        targets = disk.keys_with_tag(value)
    else:
        raise ValueError(f"unknown purge kind {kind!r}")
    for key, variant in targets:
        if soft:
            found = disk.lookup(key, variant)
            if found is not None:
                meta = dict(found.meta)
                meta["freshness"] = {**meta["freshness"], "invalidated": True}
                disk.update_meta(key, variant, meta)
        else:
            disk.remove(key, variant)
    return len(targets)
