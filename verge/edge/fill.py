"""A cache fill: one origin response in flight, read by any number of clients as it arrives.

This is what makes request collapsing and streaming-while-storing one mechanism: the
first miss for a key starts a fill; concurrent misses for the same key wait on its head
and then read its body from the offset they need (a Range request reads from the middle,
possibly before those bytes have arrived). The body is appended once, to the disk tier's
temp file (readers ``pread`` from it) and, while the object is small, to a memory buffer
that becomes the memory-tier copy on completion. So a 10 GiB object never sits in memory,
and a client that disconnects does not stop the fill: the cache still gets the object.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from verge.cache.disk import DiskWriter
    from verge.cache.store import CacheEntry
    from verge.http.client import UpstreamResponse


@dataclass(slots=True)
class FillHead:
    """How a fill turned out, as soon as the origin's response head is known.

    kind:
      ``stream``      storable response: read the body from the fill
      ``entry``       answer from a cache entry (304 refresh, or stale-if-error)
      ``uncacheable`` not storable: the initiator streams ``response`` itself; waiters fetch alone
      ``error``       the origin failed: ``error`` says how
    """

    kind: str
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    variant: str = ""
    vary: tuple[str, ...] = ()
    total: int | None = None
    entry: CacheEntry | None = None
    response: UpstreamResponse | None = None
    error: Exception | None = None
    cache_status: str = ""


class FillAborted(Exception):
    """The origin connection broke mid-body: readers must cut their responses short."""


class Fill:
    """One growing body. See the module docstring."""

    def __init__(self, key: str, memory_limit: int) -> None:
        self.key = key
        self.head: asyncio.Future[FillHead] = asyncio.get_running_loop().create_future()
        self._memory_limit = memory_limit
        self._buffer: bytearray | None = bytearray()
        self._writer: DiskWriter | None = None
        self.size = 0
        self.done = False
        self.error: Exception | None = None
        self.entry: CacheEntry | None = None
        self._waiters: list[asyncio.Future] = []
        self.readers = 0

    def set_head(self, head: FillHead) -> None:
        if not self.head.done():
            self.head.set_result(head)

    def attach_writer(self, writer: DiskWriter | None) -> None:
        self._writer = writer

    @property
    def buffered(self) -> bytes | None:
        """The whole body when it stayed within the memory limit (call after finish)."""
        return bytes(self._buffer) if self._buffer is not None else None

    def append(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)
        if self._buffer is not None:
            if self.size + len(data) <= self._memory_limit or self._writer is None:
                self._buffer += data
            else:
                self._buffer = None
        self.size += len(data)
        self._wake()

    def finish(self, entry: CacheEntry | None) -> None:
        self.entry = entry
        self.done = True
        self._wake()

    def fail(self, exc: Exception) -> None:
        self.error = exc
        self.done = True
        self.set_head(FillHead("error", error=exc))
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _read_at(self, offset: int, limit: int) -> bytes:
        if self._buffer is not None:
            return bytes(self._buffer[offset : offset + limit])
        if self.entry is not None:  # committed: the writer's fd may be closed by now
            return self.entry.read_body(offset, min(offset + limit, self.size))
        return os.pread(self._writer.fd, limit, offset)

    async def stream(self, start: int = 0, end: int | None = None, chunk: int = 256 * 1024):
        """Yield body bytes [start, end) as they arrive; raises FillAborted on origin failure."""
        offset = start
        self.readers += 1
        try:
            while end is None or offset < end:
                if offset < self.size:
                    stop = self.size if end is None else min(end, self.size)
                    data = self._read_at(offset, min(stop - offset, chunk))
                    if not data:
                        raise FillAborted("body vanished")
                    offset += len(data)
                    yield data
                    continue
                if self.done:
                    if self.error is not None:
                        raise FillAborted(str(self.error))
                    return
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut
        finally:
            self.readers -= 1
