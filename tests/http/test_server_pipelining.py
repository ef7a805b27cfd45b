"""Pipelining on the HTTP/1.1 server: a long queue of requests behind a slow (async) one is
answered in order and in full once it completes — iteratively, not one stack frame per
queued answer (a regression: ~330 queued fast answers raised RecursionError)."""

from __future__ import annotations

import asyncio

from verge.http.server import (
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

    def handle_fast(self, request):
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
        deadline = asyncio.get_running_loop().time() + 10
        while queued() < count:  # the server has parsed them all behind /slow
            assert asyncio.get_running_loop().time() < deadline, queued()
            await asyncio.sleep(0.001)
        app.gate.set()
        bodies = []
        for _ in range(count + 1):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            bodies.append(await reader.readexactly(length))
        assert bodies[0] == b"slow\n"
        assert bodies[1:] == [b"%d\n" % i for i in range(count)]  # all of them, in order
        writer.close()
    finally:
        server.close()
