"""HTTPS (TLS + HTTP/2) served by the native front, the application on the asyncio loop.

Why: the Python HTTP/2 server costs about four times what nginx does per request, most of it
in TLS records and h2 framing. The native extension ``verge.http._h2front`` (Rust: rustls,
hyper 0.14, h2; built by ``scripts/build-native.sh``) does that part in a thread of its own
and queues requests; an eventfd wakes this loop, which takes the whole batch, answers the
cache hits synchronously (``app.handle_fast``) with one ``respond()`` call and runs the rest
as tasks (``app.handle`` with :class:`NativeResponseWriter`). The application is the same
one the HTTP/1.1 and Python HTTP/2 servers call, unchanged:

* requests are built by :func:`verge.http.h2server.request_from_fields` from the stream's
  fields, so the target is normalised (:mod:`verge.http.target`) and malformed requests are
  refused (400, 413, 414) exactly as on the other servers;
* request bodies stream through :class:`NativeBody` (a ``QueuedBody``); the native side runs
  at most ``BODY_WINDOW`` bytes ahead of what the application has read;
* responses rendered as HTTP/1.1 wire bytes are split into status + fields with
  :func:`verge.http.h2server.parse_wire_head`; the native head object built from them is
  memoised per rendered head, so a hot cache entry's fields are parsed once.

TLS: the certificate is chosen by SNI from the same certificate set the Python listener uses
(:class:`verge.http.tls.CertSpec`; exact names, ``*.parent`` wildcards, a default), and
:meth:`NativeH2Server.reload` swaps it under a running server. Only ``h2`` is offered by
ALPN on this listener (HTTP/1.1 clients cannot connect); session tickets are per process
(not yet the node's shared key ring), OCSP responses are stapled when configured.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from verge.http.h2server import (
    parse_wire_head,
    request_from_fields,
    request_problem,
    response_fields,
)
from verge.http.message import Request
from verge.http.server import (
    NO_BODY_STATUSES,
    FileResponse,
    ProtocolLimitError,
    QueuedBody,
    ServerLimits,
    simple_response,
)
from verge.http.tls import CertSpec, normalise_host

log = logging.getLogger("verge.native_h2")

try:
    from verge.http import _h2front
except ImportError:  # not built: scripts/build-native.sh
    _h2front = None

BUILD_HINT = "the native HTTP/2 engine is not built: run scripts/build-native.sh"
MAX_CONCURRENT_STREAMS = 100
FILE_CHUNK = 64 * 1024
HEAD_MEMO_SIZE = 4096  # rendered heads remembered (cache entries render theirs once)

# Event kinds from the native side (see native/h2front/src/lib.rs).
REQUEST, DATA, END, GONE, ROOM = range(5)


def available() -> bool:
    """True when the extension is built and importable."""
    return _h2front is not None


# ----- certificates ----------------------------------------------------------------------

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")


def pem_blocks(pem: bytes) -> list[tuple[bytes, bytes]]:
    """(label, DER) of every PEM block, in order."""
    return [
        (label, base64.b64decode(b"".join(body.split()))) for label, body in _PEM_BLOCK.findall(pem)
    ]


def load_cert_parts(spec: CertSpec) -> tuple[list[bytes], bytes, bytes | None]:
    """(chain DERs, key DER, OCSP DER or None) of a CertSpec's files; ValueError if unusable."""
    chain = [
        der
        for label, der in pem_blocks(Path(spec.cert_file).read_bytes())
        if label == b"CERTIFICATE"
    ]
    keys = [
        (label, der)
        for label, der in pem_blocks(Path(spec.key_file).read_bytes())
        if label.endswith(b"PRIVATE KEY")
    ]
    if not chain:
        raise ValueError(f"{spec.cert_file}: no certificate")
    if not keys or keys[0][0] not in _KEY_LABELS:
        raise ValueError(f"{spec.key_file}: no unencrypted private key")
    ocsp = Path(spec.ocsp_response).read_bytes() if spec.ocsp_response else None
    return chain, keys[0][1], ocsp


def native_cert_set(certs: Sequence[CertSpec], default: CertSpec | None):
    """The (entries, default) arguments of the native server's certificate table."""
    entries = [
        ([normalise_host(host) for host in spec.hosts], *load_cert_parts(spec)) for spec in certs
    ]
    return entries, (load_cert_parts(default) if default is not None else None)


# ----- request bodies and response writers --------------------------------------------------


class NativeBody(QueuedBody):
    """A stream's request body; reading gives the native side credit for more."""

    def __init__(self, front: NativeH2Server, stream_id: int) -> None:
        super().__init__(front.loop)
        self._front = front
        self._id = stream_id

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self._front.limits.max_body_bytes:
            self._chunks.clear()
            self._front.native.discard_body(self._id)
            self.fail(ProtocolLimitError(413, "request body too large"))
            return
        self._chunks.append(data)
        self._wake()

    async def read(self) -> bytes:
        """The next chunk, or b'' at the end of the body."""
        data = await self._next()
        if data is None:
            return b""
        self._front.native.ack(self._id, len(data))
        return data


