"""GCRA state in shared memory: exact limits across a node's workers for unsteerable keys.

Connection steering (verge/protect/steer.py) keeps all of one client address's connections
on one worker, so limits keyed by the client IP live in that worker's dict
(verge/protect/gcra.py, 0.2-0.6 µs a check). A limit keyed by a header, a cookie or the path
cannot be steered: the same API key arrives from many addresses, hence on every worker. For
those keys the workers share this table, one file in memory (``memfd_create``) that the node
supervisor creates and every worker maps. Measured on the 2-core reference VM (50k keys,
``python -m verge.protect.bench``): ~5 µs a check, 9-13 µs while a second process hammers
the same table, against 0.2-0.6 µs for the worker-local dict: affordable for the few
requests such rules match (logins, API keys), too dear for every cache hit.

Layout: a 64-byte header (magic, bucket count, a random 32-byte secret) then buckets of 8
slots; a slot is (fingerprint u64, TAT f64, end of penalty f64), 24 bytes. A key's
fingerprint is a keyed BLAKE2b of (scope, key), so clients cannot aim collisions at someone
else's slot, and the scope (service and rule) keeps rules apart in one table. A key lives in
one bucket: a lookup reads the bucket's 8 slots in one ``unpack_from``; a new key takes an
empty or expired slot, else the slot closest to expiry (eviction is permissive: the evicted
key starts afresh).

Exactness: a check holds a POSIX record lock on one byte per bucket (``lockf``) while it reads
and writes the slot, so two workers never both spend the last unit of a burst. Record locks
are released by the kernel when a process dies, so a worker killed mid-check cannot wedge the
others (a process-shared mutex would). Time is ``time.monotonic()``, one clock for every
process of the machine. A slot whose TAT is further ahead than the rule allows (a rule made
stricter by a config reload) is treated as expired.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct

from verge.protect.gcra import Limit

MAGIC = b"VRGGCRA1"
HEADER = struct.Struct("<8sQ32s")
HEADER_SIZE = 64
SLOTS_PER_BUCKET = 8
SLOT = struct.Struct("<Qdd")  # fingerprint (0: empty), TAT, end of penalty
BUCKET = struct.Struct("<" + "Qdd" * SLOTS_PER_BUCKET)
DEFAULT_BUCKETS = 16_384  # 131,072 slots, 3 MiB
MAX_BUCKETS = 1 << 24


class SharedTable:
    """The shared file: create it once per node, attach it in every worker."""

    def __init__(self, fd: int, *, owner: bool) -> None:
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise ValueError("not a rate-limit table: too small")
        self._mm = mmap.mmap(fd, size)
        magic, buckets, secret = HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC or size != HEADER_SIZE + buckets * BUCKET.size:
            self._mm.close()
            raise ValueError("not a rate-limit table (bad magic or size)")
        self.fd = fd
        self.buckets = buckets
        self._secret = secret
        self._owner = owner

    @classmethod
    def create(cls, buckets: int = DEFAULT_BUCKETS) -> SharedTable:
        """A new zeroed table in an anonymous memory file; pass ``fileno()`` to the workers."""
        if isinstance(buckets, bool) or not isinstance(buckets, int):
            raise ValueError(f"buckets must be an int, not {buckets!r}")
        if not 1 <= buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets must be 1..{MAX_BUCKETS}, not {buckets}")
        fd = os.memfd_create("verge-ratelimit", os.MFD_CLOEXEC)
        os.ftruncate(fd, HEADER_SIZE + buckets * BUCKET.size)
        with mmap.mmap(fd, HEADER_SIZE) as header:
            HEADER.pack_into(header, 0, MAGIC, buckets, secrets.token_bytes(32))
        return cls(fd, owner=True)

    @classmethod
    def attach(cls, fd: int) -> SharedTable:
        """The table behind an inherited file descriptor (the caller keeps owning the fd)."""
        return cls(fd, owner=False)

    def fileno(self) -> int:
        return self.fd

    def limit(
        self, scope: str, count: int, period: float, burst: int = 0, *, penalty: float = 0.0
    ) -> SharedGcra:
        """A GCRA limit whose keys live in this table; ``scope`` names it (service/rule)."""
        return SharedGcra(self, scope, count, period, burst, penalty)

    def close(self) -> None:
        self._mm.close()
        if self._owner:
            os.close(self.fd)


class SharedGcra(Limit):
    """:class:`verge.protect.gcra.Gcra`'s contract on a :class:`SharedTable`."""

    __slots__ = ("_table", "_mm", "_fd", "_buckets", "_hasher", "_stale")

    def __init__(
        self,
        table: SharedTable,
        scope: str,
        count: int,
        period: float,
        burst: int = 0,
        penalty: float = 0.0,
    ) -> None:
        super().__init__(count, period, burst, penalty)
        self._table = table  # keeps the mapping alive
        self._mm = table._mm
        self._fd = table.fd
        self._buckets = table.buckets
        scope_bytes = scope.encode("utf-8", "surrogatepass")
        self._hasher = hashlib.blake2b(digest_size=8, key=table._secret)
        self._hasher.update(len(scope_bytes).to_bytes(4, "little") + scope_bytes)
        # No state of this rule lies further ahead than this: anything beyond is stale.
        self._stale = self.tolerance + self.interval + self.penalty

    def _locate(self, key: str) -> tuple[int, int]:
        """(fingerprint, bucket) of a key."""
        hasher = self._hasher.copy()
        hasher.update(key.encode("utf-8", "surrogatepass"))
        fingerprint = int.from_bytes(hasher.digest(), "little") | 1
        return fingerprint, (fingerprint >> 1) % self._buckets

    def update(self, key: str, now: float) -> float:
        fingerprint, bucket = self._locate(key)
        offset = HEADER_SIZE + bucket * BUCKET.size
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, bucket)
        try:
            slots = BUCKET.unpack_from(self._mm, offset)
            index, tat, release = self._find(slots, fingerprint, now)
            if release > now:
                return now - release
            if tat < now:
                tat = now
            ahead = tat - now
            if ahead > self.ceiling:
                wait = self.sentence(ahead)
                if self.penalty > 0.0:
                    SLOT.pack_into(
                        self._mm, offset + index * SLOT.size, fingerprint, tat, now + wait
                    )
                return -wait
            tat += self.interval
            SLOT.pack_into(self._mm, offset + index * SLOT.size, fingerprint, tat, 0.0)
            return tat - now
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, bucket)

    def _find(self, slots: tuple, fingerprint: int, now: float) -> tuple[int, float, float]:
        """(slot index, TAT, end of penalty) of the key in its bucket; a fresh slot if absent."""
        fingerprints = slots[0::3]
        if fingerprint in fingerprints:
            index = fingerprints.index(fingerprint)
            tat, release = slots[3 * index + 1], slots[3 * index + 2]
            if tat - now <= self._stale and release - now <= self._stale:
                return index, tat, release
            return index, now, 0.0
        return self._victim(slots, now), now, 0.0

    def _victim(self, slots: tuple, now: float) -> int:
        """An empty or expired slot, else the live one closest to expiry (evicted)."""
        best, best_end = 0, float("inf")
        for index in range(SLOTS_PER_BUCKET):
            fingerprint, tat, release = slots[3 * index : 3 * index + 3]
            end = max(tat, release)
            if fingerprint == 0 or end <= now:
                return index
            if end < best_end:
                best, best_end = index, end
        self.evicted += 1
        return best

    def state(self, key: str, now: float) -> tuple[float | None, float | None]:
        fingerprint, bucket = self._locate(key)
        offset = HEADER_SIZE + bucket * BUCKET.size
        fcntl.lockf(self._fd, fcntl.LOCK_SH, 1, bucket)
        try:
            slots = BUCKET.unpack_from(self._mm, offset)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, bucket)
        if fingerprint not in slots[0::3]:
            return None, None
        _index, tat, release = self._find(slots, fingerprint, now)
        return tat, (release if release > 0.0 else None)
