"""HTTP/1.1 framing of the server protocol, table-tested without a socket.

``HttpServerProtocol`` is driven the way uvicorn tests its protocols: bytes handed to
``data_received`` on a mock transport that records what the server writes and whether it
closed. Each table row is one wire-level case: request smuggling attempts (CL+TE, duplicate
or malformed Content-Length, bad chunk sizes, obs-fold, bare LF, ambiguous spellings) must
get one error answer and a closed connection, and the bytes after them must never reach the
application; pipelining, keep-alive, ``100 Continue`` and HEAD keep the response stream
framed byte for byte.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import pytest

from verge.http.response import Response
from verge.http.server import HttpApp, HttpServerProtocol, Outbox, ServerLimits, text_response

DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")
TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"


class Transport(asyncio.Transport):
    """Records what the server writes; remembers close and read pauses."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def writelines(self, parts) -> None:
        for part in parts:
            self.write(part)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("192.0.2.1", 40000)}.get(name, default)


class App(HttpApp):
    """GET answers at once (``METHOD /path``); /async/... and requests with a body take the
    async path, which waits for ``gate`` and echoes the body (/async/stream: chunked)."""

    def __init__(self) -> None:
        self.seen: list[str] = []  # paths, in the order the app got them
        self.errors: list[tuple[int, str]] = []  # protocol errors reported
        self.gate = asyncio.Event()
        self.gate.set()

    def handle_fast(self, request):
        if request.path.startswith("/async"):
            return None
        self.seen.append(request.path)
        if request.path == "/empty":
            return Response(204, [("X-Empty", "1")], b"")
        return text_response(200, f"{request.method} {request.path}\n")

    async def handle(self, request, writer) -> None:
        self.seen.append(request.path)
        await self.gate.wait()
        if request.path == "/async/stream":
            writer.start(200, [("X-Part", "1")])
            await writer.write(b"hello")
            await writer.end()
            return
        body = await request.body.read_all(1 << 20) if request.body is not None else b""
        await writer.send(text_response(200, b"got " + body))

    def report_protocol_error(self, client: str, status: int, message: str) -> None:
        self.errors.append((status, message))


class Connection:
    """One server-side connection on a mock transport."""

    def __init__(self, limits: ServerLimits | None = None) -> None:
        self.app = App()
        self.transport = Transport()
        self.proto = HttpServerProtocol(
            self.app, limits or ServerLimits(), asyncio.get_running_loop()
        )
        self.proto.connection_made(self.transport)

    async def send(self, *parts: bytes) -> bytes:
        """Feed each part as one read, let the async path run; everything written so far."""
        for part in parts:
            self.proto.data_received(part)
            await self.settle()
        return bytes(self.transport.out)

    async def settle(self) -> None:
        """Run the loop until the connection's tasks are done and its answers written
        (held answers leave at the end of a turn), or it waits on something."""
        for _ in range(200):
            await asyncio.sleep(0)  # a yield to the loop, not a timed wait
            proto = self.proto
            if not proto._busy and not proto._turn_scheduled and proto._held is None:
                return

    def close(self) -> None:
        self.proto.connection_lost(None)


@pytest.fixture
async def conn():
    connection = Connection()
    yield connection
    connection.close()


@dataclass
class Answer:
    status: int
    head: bytes  # status line and fields, Date removed, without the final blank line
    body: bytes


def answers(wire: bytes, head_for: tuple[int, ...] = ()) -> list[Answer]:
    """Split a response stream by its own framing (Content-Length, chunked, or to the end).

    ``head_for``: indexes of answers to HEAD requests (a length but no body)."""
    out: list[Answer] = []
    rest = DATE.sub(b"\r\n", wire)
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"unterminated head: {head!r}"
        status = int(head.split(b" ", 2)[1])
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        if status == 100:
            out.append(Answer(status, head, b""))
            continue
        if len(out) in head_for or status in (204, 304):
            body = b""
        elif b"Content-Length" in fields:
            length = int(fields[b"Content-Length"])
            body, rest = rest[:length], rest[length:]
        elif fields.get(b"Transfer-Encoding") == b"chunked":
            body, rest = _unchunk(rest)
        else:
            body, rest = rest, b""
        out.append(Answer(status, head, body))
    return out


