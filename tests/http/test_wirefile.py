"""Large memoised responses sent with sendfile from a memfd (verge.http.wirefile): the
bytes on the wire are exactly the response's, in order behind and before other answers,
when the socket takes only part of a send, within the byte budget, and never over TLS."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from verge.http import wirefile
from verge.http.response import Response
from verge.http.server import (
    HttpApp,
    HttpServerProtocol,
    ServerLimits,
    adopt_transport,
    http1_bytes,
    reuseport_socket,
    serve,
    text_response,
)
from verge.http.wirefile import SENDFILE_MAX, SENDFILE_MIN, WireFile, WirePool, wire_for

BIG = os.urandom(200 * 1024)


class App(HttpApp):
    """/big: one shared Response (as a hot cache entry's); anything else: a small answer."""

    def __init__(self) -> None:
        self.big = Response(200, [("Content-Type", "application/octet-stream")], BIG)

    def handle_fast(self, request):
        if request.path == "/big":
            return self.big
        return text_response(200, request.path[1:] + "\n")

    async def handle(self, request, writer) -> None:
        raise AssertionError("every answer here is a fast one")


@pytest.fixture
async def server():
    app = App()
    srv = await serve(app, reuseport_socket("127.0.0.1", 0), ServerLimits())
    try:
        yield app, srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


def test_only_the_sendfile_range_gets_a_wire_file() -> None:
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    assert type(wire_for(head, b"x" * (SENDFILE_MIN - 1))) is tuple
    assert type(wire_for(head, b"x" * SENDFILE_MIN)) is WireFile
    assert type(wire_for(head, b"x" * SENDFILE_MAX)) is WireFile
    assert type(wire_for(head, b"x" * (SENDFILE_MAX + 1))) is tuple


def test_a_memfd_is_made_on_the_second_send_and_holds_the_whole_response(monkeypatch) -> None:
    monkeypatch.setattr(wirefile, "POOL", WirePool(1024 * 1024))
    wire = WireFile(b"HEAD\r\n\r\n", b"b" * SENDFILE_MIN)
    assert wire._file_on_second_send() == -1  # first send: bytes
    fd = wire._file_on_second_send()
    assert fd >= 0 and wire.state == WireFile.FILED
    assert os.pread(fd, wire.size + 10, 0) == b"HEAD\r\n\r\n" + b"b" * SENDFILE_MIN
    assert wirefile.POOL.used == wire.size
    del wire  # the response is gone: its memfd is closed and the budget given back
    assert wirefile.POOL.used == 0
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_pool_kept_in_a_directory_files_unnamed_files_there(monkeypatch, tmp_path) -> None:
    pool = WirePool(1024 * 1024)
    pool.keep_in(str(tmp_path))
    monkeypatch.setattr(wirefile, "POOL", pool)
    wire = WireFile(b"HEAD\r\n\r\n", b"d" * SENDFILE_MIN)
    wire._file_on_second_send()
    fd = wire._file_on_second_send()
    assert fd >= 0 and pool.directory == str(tmp_path)
    target = os.readlink(f"/proc/self/fd/{fd}")
    assert target.startswith(str(tmp_path)) and target.endswith("(deleted)")
    assert list(tmp_path.iterdir()) == []  # nothing another process could open by name
    assert os.fstat(fd).st_mode & 0o777 == 0o600
    assert os.pread(fd, wire.size + 10, 0) == b"HEAD\r\n\r\n" + b"d" * SENDFILE_MIN
    del wire
    assert pool.used == 0


def test_a_directory_that_cannot_hold_files_falls_back_to_memfds(monkeypatch, tmp_path) -> None:
    pool = WirePool(1024 * 1024)
    pool.keep_in(str(tmp_path / "gone"))
    monkeypatch.setattr(wirefile, "POOL", pool)
    wire = WireFile(b"H", b"m" * SENDFILE_MIN)
    wire._file_on_second_send()
    fd = wire._file_on_second_send()
    assert fd >= 0 and os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    assert pool.directory is None  # not tried again on every filing


def test_the_budget_closes_the_oldest_and_a_closed_one_stays_on_bytes(monkeypatch) -> None:
    body = b"z" * SENDFILE_MIN
    monkeypatch.setattr(wirefile, "POOL", WirePool(2 * (len(body) + 100)))
    wires = [WireFile(b"H" * 10, body) for _ in range(3)]
    for wire in wires:
        wire._file_on_second_send()
        wire._file_on_second_send()
    assert [w.state for w in wires] == [WireFile.SPILLED, WireFile.FILED, WireFile.FILED]
    assert wirefile.POOL.used == 2 * wires[0].size <= wirefile.POOL.budget
    assert wires[0].fd == -1 and wires[0]._file_on_second_send() == -1  # never again


def test_a_response_larger_than_the_budget_is_never_filed(monkeypatch) -> None:
    monkeypatch.setattr(wirefile, "POOL", WirePool(SENDFILE_MIN))
    wire = WireFile(b"H", b"y" * SENDFILE_MIN)
    wire._file_on_second_send()
    assert wire._file_on_second_send() == -1 and wire.state == WireFile.SPILLED


def test_a_tls_connection_never_sends_from_a_file() -> None:
    class Transport:
        def __init__(self, tls: bool) -> None:
            self.sock = socket.socket()
            self.tls = tls

        def get_extra_info(self, name):
            return {"peername": ("127.0.0.1", 1), "socket": self.sock,
                    "sslcontext": object() if self.tls else None}.get(name)

    for tls, expected in ((True, -1), (False, None)):
        proto = HttpServerProtocol(App(), ServerLimits(), asyncio.new_event_loop())
        transport = Transport(tls)
        try:
            assert adopt_transport(proto, transport)
            assert proto.sendfile_fd == (transport.sock.fileno() if expected is None else -1)
        finally:
            HttpServerProtocol.connections.discard(proto)
            transport.sock.close()
            proto.loop.close()


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    bodies = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        bodies.append(await asyncio.wait_for(reader.readexactly(length), 10))
    return bodies


async def test_pipelined_answers_stay_whole_and_in_order_when_a_send_is_partial(
        server, monkeypatch) -> None:
    app, port = server
    sent: list[tuple[int, int]] = []
    real_sendfile = os.sendfile

    short = [50, 5000]  # the socket takes part of the head, then part of the body

    def recording_sendfile(out_fd, in_fd, offset, count):
        done = real_sendfile(out_fd, in_fd, offset, short.pop(0) if short else count)
        sent.append((done, count))
        return done

    monkeypatch.setattr(wirefile.os, "sendfile", recording_sendfile)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    paths = [b"/big", b"/a", b"/big", b"/big", b"/b", b"/big", b"/big", b"/c"]
    writer.write(b"".join(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % p for p in paths))
    await writer.drain()
    bodies = await read_answers(reader, len(paths))
    expected = [BIG if p == b"/big" else p[1:] + b"\n" for p in paths]
    assert bodies == expected
    wire = app.big.http1
    assert type(wire) is WireFile and wire.state == WireFile.FILED
    assert sent, "the hot response went out with sendfile"
    assert [done for done, _ in sent[:2]] == [50, 5000], sent  # the partial ones
    writer.close()


async def test_a_reader_that_keeps_up_gets_whole_sends(server) -> None:
    app, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(5):
        writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        assert await read_answers(reader, 1) == [BIG]
    assert app.big.http1.state == WireFile.FILED
    writer.close()


def test_head_and_body_pairs_still_serve_the_async_path() -> None:
    response = Response(200, [], b"q" * SENDFILE_MIN)
    wire = http1_bytes(response)
    assert type(wire) is WireFile and wire.parts[1] is response.body