class NativeResponseWriter:
    """The native counterpart of :class:`verge.http.server.ResponseWriter` (the same
    methods the application calls): whole responses in one call, others streamed."""

    __slots__ = (
        "_front",
        "_id",
        "_method",
        "started",
        "finished",
        "status",
        "bytes_sent",
        "keep_alive",
        "_no_body",
    )

    def __init__(self, front: NativeH2Server, stream_id: int, request: Request) -> None:
        self._front = front
        self._id = stream_id
        self._method = request.method
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
        """Send the head. ``reason`` does not exist in HTTP/2 and is ignored."""
        self.started = True
        self.status = status
        self._no_body = self._method == "HEAD" or status in NO_BODY_STATUSES
        self._open(self._front.native.head(status, response_fields(status, headers,
                                                                    content_length)))

    def _open(self, head) -> None:
        native = self._front.native
        if self._no_body:
            native.respond([(self._id, head, b"")])
            self.finished = True
        elif not native.start_stream(self._id, head):
            raise ConnectionResetError("stream closed")

    async def write(self, data: bytes) -> None:
        if not data or self._no_body:
            return
        self.bytes_sent += len(data)
        if self._front.native.send(self._id, bytes(data)):
            await self._front.wait_room(self._id)

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` (pread in chunks)."""
        if self._no_body:
            return
        while count > 0:
            data = os.pread(fd, min(count, FILE_CHUNK), offset)
            if not data:
                raise ConnectionResetError("file shorter than expected")
            await self.write(data)
            offset += len(data)
            count -= len(data)

    def send_prepared(
        self, status: int, data: bytes | tuple[bytes, bytes], body_bytes: int
    ) -> None:
        """Send a response rendered whole as HTTP/1.1 wire bytes."""
        self.started = self.finished = True
        self.status = status
        self.bytes_sent = body_bytes
        self._front.native.respond([self._front.wire_answer(self._id, data, self._method)])

    async def send_file_response(self, status: int, response: FileResponse) -> None:
        """A pre-rendered head, then the file range; closes the fd."""
        self.started = True
        self.status = status
        try:
            head = self._front.head_of(response.head)
            self._no_body = self._method == "HEAD" or head.status in NO_BODY_STATUSES
            self._open(head)
            await self.sendfile(response.fd, response.offset, response.count)
        finally:
            if response.close_fd:
                os.close(response.fd)
        await self.end()
        self.bytes_sent = response.count

    async def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._front.native.finish(self._id)

    def abort(self) -> None:
        """Give up on the response: reset the stream (or a bare 500 if nothing was sent)."""
        self.finished = True
        self._front.native.abort(self._id)


# ----- the server ----------------------------------------------------------------------


class NativeH2Server:
    """The native TLS + HTTP/2 listener feeding ``app`` on this loop."""

    def __init__(
        self,
        app,
        sock,
        limits: ServerLimits,
        certs: Sequence[CertSpec],
        default: CertSpec | None = None,
        *,
        max_streams: int = MAX_CONCURRENT_STREAMS,
    ) -> None:
        if _h2front is None:
            raise RuntimeError(BUILD_HINT)
        self.app = app
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self._bodies: dict[int, NativeBody] = {}
        self._tasks: dict[int, asyncio.Task] = {}
        self._room: dict[int, asyncio.Future] = {}
        self._heads: dict[bytes, object] = {}
        entries, default_parts = native_cert_set(certs, default)
        self.native = _h2front.Server(
            sock.detach(),
            entries,
            default_parts,
            max_streams=max_streams,
            max_header_list=limits.max_header_bytes + 4096,
        )
        self.loop.add_reader(self.native.fileno(), self._on_ready)

    # --- lifecycle ---
    def reload(self, certs: Sequence[CertSpec], default: CertSpec | None = None) -> None:
        """New certificates for new handshakes; raises (and keeps the old set) if one is bad."""
        self.native.set_certs(*native_cert_set(certs, default))

    def set_ticket_keys(self, keys) -> bool:
        """Shared session ticket keys are not supported by the native front yet."""
        return False

    def close(self) -> None:
        """Stop accepting; every connection gets GOAWAY and its streams in flight finish."""
        self.native.shutdown()

    @property
    def connections(self) -> int:
        return self.native.connections()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait (answering requests meanwhile) until every connection is gone."""
        deadline = self.loop.time() + timeout
        while self.native.connections() and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        return not self.native.connections()

    # --- the batch ---
    def _on_ready(self) -> None:
        answers: list = []
        for event in self.native.take():
            kind = event[0]
            if kind == REQUEST:
                self._on_request(event, answers)
            elif kind == DATA:
                body = self._bodies.get(event[1])
                if body is not None:
                    body.feed(event[2])
            elif kind == END:
                body = self._bodies.pop(event[1], None)
                if body is not None:
                    body.finish()
            elif kind == GONE:
                self._on_gone(event[1])
            elif kind == ROOM:
                self._wake_room(event[1])
        if answers:
            self.native.respond(answers)

    def _on_request(self, event: tuple, answers: list) -> None:
        _, stream_id, method, path, authority, headers, has_body, client = event
        fields = [(b":method", method), (b":scheme", b"https")]
        if path is not None:
            fields.append((b":path", path))
        if authority is not None:
            fields.append((b":authority", authority))
        fields.extend(headers)
        request, malformed = request_from_fields(fields, "2", client, "https")
        body = NativeBody(self, stream_id) if has_body else None
        request.body = body
        problem = request_problem(request, malformed, self.limits)
        if problem is not None:
            status, message = problem
            answers.append(
                self.wire_answer(
                    stream_id, simple_response(status, f"{message}\n".encode()), request.method
                )
            )
            if body is not None:
                self.native.discard_body(stream_id)
            return
        if body is None:
            try:
                result = self.app.handle_fast(request)
            except Exception as exc:  # an app bug must not kill the worker
                self.app.report_error(request, exc)
                result = simple_response(500, b"internal error\n")
            if result is not None:
                if type(result) is FileResponse:
                    self._spawn(stream_id, self._run_file(stream_id, request, result))
                else:
                    answers.append(self.wire_answer(stream_id, result, request.method))
                return
        else:
            self._bodies[stream_id] = body
        self._spawn(stream_id, self._run(stream_id, request))

    def _spawn(self, stream_id: int, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks[stream_id] = task
        task.add_done_callback(lambda _t: self._forget(stream_id))

    def _forget(self, stream_id: int) -> None:
        self._tasks.pop(stream_id, None)
        self._room.pop(stream_id, None)
        body = self._bodies.pop(stream_id, None)
        if body is not None and not body.complete:
            self.native.discard_body(stream_id)  # unread: the native side stops reading

    def _on_gone(self, stream_id: int) -> None:
        """The client reset the stream or the connection went away."""
        exc = ConnectionResetError("stream reset by the client")
        body = self._bodies.pop(stream_id, None)
        if body is not None:
            body.fail(exc)
        waiter = self._room.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
            waiter.exception()  # retrieved: the task may be cancelled below
        task = self._tasks.get(stream_id)
        if task is not None and not task.done():
            task.cancel()

    async def wait_room(self, stream_id: int) -> None:
        waiter = self.loop.create_future()
        self._room[stream_id] = waiter
        try:
            await waiter
        finally:
            self._room.pop(stream_id, None)

    def _wake_room(self, stream_id: int) -> None:
        waiter = self._room.get(stream_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- responses ---
    def head_of(self, head: bytes):
        """The native head for an HTTP/1.1-rendered head (memoised per rendered head)."""
        native_head = self._heads.get(head)
        if native_head is None:
            status, fields = parse_wire_head(head)
            native_head = self.native.head(status, fields)
            if len(self._heads) >= HEAD_MEMO_SIZE:
                self._heads.clear()
            self._heads[head] = native_head
        return native_head

    def wire_answer(self, stream_id: int, data, method: str) -> tuple:
        """(id, head, body) for ``respond`` from HTTP/1.1 wire bytes or (wire, more body)."""
        extra = b""
        if type(data) is tuple:
            data, extra = data
        end = data.find(b"\r\n\r\n")
        head = data[:end] if end >= 0 else data
        body = data[end + 4 :] if end >= 0 else b""
        native_head = self.head_of(bytes(head))
        if method == "HEAD" or native_head.status in NO_BODY_STATUSES:
            return stream_id, native_head, b""
        if extra:
            body = (bytes(body), bytes(extra))
        return stream_id, native_head, body

    async def _run(self, stream_id: int, request: Request) -> None:
        writer = NativeResponseWriter(self, stream_id, request)
        try:
            await self.app.handle(request, writer)
            if writer.started:
                await writer.end()
            else:
                writer.send_prepared(500, simple_response(500, b"no response\n"), 0)
        except (asyncio.CancelledError, ConnectionError):
            writer.abort()
        except ProtocolLimitError as exc:
            self._answer_error(writer, exc.status, f"{exc}\n".encode())
        except Exception as exc:
            self.app.report_error(request, exc)
            self._answer_error(writer, 500, b"internal error\n")

    async def _run_file(self, stream_id: int, request: Request, result: FileResponse) -> None:
        writer = NativeResponseWriter(self, stream_id, request)
        try:
            await writer.send_file_response(0, result)
        except (asyncio.CancelledError, ConnectionError, OSError):
            writer.abort()

    @staticmethod
    def _answer_error(writer: NativeResponseWriter, status: int, body: bytes) -> None:
        if writer.started:
            writer.abort()
        else:
            writer.send_prepared(status, simple_response(status, body), len(body))


async def serve_native_h2(
    app, sock, limits: ServerLimits, certs: Sequence[CertSpec], default: CertSpec | None = None
) -> NativeH2Server:
    """Serve ``app`` over TLS + HTTP/2 (native engine) on a bound, listening socket."""
    return NativeH2Server(app, sock, limits, certs, default)
