"""HTTPS (TLS + HTTP/2 and HTTP/1.1) served by the native front, the application on the
asyncio loop.

Why: the Python HTTP/2 server costs about four times what nginx does per request, most of it
in TLS records and h2 framing. The native extension ``verge.http._h2front`` (Rust: rustls,
hyper 0.14, h2; built by ``scripts/build-native.sh``) does that part in a thread of its own
and queues requests; an eventfd wakes this loop, which takes the whole batch, answers the
cache hits synchronously (``app.handle_fast``) with one ``respond()`` call and runs the rest
as tasks (``app.handle`` with :class:`NativeResponseWriter`). The application is the same
one the HTTP/1.1 and Python HTTP/2 servers call, unchanged:

* HTTP/2 requests are built by :func:`verge.http.h2server.request_from_fields` from the
  stream's fields, HTTP/1.1 ones by :func:`request_from_http1` with the rules of
  :mod:`verge.http.server` (one Host, normalised target, 400/413/414/431/501 refusals), so
  both are refused exactly as on the other servers;
* request bodies stream through :class:`NativeBody` (a ``QueuedBody``); the native side runs
  at most ``BODY_WINDOW`` bytes ahead of what the application has read;
* a :class:`~verge.http.response.Response` becomes a native head object (status + fields,
  :func:`verge.http.h2server.fields_of`), memoised on the Response, so a hot cache entry's
  head is built once; it serves both protocols (hyper frames HTTP/1.1 itself: Content-Length
  or chunked, keep-alive, ``Connection: close`` when asked);
* an HTTP/1.1 WebSocket upgrade is accepted with :meth:`NativeH1ResponseWriter.upgrade`,
  which returns a :class:`NativeUpgradedStream` (what :mod:`verge.edge.tunnel` splices).

TLS: ALPN offers ``h2`` and ``http/1.1`` (no ALPN: HTTP/1.1). The certificate is chosen by
SNI from the same certificate set the Python listener uses (:class:`verge.http.tls.CertSpec`;
exact names, ``*.parent`` wildcards, a default), and :meth:`NativeH2Server.reload` swaps it
under a running server. Session tickets are sealed with the node's shared keys
(:meth:`NativeH2Server.set_ticket_keys`, the input of ``TlsStore.set_ticket_keys``), so every
worker resumes every other's sessions; OCSP responses are stapled when configured.

Protection: timeouts from :class:`~verge.http.server.ServerLimits` (handshake and HTTP/1.1
head: ``header_timeout``; idle: ``keepalive_timeout``; a request body that stops arriving:
``body_timeout``, 408; a client that stops reading: ``send_timeout``), the HTTP/1.1 head
limits (the field count follows from ``max_header_bytes``, as on the Python server), the
HTTP/2 flood caps of :class:`verge.http.h2server.H2ServerProtocol`, enforced natively
(native/h2front/src/guard.rs), and the application's connection gate
(``app.connection_gate``, the per-address cap of :mod:`verge.edge.protect`): while there is
one, each accepted connection is admitted or closed by it before its TLS handshake, and
counted until it closes, as the Python listeners count theirs.

``Expect: 100-continue`` (HTTP/1.1): the 100 is sent when the application starts reading
the body (:class:`NativeBody`), so a request refused unread never gets one.
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
    H2ServerProtocol,
    WriterState,
    fields_of,
    request_from_fields,
    request_problem,
)
from verge.http.message import Request, known_host, set_host
from verge.http.response import Response
from verge.http.server import (
    FRAMING_FIELDS,
    NO_BODY_STATUSES,
    ProtocolLimitError,
    QueuedBody,
    ServerLimits,
    text_response,
)
from verge.http.target import BadTarget, normalize_target
from verge.http.tls import CertSpec, normalise_host
from verge.http.tls_tickets import TicketKey

log = logging.getLogger("verge.native_h2")

try:
    from verge.http import _h2front
except ImportError:  # not built: scripts/build-native.sh
    _h2front = None

BUILD_HINT = "the native HTTP/2 engine is not built: run scripts/build-native.sh"
MAX_CONCURRENT_STREAMS = 100
FILE_CHUNK = 64 * 1024

# Event kinds from the native side (see native/h2front/src/lib.rs).
REQUEST, DATA, END, GONE, ROOM, OPEN, CLOSED = range(7)
# A request event's body state: none, one, one sent on 100 Continue (once read).
NO_BODY, BODY, BODY_ON_READ = range(3)
MIN_FIELD_BYTES = 5  # the smallest field as ServerLimits.max_header_bytes counts it: "a:" + 4
HEAD_SLACK = 4096  # request line and framing of a head, over the URL and field limits


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


# ----- limits --------------------------------------------------------------------------------


def native_limits(limits: ServerLimits) -> dict[str, float | int]:
    """The native server's timeouts and HTTP/2 flood caps: the Python servers' values.

    The TLS handshake gets ``header_timeout``, as on the Python TLS listener (alpn.py); the
    caps are :class:`H2ServerProtocol`'s (the native side adds its own for WINDOW_UPDATE,
    empty DATA, PRIORITY and the resets the server is made to send). The Python server
    counts header bytes, not fields (each at least ``MIN_FIELD_BYTES``): more fields than
    fit in ``max_header_bytes`` are refused (431) by hyper, fewer reach the byte check here.
    """
    return {
        "handshake_timeout": limits.header_timeout,
        "header_timeout": limits.header_timeout,
        "keepalive_timeout": limits.keepalive_timeout,
        "body_timeout": limits.body_timeout,
        "send_timeout": limits.send_timeout,
        "max_header_fields": limits.max_header_bytes // MIN_FIELD_BYTES,
        "max_head_bytes": limits.max_url_bytes + limits.max_header_bytes + HEAD_SLACK,
        "resets_per_second": H2ServerProtocol.MAX_RESETS_PER_SECOND,
        "dropped_per_second": H2ServerProtocol.MAX_RESETS_PER_SECOND,
        "pings_per_second": H2ServerProtocol.MAX_PINGS_PER_SECOND,
        "settings_per_second": H2ServerProtocol.MAX_SETTINGS_PER_SECOND,
    }


# ----- HTTP/1.1 requests ----------------------------------------------------------------------


def request_from_http1(
    method: bytes,
    target: bytes,
    fields: list[tuple[bytes, bytes]],
    version: str,
    client: str,
    limits: ServerLimits,
) -> tuple[Request, tuple[int, str] | None]:
    """A Request from an HTTP/1.x head hyper parsed, and (status, reason) if it must be
    refused: the checks :class:`verge.http.server.HttpServerProtocol` makes on top of its
    parser, in its order (URL 414, fields 431, target, Host, framing 400/501, body 413).

    hyper already refused what llhttp refuses (bad syntax, obs-fold, differing
    Content-Lengths, Content-Length with Transfer-Encoding, chunked on HTTP/1.0, more fields
    than ``max_header_bytes`` can hold: 431).
    """
    headers: list[tuple[str, str]] = []
    hmap: dict[str, str] = {}
    size = 0
    problem: tuple[int, str] | None = None
    for raw_name, raw_value in fields:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        size += len(raw_name) + len(raw_value) + 4
        headers.append((name, value))
        if "_" in name and name.replace("_", "-") in FRAMING_FIELDS:
            problem = problem or (400, f"ambiguous framing field {name}")
        if name in hmap:
            if name == "host":
                problem = problem or (400, "exactly one Host header is required")
            hmap[name] = hmap[name] + ", " + value
        else:
            hmap[name] = value
    method_name, raw_target = method.decode("latin-1"), target.decode("latin-1")
    if len(target) > limits.max_url_bytes:
        problem = (414, "request URL too long")
    elif size > limits.max_header_bytes:
        problem = (431, "request header fields too large")
    normal, authority = raw_target, None
    if problem is None:
        try:
            normal, authority = normalize_target(method_name, raw_target)
        except BadTarget as exc:
            problem = (exc.status, str(exc))
    if authority is not None:  # absolute-form: its authority is the host (RFC 9112 §3.2.2)
        headers = set_host(headers, hmap, authority)
    elif problem is None and not known_host(hmap.get("host")):
        problem = (400, "invalid Host header")
    request = Request(method_name, normal, None, None, headers, version, client, None, hmap)
    request.scheme = "https"
    request.keep_alive = _keeps_alive(version, hmap)
    return request, problem or _framing_problem(version, hmap, limits)


def _keeps_alive(version: str, hmap: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in hmap.get("connection", "").split(",")}
    if "upgrade" in hmap and "upgrade" in tokens:
        return False  # unless accepted, the answer closes the connection
    return "close" not in tokens if version == "1.1" else "keep-alive" in tokens


def _framing_problem(version: str, hmap: dict[str, str], limits) -> tuple[int, str] | None:
    """server.py's Host and body-framing rules (Content-Length with Transfer-Encoding is
    refused by hyper already: native/h2front/patches/hyper-0.14.19-verge.patch)."""
    if "host" not in hmap and version == "1.1":
        return 400, "exactly one Host header is required"
    te = hmap.get("transfer-encoding")
    if te is not None and "content-length" in hmap:
        return 400, "both Transfer-Encoding and Content-Length"
    if te is not None and te.strip().lower() != "chunked":
        return 501, "unsupported transfer-coding"
    length = hmap.get("content-length", "").strip()
    if length.isdigit() and int(length) > limits.max_body_bytes:
        return 413, "request body too large"
    return None


# ----- request bodies and response writers --------------------------------------------------


class NativeBody(QueuedBody):
    """A stream's request body; reading gives the native side credit for more. A body sent
    on ``100 Continue`` (``on_read``) is asked for at the first read, as the Python server's
    :class:`~verge.http.server.RequestBody` sends its 100 then."""

    def __init__(self, front: NativeH2Server, stream_id: int, on_read: bool = False) -> None:
        super().__init__(front.loop)
        self._front = front
        self._id = stream_id
        self._on_read = on_read

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
        if self._on_read:
            self._on_read = False
            self._front.native.start_body(self._id)
        data = await self._next()
        if data is None:
            return b""
        self._front.native.ack(self._id, len(data))
        return data


class NativeResponseWriter(WriterState):
    """The native counterpart of :class:`verge.http.server.ResponseWriter` (the same
    methods the application calls): whole responses in one call, others streamed."""

    __slots__ = ("_front", "_id")

    def __init__(self, front: NativeH2Server, stream_id: int, request: Request) -> None:
        WriterState.__init__(self, request.method)
        self._front = front
        self._id = stream_id

    def _send_head(self, status: int, fields: list[tuple[bytes, bytes]]) -> None:
        native = self._front.native
        head = native.head(status, fields)
        close = not self.keep_alive  # HTTP/1.1 only: Connection: close
        if self._no_body:
            native.respond([(self._id, head, b"", close)])
            self.finished = True
        elif not native.start_stream(self._id, head, close):
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

    async def send(self, response: Response) -> None:
        """Send a whole response: one ``respond`` for a bytes body, else the head and the
        streamed body."""
        if response.streamed:
            await self._send_streamed(response)
            return
        self._sent_whole(response.status)
        answer = self._front.answer(self._id, response, self._method, not self.keep_alive)
        self.bytes_sent = len(answer[2])
        self._front.native.respond([answer])

    async def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._front.native.finish(self._id)

    def abort(self) -> None:
        """Give up on the response: reset the stream (or a bare 500 if nothing was sent)."""
        self.finished = True
        self._front.native.abort(self._id)


class NativeH1ResponseWriter(NativeResponseWriter):
    """The writer of an HTTP/1.1 request: the HTTP/2 one plus :meth:`upgrade` (its presence
    is what :func:`verge.edge.tunnel.wants_tunnel` looks for)."""

    __slots__ = ("_request",)

    def __init__(self, front: NativeH2Server, stream_id: int, request: Request) -> None:
        super().__init__(front, stream_id, request)
        self._request = request
        self.keep_alive = request.keep_alive

    def upgrade(self, headers: list[tuple[str, str]]) -> NativeUpgradedStream:
        """Accept the request's ``Upgrade``: send the 101 with ``headers`` and take over the
        connection. RuntimeError if the request was not an upgrade or a response started."""
        request = self._request
        if (
            self.started
            or request.version != "1.1"
            or "upgrade" not in request.hmap
            or request.body is not None
        ):
            raise RuntimeError("not an upgrade request, or the response has started")
        self.started = self.finished = True
        self.status = 101
        self.keep_alive = False
        fields = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers
            if name.lower() not in FRAMING_FIELDS
        ]
        front = self._front
        stream = NativeUpgradedStream(front, self._id)
        front._bodies[self._id] = stream
        if not front.native.upgrade(self._id, front.native.head(101, fields)):
            front._bodies.pop(self._id, None)
            raise ConnectionResetError("client gone")
        return stream


class NativeUpgradedStream(QueuedBody):
    """The connection after ``101 Switching Protocols``: raw bytes both ways (the native
    counterpart of :class:`verge.http.server.UpgradedStream`).

    ``read()`` returns the next bytes (b'' once the client has closed its side); the native
    side reads at most ``BODY_WINDOW`` bytes ahead. ``write()`` queues, ``drain()`` waits
    while too much is queued, ``close()`` closes the connection after the queued bytes.
    """

    def __init__(self, front: NativeH2Server, stream_id: int) -> None:
        super().__init__(front.loop)
        self._front = front
        self._id = stream_id
        self._full = False
        self.closed = False

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        self._chunks.append(data)
        self._wake()

    def feed_eof(self) -> None:
        self.finish()

    async def read(self) -> bytes:
        data = await self._next()
        if data is None:
            return b""
        self._front.native.ack(self._id, len(data))
        return data

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("connection closed")
        if data and self._front.native.send(self._id, bytes(data)):
            self._full = True

    async def drain(self) -> None:
        if self.error is not None:
            raise ConnectionResetError("connection closed")
        if self._full:
            self._full = False
            await self._front.wait_room(self._id)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._front.native.abort(self._id)


# ----- the server ----------------------------------------------------------------------


class NativeH2Server:
    """The native TLS listener (HTTP/2 and HTTP/1.1 by ALPN) feeding ``app`` on this loop."""

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
        self._admitted: dict[int, tuple] = {}  # connection id: (the gate that counted it, client)
        entries, default_parts = native_cert_set(certs, default)
        self.native = _h2front.Server(
            sock.detach(),
            entries,
            default_parts,
            max_streams=max_streams,
            max_header_list=limits.max_header_bytes + 4096,
            limits=self._native_limits(),
        )
        self.loop.add_reader(self.native.fileno(), self._on_ready)

    # --- lifecycle ---
    def reload(self, certs: Sequence[CertSpec], default: CertSpec | None = None) -> None:
        """New certificates for new handshakes; raises (and keeps the old set) if one is bad.

        The timeouts follow ``limits`` too, read once the current callback is done: the
        worker reloads certificates first and updates the shared limits right after.
        """
        self.native.set_certs(*native_cert_set(certs, default))
        self.loop.call_soon(self.apply_limits)

    def apply_limits(self) -> None:
        """Push the current ``limits`` (timeouts, head limits) and whether the application
        has a connection gate to the native side, for new connections."""
        self.native.set_limits(self._native_limits())

    def _native_limits(self) -> dict[str, float | int | bool]:
        gated = getattr(self.app, "connection_gate", None) is not None
        return {**native_limits(self.limits), "connection_gate": gated}

    def set_ticket_keys(self, keys: Sequence[TicketKey]) -> bool:
        """Seal session tickets with ``keys[0]``, accept tickets sealed with any of ``keys``
        (the node's shared keys, as ``TlsStore.set_ticket_keys``). Tickets of this listener
        and of the Python one (OpenSSL's format) do not resume on each other."""
        self.native.set_ticket_keys([key.to_bytes() for key in keys])
        return True

    def close(self) -> None:
        """Stop accepting; every HTTP/2 connection gets GOAWAY, every HTTP/1.1 one closes
        after its response in flight (idle ones at once); requests in flight finish."""
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
        verdicts: list = []
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
            elif kind == OPEN:
                verdicts.append((event[1], self._admit(event[1], event[2])))
            elif kind == CLOSED:
                self._release(event[1])
        if answers:
            self.native.respond(answers)
        if verdicts:
            for late in self.native.admit(verdicts):  # the connection stopped waiting
                self._release(late)

    # --- the connection gate ---
    def _admit(self, conn_id: int, client: str) -> bool:
        """The application's connection gate on a new connection (no gate: admitted,
        uncounted). Refusals count in the gate (``verge_connections_refused_by_cap``)."""
        gate = getattr(self.app, "connection_gate", None)
        if gate is None:
            return True
        if not gate.opened(client):
            return False
        self._admitted[conn_id] = (gate, client)
        return True

    def _release(self, conn_id: int) -> None:
        counted = self._admitted.pop(conn_id, None)
        if counted is not None:
            gate, client = counted
            gate.closed(client)

    def _on_request(self, event: tuple, answers: list) -> None:
        _, stream_id, method, path, authority, headers, body, client, version = event
        if version != "2":
            request, problem = request_from_http1(
                method, path, headers, version, client, self.limits
            )
            if body != NO_BODY:
                request.body = self._http1_body(stream_id, request, body == BODY_ON_READ)
            self._dispatch(stream_id, request, problem, answers)
            return
        fields = [(b":method", method), (b":scheme", b"https")]
        if path is not None:
            fields.append((b":path", path))
        if authority is not None:
            fields.append((b":authority", authority))
        fields.extend(headers)
        request, malformed = request_from_fields(fields, "2", client, "https")
        request.body = NativeBody(self, stream_id) if body != NO_BODY else None
        problem = request_problem(request, malformed, self.limits)
        self._dispatch(stream_id, request, problem, answers)

    def _http1_body(self, stream_id: int, request: Request, on_read: bool) -> NativeBody:
        body = NativeBody(self, stream_id, on_read)
        length = request.hmap.get("content-length", "")
        if length.isdigit() and "transfer-encoding" not in request.hmap:
            body.length = int(length)
        return body

    def _dispatch(
        self,
        stream_id: int,
        request: Request,
        problem: tuple[int, str] | None,
        answers: list,
    ) -> None:
        """Refuse the request, answer it from ``handle_fast``, or start its task."""
        body = request.body
        if problem is not None:
            status, message = problem
            refusal = text_response(status, f"{message}\n", close=request.version != "2")
            answers.append(self.answer(stream_id, refusal, request.method))
            if body is not None:
                self.native.discard_body(stream_id)
            return
        if body is None:
            try:
                result = self.app.handle_fast(request)
            except Exception as exc:  # an app bug must not kill the worker
                self.app.report_error(request, exc)
                result = text_response(500, "internal error\n")
            if result is not None:
                if result.streamed:
                    self._spawn(stream_id, self._run_send(stream_id, request, result))
                else:
                    answers.append(self.answer(stream_id, result, request.method))
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
        if isinstance(body, NativeUpgradedStream):
            body.close()  # the handler is done with the connection
        elif body is not None and not body.complete:
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
    def answer(self, stream_id: int, response: Response, method: str, close: bool = False) -> tuple:
        """(id, head, body[, close]) for ``respond``: a Response with a bytes body (or none);
        ``close`` (or ``response.close``) closes an HTTP/1.1 connection after it."""
        head = response.native
        if head is None:
            head = response.native = self.native.head(response.status, fields_of(response))
        body = response.body
        if method == "HEAD" or response.status in NO_BODY_STATUSES or not body:
            body = b""
        if close or response.close:
            return stream_id, head, body, True
        return stream_id, head, body

    def _writer(self, stream_id: int, request: Request) -> NativeResponseWriter:
        if request.version == "2":
            return NativeResponseWriter(self, stream_id, request)
        return NativeH1ResponseWriter(self, stream_id, request)

    async def _run(self, stream_id: int, request: Request) -> None:
        writer = self._writer(stream_id, request)
        try:
            await self.app.handle(request, writer)
            if writer.started:
                await writer.end()
            else:
                await writer.send(text_response(500, "no response\n"))
        except (asyncio.CancelledError, ConnectionError):
            writer.abort()
        except ProtocolLimitError as exc:
            await self._answer_error(writer, exc.status, f"{exc}\n")
        except Exception as exc:
            self.app.report_error(request, exc)
            await self._answer_error(writer, 500, "internal error\n")

    async def _run_send(self, stream_id: int, request: Request, response: Response) -> None:
        writer = self._writer(stream_id, request)
        try:
            await writer.send(response)
        except (asyncio.CancelledError, ConnectionError, OSError):
            writer.abort()

    @staticmethod
    async def _answer_error(writer: NativeResponseWriter, status: int, message: str) -> None:
        """As the Python server: the error answered (HTTP/1.1: and the connection closed,
        its request body possibly unread), or the response reset if it has started."""
        if writer.started:
            writer.abort()
        else:
            await writer.send(text_response(status, message, close=True))


async def serve_native_h2(
    app, sock, limits: ServerLimits, certs: Sequence[CertSpec], default: CertSpec | None = None
) -> NativeH2Server:
    """Serve ``app`` over TLS, HTTP/2 and HTTP/1.1 (native engine), on a bound, listening
    socket."""
    return NativeH2Server(app, sock, limits, certs, default)
