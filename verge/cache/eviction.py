"""Byte-aware eviction policies for the memory tier.

A policy tracks keys and their sizes in bytes, never values: the store that owns the values
(:class:`verge.cache.memory.MemoryStore`) asks the policy what to evict and drops those
values itself. Every operation is O(1) amortised; ``access`` runs on every cache hit, so
it is one dict lookup and, for S3-FIFO, one counter bump.

Two policies:

* :class:`LRU` -- the baseline, an ``OrderedDict`` in recency order.
* :class:`S3FIFO` -- the default. S3-FIFO (Yang et al., "FIFO queues are all you need for
  cache eviction", SOSP 2023), made byte-aware. See its docstring for the measurements that
  chose it over LRU (and over W-TinyLFU).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Callable


class EvictionPolicy(abc.ABC):
    """Tracks which keys are resident and how many bytes they take.

    ``insert`` returns the keys evicted to make room. When the new object is not admitted
    (bigger than the whole capacity, or rejected by the policy) its own key is in that list
    too and it is not resident afterwards. Inserting a key that is already resident replaces
    its size (the replacement never evicts itself unless it alone exceeds capacity).
    """

    capacity: int
    used: int

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.used = 0

    @abc.abstractmethod
    def insert(self, key: str, size: int) -> list[str]:
        """Make ``key`` resident with ``size`` bytes; return the keys evicted."""

    @abc.abstractmethod
    def access(self, key: str) -> None:
        """Record a hit on ``key`` (a no-op for keys that are not resident)."""

    @abc.abstractmethod
    def remove(self, key: str) -> bool:
        """Forget ``key`` (purge, expiry); True when it was resident."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def _check_size(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")


