"""Raw-socket HTTP/1.1 tools for request smuggling tests: a recording origin and a byte client.

Smuggling bugs live in the gap between how two parsers frame the same bytes. To see that gap
the test needs an origin that frames requests itself, strictly and visibly, and records
exactly what arrived: a request per Content-Length or chunked message, with its head, its
de-chunked body and the raw framing bytes. A library server (http.server, h11) would hide the
evidence by rejecting, normalising or silently resynchronising. Anything that a strict
HTTP/1.1 reader could not frame is recorded too, as a request with a ``problem``.

The client side sends exact bytes (no library between the test and the edge) and splits what
comes back into responses, so a test can say "one write, three answers, in this order".
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
FIELD_LINE = re.compile(rb"(" + TOKEN + rb"):[ \t]*(.*?)[ \t]*")
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
MAX_HEAD = 64 * 1024
POLL = 0.1  # seconds between checks of the stop flag while a socket is idle

# What a recorded request's ``problem`` says when the sender gave up half-way: the origin
# never acted on it, so it is not a request that reached the application.
ABORTED = "connection closed mid-request"
# How the body of the origin's own 400 (for what it could not frame) begins.
ORIGIN_FAILURE = "recording origin could not frame the request:"


@dataclass
class RecordedRequest:
    """One request as the origin framed it (or failed to: then ``problem`` says why)."""

    number: int  # 1-based, across all connections of this origin
    connection: int  # 1-based index of the TCP connection it came on
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes  # de-chunked
    wire_body: bytes = b""  # the body bytes exactly as framed on the wire
    framing: str = "none"  # "none", "length" or "chunked"
    chunk_extensions: list[bytes] = field(default_factory=list)
    trailers: list[bytes] = field(default_factory=list)
    problem: str | None = None
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        """The first field called ``name`` (any case), or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def describe(self) -> str:
        text = (
            f"#{self.number} conn{self.connection} {self.method} {self.target} body={self.body!r}"
        )
        if self.chunk_extensions:
            text += f" extensions={self.chunk_extensions!r}"
        if self.problem:
            text += f" PROBLEM={self.problem}"
        return text + f" head={self.raw_head!r}"


class _Closed(Exception):
    """The peer closed; ``partial`` when it did so in the middle of a message."""

    def __init__(self, partial: bool) -> None:
        super().__init__("peer closed")
        self.partial = partial


class _Malformed(Exception):
    """Bytes a strict HTTP/1.1 reader cannot frame."""


class _Stalled(Exception):
    """A message started and then no byte came for the stall period."""


class _Wire:
    """Buffered reads from one socket: patient between messages, impatient inside one."""

    def __init__(self, sock: socket.socket, stall: float, stopping: threading.Event) -> None:
        self.sock = sock
        self.stall = stall
        self.stopping = stopping
        self.buf = bytearray()
        self.taken = bytearray()  # everything handed out for the current message

    def _more(self, patient: bool) -> None:
        deadline = None if patient else time.monotonic() + self.stall
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if deadline is not None and time.monotonic() > deadline:
                    raise _Stalled() from None
                continue
            except OSError:
                break
            if not data:
                break
            self.buf += data
            return
        raise _Closed(partial=bool(self.buf) or bool(self.taken))

    def _take(self, size: int) -> bytes:
        data = bytes(self.buf[:size])
        del self.buf[:size]
        self.taken += data
        return data

    def until(self, marker: bytes, limit: int, patient: bool = False) -> bytes:
        """Bytes up to and including ``marker``."""
        while True:
            index = self.buf.find(marker)
            if index >= 0:
                return self._take(index + len(marker))
            if len(self.buf) > limit:
                raise _Malformed(f"no {marker!r} within {limit} bytes")
            self._more(patient and not self.buf and not self.taken)

    def exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._more(False)
        return self._take(size)


@dataclass
class _Head:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]


