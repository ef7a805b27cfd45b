"""The memory tier: a bytes-bounded key -> value map in front of the disk tier.

Values are opaque to the store (the edge keeps its cache entries here); the caller says how
many bytes each one costs. Which keys to drop when the bytes run out is decided by an
:mod:`~verge.cache.eviction` policy (S3-FIFO by default), which sees keys and sizes only.

``get`` runs on every cache hit, so it is one dict lookup plus the policy's O(1) ``access``.
The store is not thread-safe: each edge worker owns one and uses it from its event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from verge.cache.eviction import make_policy

V = TypeVar("V")


class MemoryStore(Generic[V]):
    """Bytes-bounded key -> value map with pluggable eviction.

    ``put`` returns the keys that had to go: keys evicted to make room and, when the new
    value is not admitted (larger than ``max_object_bytes`` or the capacity, or refused by
    the policy), its own key. ``on_evict``, when set, is called once for each key in that
    list with the value that was dropped (for a refused put, the new value), after the store
    is consistent again. Values replaced by ``put`` or taken out by ``remove`` are not
    reported. ``None`` is not a storable value (``get`` uses it to mean a miss).
    """

    def __init__(
        self, capacity_bytes: int, policy: str = "s3fifo", max_object_bytes: int | None = None
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.max_object_bytes = capacity_bytes if max_object_bytes is None else max_object_bytes
        self.on_evict: Callable[[str, V], None] | None = None
        self._policy = make_policy(policy, capacity_bytes)
        self._values: dict[str, V] = {}
        # Bound once: both run on every hit.
        self._lookup = self._values.get
        self._access = self._policy.access

    def get(self, key: str) -> V | None:
        """The value for ``key``, recorded as a hit; None on a miss."""
        value = self._lookup(key)
        if value is not None:
            self._access(key)
        return value

    def peek(self, key: str) -> V | None:
        """The value for ``key`` without recording a hit (revalidation, purge, stats)."""
        return self._values.get(key)

    def put(self, key: str, value: V, size: int) -> list[str]:
        """Store (or replace) ``key``; return the keys evicted or refused."""
        if value is None:
            raise ValueError("None cannot be stored")
        if size > self.max_object_bytes:
            self.remove(key)  # a stale older value must not outlive its replacement
            dropped = [(key, value)]
        else:
            dropped = self._insert(key, value, size)
        self._notify(dropped)
        return [k for k, _ in dropped]

    def _insert(self, key: str, value: V, size: int) -> list[tuple[str, V]]:
        values = self._values
        dropped = []
        refused = False
        for evicted in self._policy.insert(key, size):
            if evicted == key:
                refused = True
                values.pop(key, None)
                dropped.append((key, value))
            else:
                dropped.append((evicted, values.pop(evicted)))
        if not refused:
            values[key] = value
        return dropped

    def _notify(self, dropped: list[tuple[str, V]]) -> None:
        if self.on_evict is not None:
            for key, value in dropped:
                self.on_evict(key, value)

    def remove(self, key: str) -> V | None:
        """Take ``key`` out (purge, expiry); its value, or None when absent."""
        value = self._values.pop(key, None)
        if value is not None:
            self._policy.remove(key)
        return value

    def keys(self) -> Iterator[str]:
        """A snapshot of the resident keys: safe to remove keys while iterating."""
        return iter(list(self._values))

    @property
    def used_bytes(self) -> int:
        return self._policy.used

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values