def _unchunk(data: bytes) -> tuple[bytes, bytes]:
    body = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert data.startswith(b"\r\n"), "no trailer section end"
            return bytes(body), data[2:]
        body += data[:size]
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]


# --- request smuggling and malformed framing: one error, then the connection closes ----------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
POST = b"POST /async HTTP/1.1\r\nHost: t\r\n"

REFUSED = [
    # (case, request bytes, status, words of the reported reason)
    (
        "CL then TE",
        POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "Transfer-Encoding",
    ),
    (
        "TE then CL",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        400,
        "Content-Length",
    ),
    (
        "TE identity with CL",
        POST + b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nab",
        400,
        "Content-Length",
    ),
    (
        "duplicate CL, other values",
        POST + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
        400,
        "Duplicate Content-Length",
    ),
    (
        "duplicate CL, same value",
        POST + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        400,
        "Duplicate Content-Length",
    ),
    ("CL as a list", POST + b"Content-Length: 4, 4\r\n\r\nabcd", 400, "Content-Length"),
    ("CL with a sign", POST + b"Content-Length: +4\r\n\r\nabcd", 400, "Content-Length"),
    ("CL negative", POST + b"Content-Length: -1\r\n\r\n", 400, "Content-Length"),
    ("CL in hex", POST + b"Content-Length: 0x4\r\n\r\nabcd", 400, "Content-Length"),
    (
        "chunk size not hex",
        POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        400,
        "chunk size",
    ),
    (
        "chunk size negative",
        POST + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n0\r\n\r\n",
        400,
        "chunk size",
    ),
    (
        "chunk size overflow",
        POST + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nab\r\n0\r\n\r\n",
        400,
        "overflow",
    ),
    (
        "chunk size with a space",
        POST + b"Transfer-Encoding: chunked\r\n\r\n2 \r\nab\r\n0\r\n\r\n",
        400,
        "chunk size",
    ),
    (
        "chunk size ended by bare LF",
        POST + b"Transfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n",
        400,
        "CR",
    ),
    (
        "TE chunked twice",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "Transfer-Encoding",
    ),
    (
        "TE not chunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        "transfer-coding",
    ),
    (
        "Transfer_Encoding spelling",
        POST + b"Transfer_Encoding: chunked\r\nContent-Length: 2\r\n\r\nab",
        400,
        "ambiguous",
    ),
    ("Content_Length spelling", POST + b"Content_Length: 2\r\n\r\nab", 400, "ambiguous"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n 2\r\n\r\n", 400, "whitespace"),
    ("bare LF line ends", b"GET / HTTP/1.1\nHost: t\n\n", 400, "CRLF"),
    ("bare LF after a field", b"GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n", 400, "CR"),
    ("bare CR", b"GET / HTTP/1.1\rHost: t\r\n\r\n", 400, "CRLF"),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : t\r\n\r\n", 400, "header token"),
    ("space before the first field", b"GET / HTTP/1.1\r\n Host: t\r\n\r\n", 400, "space"),
    ("NUL in a value", b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", 400, "value char"),
    ("two Host fields", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Host"),
    ("no Host in 1.1", b"GET / HTTP/1.1\r\n\r\n", 400, "Host"),
    ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505, "HTTP/2.0"),
    ("HTTP/0.9 request line", b"GET /\r\n\r\n", 505, "HTTP/0.9"),
]


@pytest.mark.parametrize(
    ("wire", "status", "reason"), [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED]
)
async def test_malformed_framing_is_refused_and_what_follows_is_never_read(
    conn: Connection, wire: bytes, status: int, reason: str
) -> None:
    out = await conn.send(wire + SMUGGLED)
    (answer,) = answers(out)
    assert answer.status == status
    assert b"\r\nConnection: close" in answer.head
    assert conn.transport.closed
    assert "/smuggled" not in conn.app.seen
    ((reported, message),) = conn.app.errors
    assert reported == status and reason in message


async def test_a_bad_chunk_after_the_handler_started_reading_is_its_error(
    conn: Connection,
) -> None:
    """The request is dispatched at its head; the bad chunk fails the body it is reading."""
    await conn.send(POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    assert conn.app.seen == ["/async"] and not conn.transport.out
    out = await conn.send(b"zz\r\n" + SMUGGLED)
    (answer,) = answers(out)
    assert answer.status == 400 and conn.transport.closed
    assert conn.app.seen == ["/async"]


# --- bodies that are well framed --------------------------------------------------------------

GOOD_BODIES = [
    ("Content-Length", [POST + b"Content-Length: 5\r\n\r\nhello"]),
    ("chunked", [POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"]),
    ("chunk extension", [POST + b"Transfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\n\r\n"]),
    (
        "trailer field",
        [POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nT: 1\r\n\r\n"],
    ),
    (
        "uppercase hex, leading zeros",
        [POST + b"Transfer-Encoding: chunked\r\n\r\n0005\r\nhello\r\n0\r\n\r\n"],
    ),
    ("head and body in separate reads", [POST + b"Content-Length: 5\r\n\r\n", b"hel", b"lo"]),
    (
        "chunks split mid size line",
        [POST + b"Transfer-Encoding: chunked\r\n\r\n", b"5\r", b"\nhel", b"lo\r\n0\r", b"\n\r\n"],
    ),
]


@pytest.mark.parametrize(
    "parts", [row[1] for row in GOOD_BODIES], ids=[row[0] for row in GOOD_BODIES]
)
async def test_well_framed_bodies_arrive_whole(conn: Connection, parts: list[bytes]) -> None:
    out = await conn.send(*parts, b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
    first, second = answers(out)
    assert (first.status, first.body) == (200, b"got hello")
    assert (second.status, second.body) == (200, b"GET /next\n")  # framing stayed in step
    assert not conn.transport.closed and conn.app.errors == []


# --- pipelining -------------------------------------------------------------------------------

PIPELINE = (
    b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
    b"POST /async HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nxyz"
    b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n"
    b"HEAD /c HTTP/1.1\r\nHost: t\r\n\r\n"
    b"GET /d HTTP/1.1\r\nHost: t\r\n\r\n"
)
PIPELINE_BODIES = [b"GET /a\n", b"got xyz", b"GET /b\n", b"", b"GET /d\n"]


async def test_pipelined_requests_are_answered_in_order(conn: Connection) -> None:
    conn.app.gate.clear()  # the async answer is late: the ones behind it wait their turn
    out = await conn.send(PIPELINE)
    assert [a.body for a in answers(out)] == [b"GET /a\n"]
    conn.app.gate.set()
    await conn.settle()
    got = answers(bytes(conn.transport.out), head_for=(3,))
    assert [a.body for a in got] == PIPELINE_BODIES
    assert conn.app.seen == ["/a", "/async", "/b", "/c", "/d"]


async def test_pipelined_requests_parse_the_same_one_byte_at_a_time(conn: Connection) -> None:
    out = await conn.send(*(PIPELINE[i : i + 1] for i in range(len(PIPELINE))))
    assert [a.body for a in answers(out, head_for=(3,))] == PIPELINE_BODIES


async def test_answers_before_a_protocol_error_go_out_first(conn: Connection) -> None:
    """An error behind a request still in progress is answered after it, then closes."""
    conn.app.gate.clear()
    await conn.send(b"GET /async HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost : t\r\n\r\n")
    assert not conn.transport.out and not conn.transport.closed
    conn.app.gate.set()
    await conn.settle()
    assert [a.status for a in answers(bytes(conn.transport.out))] == [200, 400]
    assert conn.transport.closed


async def test_the_pipelined_queue_is_bounded() -> None:
    connection = Connection(ServerLimits(max_pipelined=2))
    connection.app.gate.clear()
    try:
        await connection.send(b"GET /async HTTP/1.1\r\nHost: t\r\n\r\n")
        await connection.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
        assert not connection.transport.reading  # the queue is over its bound: stop reading
        connection.app.gate.set()
        await connection.settle()
        assert connection.transport.reading
        assert len(answers(bytes(connection.transport.out))) == 4
    finally:
        connection.close()


# --- answers held to the end of the turn (Outbox) -----------------------------------------------


async def test_fast_answers_of_a_turn_are_written_together_at_its_end() -> None:
    """Two connections of one listener read in the same turn: neither answer is written
    while the turn decides, both are once it ends, each on its own connection."""
    loop = asyncio.get_running_loop()
    outbox = Outbox(loop)
    pairs = []
    for _ in range(2):
        transport = Transport()
        proto = HttpServerProtocol(App(), ServerLimits(), loop, outbox)
        proto.connection_made(transport)
        pairs.append((proto, transport))
    for index, (proto, _transport) in enumerate(pairs):
        proto.data_received(b"GET /n%d HTTP/1.1\r\nHost: t\r\n\r\n" % index)
    assert [t.out for _p, t in pairs] == [b"", b""] and len(outbox.held) == 2
    await asyncio.sleep(0)  # the turn ends
    assert [answers(bytes(t.out))[0].body for _p, t in pairs] == [b"GET /n0\n", b"GET /n1\n"]
    assert outbox.held == []


async def test_pipelined_fast_answers_leave_in_order_in_one_write(conn: Connection) -> None:
    writes: list[int] = []
    conn.transport.writelines = lambda parts: (
        writes.append(len(parts))
        or [  # type: ignore
            conn.transport.write(part) for part in parts
        ]
    )
    out = await conn.send(b"".join(b"GET /p%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(5)))
    assert [a.body for a in answers(out)] == [b"GET /p%d\n" % i for i in range(5)]
    assert writes == [5]


async def test_a_closing_answer_and_an_error_write_the_held_answers_first(conn: Connection) -> None:
    out = await conn.send(
        b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert [a.body for a in answers(out)] == [b"GET /a\n", b"GET /b\n"]
    assert conn.transport.closed
    other = Connection()
    try:
        out = await other.send(
            b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost : t\r\n\r\n"
        )
        assert [a.status for a in answers(out)] == [200, 400] and other.transport.closed
    finally:
        other.close()


async def test_held_answers_of_a_lost_connection_are_dropped(conn: Connection) -> None:
    conn.proto.data_received(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
    conn.transport.closed = True  # the peer went away before the turn ended
    conn.proto.connection_lost(None)
    await asyncio.sleep(0)
    assert conn.transport.out == b""


# --- keep-alive and close ---------------------------------------------------------------------

KEEP_ALIVE = [
    # (request line and fields, Connection field of the answer, connection left open)
    (b"GET /k HTTP/1.1\r\nHost: t\r\n", None, True),
    (b"GET /k HTTP/1.1\r\nHost: t\r\nConnection: close\r\n", b"close", False),
    (b"GET /k HTTP/1.1\r\nHost: t\r\nConnection: Close\r\n", b"close", False),
    (b"GET /k HTTP/1.0\r\nHost: t\r\n", b"close", False),
    (b"GET /k HTTP/1.0\r\n", b"close", False),  # 1.0 needs no Host
    (b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n", b"keep-alive", True),
    (
        b"POST /async HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n",
        b"close",
        False,
    ),
]


@pytest.mark.parametrize(("head", "field", "open_after"), KEEP_ALIVE)
async def test_keep_alive_or_close(
    conn: Connection, head: bytes, field: bytes | None, open_after: bool
) -> None:
    out = await conn.send(head + b"\r\n")
    (answer,) = answers(out)
    connection = re.search(rb"\r\nConnection: ([^\r]*)", answer.head)
    assert (connection.group(1) if connection else None) == field
    assert conn.transport.closed is not open_after
    if open_after:  # the same connection answers the next request
        out = await conn.send(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answers(out)[-1].body == b"GET /again\n"


async def test_nothing_is_read_after_connection_close(conn: Connection) -> None:
    await conn.send(b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" + SMUGGLED)
    assert conn.app.seen == ["/a"] and conn.transport.closed


# --- 100 Continue -----------------------------------------------------------------------------


async def test_100_continue_is_sent_when_the_handler_reads_the_body(conn: Connection) -> None:
    out = await conn.send(POST + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert out == b"HTTP/1.1 100 Continue\r\n\r\n"  # the client may send the body now
    out = await conn.send(b"hello")
    interim, final = answers(out)
    assert interim.status == 100 and (final.status, final.body) == (200, b"got hello")


async def test_no_100_continue_without_the_expectation(conn: Connection) -> None:
    await conn.send(POST + b"Content-Length: 5\r\n\r\n")
    assert not conn.transport.out
    assert [a.status for a in answers(await conn.send(b"hello"))] == [200]


async def test_100_continue_precedes_the_answer_when_the_body_came_early(
    conn: Connection,
) -> None:
    """A client that did not wait sent the body with the head: the interim answer (allowed,
    RFC 9110 §10.1.1) still comes before the final one, never inside it."""
    out = await conn.send(POST + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
    assert [(a.status, a.body) for a in answers(out)] == [(100, b""), (200, b"got hello")]


# --- HEAD and response framing ----------------------------------------------------------------


async def test_head_gets_the_length_of_the_get_and_no_body(conn: Connection) -> None:
    out = await conn.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /h HTTP/1.1\r\nHost: t\r\n\r\n")
    head, get = answers(out, head_for=(0,))
    assert head.head.endswith(b"\r\nContent-Length: 8") and head.body == b""
    assert get.body == b"GET /h\n"  # the HEAD answer carried no stray body bytes


FRAMING = [
    # (request, exact answer with the Date field removed)
    (
        b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + TEXT + b"Content-Length: 7\r\n\r\nGET /x\n",
    ),
    (
        b"GET /x HTTP/1.0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + TEXT + b"Content-Length: 7\r\nConnection: close\r\n\r\nGET /x\n",
    ),
    (b"GET /empty HTTP/1.1\r\nHost: t\r\n\r\n", b"HTTP/1.1 204 No Content\r\nX-Empty: 1\r\n\r\n"),
    (
        b"GET /async/stream HTTP/1.1\r\nHost: t\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Part: 1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        b"GET /async/stream HTTP/1.0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Part: 1\r\nConnection: close\r\n\r\nhello",
    ),
    (b"HEAD /async/stream HTTP/1.1\r\nHost: t\r\n\r\n", b"HTTP/1.1 200 OK\r\nX-Part: 1\r\n\r\n"),
    (
        b"POST /async HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n" + TEXT + b"Content-Length: 6\r\n\r\ngot ok",
    ),
]


@pytest.mark.parametrize(("request_bytes", "expected"), FRAMING)
async def test_response_framing_bytes(
    conn: Connection, request_bytes: bytes, expected: bytes
) -> None:
    out = await conn.send(request_bytes)
    assert DATE.sub(b"\r\n", out) == expected


# --- limits -----------------------------------------------------------------------------------

LIMITS = [
    (b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 200 + b"\r\n\r\n", 431),
    (POST + b"Content-Length: 65\r\n\r\n", 413),
]


@pytest.mark.parametrize(("wire", "status"), LIMITS)
async def test_limits_answer_with_their_status(wire: bytes, status: int) -> None:
    limits = ServerLimits(max_url_bytes=64, max_header_bytes=128, max_body_bytes=64)
    connection = Connection(limits)
    try:
        (answer,) = answers(await connection.send(wire + SMUGGLED))
        assert answer.status == status and connection.transport.closed
        assert "/smuggled" not in connection.app.seen
    finally:
        connection.close()
