"""HTTP/3 server: aioquic's QUIC + H3 state machines behind the edge's application interface.

Why: the edge pipeline is written once against the HTTP/1.1 application interface of
:mod:`verge.http.server` (``handle_fast`` returning wire bytes, ``handle`` writing through a
ResponseWriter). This module serves that SAME application over HTTP/3 (QUIC, UDP), exactly as
:mod:`verge.http.h2server` does for HTTP/2, so the edge needs no change:

* every request stream becomes a :class:`~verge.http.message.Request` (version ``"3"``,
  scheme ``"https"``, ``host`` from ``:authority``); a request body is collected from DATA
  frames into :class:`H3RequestBody` (same interface as ``RequestBody``), capped at
  ``ServerLimits.max_body_bytes`` (QUIC flow control itself is managed by aioquic);
* ``handle_fast`` results (HTTP/1.1 wire bytes, ``(head, body)`` or :class:`FileResponse`)
  are re-framed with :func:`~verge.http.h2server.parse_wire_head`: HEADERS, then DATA;
* :class:`H3ResponseWriter` has the ResponseWriter methods; a writer waits while its stream
  holds more than ``HIGH_WATER`` unacknowledged bytes in aioquic's send buffer.

:func:`serve_h3` binds the UDP socket itself with SO_REUSEPORT so that several worker
processes can share one port (the kernel spreads datagrams by 4-tuple hash).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.h3.exceptions import H3Error
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset

from verge.http.h2server import (
    StreamDispatch,
    StreamResponseWriter,
    parse_wire_head,
    request_from_fields,
    request_problem,
)
from verge.http.message import Request
from verge.http.server import (
    NO_BODY_STATUSES,
    BodyStream,
    ProtocolLimitError,
    ServerLimits,
    simple_response,
)

H3_INTERNAL_ERROR = 0x102  # RFC 9114 §8.1
H3_REQUEST_CANCELLED = 0x10C


class H3RequestBody(BodyStream):
    """A stream's request body: same interface as :class:`verge.http.server.RequestBody`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future | None = None
        self.received = 0
        self.complete = False
        self.error: Exception | None = None

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if data:
            self._chunks.append(data)
            self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._chunks.clear()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk, or b'' at the end of the body."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._chunks.popleft()



class _Stream:
    """Per-stream state: the request, its body, whether the response ended or was reset."""

    __slots__ = ("id", "request", "body", "ended", "reset", "task")

    def __init__(self, stream_id: int, request: Request, body: H3RequestBody | None) -> None:
        self.id = stream_id
        self.request = request
        self.body = body
        self.ended = False
        self.reset = False
        self.task: asyncio.Task | None = None


# The writer is protocol-neutral: it drives the protocol's send_head / queue_data / wait_room /
# send_file_range / send_wire / send_file_response / queue_end, which H3ServerProtocol provides.
H3ResponseWriter = StreamResponseWriter


