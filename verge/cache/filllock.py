"""Node-wide fill locks: one origin request per cache key, whatever the worker count.

Within a worker, concurrent misses for a key join one in-flight fill (verge.edge.fill). Across
the workers of a node the disk tier is the meeting point, as with nginx's
``proxy_cache_lock``: the worker that takes a key's lock fills it; a worker that finds the lock
taken waits until the entry appears in the shared disk index (or the lock is let go, or the
lock timeout passes) and serves it from there, instead of asking the origin again.

Why POSIX record locks (``fcntl.lockf``) on one file: the kernel lets go of a dead worker's
locks by itself (a worker killed with -9 never leaves a key locked), one byte per stripe of a
sparse file needs no file per key and nothing to clean up, and taking a free lock is one
system call. Keys are hashed onto 2**20 stripes; two keys that share one (rare) make at most
one extra origin request, never a wrong answer. Record locks belong to the process, so two
coroutines of one worker never block each other (they collapse in memory anyway).

A fill that turns out uncacheable marks its key "pass" for a few seconds (Varnish's
hit-for-miss) in a small shared table, so the other workers' waiters go to the origin at
once instead of queueing behind one another's fills.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from pathlib import Path

STRIPES = 1 << 20
PASS_SLOTS = 1 << 16
_SLOT = struct.Struct("d")


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class NodeFillLocks:
    """The fill locks and the pass table of one node's cache directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(root / "fill.locks", os.O_RDWR | os.O_CREAT, 0o600)
        pass_fd = os.open(root / "fill.pass", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(pass_fd).st_size < PASS_SLOTS * _SLOT.size:
                os.ftruncate(pass_fd, PASS_SLOTS * _SLOT.size)
            self._pass = mmap.mmap(pass_fd, PASS_SLOTS * _SLOT.size)
        finally:
            os.close(pass_fd)
        self.held: dict[int, int] = {}  # stripe -> how many of this worker's fills hold it

    def try_acquire(self, key: str) -> int | None:
        """The key's stripe, now locked by this worker; None when another worker holds it."""
        stripe = _hash(key) % STRIPES
        if stripe not in self.held:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, stripe)
            except OSError:
                return None
        self.held[stripe] = self.held.get(stripe, 0) + 1
        return stripe

    def release(self, stripe: int) -> None:
        count = self.held.get(stripe, 0) - 1
        if count > 0:
            self.held[stripe] = count
            return
        self.held.pop(stripe, None)
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, stripe)

    def mark_pass(self, key: str, seconds: float) -> None:
        """Waiters in other workers should not wait for this key's fills for ``seconds``."""
        _SLOT.pack_into(self._pass, (_hash(key) % PASS_SLOTS) * _SLOT.size, time.time() + seconds)

    def passing(self, key: str) -> bool:
        until = _SLOT.unpack_from(self._pass, (_hash(key) % PASS_SLOTS) * _SLOT.size)[0]
        return until > time.time()

    def close(self) -> None:
        os.close(self._fd)
        self._pass.close()