class LRU(EvictionPolicy):
    """Least recently used: evict from the cold end of one recency-ordered map."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def insert(self, key: str, size: int) -> list[str]:
        self._check_size(size)
        self.remove(key)
        if size > self.capacity:
            return [key]
        evicted = []
        sizes = self._sizes
        while self.used + size > self.capacity:
            victim, victim_size = sizes.popitem(last=False)
            self.used -= victim_size
            evicted.append(victim)
        sizes[key] = size
        self.used += size
        return evicted

    def access(self, key: str) -> None:
        try:  # noqa: SIM105 -- cheaper than contextlib.suppress on this hot path
            self._sizes.move_to_end(key)
        except KeyError:  # not resident: nothing to record
            pass

    def remove(self, key: str) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self.used -= size
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)


MIN_GHOST = 16  # ghost entries kept even when very few objects are resident


class _Entry:
    """A resident object: its size, its hit counter (0..MAX_FREQ) and which queue holds it."""

    __slots__ = ("size", "freq", "in_main")

    def __init__(self, size: int, in_main: bool) -> None:
        self.size = size
        self.freq = 0
        self.in_main = in_main


class S3FIFO(EvictionPolicy):
    """S3-FIFO, byte-aware: a small probationary FIFO, a main FIFO and a ghost FIFO.

    * New objects enter the *small* queue (about 10% of the bytes). When one reaches the head
      of small it moves to *main* if it was hit while in small, and is evicted otherwise; its
      key then goes to the *ghost* queue. Most objects on a CDN are requested once, and this
      quick demotion keeps them from pushing popular objects out.
    * A key found in ghost when it is inserted again was evicted too early: it goes straight
      to main.
    * Main is a FIFO with reinsertion (CLOCK-like): an object at the head whose frequency is
      above zero goes back to the tail with its frequency decremented; one at zero is evicted.
    * Hits only bump a per-object counter capped at 3, so ``access`` costs a dict lookup and
      an increment; nothing is relinked on a hit (LRU relinks on every hit).
    * Byte-aware: the queues are bounded in bytes, and eviction runs until the new object's
      bytes fit; each step either frees bytes or promotes one object from small to main.
    * The ghost holds keys only and is bounded by entry count: half as many keys as there
      are resident objects (``ghost_ratio``, at least ``MIN_GHOST``). The paper sizes it like
      main (~0.9); on a static Zipf trace a smaller ghost is up to a point better (it sends
      fewer one-time objects straight to main), while under strong popularity churn no ghost
      at all falls behind LRU; 0.5 was best or within 0.3 points of best on both.

    Measurements (``bench/zipf_hit_ratio.py``, seed 1: 20,000 objects, log-normal sizes
    1 KiB-1 MiB, 400,000 requests; "churn 50" = 50 new most-popular objects per 1,000
    requests). Object / byte hit ratio; W-TinyLFU is a byte-aware prototype (1% LRU window,
    segmented-LRU main, 4-bit count-min sketch with aging, a candidate admitted only when
    more frequent than every victim it displaces), kept out of the tree:

    =========  =====  =====  =============  =============  =============
    workload   alpha  cache  LRU            S3-FIFO        W-TinyLFU
    =========  =====  =====  =============  =============  =============
    static     0.9    5%     0.478 / 0.391  0.576 / 0.495  0.609 / 0.502
    static     0.9    10%    0.574 / 0.499  0.652 / 0.586  0.682 / 0.584
    static     1.0    5%     0.611 / 0.502  0.691 / 0.598  0.715 / 0.602
    static     1.0    10%    0.693 / 0.605  0.753 / 0.679  0.773 / 0.677
    churn 50   0.9    5%     0.521 / 0.519  0.584 / 0.580  0.479 / 0.377
    churn 50   0.9    10%    0.623 / 0.622  0.675 / 0.673  0.600 / 0.511
    churn 50   1.0    5%     0.640 / 0.641  0.689 / 0.690  0.575 / 0.479
    churn 50   1.0    10%    0.722 / 0.723  0.759 / 0.760  0.703 / 0.626
    =========  =====  =====  =============  =============  =============

    S3-FIFO beats LRU by 5-10 points of byte hit ratio. W-TinyLFU matches it in bytes on
    static popularity (its wins are in objects: size-aware admission favours small ones),
    falls far behind when popularity moves (without Caffeine's adaptive window it admits new
    hot objects too slowly), and its replay ran ~8x slower in Python (a sketch update on every
    request). Hence S3-FIFO.
    """

    MAX_FREQ = 3

    def __init__(
        self,
        capacity: int,
        small_fraction: float = 0.1,
        move_to_main_threshold: int = 1,
        ghost_ratio: float = 0.5,
    ) -> None:
        super().__init__(capacity)
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be in (0, 1), got {small_fraction}")
        self.small_capacity = int(capacity * small_fraction)
        self.small_used = 0
        self._move_threshold = move_to_main_threshold
        self._ghost_ratio = ghost_ratio
        self._entries: dict[str, _Entry] = {}
        self._small: OrderedDict[str, _Entry] = OrderedDict()
        self._main: OrderedDict[str, _Entry] = OrderedDict()
        self._ghost: OrderedDict[str, None] = OrderedDict()
        self._entries_get: Callable[[str], _Entry | None] = self._entries.get

    # -- the hot path -------------------------------------------------------------------

    def access(self, key: str) -> None:
        entry = self._entries_get(key)
        if entry is not None and entry.freq < 3:  # 3 == MAX_FREQ, inlined
            entry.freq += 1

    # -- insert / remove ----------------------------------------------------------------

    def insert(self, key: str, size: int) -> list[str]:
        self._check_size(size)
        old = self._entries.get(key)
        if old is not None:
            return self._replace(key, old, size)
        if size > self.capacity:
            return [key]
        evicted = self._make_room(size, [])
        to_main = key in self._ghost
        if to_main:
            del self._ghost[key]
        self._link(key, _Entry(size, to_main))
        return evicted

    def _replace(self, key: str, old: _Entry, size: int) -> list[str]:
        """New size for a resident key: same queue and frequency, re-queued at the tail."""
        self._unlink(key, old)
        if size > self.capacity:
            return [key]
        evicted = self._make_room(size, [])
        entry = _Entry(size, old.in_main)
        entry.freq = old.freq
        self._link(key, entry)
        return evicted

    def remove(self, key: str) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._unlink(key, entry)
        return True

    def _link(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self.used += entry.size
        if entry.in_main:
            self._main[key] = entry
        else:
            self._small[key] = entry
            self.small_used += entry.size

    def _unlink(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        self.used -= entry.size
        if entry.in_main:
            del self._main[key]
        else:
            del self._small[key]
            self.small_used -= entry.size

    # -- eviction -----------------------------------------------------------------------

    def _make_room(self, size: int, evicted: list[str]) -> list[str]:
        """Evict until ``size`` more bytes fit; each pass frees bytes or promotes one object."""
        while self.used + size > self.capacity:
            if self.small_used > self.small_capacity or not self._main:
                self._evict_from_small(evicted)
            else:
                self._evict_from_main(evicted)
        return evicted

    def _evict_from_small(self, evicted: list[str]) -> None:
        key, entry = self._small.popitem(last=False)
        self.small_used -= entry.size
        if entry.freq >= self._move_threshold:
            entry.freq = 0
            entry.in_main = True
            self._main[key] = entry
            return
        del self._entries[key]
        self.used -= entry.size
        evicted.append(key)
        self._remember(key)

    def _evict_from_main(self, evicted: list[str]) -> None:
        main = self._main
        while True:
            key, entry = main.popitem(last=False)
            if entry.freq > 0:
                entry.freq -= 1
                main[key] = entry
                continue
            del self._entries[key]
            self.used -= entry.size
            evicted.append(key)
            return

    def _remember(self, key: str) -> None:
        ghost = self._ghost
        ghost[key] = None
        limit = max(int(len(self._entries) * self._ghost_ratio), MIN_GHOST)
        while len(ghost) > limit:
            ghost.popitem(last=False)

    # -- introspection ------------------------------------------------------------------

    def in_ghost(self, key: str) -> bool:
        """True when ``key`` was recently evicted from the small queue (for tests/metrics)."""
        return key in self._ghost

    def in_main(self, key: str) -> bool:
        """True when ``key`` is resident in the main queue (for tests/metrics)."""
        entry = self._entries.get(key)
        return entry is not None and entry.in_main

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


POLICIES: dict[str, type[EvictionPolicy]] = {"s3fifo": S3FIFO, "lru": LRU}


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """The policy called ``name`` ("s3fifo" or "lru") with ``capacity`` bytes."""
    try:
        policy_class = POLICIES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}"
        ) from None
    return policy_class(capacity)