class H3ServerProtocol(StreamDispatch, QuicConnectionProtocol):
    """One QUIC connection speaking HTTP/3; ``app`` and ``limits`` are set by the factory."""

    HIGH_WATER = 256 * 1024  # unacknowledged bytes per stream before an async writer waits
    DRAIN_POLL = 0.005  # aioquic has no "data acknowledged" event, so waiting writers poll

    def __init__(self, *args, app, limits: ServerLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.app = app
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.http = H3Connection(self._quic)
        self._streams: dict[int, _Stream] = {}
        self.client = ""

    # ----- input ---------------------------------------------------------------------------
    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            self._on_reset(event.stream_id)
        elif isinstance(event, ConnectionTerminated):
            for stream_id in list(self._streams):
                self._on_reset(stream_id)
        try:
            h3_events = self.http.handle_event(event)
        except H3Error:
            self._quic.close(error_code=H3_INTERNAL_ERROR, reason_phrase="h3 error")
            self.transmit()
            return
        for h3_event in h3_events:
            self._on_h3_event(h3_event)

    def _on_h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self._on_request(event)
            elif event.stream_ended and stream.body is not None:  # trailers end the body
                stream.body.finish()
        elif isinstance(event, DataReceived):
            self._on_data(event)

    def _on_request(self, event: HeadersReceived) -> None:
        if not self.client:
            peer = self._transport.get_extra_info("peername") if self._transport else None
            self.client = peer[0] if peer else ""
        request, authority_ok = request_from_fields(event.headers, "3", self.client, "https")
        body = None if event.stream_ended else H3RequestBody(self.loop)
        request.body = body
        stream = _Stream(event.stream_id, request, body)
        self._streams[event.stream_id] = stream
        problem = request_problem(request, authority_ok, self.limits)
        if problem is not None:
            status, reason = problem
            self.send_wire(stream, simple_response(status, f"{reason}\n".encode()))
            return
        self._dispatch(stream)

    def _on_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        body = stream.body if stream is not None else None
        if body is None:
            return
        if body.error is None:
            if body.received + len(event.data) > self.limits.max_body_bytes:
                body.fail(ProtocolLimitError(413, "request body too large"))
            else:
                body.feed(event.data)
        if event.stream_ended:
            body.finish()
            if stream.ended:
                self._streams.pop(stream.id, None)

    def _on_reset(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        stream.reset = True
        if stream.body is not None:
            stream.body.fail(ConnectionResetError("stream reset by the client"))
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    # ----- dispatch: StreamDispatch, with these codes --------------------------------------
    CANCEL_CODE = H3_REQUEST_CANCELLED
    INTERNAL_ERROR_CODE = H3_INTERNAL_ERROR

    def _after_handler(self, stream: _Stream) -> None:
        """Nothing to do: QUIC ends or resets the stream on its own."""

    # ----- output --------------------------------------------------------------------------
    def send_head(
        self, stream: _Stream, status: int, fields: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        if stream.reset:
            raise ConnectionResetError("stream closed")
        self.http.send_headers(
            stream.id, [(b":status", b"%d" % status), *fields], end_stream=end_stream
        )
        if end_stream:
            self._stream_done(stream)
        self.transmit()

    def send_body(self, stream: _Stream, data: bytes, end_stream: bool = False) -> None:
        if stream.reset:
            raise ConnectionResetError("stream closed")
        self.http.send_data(stream.id, data, end_stream=end_stream)
        if end_stream:
            self._stream_done(stream)
        self.transmit()

    def send_end(self, stream: _Stream) -> None:
        if not stream.ended and not stream.reset:
            self.send_body(stream, b"", end_stream=True)

    def send_wire(
        self, stream: _Stream, data: bytes | tuple[bytes, bytes], end_stream: bool = True
    ) -> None:
        """Send an HTTP/1.1-rendered response (head + optional body) as HEADERS + DATA."""
        if stream.reset:
            return
        extra = b""
        if type(data) is tuple:
            data, extra = data
        head, _, body = data.partition(b"\r\n\r\n")
        status, fields = parse_wire_head(head)
        no_body = stream.request.method == "HEAD" or status in NO_BODY_STATUSES
        payload = b"" if no_body else body + extra
        if not payload:
            self.send_head(stream, status, fields, end_stream=end_stream or no_body)
            return
        self.send_head(stream, status, fields, end_stream=False)
        self.send_body(stream, payload, end_stream=end_stream)

    def _unacked(self, stream: _Stream) -> int:
        quic_stream = self._quic._streams.get(stream.id)
        if quic_stream is None:
            return 0
        sender = quic_stream.sender
        return sender._buffer_stop - sender._buffer_start

    def queue_data(self, stream: _Stream, data: bytes) -> None:
        self.send_body(stream, data)

    def queue_end(self, stream: _Stream) -> None:
        self.send_end(stream)

    async def wait_room(self, stream: _Stream, high: int | None = None) -> None:
        """Wait until at most ``high`` (default HIGH_WATER) bytes await acknowledgement.

        ``high=0`` (the end of a response) does not wait: QUIC retransmits on its own.
        """
        if high == 0:
            return
        while self._unacked(stream) > self.HIGH_WATER:
            if stream.reset:
                raise ConnectionResetError("stream closed")
            await asyncio.sleep(self.DRAIN_POLL)
        if stream.reset:
            raise ConnectionResetError("stream closed")

    def _stream_done(self, stream: _Stream) -> None:
        stream.ended = True
        if stream.body is None or stream.body.complete:
            self._streams.pop(stream.id, None)

    def reset(self, stream: _Stream, code: int) -> None:
        """Abandon the response: RESET_STREAM (and STOP_SENDING for an unread body)."""
        self._streams.pop(stream.id, None)
        if stream.reset or stream.ended:
            return
        stream.reset = True
        with contextlib.suppress(Exception):
            self._quic.reset_stream(stream.id, code)
        self.transmit()


def _udp_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def quic_configuration(ssl_cert_file: str, ssl_key_file: str) -> QuicConfiguration:
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(ssl_cert_file, ssl_key_file)
    return config


async def serve_h3(
    app,
    host: str,
    port: int,
    ssl_cert_file: str,
    ssl_key_file: str,
    limits: ServerLimits,
    *,
    reuse_port: bool = True,
) -> QuicServer:
    """Serve ``app`` over HTTP/3 on UDP ``host:port``; returns the server (``.close()``)."""
    configuration = quic_configuration(ssl_cert_file, ssl_key_file)

    def create_protocol(*args, **kwargs) -> H3ServerProtocol:
        return H3ServerProtocol(*args, app=app, limits=limits, **kwargs)

    loop = asyncio.get_running_loop()
    sock = _udp_socket(host, port, reuse_port)
    _, server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=configuration, create_protocol=create_protocol),
        sock=sock,
    )
    return server


def server_port(server: QuicServer) -> int:
    """The UDP port a server from :func:`serve_h3` listens on (useful with port 0)."""
    return server._transport.get_extra_info("sockname")[1]
