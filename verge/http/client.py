"""Origin-side HTTP/1.1 client with a keep-alive connection pool.

Why this exists: on a cache miss or a revalidation the edge fetches from an origin (or a
shield edge). That fetch sits on the hot path, so it is a lean ``asyncio.Protocol`` around
``httptools.HttpResponseParser`` (llhttp) rather than a general-purpose client, and it
reuses keep-alive connections per origin. Bodies stream in both directions and are never
held whole: a response stops reading from the socket while more than ``HIGH_WATER`` bytes
wait for the consumer, and a streamed upload waits for the socket to drain.

Failures are mapped to a small set of exceptions whose ``status`` is what the edge
answers with (502 or 504); :class:`ConnectError` means the origin was never reached, so
the caller may fail over to another origin. A keep-alive connection that turns out to
have been closed by the origin before any byte of the response (the usual keep-alive
race) is retried once on a fresh connection when the request body can be replayed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl as _ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import urlsplit

import httptools

from verge.http.message import Headers, header_map
from verge.http.tls import origin_client_context

__all__ = [
    "ConnectError",
    "FirstByteTimeout",
    "IdleTimeout",
    "Origin",
    "OriginPool",
    "ProtocolError",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
]

HIGH_WATER = 256 * 1024  # pause reading from the origin above this many buffered bytes
LOW_WATER = 64 * 1024  # ... and resume once the consumer has drained below this
MAX_HEAD_SIZE = 64 * 1024  # largest response head (status line + fields) accepted

DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_BODY_STATUS = frozenset({204, 304})
# Methods for which an empty bytes body means "no body" (no Content-Length: 0 is sent).
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_HOST_CHARS = frozenset("-._~0123456789abcdefghijklmnopqrstuvwxyz")

_BODY_STALLED = "origin {origin} sent no body data for {timeout:g}s"

Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | None


class SizedBody:
    """A streamed request body of a known length: sent with Content-Length (and checked to
    be exactly that long) instead of chunked. Server request bodies carry ``length`` too
    (verge.http.server.BodyStream), so a proxied upload keeps its client's framing."""

    def __init__(self, chunks: AsyncIterable[bytes], length: int) -> None:
        self.chunks = chunks
        self.length = length

    def __aiter__(self):
        return self.chunks.__aiter__()
Framing = Literal["none", "length", "chunked", "eof"]


# --------------------------------------------------------------------------- origins


