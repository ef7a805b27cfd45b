"""Pipelining on the HTTP/1.1 server: a long queue of requests behind a slow (async) one is
answered in order and in full once it completes — iteratively, not one stack frame per
queued answer (a regression: ~330 queued fast answers raised RecursionError) — with the
queue bounded (max_pipelined: the rest waits unparsed), and a connection that pipelines
thousands of requests takes turns with the others (a flood must not hold the loop)."""

from __future__ import annotations

import asyncio

from verge.http.server import (
    TURN_REQUESTS,
    HttpApp,
    HttpServerProtocol,
    ServerLimits,
    reuseport_socket,
    serve,
    text_response,
)


class App(HttpApp):
    """/slow waits for the test's gate (the async path); everything else answers at once."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

        self.seen: list[str] = []  # paths in the order they were handled

    def handle_fast(self, request):
        self.seen.append(request.path)
        if request.path == "/slow":
            return None
        return text_response(200, request.path[1:] + "\n")

    async def handle(self, request, writer) -> None:
        await self.gate.wait()
        await writer.send(text_response(200, "slow\n"))


def queued() -> int:
    return sum(len(proto._queue) for proto in HttpServerProtocol.connections)


async def test_a_thousand_pipelined_answers_drain_after_an_async_one():
    app = App()
    server = await serve(app, reuseport_socket("127.0.0.1", 0), ServerLimits())
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        count = 1000
        wire = b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n" + b"".join(
            b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(count))
        writer.write(wire)
        await writer.drain()
        limit = ServerLimits().max_pipelined
        deadline = asyncio.get_running_loop().time() + 10
        while queued() <= limit:  # the server has parsed a full queue behind /slow
            assert asyncio.get_running_loop().time() < deadline, queued()
            await asyncio.sleep(0.001)
        for _ in range(20):  # and parses no more while it is full (the rest waits unread)
            await asyncio.sleep(0)
        assert queued() <= limit + TURN_REQUESTS
        app.gate.set()
        bodies = await read_answers(reader, count + 1)
        assert bodies[0] == b"slow\n"
        assert bodies[1:] == [b"%d\n" % i for i in range(count)]  # all of them, in order
        writer.close()
    finally:
        server.close()


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    bodies = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        bodies.append(await reader.readexactly(length))
    return bodies


async def test_a_pipelining_connection_takes_turns_with_the_others():
    """2,000 pipelined requests in one read, and one request on another connection sent
    right after: that one is handled within the flood's first turns, not after all 2,000."""
    app = App()
    server = await serve(app, reuseport_socket("127.0.0.1", 0), ServerLimits())
    port = server.sockets[0].getsockname()[1]
    try:
        flood_reader, flood = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        count = 2000
        flood.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i
                             for i in range(count)))
        writer.write(b"GET /other HTTP/1.1\r\nHost: t\r\n\r\n")
        assert await read_answers(reader, 1) == [b"other\n"]
        assert await read_answers(flood_reader, count) == [b"%d\n" % i for i in range(count)]
        assert app.seen.index("/other") < 10 * TURN_REQUESTS, app.seen.index("/other")
        flood.close()
        writer.close()
    finally:
        server.close()


async def test_a_request_split_across_turn_slices_is_parsed_whole():
    """Slices are cut anywhere, mid-header and mid-body: every request and body arrives."""
    app = EchoApp()
    server = await serve(app, reuseport_socket("127.0.0.1", 0), ServerLimits())
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        bodies = [b"x" * size for size in (0, 1, 2047, 2048, 5000, 70000)] * 20
        writer.write(b"".join(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nX-Pad: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (b"p" * (i * 37 % 3000), len(body), body) for i, body in enumerate(bodies)))
        assert await read_answers(reader, len(bodies)) == [b"%d" % len(b) for b in bodies]
        writer.close()
    finally:
        server.close()


class EchoApp(HttpApp):
    """Answers the size of the request body it read."""

    def handle_fast(self, request):
        return None

    async def handle(self, request, writer) -> None:
        body = await request.body.read_all(1 << 20) if request.body is not None else b""
        await writer.send(text_response(200, b"%d" % len(body)))
