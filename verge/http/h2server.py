"""HTTP/2 server: the h2 sans-I/O state machine behind a thin asyncio.Protocol.

Why: the edge pipeline is written once against the application interface of
:mod:`verge.http.server` (``handle_fast`` returning a protocol-neutral
:class:`~verge.http.response.Response`, ``handle`` writing through a writer). This module
serves that SAME application over HTTP/2, so TLS+ALPN ``h2`` and cleartext prior-knowledge
``h2c`` need no change in the edge:

* every stream becomes a :class:`~verge.http.message.Request` (version ``"2"``, ``host``
  from ``:authority``); request bodies stream through :class:`H2RequestBody`, which gives
  flow-control credit back only as the application consumes (bounded memory per stream);
* a Response becomes HEADERS (its fields memoised on it: a hot entry's Response is reused)
  and DATA from its body (bytes, a file range, or an async source);
* :class:`H2ResponseWriter` has the ResponseWriter methods; outgoing DATA respects the
  peer's stream and connection windows and max frame size, waiting for WINDOW_UPDATE.

Protections (DoS): SETTINGS_MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE (HPACK bombs), a cap
on buffered header-block bytes and h2's CONTINUATION backlog (CONTINUATION flood), rate caps
on client RST_STREAM (rapid reset, CVE-2023-44487), PING and SETTINGS frames, each answered
with GOAWAY ENHANCE_YOUR_CALM. Any protocol error becomes GOAWAY + close; nothing escapes
into the event loop. :meth:`H2ServerProtocol.close_gracefully` drains for reloads.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import re
import time
from collections import deque

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from verge.compat import h2 as h2_compat
from verge.http import hpack_memo
from verge.http.message import Request, known_host
from verge.http.response import Response, write_body
from verge.http.server import (
    CLOCK,
    FRAMING_FIELDS,
    NO_BODY_STATUSES,
    ProtocolLimitError,
    QueuedBody,
    ServerLimits,
    adopt_transport,
    release_transport,
    text_response,
)
from verge.http.target import BadTarget, normalize_target

# Connection-specific fields are forbidden in HTTP/2 (RFC 9113 §8.2.2).
CONNECTION_FIELDS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
DROPPED_RESPONSE_FIELDS = CONNECTION_FIELDS | {b"te"}
FILE_CHUNK = 64 * 1024


class RateCap:
    """Counts events in one-second windows; ``hit()`` is True once the cap is exceeded."""

    __slots__ = ("limit", "count", "start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.start = time.monotonic()

    def hit(self) -> bool:
        now = time.monotonic()
        if now - self.start >= 1.0:
            self.start, self.count = now, 0
        self.count += 1
        return self.count > self.limit


class H2RequestBody(QueuedBody):
    """A stream's request body: same interface as :class:`verge.http.server.RequestBody`.

    Flow-control credit is returned (WINDOW_UPDATE) only when the consumer reads a chunk, so
    a peer can never buffer more than the stream window in this process.
    """

    def __init__(self, proto: H2ServerProtocol, stream_id: int) -> None:
        super().__init__(proto.loop)
        self._proto = proto
        self._stream_id = stream_id
        self.unacked = 0

    def feed(self, data: bytes, flow_length: int) -> None:
        self.received += len(data)
        if not data:
            self._proto.acknowledge(self._stream_id, flow_length)
            return
        self._chunks.append((data, flow_length))
        self.unacked += flow_length
        self._wake()

    def discard(self) -> int:
        """Drop buffered chunks; returns their flow-controlled length (to acknowledge)."""
        pending, self.unacked = self.unacked, 0
        self._chunks.clear()
        return pending

    async def read(self) -> bytes:
        """The next chunk, or b'' at the end of the body."""
        item = await self._next()
        if item is None:
            return b""
        data, flow_length = item
        self.unacked -= flow_length
        self._proto.acknowledge(self._stream_id, flow_length)
        return data


class _Stream:
    """Per-stream state: the request, its body and the outgoing DATA not yet sent."""

    __slots__ = (
        "id",
        "request",
        "body",
        "outbox",
        "out_bytes",
        "end_pending",
        "ended",
        "reset",
        "waiter",
        "task",
        "rst_after_end",
    )

    def __init__(self, stream_id: int, request: Request, body: H2RequestBody | None) -> None:
        self.id = stream_id
        self.request = request
        self.body = body
        self.outbox: deque[memoryview] = deque()
        self.out_bytes = 0
        self.end_pending = False
        self.ended = False  # END_STREAM sent
        self.reset = False  # RST_STREAM sent or received
        self.waiter: asyncio.Future | None = None
        self.task: asyncio.Task | None = None
        self.rst_after_end = False  # request body unread: RST(NO_ERROR) after the response


def response_fields(status: int, headers: list[tuple[str, str]],
                    content_length: int | None) -> list[tuple[bytes, bytes]]:
    """A response head's fields for HTTP/2 and HTTP/3 (the Python and native engines): lower
    case, connection-specific fields dropped, Content-Length ours."""
    fields = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]
    fields = [(n, v) for n, v in fields if n not in DROPPED_RESPONSE_FIELDS and n != b"content-length"]
    if content_length is not None and status not in NO_BODY_STATUSES:
        fields.append((b"content-length", b"%d" % content_length))
    return fields


def fields_of(response: Response) -> list[tuple[bytes, bytes]]:
    """A Response's HTTP/2 and HTTP/3 fields, memoised on it (a hot entry's is reused)."""
    fields = response.fields
    if fields is None:
        fields = response.fields = response_fields(response.status, response.headers,
                                                   response.length)
    return fields


class WriterState(abc.ABC):
    """What the stream writers (HTTP/2 and /3 here, the native front's in
    :mod:`verge.http.native_h2`) share: the state the application and the access log read,
    `start`, and the way a streamed response is sent through the writer's own ``_send_head``,
    ``write`` and ``end``."""

    __slots__ = (
        "_method", "started", "finished", "status", "bytes_sent", "keep_alive", "_no_body",
    )

    def __init__(self, method: str) -> None:
        self._method = method
        self.started = False
        self.finished = False
        self.status = 0
        self.bytes_sent = 0
        self.keep_alive = True
        self._no_body = False

    def start(
        self,
        status: int,
        headers: list[tuple[str, str]],
        *,
        content_length: int | None = None,
        reason: str | None = None,
    ) -> None:
        """Send the head. ``reason`` does not exist in HTTP/2 and /3 and is ignored."""
        self.started = True
        self.status = status
        self._no_body = self._method == "HEAD" or status in NO_BODY_STATUSES
        self._send_head(status, response_fields(status, headers, content_length))

    @abc.abstractmethod
    def _send_head(self, status: int, fields: list[tuple[bytes, bytes]]) -> None:
        """Put the head on the wire (and end the stream when ``_no_body``)."""

    def _sent_whole(self, status: int) -> None:
        """A whole response went out in one piece."""
        self.started = self.finished = True
        self.status = status

    async def _send_streamed(self, response: Response) -> None:
        """The head, the streamed body, the end; the body is discarded whatever happens."""
        self.start(response.status, response.headers, content_length=response.length)
        try:
            await write_body(self, response.body)
        finally:
            response.discard()
        await self.end()


class StreamResponseWriter(WriterState):
    """The HTTP/2 and HTTP/3 counterpart of :class:`verge.http.server.ResponseWriter`.

    Protocol-neutral: it calls the connection's send_head, send_whole, queue_data,
    wait_room, send_file_range and queue_end for its stream.
    """

    __slots__ = ("_proto", "_stream")

    def __init__(self, proto, stream) -> None:
        WriterState.__init__(self, stream.request.method)
        self._proto = proto
        self._stream = stream

    def _send_head(self, status: int, fields: list[tuple[bytes, bytes]]) -> None:
        self._proto.send_head(self._stream, status, fields, end_stream=self._no_body)
        if self._no_body:
            self.finished = True

    async def write(self, data: bytes) -> None:
        if not data or self._no_body:
            return
        self.bytes_sent += len(data)
        self._proto.queue_data(self._stream, data)
        await self._proto.wait_room(self._stream)

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` (pread in chunks; no zero-copy:
        every piece is framed)."""
        if self._no_body:
            return
        await self._proto.send_file_range(self._stream, fd, offset, count)
        self.bytes_sent += count

    async def send(self, response: Response) -> None:
        """Send a whole response: HEADERS (+ DATA) at once for a bytes body, else HEADERS
        and the streamed body."""
        if response.streamed:
            await self._send_streamed(response)
            return
        self._sent_whole(response.status)
        if response.body and self._method != "HEAD" \
                and response.status not in NO_BODY_STATUSES:
            self.bytes_sent = len(response.body)
        self._proto.send_whole(self._stream, response)

    async def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._proto.queue_end(self._stream)
        await self._proto.wait_room(self._stream, 0)


