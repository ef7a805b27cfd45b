"""The protocol-neutral response an application returns; each protocol serialises it.

Why: the edge decides one answer per request (status, end-to-end fields, body length and
where the body comes from) and must not know which protocol carries it. HTTP/1.1 renders a
status line and fields (:mod:`verge.http.server`), HTTP/2 and HTTP/3 HPACK/QPACK fields
(:mod:`verge.http.h2server`, :mod:`verge.http.h3server`, :mod:`verge.http.native_h2`).

A hot cache entry hands out the same :class:`Response` object until its ``Age`` changes
(``EdgeApp.handle_fast``), so each protocol memoises its rendering on the object: the
complete HTTP/1.1 bytes in ``http1``, the HTTP/2/3 fields in ``fields`` and the native
HTTP/2 engine's head object in ``native``. That keeps a
memory hit one ``transport.write`` on every protocol without the application rendering wire
bytes for one of them.

Body sources: ``None`` (no body: HEAD, 304, 416), ``bytes``, :class:`FileBody` (a byte
range of an open file, sent with sendfile or pread), or an async iterable of ``bytes``
(a streamed fill or a relayed origin response). Framing (Content-Length, chunked,
Connection) is never in ``headers``: the protocol sets it from ``length`` and its own state.
"""

from __future__ import annotations

import os

Headers = list[tuple[str, str]]


class FileBody:
    """``count`` bytes of the open file ``fd`` from ``offset``; the sender closes the fd."""

    __slots__ = ("fd", "offset", "count", "close_fd")

    def __init__(self, fd: int, offset: int, count: int, close_fd: bool = True) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count
        self.close_fd = close_fd

    def close(self) -> None:
        if self.close_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Response:
    """One response: what the application decided, before any protocol renders it.

    ``length`` is the body's length when known (sent as Content-Length; for HEAD the length
    the GET would have), None when the body is streamed without a known length. ``close``
    asks the protocol to close the connection after it (HTTP/1.1 only). ``http1`` and
    ``fields`` are the protocols' memoised renderings (see the module docstring); ``variants``
    the memoised copies of a shared response with a few more fields (verge.edge.protect's
    ``with_fields``: a rate-limited hit's RateLimit fields)."""

    __slots__ = ("status", "headers", "length", "body", "reason", "close", "http1", "fields",
                 "native", "variants")

    def __init__(self, status: int, headers: Headers, body=None, length: int | None = None,
                 *, reason: str = "", close: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        if length is None and type(body) is bytes:
            length = len(body)
        self.length = length
        self.reason = reason
        self.close = close
        self.http1: bytes | tuple[bytes, bytes] | None = None
        self.fields: list[tuple[bytes, bytes]] | None = None
        self.native = None  # the native HTTP/2 engine's head object (verge.http.native_h2)
        self.variants: dict | None = None

    def __repr__(self) -> str:
        return f"Response({self.status}, length={self.length})"

    @property
    def streamed(self) -> bool:
        """True when the body must be awaited (a file range or an async source)."""
        body = self.body
        return body is not None and type(body) is not bytes

    def discard(self) -> None:
        """Release a file body left unsent (its fd)."""
        if type(self.body) is FileBody:
            self.body.close()


async def write_body(writer, body) -> None:
    """Send a streamed body through any protocol's writer (``write``/``sendfile``): a file
    range (its fd closed after) or an async source of bytes."""
    if type(body) is FileBody:
        try:
            await writer.sendfile(body.fd, body.offset, body.count)
        finally:
            body.close()
    elif type(body) is bytes:
        await writer.write(body)
    elif body is not None:
        async for chunk in body:
            await writer.write(chunk)