@dataclass(frozen=True, slots=True)
class Origin:
    """Where to connect: scheme, host and port, and for https how to trust it (the pool key).

    ``tls_ca`` pins trust to that PEM CA file (default: the system store); ``tls_verify=False``
    checks nothing (unsafe: for a self-signed origin on a trusted network only);
    ``tls_server_name`` is sent as SNI and checked in the certificate (default: ``host``).
    """

    scheme: str
    host: str
    port: int
    tls_ca: str | None = None
    tls_verify: bool = True
    tls_server_name: str | None = None

    @classmethod
    def parse(
        cls,
        url: str,
        *,
        tls_ca: str | None = None,
        tls_verify: bool = True,
        tls_server_name: str | None = None,
    ) -> Origin:
        """``http://host[:port][/...]`` or ``https://...``; ValueError on anything else."""
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.netloc:
            raise ValueError(f"origin must be an http:// or https:// URL, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"credentials in an origin URL are not supported: {url!r}")
        host = parts.hostname or ""
        if not _valid_host(host):
            raise ValueError(f"origin URL has no valid host: {url!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"origin URL has an invalid port: {url!r}") from None
        if port == 0:
            raise ValueError(f"origin URL has an invalid port: {url!r}")
        if scheme != "https":
            return cls(scheme, host, port or DEFAULT_PORTS[scheme])
        return cls(scheme, host, port or DEFAULT_PORTS[scheme], tls_ca, tls_verify, tls_server_name)

    @property
    def server_name(self) -> str:
        """The name sent as SNI and verified in the origin's certificate."""
        return self.tls_server_name or self.host

    @property
    def authority(self) -> str:
        """``host[:port]`` as a Host header value (port only when not the default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == DEFAULT_PORTS.get(self.scheme):
            return host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


def _valid_host(host: str) -> bool:
    if ":" in host:  # IPv6 literal (urlsplit already removed the brackets)
        return all(c in "0123456789abcdef:." for c in host.split("%", 1)[0])
    return bool(host) and all(c in _HOST_CHARS for c in host)


# --------------------------------------------------------------------------- errors


class UpstreamError(Exception):
    """Fetching from the origin failed; ``status`` is what the edge should answer."""

    status = 502


class ConnectError(UpstreamError):
    """The origin could not be reached (refused, DNS, TLS, connect timeout): fail over."""


class UpstreamTimeout(UpstreamError):
    """Base of the two read timeouts."""

    status = 504


class FirstByteTimeout(UpstreamTimeout):
    """No complete response head within ``first_byte_timeout``."""


class IdleTimeout(UpstreamTimeout):
    """The body (either direction) made no progress for ``idle_timeout``."""


class ProtocolError(UpstreamError):
    """Bad response, connection closed early, or a body shorter than announced."""


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed before any response byte (internal)."""


# --------------------------------------------------------------------------- one exchange


class _Exchange:
    """Response state of one request on a connection; also the httptools callback object."""

    def __init__(self, conn: _Connection, method: str, request_keep_alive: bool) -> None:
        self.conn = conn
        self.head_only = method == "HEAD"
        self.request_keep_alive = request_keep_alive
        self.parser = httptools.HttpResponseParser(self)
        self.received = 0  # raw bytes from the origin for this exchange
        self.raw_head_size = 0  # bytes fed while the head was still incomplete
        self.fields_size = 0  # size of the parsed status line and fields
        self.status = 0
        self.reason_parts: list[bytes] = []
        self.headers: Headers = []
        self.version = "1.1"
        self.headers_done = False
        self.interim = False  # inside a 1xx response
        self.framing: Framing = "eof"
        self.content_length: int | None = None
        self.body_received = 0
        self.keep_alive = False
        self.complete = False
        self.error: BaseException | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None

    # ---- feeding

    def feed(self, data: bytes) -> None:
        head_pending = not self.headers_done
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self.fail(cause if isinstance(cause, UpstreamError) else self._invalid(cause or exc))
        except httptools.HttpParserUpgrade:
            self.fail(ProtocolError(f"origin {self.conn.origin} switched protocols unexpectedly"))
        except httptools.HttpParserError as exc:
            if self.complete:  # bytes after the end of the response: not reusable
                self.conn.poisoned = True
            else:
                self.fail(self._invalid(exc))
        if head_pending and not self.headers_done and self.error is None:
            self.raw_head_size += len(data)
            if self.raw_head_size > MAX_HEAD_SIZE:
                self.fail(self._head_too_large())

    def _invalid(self, exc: BaseException) -> ProtocolError:
        return ProtocolError(f"invalid response from origin {self.conn.origin}: {exc}")

    def _head_too_large(self) -> ProtocolError:
        return ProtocolError(
            f"response head from origin {self.conn.origin} exceeds {MAX_HEAD_SIZE} bytes"
        )

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.conn.poisoned = True
            return
        self.reason_parts.clear()
        self.headers.clear()
        self.fields_size = 0

    def on_status(self, status: bytes) -> None:
        self.fields_size += len(status)
        self.reason_parts.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields_size += len(name) + len(value) + 4
        if self.fields_size > MAX_HEAD_SIZE:
            raise self._head_too_large()
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError(f"origin {self.conn.origin} switched protocols unexpectedly")
            self.interim = True  # 100 Continue, 103 Early Hints...: skipped
            return
        self.status = status
        self.version = self.parser.get_http_version()
        fields = header_map(self.headers)
        self.framing = _response_framing(status, self.head_only, fields)
        self.content_length = _content_length(fields) if self.framing == "length" else None
        self.keep_alive = (
            self.request_keep_alive
            and self.framing != "eof"
            and _persistent(self.version, fields.get("connection", ""))
        )
        self.headers_done = True
        if self.framing == "none":
            self.complete = True
        self.wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # e.g. a body after a HEAD response head: not reusable
            self.conn.poisoned = True
            return
        self.body_received += len(body)
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER:
            self.conn.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.complete:
            self.complete = True
            self.wake()

    # ---- end states

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.complete or self.error is not None:
            return
        if self.headers_done and self.framing == "eof":
            self.complete = True
            self.wake()
            return
        origin = self.conn.origin
        reason = f" ({exc})" if exc else ""
        if self.headers_done:
            expected = f" of {self.content_length}" if self.content_length is not None else ""
            err: BaseException = ProtocolError(
                f"origin {origin} closed the connection after {self.body_received}{expected}"
                f" bytes of the response body{reason}"
            )
        elif self.received == 0 and self.conn.reused:
            err = _StaleConnection()
        elif self.received == 0:
            err = ProtocolError(f"origin {origin} closed the connection without a response{reason}")
        else:
            err = ProtocolError(f"origin {origin} closed the connection inside the response head")
        self.fail(err)

    def fail(self, err: BaseException) -> None:
        """Record the first error, drop the connection and wake whoever waits."""
        if self.error is None and not self.complete:
            self.error = err
        self.conn.abort()
        self.wake()

    # ---- waiting

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(
        self,
        timeout: float | None = None,
        on_timeout: type[UpstreamError] = UpstreamError,
        message: str = "",
    ) -> None:
        """Sleep until the next event (head, body data, end, error).

        After ``timeout`` seconds the exchange fails with ``on_timeout(message)``;
        ``message`` may use ``{origin}`` and ``{timeout}`` (formatted only then).
        """
        waiter = self.waiter = self.conn.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            err = on_timeout(message.format(origin=self.conn.origin, timeout=timeout))
            self.fail(err)
            raise err from None
        finally:
            self.waiter = None

    async def wait_head(self, timeout: float, upload: asyncio.Task[None] | None) -> None:
        """Until the final response head; FirstByteTimeout ``timeout`` s after the request.

        While a streamed body is still going up only the upload's own stall timeout
        applies; the first-byte clock starts once the whole request has been sent.
        """
        while upload is not None and not upload.done() and not self._head_settled():
            await self.wait()
        loop = self.conn.loop
        deadline = loop.time() + timeout
        while not self._head_settled():
            await self.wait(
                max(0.0, deadline - loop.time()),
                FirstByteTimeout,
                f"no response head from origin {{origin}} within {timeout:g}s",
            )
        if not self.headers_done:
            assert self.error is not None
            raise self.error

    def _head_settled(self) -> bool:
        return self.headers_done or self.error is not None

    def take_chunk(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered <= LOW_WATER and self.conn.exchange is self:
            self.conn.resume_reading()
        return chunk


def _response_framing(status: int, head_only: bool, fields: dict[str, str]) -> Framing:
    """How the response body is delimited (RFC 9112 §6.3)."""
    if head_only or status in _NO_BODY_STATUS:
        return "none"
    te = fields.get("transfer-encoding")
    if te is not None:
        return "chunked" if te.rsplit(",", 1)[-1].strip().lower() == "chunked" else "eof"
    if "content-length" in fields:
        return "length"
    return "eof"


def _content_length(fields: dict[str, str]) -> int | None:
    value = fields.get("content-length", "").split(",", 1)[0].strip()
    return int(value) if value.isdigit() else None


def _persistent(version: str, connection: str) -> bool:
    tokens = {t.strip().lower() for t in connection.split(",")}
    if version == "1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


# --------------------------------------------------------------------------- connection


@dataclass(slots=True)
class _Outgoing:
    """A serialised request, ready to be sent (again, if it is replayable)."""

    method: str
    head: bytes
    body: Body
    upload_length: int | None  # declared length of a raw streamed body
    keep_alive: bool  # the request itself does not ask to close

    @property
    def replayable(self) -> bool:
        return self.body is None or isinstance(self.body, bytes | bytearray | memoryview)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an origin; runs one exchange at a time."""

    def __init__(self, pool: OriginPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.upload: asyncio.Task[None] | None = None
        self.upload_ok = True  # the last streamed request body went out whole
        self.reused = False
        self.lost = False
        self.poisoned = False  # unexpected bytes seen: never reuse
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:  # unsolicited bytes on an idle connection (e.g. a 408)
            self.abort()
            return
        self.exchange.feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake_drain()
        if self.exchange is not None:
            self.exchange.connection_lost(exc)
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # ---- control

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.lost and self.transport is not None:
            self.reading_paused = True
            self.pool.stats["pauses"] += 1
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.lost and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    @property
    def usable(self) -> bool:
        transport = self.transport
        return not (self.lost or self.poisoned or transport is None or transport.is_closing())

    def close(self) -> None:
        """Graceful close (idle connection)."""
        self._stop_upload()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Hard close: pending request/response bytes are discarded."""
        self._stop_upload()
        self.poisoned = True
        if self.transport is not None:
            self.transport.abort()

    def _stop_upload(self) -> None:
        upload, self.upload = self.upload, None
        if upload is not None and not upload.done() and upload is not asyncio.current_task():
            upload.cancel()

    # ---- sending

    def send(self, request: _Outgoing) -> tuple[_Exchange, asyncio.Task[None] | None]:
        """Start an exchange: write the head and a bytes body, or start streaming one."""
        self.exchange = _Exchange(self, request.method, request.keep_alive)
        body = request.body
        if body is None or isinstance(body, bytes | bytearray | memoryview):
            if body and len(body) <= 16384:
                self.write(request.head + body)  # one segment for small bodies
            else:
                self.write(request.head)
                self.write(body or b"")
            return self.exchange, None
        self.write(request.head)
        return self.exchange, self.start_upload(body, request.upload_length)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        if data and not self.lost:
            self.transport.write(data)

    def writelines(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        assert self.transport is not None
        if not self.lost:
            self.transport.writelines(parts)

    def start_upload(self, body: AsyncIterable[bytes], length: int | None) -> asyncio.Task[None]:
        self.upload_ok = False
        self.upload = self.loop.create_task(self._upload(body, length))
        return self.upload

    async def _upload(self, body: AsyncIterable[bytes], length: int | None) -> None:
        exchange = self.exchange
        assert exchange is not None
        try:
            sent = await self._send_body(body, length)
            if length is None:
                self.write(b"0\r\n\r\n")
            elif sent != length:
                raise ProtocolError(f"request body was {sent} bytes, Content-Length said {length}")
            self.upload_ok = True
        except asyncio.CancelledError:
            return  # the exchange was closed under us
        except Exception as exc:  # reported to whoever waits on the exchange
            exchange.fail(exc)
        finally:
            exchange.wake()

    async def _send_body(self, body: AsyncIterable[bytes], length: int | None) -> int:
        sent = 0
        async for piece in body:
            if not piece:
                continue
            if self.lost:
                raise ProtocolError(f"origin {self.origin} closed the connection during the upload")
            sent += len(piece)
            if length is None:
                self.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
            elif sent > length:
                raise ProtocolError(f"request body exceeds its Content-Length of {length}")
            else:
                self.write(piece)
            await self.drain()
        return sent

    async def drain(self) -> None:
        if self.lost:
            raise ProtocolError(f"origin {self.origin} closed the connection during the upload")
        if not self.write_paused:
            return
        timeout = self.pool.idle_timeout
        self.drain_waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.drain_waiter
        except TimeoutError:
            raise IdleTimeout(
                f"origin {self.origin} stopped reading the request body for {timeout:g}s"
            ) from None
        finally:
            self.drain_waiter = None
        if self.lost:
            raise ProtocolError(f"origin {self.origin} closed the connection during the upload")

    def _wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# --------------------------------------------------------------------------- response


class UpstreamResponse:
    """A response head plus its streamed body; give the connection back with release()."""

    __slots__ = ("status", "reason", "headers", "version", "_pool", "_conn", "_ex", "_done")

    def __init__(self, pool: OriginPool, conn: _Connection, exchange: _Exchange) -> None:
        self.status: int = exchange.status
        self.reason: str = b"".join(exchange.reason_parts).decode("latin-1")
        self.headers: Headers = list(exchange.headers)
        self.version: str = exchange.version
        self._pool = pool
        self._conn = conn
        self._ex = exchange
        self._done = False  # released or closed

    @property
    def complete(self) -> bool:
        """The whole body has been received from the origin."""
        return self._ex.complete

    @property
    def buffered(self) -> int:
        """Body bytes received but not yet read by the consumer."""
        return self._ex.buffered

    async def read_chunk(self) -> bytes:
        """The next piece of the (de-chunked) body; b"" at the end (then auto-released)."""
        ex = self._ex
        while True:
            if ex.chunks:
                return ex.take_chunk()
            if ex.error is not None:
                raise ex.error
            if ex.complete:
                self.release()
                return b""
            await ex.wait(self._pool.idle_timeout, IdleTimeout, _BODY_STALLED)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read_all(self, limit: int | None = None) -> bytes:
        """The whole body (for small bodies and tests); ProtocolError beyond ``limit``."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if limit is not None and size > limit:
                self.close()
                raise ProtocolError(f"response body from {self._conn.origin} exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: the connection is pooled if reusable, else closed."""
        self._finish(reuse=True)

    def close(self) -> None:
        """Abort: the connection is closed and never reused."""
        self._finish(reuse=False)

    def _finish(self, *, reuse: bool) -> None:
        if self._done:
            return
        self._done = True
        ex = self._ex
        if not ex.complete and ex.error is None:
            ex.error = ProtocolError("response was closed before its end")
        if reuse:
            self._pool._release(self._conn, ex)
        else:
            self._pool._discard(self._conn)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r} from {self._conn.origin}>"


# --------------------------------------------------------------------------- pool


class OriginPool:
    """Keep-alive connections per origin, and the request() entry point."""

    def __init__(
        self,
        *,
        connect_timeout: float = 3.0,
        first_byte_timeout: float = 30.0,
        idle_timeout: float = 30.0,
        max_idle_per_origin: int = 64,
        keepalive_expiry: float = 60.0,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_expiry = keepalive_expiry
        self.ssl = ssl  # for https origins with default trust settings
        self._tls_contexts: dict[tuple[str | None, int, bool], _ssl.SSLContext] = {}
        self.stats: dict[str, int] = {
            "connects": 0,
            "reuses": 0,
            "retries": 0,
            "connect_errors": 0,
            "expired": 0,
            "pauses": 0,
        }
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._live: set[_Connection] = set()
        self._closed = False

    def idle_count(self, origin: Origin | None = None) -> int:
        """Pooled idle connections (for one origin, or all)."""
        if origin is not None:
            return len(self._idle.get(origin, ()))
        return sum(len(q) for q in self._idle.values())

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Headers,
        body: Body = None,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived."""
        if self._closed:
            raise RuntimeError("OriginPool is closed")
        request = _serialise(method, target, headers, body)
        conn = self._take_idle(origin) or await self._connect(origin)
        try:
            return await self._exchange(conn, request)
        except _StaleConnection:
            if not request.replayable:
                raise ProtocolError(
                    f"keep-alive connection to origin {origin} was closed before the response;"
                    " the streamed request body cannot be replayed"
                ) from None
        self.stats["retries"] += 1  # the keep-alive race: once more on a fresh connection
        return await self._exchange(await self._connect(origin), request)

    async def close(self) -> None:
        """Close every connection, idle or in use; further requests raise RuntimeError."""
        self._closed = True
        for conn in list(self._live):
            self._discard(conn)
        self._idle.clear()
        await asyncio.sleep(0)  # let transports run connection_lost

    # ---- internals

    async def _exchange(self, conn: _Connection, request: _Outgoing) -> UpstreamResponse:
        try:
            exchange, upload = conn.send(request)
            await exchange.wait_head(self.first_byte_timeout, upload)
        except BaseException:
            self._discard(conn)
            raise
        return UpstreamResponse(self, conn, exchange)

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            self._cancel_expiry(conn)
            if conn.usable:
                conn.reused = True
                self.stats["reuses"] += 1
                return conn
            self._discard(conn)
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            context = self._ssl_context(origin)
        except (OSError, _ssl.SSLError) as exc:  # tls_ca missing or not a PEM CA file
            self.stats["connect_errors"] += 1
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise ConnectError(
                f"cannot load tls_ca {origin.tls_ca!r} for origin {origin}: {reason}"
            ) from exc
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.server_name if context is not None else None,
                )
        except TimeoutError:
            self.stats["connect_errors"] += 1
            raise ConnectError(
                f"timed out connecting to origin {origin} after {self.connect_timeout:g}s"
            ) from None
        except (OSError, _ssl.SSLError) as exc:
            self.stats["connect_errors"] += 1
            raise ConnectError(f"cannot connect to origin {origin}: {_describe(exc)}") from exc
        self.stats["connects"] += 1
        self._live.add(conn)
        return conn

    def _ssl_context(self, origin: Origin) -> _ssl.SSLContext | None:
        """One client context per trust setting; a changed ``tls_ca`` file is re-read."""
        if origin.scheme != "https":
            return None
        if origin.tls_ca is None and origin.tls_verify:
            if self.ssl is None:
                self.ssl = origin_client_context()
            return self.ssl
        mtime = os.stat(origin.tls_ca).st_mtime_ns if origin.tls_ca else 0
        key = (origin.tls_ca, mtime, origin.tls_verify)
        context = self._tls_contexts.get(key)
        if context is None:
            context = origin_client_context(origin.tls_ca, origin.tls_verify)
            self._tls_contexts = {  # forget contexts made from an older version of the file
                k: v for k, v in self._tls_contexts.items() if k[0] != key[0] or k[1] == mtime
            }
            self._tls_contexts[key] = context
        return context

    def _release(self, conn: _Connection, exchange: _Exchange) -> None:
        reusable = (
            exchange.complete
            and exchange.error is None
            and exchange.keep_alive
            and conn.usable
            and not self._closed
            and self.max_idle_per_origin > 0
        )
        upload = conn.upload
        if reusable and upload is not None and not upload.done():
            # The origin answered before the request body was all sent and wants to keep
            # the connection: finish the upload (RFC 9112 §9.3), then pool it.
            upload.add_done_callback(lambda _: self._release(conn, exchange))
            return
        if not (reusable and conn.upload_ok):
            self._discard(conn)
            return
        conn.exchange = None
        conn.upload = None
        conn.resume_reading()
        idle = self._idle.setdefault(conn.origin, deque())
        while len(idle) >= self.max_idle_per_origin:
            self._discard(idle.popleft())
        idle.append(conn)
        conn.expiry = conn.loop.call_later(self.keepalive_expiry, self._expire, conn)

    def _expire(self, conn: _Connection) -> None:
        conn.expiry = None
        self.stats["expired"] += 1
        self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        """Close a connection and drop it from the pool."""
        self._forget(conn)
        if conn.exchange is not None and not conn.exchange.complete:
            conn.abort()
        else:
            conn.close()

    def _forget(self, conn: _Connection) -> None:
        self._cancel_expiry(conn)
        self._live.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)

    @staticmethod
    def _cancel_expiry(conn: _Connection) -> None:
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None


# --------------------------------------------------------------------------- helpers


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed ({exc.strerror})"
    if isinstance(exc, _ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({exc.verify_message})"
    if isinstance(exc, _ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc})"
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno).lower()
    return str(exc) or type(exc).__name__


def _serialise(method: str, target: str, headers: Headers, body: Body) -> _Outgoing:
    """Validate and serialise a request head (headers as given, plus body framing)."""
    if not method or not set(method) <= _TOKEN_CHARS:
        raise ValueError(f"invalid request method {method!r}")
    if not target or any(c in target for c in " \r\n\t\0"):
        raise ValueError(f"invalid request target {target!r}")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    connection = ""
    for name, value in headers:
        if not name or not set(name) <= _TOKEN_CHARS or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid request header {name!r}: {value!r}")
        lname = name.lower()
        if lname == "content-length" or lname == "transfer-encoding":
            continue  # framing describes the body we send, never a caller's copy
        if lname == "connection":
            connection = f"{connection},{value}"
        lines.append(f"{name}: {value}\r\n")
    upload_length = _add_framing(method, body, lines)
    lines.append("\r\n")
    try:
        head = "".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"request head is not latin-1: {exc}") from None
    return _Outgoing(method, head, body, upload_length, _persistent("1.1", connection))


def _add_framing(method: str, body: Body, lines: list[str]) -> int | None:
    """Frame the body this request sends, from the body itself: bytes get their length, a
    stream its declared ``length`` attribute (checked while it is sent) or chunked coding,
    no body no framing. Returns the declared length of a stream (None: chunked)."""
    if body is None:
        return None
    if isinstance(body, bytes | bytearray | memoryview):
        if len(body) or method not in _BODYLESS_METHODS:
            lines.append(f"Content-Length: {len(body)}\r\n")
        return None
    length = getattr(body, "length", None)
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
        return length
    lines.append("Transfer-Encoding: chunked\r\n")
    return None