H2ResponseWriter = StreamResponseWriter


REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # a token in lower case
_WHITESPACE = (0x20, 0x09)
_NAMES_SEEN = 1024  # valid field names remembered (names repeat; values do not)
_valid_names: set[bytes] = set()


def field_problem(name: bytes, value: bytes) -> str | None:
    """Why a regular request field makes the request malformed (RFC 9113 §8.2), or None."""
    if name not in _valid_names:
        if not _FIELD_NAME.match(name):
            return f"invalid field name {name[:40]!r}"
        if name in CONNECTION_FIELDS:
            return f"connection-specific field {name.decode()}"
        if b"_" in name and name.replace(b"_", b"-").decode() in FRAMING_FIELDS:
            return f"ambiguous framing field {name.decode()}"
        if name != b"te" and len(_valid_names) < _NAMES_SEEN:
            _valid_names.add(name)
    if name == b"te" and value != b"trailers":
        return "te other than trailers"
    if b"\r" in value or b"\n" in value or b"\0" in value:
        return f"CR, LF or NUL in {name.decode()}"
    if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE):
        return f"whitespace around the value of {name.decode()}"
    return None


def request_from_fields(headers, version: str, client: str,
                        scheme: str) -> tuple[Request, str | BadTarget | None]:
    """A Request from HTTP/2 or HTTP/3 header fields (pseudo-headers, cookie crumbs joined
    with "; " — RFC 9113 §8.2.3, RFC 9114 §4.2.1), and why it is malformed, if it is.

    The checks of RFC 9113 §8.2-8.3 (and RFC 9114 §4.2-4.3, the same rules) in one pass over
    the fields, done here rather than by h2 (its validation makes ~10 generator passes and
    was a fifth of the cost of a request).
    """
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[str, str]] = []
    cookies: list[str] = []
    problem: str | None = None
    for name, value in headers:
        if name[:1] == b":":
            if fields or cookies:
                problem = problem or "pseudo-header after a regular field"
            elif name not in REQUEST_PSEUDO or name in pseudo:
                problem = problem or f"unknown or repeated pseudo-header {name.decode()}"
            pseudo[name] = value
            continue
        if problem is None:
            problem = field_problem(name, value)
        if name == b"cookie":
            cookies.append(value.decode("latin-1"))
        else:
            fields.append((name.decode("latin-1"), value.decode("latin-1")))
    if cookies:
        fields.append(("cookie", "; ".join(cookies)))
    host = next((v for n, v in fields if n == "host"), None)
    authority = pseudo.get(b":authority")
    if authority is not None and host is None:
        fields.insert(0, ("host", authority.decode("latin-1")))
    path = pseudo.get(b":path")
    method = pseudo.get(b":method", b"GET").decode("latin-1")
    target = path.decode("latin-1") if path is not None else None
    problem = problem or _pseudo_problem(pseudo, host)
    if problem is None:
        try:  # the one normal form every decision uses (verge.http.target)
            target = normalize_target(method, target)[0]
        except BadTarget as exc:
            problem = exc
        if not known_host(host if host is not None else authority.decode("latin-1")):
            problem = problem or "invalid :authority or host"
    request = Request(method, target, headers=fields, version=version, client=client)
    request.scheme = scheme
    return request, problem


