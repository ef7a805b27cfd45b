"""Large memoised HTTP/1.1 responses sent with one sendfile(2) from a file of their bytes.

Why: a 100 KiB cache hit written with writev costs the worker a copy of the body into the
socket (the kernel's ``_copy_from_iter`` was 14 % of the hit's CPU on loopback), and the
copy also pushes the interpreter's working set out of the CPU caches; nginx sends its cache
files with sendfile and is ~8 % faster there. So a response that is sent again (a hot
cache entry's memoised Response, :func:`verge.http.server.http1_bytes`) is written once,
head and body, into a file of its own, and each further send is one ``sendfile``
call from it: no copy in the worker and one syscall. Measured (wrk -c50 on one core, the
worker pinned to the other, 100 KiB hit, this code against the code before it, alternated
8-10 rounds): +8 %, +11 % and +18 % requests/s in three runs.

Bounds, because the file holds a second copy of the response:

* only responses of :data:`SENDFILE_MIN` to :data:`SENDFILE_MAX` bytes (below, a copy is
  cheap; above, the socket rarely takes the whole response at once and the rest would be
  copied anyway: writev serves them);
* a file is made on the second send, never the first, so an object hit once a second does
  not pay a file per hit (a hot entry's Response is rebuilt when its ``Age`` changes);
* the process keeps at most :data:`BUDGET` bytes of them: the oldest are closed to make
  room, and a closed one goes back to writev for good (no thrashing);
* only on a plain-TCP connection whose transport has nothing buffered: TLS must encrypt the
  bytes, and anything queued must go out first.

Where the file lives: an unnamed file (``O_TMPFILE``, never linkable) in the cache's
directory (:meth:`WirePool.keep_in`), else a memfd. A memfd is shmem: the kernel looks up
each 4 KiB page of it on every sendfile (``filemap_get_entry`` and the shmem splice were ~8 %
of a 100 KiB hit's CPU), when a file of a filesystem with large folios (ext4 since Linux
6.16) is a handful of folios. Measured (the same A/B, 10 rounds, Linux 6.18, ext4): the
cache-directory file +15 % requests/s (median ratio 1.15) and -17 % worker CPU per hit over
the memfd. The file is a second copy of a hot response, within the same budget; its pages
may be written back to the disk once, as any cache file is, and it is gone with the process.

A partial sendfile (the socket's buffer was full) hands the rest to the transport as a view
of the original bytes, so the order of the bytes on the connection is kept.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections import deque

SENDFILE_MIN = 64 * 1024
SENDFILE_MAX = 1024 * 1024
BUDGET = 32 * 1024 * 1024  # bytes of response files per process

HAS_MEMFD = hasattr(os, "memfd_create") and hasattr(os, "sendfile")


class WireFile:
    """One complete HTTP/1.1 response (``parts``: head, body), and after its second send
    the file holding the same bytes (``fd``; -1 while there is none)."""

    __slots__ = ("parts", "size", "fd", "state", "pool", "__weakref__")

    NEW, SEEN, FILED, SPILLED = range(4)

    def __init__(self, head: bytes, body: bytes) -> None:
        self.parts = (head, body)
        self.size = len(head) + len(body)
        self.fd = -1
        self.state = WireFile.NEW
        self.pool: WirePool | None = None  # the pool whose budget its file counts in

    def send(self, transport, sock_fd: int) -> None:
        """Write the response on ``transport`` (a plain-TCP socket whose descriptor is
        ``sock_fd``): sendfile when filed and nothing is queued, else the bytes."""
        fd = self.fd
        if fd < 0:
            fd = self._file_on_second_send()
        if fd < 0 or transport.get_write_buffer_size():
            transport.writelines(self.parts)
            return
        try:
            sent = os.sendfile(sock_fd, fd, 0, self.size)
        except OSError:  # full (EAGAIN), or the peer is gone: the transport finds out
            sent = 0
        if sent < self.size:
            self._send_rest(transport, sent)

    def _send_rest(self, transport, sent: int) -> None:
        head, body = self.parts
        if sent < len(head):
            transport.writelines((memoryview(head)[sent:], body))
        else:
            transport.write(memoryview(body)[sent - len(head):])

    def _file_on_second_send(self) -> int:
        if self.state == WireFile.NEW:
            self.state = WireFile.SEEN
        elif self.state == WireFile.SEEN:
            self.state = WireFile.FILED if POOL.file(self) else WireFile.SPILLED
        return self.fd

    def close(self) -> None:
        """Give the file back (evicted, or the response is gone); bytes from now on."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
            self.pool.used -= self.size
        self.state = WireFile.SPILLED

    def __del__(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(Exception):  # (at interpreter exit os may be gone)
                self.close()


class WirePool:
    """The response files of this process, oldest first, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.filed: deque[weakref.ref[WireFile]] = deque()
        self.directory: str | None = None  # where unnamed files go; None: memfds

    def keep_in(self, directory: str | None) -> None:
        """Make further files unnamed files of ``directory`` (the cache's: why in the
        module's docstring); None goes back to memfds."""
        self.directory = directory

    def _open(self) -> int:
        """A new empty file: unnamed in :attr:`directory` when it can be, else a memfd."""
        if self.directory is not None:
            try:
                return os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
            except OSError:  # no O_TMPFILE on this filesystem, the directory is gone
                self.directory = None
        return os.memfd_create("verge-wire")

    def file(self, wire: WireFile) -> bool:
        """Give ``wire`` a file holding its bytes, closing the oldest to make room; False
        when it cannot have one (no memfd here, larger than the budget, an OS error)."""
        if not HAS_MEMFD or wire.size > self.budget:
            return False
        while self.used + wire.size > self.budget and self.filed:
            oldest = self.filed.popleft()()
            if oldest is not None:
                oldest.close()
        try:
            fd = self._open()
        except OSError:
            return False
        try:
            _write_all(fd, wire.parts)
        except OSError:
            os.close(fd)
            return False
        wire.fd, wire.pool = fd, self
        self.used += wire.size
        self.filed.append(weakref.ref(wire))
        if len(self.filed) > 2 * (self.budget // SENDFILE_MIN):  # dead refs pile up
            self.filed = deque(ref for ref in self.filed if ref() is not None)
        return True


def _write_all(fd: int, parts: tuple[bytes, bytes]) -> None:
    view = memoryview(b"".join(parts))
    while view:
        view = view[os.write(fd, view):]


def wire_for(head: bytes, body: bytes):
    """The memoised wire form of a response too large to join: a :class:`WireFile` in the
    sendfile range, else the ``(head, body)`` pair for writev."""
    if SENDFILE_MIN <= len(body) <= SENDFILE_MAX and HAS_MEMFD:
        return WireFile(head, body)
    return (head, body)


POOL = WirePool(BUDGET)