def parse_head(head: bytes) -> _Head:
    """A request head (ending in CRLFCRLF) parsed strictly; _Malformed says what is wrong."""
    lines = head[:-4].split(b"\r\n")
    match = REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise _Malformed(f"bad request line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise _Malformed(f"obs-fold line {line!r}")
        if any(c in line for c in (b"\n", b"\r", b"\x00")):
            raise _Malformed(f"bare LF, CR or NUL in {line!r}")
        field_match = FIELD_LINE.fullmatch(line)
        if field_match is None:
            raise _Malformed(f"bad field line {line!r}")
        headers.append(
            (field_match.group(1).decode("latin-1"), field_match.group(2).decode("latin-1"))
        )
    method, target, major, minor = match.groups()
    return _Head(
        method.decode(), target.decode("latin-1"), f"{major.decode()}.{minor.decode()}", headers
    )


def body_framing(head: _Head) -> tuple[str, int]:
    """("none" | "length" | "chunked", length) per RFC 9112 §6, refusing anything ambiguous."""
    te = [v for n, v in head.headers if n.lower() == "transfer-encoding"]
    cl = [v for n, v in head.headers if n.lower() == "content-length"]
    if te and cl:
        raise _Malformed("both Transfer-Encoding and Content-Length")
    if te:
        codings = [c.strip().lower() for c in ",".join(te).split(",")]
        if codings != ["chunked"] or head.version != "1.1":
            raise _Malformed(f"Transfer-Encoding {te!r} is not exactly chunked over HTTP/1.1")
        return "chunked", 0
    if cl:
        values = {v.strip() for v in ",".join(cl).split(",")}
        if len(values) != 1 or not all(v.isdigit() and len(v) < 19 for v in values):
            raise _Malformed(f"bad Content-Length {cl!r}")
        return "length", int(values.pop())
    return "none", 0


def read_chunked(wire: _Wire, record: RecordedRequest) -> None:
    """A chunked body, strictly: hex sizes, CRLF everywhere, trailers kept aside."""
    body = bytearray()
    while True:
        line = wire.until(b"\r\n", 4096)[:-2]
        size_text, semicolon, extension = line.partition(b";")
        if semicolon:
            record.chunk_extensions.append(extension)
        if not CHUNK_SIZE.fullmatch(size_text):
            raise _Malformed(f"bad chunk-size line {line!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        body += wire.exact(size)
        if wire.exact(2) != b"\r\n":
            raise _Malformed("chunk data not followed by CRLF")
    while (trailer := wire.until(b"\r\n", 4096)[:-2]) != b"":
        record.trailers.append(trailer)
    record.body = bytes(body)


class RecordingOrigin:
    """A raw-socket HTTP/1.1 origin on 127.0.0.1 that records every request it frames.

    Each request is answered ``200`` with ``Cache-Control: max-age=60`` and a body naming the
    origin, the request number, method and target (see :func:`named_target`); connections
    stay open unless the request asks to close. A head or body it cannot frame is recorded
    with a ``problem`` and answered 400 with the connection closed; so is a message that
    stalls for ``stall`` seconds half-way (a sender that announced bytes it never sends).
    """

    __test__ = False

    def __init__(self, name: str = "origin", stall: float = 1.0) -> None:
        self.name = name
        self.stall = stall
        self.port = 0
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._records: list[RecordedRequest] = []
        self._connections = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Everything recorded so far, problems included, in arrival order (a copy)."""
        with self._lock:
            return list(self._records)

    @property
    def connections(self) -> int:
        """How many TCP connections have been accepted."""
        with self._lock:
            return self._connections

    def mark(self) -> int:
        """A position in the record; pass it to :meth:`since`."""
        with self._lock:
            return len(self._records)

    def since(self, mark: int) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records[mark:])

    def start(self) -> RecordingOrigin:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(POLL)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> RecordingOrigin:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(POLL)
            with self._lock:
                self._connections += 1
                number = self._connections
                self._sockets.append(sock)
            self._spawn(self._serve, sock, number)

    def _serve(self, sock: socket.socket, connection: int) -> None:
        wire = _Wire(sock, self.stall, self._stopping)
        with sock:
            while self._serve_one(wire, connection):
                pass

    def _serve_one(self, wire: _Wire, connection: int) -> bool:
        """Frame, record and answer one request; False when the connection is done."""
        wire.taken.clear()
        record = RecordedRequest(0, connection, "", "", "", [], b"")
        try:
            record.raw_head = wire.until(b"\r\n\r\n", MAX_HEAD, patient=True)
            head = parse_head(record.raw_head)
            record.method, record.target = head.method, head.target
            record.version, record.headers = head.version, head.headers
            record.framing, length = body_framing(head)
            self._read_body(wire, record, length)
        except _Closed as closed:
            if closed.partial:
                record.raw_head = record.raw_head or bytes(wire.taken + wire.buf)
                self._fail(wire, record, ABORTED, answer=False)
            return False
        except _Malformed as exc:
            self._fail(wire, record, str(exc))
            return False
        except _Stalled:
            record.raw_head = record.raw_head or bytes(wire.taken + wire.buf)
            self._fail(wire, record, f"stalled mid-message for {self.stall}s")
            return False
        number = self._record(record)
        return self._answer(wire.sock, record, number)

    def _read_body(self, wire: _Wire, record: RecordedRequest, length: int) -> None:
        start = len(wire.taken)
        try:
            if record.framing == "length":
                record.body = wire.exact(length)
            elif record.framing == "chunked":
                read_chunked(wire, record)
        finally:
            record.wire_body = bytes(wire.taken[start:])

    def _record(self, record: RecordedRequest) -> int:
        with self._lock:
            record.number = len(self._records) + 1
            self._records.append(record)
            return record.number

    def _fail(
        self, wire: _Wire, record: RecordedRequest, problem: str, answer: bool = True
    ) -> None:
        record.problem = problem
        self._record(record)
        if answer:
            body = f"{ORIGIN_FAILURE} {problem}\n".encode("latin-1", "replace")
            head = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            with contextlib.suppress(OSError):
                wire.sock.sendall(head % len(body) + b"Connection: close\r\n\r\n" + body)

    def _answer(self, sock: socket.socket, record: RecordedRequest, number: int) -> bool:
        keep = (
            record.version == "1.1" and "close" not in (record.header("connection") or "").lower()
        )
        body = f"{self.name} #{number} {record.method} {record.target}\n".encode("latin-1")
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=60\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(body), b"" if keep else b"Connection: close\r\n")
        )
        try:
            sock.sendall(head if record.method == "HEAD" else head + body)
        except OSError:
            return False
        return keep


def named_target(body: bytes) -> str | None:
    """The request-target a RecordingOrigin response body names (None if not such a body)."""
    parts = body.decode("latin-1").split()
    return parts[3] if len(parts) == 4 and parts[1].startswith("#") else None


def named_origin(body: bytes) -> str | None:
    """The name of the RecordingOrigin that produced a response body."""
    parts = body.decode("latin-1").split()
    return parts[0] if len(parts) == 4 else None


# ----- the client side ------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)


@dataclass
class Exchange:
    """What the edge answered to one write: responses in order, and how the connection ended."""

    raw: bytes
    responses: list[RawResponse]
    closed: bool  # the edge closed (FIN) or reset the connection
    reset: bool  # ... with a reset
    leftover: bytes  # bytes after the last complete response

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


class _Incomplete(Exception):
    pass


def _parse_response(buf: bytes, pos: int, head_only: bool, eof: bool) -> tuple[RawResponse, int]:
    end = buf.find(b"\r\n\r\n", pos)
    if end < 0:
        raise _Incomplete()
    lines = buf[pos:end].decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    response = RawResponse(int(status), reason[0] if reason else "", headers, b"")
    pos = end + 4
    code = response.status
    if head_only or code in (204, 304) or 100 <= code < 200:
        return response, pos
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        return _dechunk(buf, pos, response)
    length = response.header("content-length")
    if length is not None:
        if len(buf) < pos + int(length):
            raise _Incomplete()
        response.body = buf[pos : pos + int(length)]
        return response, pos + int(length)
    if not eof:
        raise _Incomplete()
    response.body = buf[pos:]
    return response, len(buf)


def _dechunk(buf: bytes, pos: int, response: RawResponse) -> tuple[RawResponse, int]:
    body = bytearray()
    while True:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete()
        size = int(buf[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n", pos)
            while trailer_end > pos:  # skip trailer fields
                pos = trailer_end + 2
                trailer_end = buf.find(b"\r\n", pos)
            if trailer_end < 0:
                raise _Incomplete()
            response.body = bytes(body)
            return response, trailer_end + 2
        if len(buf) < pos + size + 2:
            raise _Incomplete()
        body += buf[pos : pos + size]
        pos += size + 2


def split_responses(
    buf: bytes,
    methods: Sequence[str] = (),
    eof: bool = False,
) -> tuple[list[RawResponse], int]:
    """The complete responses at the start of ``buf`` and how many bytes they took.

    ``methods`` are the requests' methods in order (HEAD answers carry no body); interim 1xx
    responses are skipped. Bytes that do not parse as a response end the split.
    """
    responses: list[RawResponse] = []
    pos = 0
    while pos < len(buf):
        head_only = len(methods) > len(responses) and methods[len(responses)] == "HEAD"
        try:
            response, pos_after = _parse_response(buf, pos, head_only, eof)
        except (_Incomplete, ValueError, IndexError):
            break
        pos = pos_after
        if not 100 <= response.status < 200:
            responses.append(response)
    return responses, pos


def exchange(
    port: int,
    data: bytes,
    *,
    expect: int | None = None,
    methods: Sequence[str] = (),
    timeout: float = 3.0,
    grace: float = 0.1,
    host: str = "127.0.0.1",
) -> Exchange:
    """Send ``data`` in one write on a fresh connection; read until the edge closes, or until
    ``expect`` responses have come and ``grace`` seconds passed without more, or ``timeout``.
    """
    buf = bytearray()
    closed = reset = False
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the edge may close before reading everything
            sock.sendall(data)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = reset = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
            if expect is not None and len(split_responses(bytes(buf), methods)[0]) >= expect:
                deadline = min(deadline, time.monotonic() + grace)
    responses, used = split_responses(bytes(buf), methods, eof=closed)
    return Exchange(bytes(buf), responses, closed, reset, bytes(buf[used:]))