def _pseudo_problem(pseudo: dict[bytes, bytes], host: str | None) -> str | None:
    method, path = pseudo.get(b":method"), pseudo.get(b":path")
    authority = pseudo.get(b":authority")
    if method is None or path is None or b":scheme" not in pseudo:
        return "request needs :method, :scheme and :path"
    if not (path[:1] == b"/" or (path == b"*" and method == b"OPTIONS")):
        return "invalid :path"
    if authority is None and host is None:
        return "request needs :authority or host"
    if authority is not None and host is not None and host.encode("latin-1") != authority:
        return "host differs from :authority"
    return None


def request_problem(request: Request, malformed: str | BadTarget | None,
                    limits: ServerLimits) -> tuple[int, str] | None:
    """(status, reason) when a stream's request must be refused before it is dispatched."""
    if isinstance(malformed, BadTarget):
        return malformed.status, str(malformed)
    if malformed is not None:
        return 400, f"malformed request: {malformed}"
    if len(request.target) > limits.max_url_bytes:
        return 414, "request URL too long"
    length = request.header("content-length")
    if request.body is not None and length and length.isdigit() and \
            int(length) > limits.max_body_bytes:
        return 413, "request body too large"
    return None


class StreamDispatch:
    """Per-stream request handling shared by HTTP/2 and HTTP/3 connections.

    The connection class provides ``app``, ``loop``, ``send_whole``, ``queue_data``,
    ``queue_end``, ``wait_room``, ``reset(stream, code)``, ``_after_handler(stream)`` and the
    two error codes.
    """

    CANCEL_CODE: int
    INTERNAL_ERROR_CODE: int

    def _dispatch(self, stream) -> None:
        request = stream.request
        if stream.body is None:
            try:
                result = self.app.handle_fast(request)
            except Exception as exc:  # an app bug must not kill the worker
                self._report_error(request, exc)
                result = text_response(500, "internal error\n")
            if result is not None:
                self._send_fast(stream, result)
                return
        stream.task = self.loop.create_task(self._run(stream))

    def _send_fast(self, stream, response: Response) -> None:
        if response.streamed:
            stream.task = self.loop.create_task(self._run_send(stream, response))
        else:
            self.send_whole(stream, response)

    async def _run_send(self, stream, response: Response) -> None:
        try:
            await StreamResponseWriter(self, stream).send(response)
        except (ConnectionError, OSError, asyncio.CancelledError):
            self.reset(stream, self.INTERNAL_ERROR_CODE)

    async def _run(self, stream) -> None:
        writer = StreamResponseWriter(self, stream)
        request = stream.request
        try:
            await self.app.handle(request, writer)
            if writer.started:
                await writer.end()
            else:
                self.send_whole(stream, text_response(500, "no response\n"))
        except (asyncio.CancelledError, ConnectionError):
            self.reset(stream, self.CANCEL_CODE)
        except ProtocolLimitError as exc:
            self._answer_error(stream, writer, exc.status, f"{exc}\n")
        except Exception as exc:
            self._report_error(request, exc)
            self._answer_error(stream, writer, 500, "internal error\n")
        self._after_handler(stream)

    async def send_file_range(self, stream, fd: int, offset: int, count: int) -> None:
        while count > 0:
            data = os.pread(fd, min(count, FILE_CHUNK), offset)
            if not data:
                raise ConnectionResetError("file shorter than expected")
            self.queue_data(stream, data)
            offset += len(data)
            count -= len(data)
            await self.wait_room(stream)

    def _answer_error(self, stream, writer: StreamResponseWriter, status: int,
                      message: str) -> None:
        if writer.started or stream.reset:
            self.reset(stream, self.INTERNAL_ERROR_CODE)
        else:
            self.send_whole(stream, text_response(status, message))

    def _report_error(self, request: Request, exc: Exception) -> None:
        report = getattr(self.app, "report_error", None)
        if report is not None:
            with contextlib.suppress(Exception):
                report(request, exc)


class H2ServerProtocol(StreamDispatch, asyncio.Protocol):
    """One HTTP/2 connection (TLS with ALPN h2, or cleartext prior knowledge)."""

    MAX_CONCURRENT_STREAMS = 100
    STREAM_WINDOW = 256 * 1024  # per-stream receive window (request bodies)
    CONNECTION_WINDOW = 1024 * 1024
    MAX_RESETS_PER_SECOND = 100  # client RST_STREAMs (rapid reset)
    MAX_PINGS_PER_SECOND = 50
    MAX_SETTINGS_PER_SECOND = 20
    HIGH_WATER = 64 * 1024  # per-stream bytes queued before an async writer waits

    def __init__(self, app, limits: ServerLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.limits = limits
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.scheme = "http"
        self.gate = None  # the connection gate that counted this connection (adopt_transport)
        self.max_header_list_size = limits.max_header_bytes + 4096
        self.conn = self._new_connection()
        self._streams: dict[int, _Stream] = {}
        self._blocked: set[int] = set()
        self._closing = False
        self._batching = False  # handling one read's events: _flush waits (see _flush)
        self._draining = False
        self._last_accepted = 2**31 - 1
        self._write_paused = False
        self._paused_since = 0.0
        self._since = CLOCK.mono
        self._resets = RateCap(self.MAX_RESETS_PER_SECOND)
        self._pings = RateCap(self.MAX_PINGS_PER_SECOND)
        self._settings = RateCap(self.MAX_SETTINGS_PER_SECOND)

    def _new_connection(self) -> h2.connection.H2Connection:
        # Inbound fields are checked in one pass by request_from_fields (RFC 9113 §8.2);
        # outbound ones are ours, already lower-cased and stripped of connection-specific
        # fields (response_fields): h2 need not check either again.
        config = h2_compat.server_configuration()  # validation off: see verge.compat.h2
        conn = h2.connection.H2Connection(config=config)
        codes = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: self.MAX_CONCURRENT_STREAMS,
                codes.MAX_HEADER_LIST_SIZE: self.max_header_list_size,
                codes.INITIAL_WINDOW_SIZE: self.STREAM_WINDOW,
                codes.ENABLE_PUSH: 0,
            },
        )
        conn.decoder.max_header_list_size = self.max_header_list_size
        hpack_memo.install(conn)
        return conn

    # ----- connection lifecycle -------------------------------------------------------
    def connection_made(self, transport) -> None:
        if not adopt_transport(self, transport):  # the shared sweeper enforces our timeouts
            return
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(self.CONNECTION_WINDOW - 65535)
        self._flush()

    def connection_lost(self, exc) -> None:
        release_transport(self)
        self._closing = True
        for stream in list(self._streams.values()):
            self._kill_stream(stream, ConnectionResetError("client closed the connection"))
        self._streams.clear()

    def close(self) -> None:
        if not self._closing and self.transport is not None:
            self._closing = True
            self._write_out()
            self.transport.close()

    def close_gracefully(self) -> None:
        """GOAWAY(NO_ERROR): finish the streams already accepted, refuse new ones, close."""
        if self._closing or self._draining:
            return
        self._draining = True
        self._last_accepted = self.conn.highest_inbound_stream_id
        self._write_out()
        self._write_goaway(self._last_accepted, ErrorCodes.NO_ERROR)
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self._draining and not self._streams:
            self.close()

    def _write_goaway(self, last_stream_id: int, code: int, debug: bytes = b"") -> None:
        """A raw GOAWAY frame: h2's own close_connection() would refuse all later frames."""
        frame = GoAwayFrame(
            0, last_stream_id=last_stream_id, error_code=code, additional_data=debug
        )
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame.serialize())

    def _abort(self, code: int, message: str) -> None:
        """GOAWAY with an error and close (protocol errors, floods)."""
        if self._closing:
            return
        report = getattr(self.app, "report_protocol_error", None)
        if report is not None:
            with contextlib.suppress(Exception):
                report(self.client, 400, f"http2: {message}")
        with contextlib.suppress(Exception):
            self.conn.data_to_send()  # drop half-built output of the failed state machine
        self._write_goaway(self.conn.highest_inbound_stream_id, code, message.encode()[:200])
        self._closing = True
        for stream in list(self._streams.values()):
            self._kill_stream(stream, ConnectionResetError(message))
        self._streams.clear()
        if self.transport is not None:
            self.transport.close()

    # ----- input --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._since = CLOCK.mono
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._abort(int(exc.error_code), str(exc) or type(exc).__name__)
            return
        except Exception as exc:  # hpack and frame decoding errors not wrapped by h2
            self._abort(ErrorCodes.PROTOCOL_ERROR, f"bad frame: {exc}")
            return
        self._batching = True
        try:
            for event in events:
                self._on_event(event)
                if self._closing:
                    return
        except h2.exceptions.ProtocolError as exc:
            self._abort(int(exc.error_code), str(exc))
            return
        except Exception as exc:  # our bug: lose the connection, not the worker
            self._abort(ErrorCodes.INTERNAL_ERROR, f"internal error: {exc!r}")
            return
        finally:
            self._batching = False
        if self._header_block_bytes() > self.max_header_list_size:
            self._abort(ErrorCodes.ENHANCE_YOUR_CALM, "header block too large")
            return
        self._write_out()

    def _header_block_bytes(self) -> int:
        """Bytes of a HEADERS + CONTINUATION sequence still waiting for END_HEADERS."""
        return h2_compat.pending_header_block_bytes(self.conn)

    def _on_event(self, event) -> None:
        kind = type(event)
        if kind is h2.events.RequestReceived:
            self._on_request(event)
        elif kind is h2.events.DataReceived:
            self._on_data(event)
        elif kind is h2.events.StreamEnded:
            stream = self._streams.get(event.stream_id)
            if stream is not None and stream.body is not None:
                stream.body.finish()
                if stream.ended:
                    self._streams.pop(stream.id, None)
                    self._close_if_drained()
        elif kind is h2.events.WindowUpdated:
            self._on_window_update(event.stream_id)
        elif kind is h2.events.StreamReset:
            self._on_reset(event)
        elif kind is h2.events.PingReceived:
            if self._pings.hit():
                self._abort(ErrorCodes.ENHANCE_YOUR_CALM, "PING flood")
        elif kind is h2.events.RemoteSettingsChanged:
            if self._settings.hit():
                self._abort(ErrorCodes.ENHANCE_YOUR_CALM, "SETTINGS flood")
            else:
                self._on_window_update(0)  # window size or frame size may have grown
        elif kind is h2.events.ConnectionTerminated:
            self._draining = True
            self._last_accepted = min(self._last_accepted, self.conn.highest_inbound_stream_id)
            self._close_if_drained()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._draining and stream_id > self._last_accepted:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        request, malformed = request_from_fields(event.headers, "2", self.client, self.scheme)
        body = None if event.stream_ended is not None else H2RequestBody(self, stream_id)
        request.body = body
        stream = _Stream(stream_id, request, body)
        self._streams[stream_id] = stream
        problem = request_problem(request, malformed, self.limits)
        if problem is not None:
            self._reject(stream, *problem)
            return
        self._dispatch(stream)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        body = stream.body if stream is not None else None
        if body is None or body.error is not None or stream.reset:
            self.acknowledge(event.stream_id, event.flow_controlled_length)
            return
        if body.received + len(event.data) > self.limits.max_body_bytes:
            self.acknowledge(event.stream_id, event.flow_controlled_length + body.discard())
            body.fail(ProtocolLimitError(413, "request body too large"))
            return
        body.feed(event.data, event.flow_controlled_length)

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is not None:
            stream.reset = True
            self._kill_stream(stream, ConnectionResetError("stream reset by the client"))
        if event.remote_reset and self._resets.hit():
            self._abort(ErrorCodes.ENHANCE_YOUR_CALM, "RST_STREAM flood (rapid reset)")
        self._close_if_drained()

    def _kill_stream(self, stream: _Stream, exc: Exception) -> None:
        """Fail the body reader and writer of a stream that is gone, and cancel its task."""
        self._blocked.discard(stream.id)
        stream.reset = True
        if stream.body is not None:
            pending = stream.body.discard()
            stream.body.fail(exc)
            if pending and not self._closing:
                self.acknowledge(stream.id, pending)
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_exception(exc)
            stream.waiter.exception()  # mark retrieved: the task may be cancelled below
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    def acknowledge(self, stream_id: int, length: int) -> None:
        """Return flow-control credit for consumed request-body bytes."""
        if length <= 0 or self._closing:
            return
        try:
            self.conn.acknowledge_received_data(length, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    # ----- dispatch: StreamDispatch, with these codes -------------------------------------
    CANCEL_CODE = ErrorCodes.CANCEL
    INTERNAL_ERROR_CODE = ErrorCodes.INTERNAL_ERROR

    def _after_handler(self, stream: _Stream) -> None:
        """Unread request body: give its credit back and end the stream once answered."""
        body = stream.body
        if body is None or body.complete or stream.reset:
            return
        self.acknowledge(stream.id, body.discard())
        body.fail(ConnectionResetError("response already sent"))
        if stream.ended:
            self.reset(stream, ErrorCodes.NO_ERROR)
        else:
            stream.rst_after_end = True

    def _reject(self, stream: _Stream, status: int, message: str) -> None:
        self.send_whole(stream, text_response(status, f"{message}\n"))
        if stream.body is not None:
            self._after_handler(stream)

    # ----- output -----------------------------------------------------------------------------
    def send_head(
        self, stream: _Stream, status: int, fields: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        if stream.reset or self._closing:
            raise ConnectionResetError("stream closed")
        try:
            self.conn.send_headers(
                stream.id, [(b":status", b"%d" % status), *fields], end_stream=end_stream
            )
        except h2.exceptions.ProtocolError as exc:
            self._lost_stream(stream)
            raise ConnectionResetError("stream closed") from exc
        if end_stream:
            self._stream_done(stream)
        self._flush()

    def send_whole(self, stream: _Stream, response: Response) -> None:
        """Send a response with a bytes body (or none) as HEADERS + DATA, END_STREAM on the
        last frame; nothing when the stream is gone."""
        if stream.reset or self._closing:
            return
        status, body = response.status, response.body
        try:
            if not body or stream.request.method == "HEAD" or status in NO_BODY_STATUSES:
                self.send_head(stream, status, fields_of(response), end_stream=True)
                return
            self.send_head(stream, status, fields_of(response), end_stream=False)
            stream.end_pending = True  # END_STREAM rides on the last DATA frame
            self.queue_data(stream, body)
        except ConnectionResetError:
            return

    def queue_data(self, stream: _Stream, data: bytes) -> None:
        if stream.reset or self._closing:
            raise ConnectionResetError("stream closed")
        stream.outbox.append(memoryview(data))
        stream.out_bytes += len(data)
        self._pump(stream)
        self._flush()

    def queue_end(self, stream: _Stream) -> None:
        if stream.reset or stream.ended or self._closing:
            return
        stream.end_pending = True
        self._pump(stream)
        self._flush()

    async def wait_room(self, stream: _Stream, high: int | None = None) -> None:
        """Wait until at most ``high`` bytes of the stream are queued (default HIGH_WATER)."""
        limit = self.HIGH_WATER if high is None else high
        while not stream.ended and (
            stream.out_bytes > limit or self._write_paused or (limit == 0 and stream.end_pending)
        ):
            if stream.reset or self._closing:
                raise ConnectionResetError("stream closed")
            stream.waiter = self.loop.create_future()
            try:
                await stream.waiter
            finally:
                stream.waiter = None
        if stream.reset and not stream.ended:
            raise ConnectionResetError("stream closed")

    def _pump(self, stream: _Stream) -> None:
        """Move queued DATA into h2 as far as the windows, frame size and socket allow."""
        try:
            self._pump_frames(stream)
        except h2.exceptions.ProtocolError:  # the peer closed the stream meanwhile
            self._lost_stream(stream)
            return
        self._wake(stream)

    def _lost_stream(self, stream: _Stream) -> None:
        self._streams.pop(stream.id, None)
        self._kill_stream(stream, ConnectionResetError("stream closed"))
        self._close_if_drained()

    def _pump_frames(self, stream: _Stream) -> None:
        conn = self.conn
        while stream.outbox and not self._write_paused:
            window = min(conn.local_flow_control_window(stream.id), conn.max_outbound_frame_size)
            if window <= 0:
                break
            chunk = stream.outbox[0]
            if len(chunk) <= window:
                stream.outbox.popleft()
            else:
                stream.outbox[0] = chunk[window:]
                chunk = chunk[:window]
            stream.out_bytes -= len(chunk)
            last = stream.end_pending and not stream.outbox
            conn.send_data(stream.id, chunk, end_stream=last)
            if last:
                self._stream_done(stream)
        if stream.outbox:
            self._blocked.add(stream.id)
        else:
            self._blocked.discard(stream.id)
            if stream.end_pending and not stream.ended:
                conn.end_stream(stream.id)
                self._stream_done(stream)

    def _wake(self, stream: _Stream) -> None:
        waiter = stream.waiter
        if waiter is None or waiter.done():
            return
        if stream.ended or (stream.out_bytes <= self.HIGH_WATER and not self._write_paused):
            waiter.set_result(None)

    def _stream_done(self, stream: _Stream) -> None:
        """END_STREAM sent: forget the stream unless its request body is still arriving."""
        stream.ended = True
        self._blocked.discard(stream.id)
        if stream.rst_after_end:
            self.reset(stream, ErrorCodes.NO_ERROR)
        body = stream.body
        if body is None or body.complete or stream.reset:
            self._streams.pop(stream.id, None)
        self._close_if_drained()

    def reset(self, stream: _Stream, code: int) -> None:
        """Send RST_STREAM for a stream we give up on (or whose body we will not read)."""
        self._streams.pop(stream.id, None)
        if stream.reset or self._closing:
            return
        stream.reset = True
        self._blocked.discard(stream.id)
        with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.conn.reset_stream(stream.id, code)
        self._flush()
        self._close_if_drained()

    def _on_window_update(self, stream_id: int) -> None:
        if stream_id:
            stream = self._streams.get(stream_id)
            if stream is not None and stream.id in self._blocked:
                self._pump(stream)
            return
        for blocked_id in list(self._blocked):
            stream = self._streams.get(blocked_id)
            if stream is None:
                self._blocked.discard(blocked_id)
            else:
                self._pump(stream)

    def _flush(self) -> None:
        """Write out what h2 has to send, except while a read's events are being handled:
        then data_received writes once at the end, so the frames answering one read (often
        many requests) leave in one write and, over TLS, one record instead of three each."""
        if not self._batching:
            self._write_out()

    def _write_out(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # ----- transport back-pressure ---------------------------------------------------------
    def pause_writing(self) -> None:
        """The socket is full: stop producing DATA and stop reading (no PING/SETTINGS acks
        pile up for a peer that does not read)."""
        self._write_paused = True
        self._paused_since = CLOCK.mono
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()
        self._on_window_update(0)
        for stream in list(self._streams.values()):
            self._wake(stream)
        self._flush()

    # ----- timeouts --------------------------------------------------------------------------
    def check_timeouts(self, now: float) -> None:
        """Called by the shared sweeper (verge.http.server.sweep_forever) once a second."""
        limits = self.limits
        if self._write_paused and now - self._paused_since > limits.send_timeout:
            self._abort(ErrorCodes.NO_ERROR, "send timeout")
        elif self._header_block_bytes() and now - self._since > limits.header_timeout:
            self._abort(ErrorCodes.NO_ERROR, "header timeout")
        elif not self._streams and now - self._since > limits.keepalive_timeout:
            self.close_gracefully()
