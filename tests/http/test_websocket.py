"""WebSocket on our HTTP/1.1 server: handshake, echo, limits, keep-alive, close.

A real server (verge.http.server.serve on loopback) runs an echo application; the client is
wsproto's own client state machine over an asyncio connection, or a raw socket where the
test needs exact bytes. ``WsClient`` is reused by the edge tunnel and player tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from verge.http.server import HttpApp, ServerLimits, reuseport_socket, serve
from verge.http.websocket import WebSocketLimits, accept, is_websocket_request

pytestmark = pytest.mark.timeout(30)


class HandshakeRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"{status}: {body!r}")
        self.status = status
        self.body = body


class WsClient:
    """A WebSocket client: wsproto over an asyncio stream connection."""

    def __init__(self, reader, writer, ws: WSConnection, accepted: AcceptConnection) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = ws
        self.accepted = accepted
        self.events: list = []
        self.close_event: CloseConnection | None = None

    @classmethod
    async def connect(
        cls,
        port: int,
        target: str,
        *,
        host: str = "127.0.0.1",
        subprotocols: list[str] | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> WsClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        writer.write(
            ws.send(
                Request(
                    host=host,
                    target=target,
                    subprotocols=subprotocols or [],
                    extra_headers=extra_headers or [],
                )
            )
        )
        status, body = 0, b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    client = cls(reader, writer, ws, event)
                    client._pending = list(ws.events())
                    return client
                if isinstance(event, RejectConnection):
                    status = event.status_code
                if isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        writer.close()
                        raise HandshakeRefused(status, body)
            if not data:
                writer.close()
                raise HandshakeRefused(status, body)

    async def send(self, message: str | bytes) -> None:
        event = (
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )
        self.writer.write(self.ws.send(event))
        await self.writer.drain()

    async def next_event(self, timeout: float = 10.0):
        """The next frame-level event (pings are answered and returned too)."""
        while not self._pending:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            self.ws.receive_data(data or None)
            self._pending.extend(self.ws.events())
            if not data and not self._pending:
                return None
        event = self._pending.pop(0)
        if isinstance(event, Ping):
            self.writer.write(self.ws.send(event.response()))
        if isinstance(event, CloseConnection):
            self.close_event = event
            with contextlib.suppress(Exception):
                self.writer.write(self.ws.send(event.response()))
        return event

    async def receive(self, timeout: float = 10.0) -> str | bytes | CloseConnection | None:
        """The next whole message, or the CloseConnection (None: the TCP connection ended)."""
        parts: list = []
        while True:
            event = await self.next_event(timeout)
            if event is None or isinstance(event, CloseConnection):
                return event
            if isinstance(event, (TextMessage, BytesMessage)):
                parts.append(event.data)
                if event.message_finished:
                    return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    async def close(self, code: int = 1000) -> CloseConnection | None:
        """Send a close frame and wait for the server's answer."""
        self.writer.write(self.ws.send(CloseConnection(code=code)))
        while True:
            event = await self.next_event()
            if event is None or isinstance(event, CloseConnection):
                self.writer.close()
                return event

    async def eof(self, timeout: float = 10.0) -> bool:
        """Whether the server closed the TCP connection (reading until it does)."""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return True

    def abort(self) -> None:
        self.writer.transport.abort()


# ---- the server under test ------------------------------------------------------------------


class EchoApp(HttpApp):
    """/echo echoes; /greet sends one message first; /refuse answers 403; other paths 200."""

    def __init__(self, limits: WebSocketLimits) -> None:
        self.limits = limits
        self.closed: asyncio.Queue = asyncio.Queue()

    async def handle(self, request, writer) -> None:
        if request.path == "/refuse" or not is_websocket_request(request):
            status = 403 if request.path == "/refuse" else 200
            body = b"plain answer\n"
            writer.start(status, [("Content-Type", "text/plain")], content_length=len(body))
            await writer.write(body)
            return
        ws = await accept(request, writer, limits=self.limits, subprotocol="chat.v1")
        if ws is None:
            return
        if request.path == "/greet":
            await ws.send("hello")
        while (message := await ws.receive()) is not None:
            if message == "bye":
                await ws.close(1000, "as you wish")
                continue
            await ws.send(message)
        await self.closed.put((ws.close_code, ws.close_reason))


@pytest.fixture
async def server():
    limits = WebSocketLimits(max_message=64 * 1024, ping_interval=0.3, idle_timeout=1.0)
    app = EchoApp(limits)
    sock = reuseport_socket("127.0.0.1", 0)
    srv = await serve(app, sock, ServerLimits())
    app.port = sock.getsockname()[1]
    yield app
    srv.close()


def key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send bytes and read everything until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


def handshake(
    path: str = "/echo", *, version: str = "13", ws_key: str | None = None, extra: str = ""
) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {ws_key or key()}\r\n"
        f"{extra}\r\n"
    ).encode()


# ---- handshake ------------------------------------------------------------------------------


async def test_handshake_accepts_and_negotiates_the_subprotocol(server):
    client = await WsClient.connect(server.port, "/echo", subprotocols=["other", "chat.v1"])
    assert client.accepted.subprotocol == "chat.v1"  # wsproto also checked Sec-WebSocket-Accept
    await client.close()


async def test_bad_handshakes_get_http_errors_and_a_closed_connection(server):
    answer = await raw_exchange(server.port, handshake(version="8"))
    assert answer.startswith(b"HTTP/1.1 426 ")
    assert b"Sec-WebSocket-Version: 13\r\n" in answer and b"Connection: close\r\n" in answer
    answer = await raw_exchange(server.port, handshake(ws_key="dG9vIHNob3J0"))  # 9 bytes
    assert answer.startswith(b"HTTP/1.1 400 ")
    post = handshake().replace(b"GET", b"POST", 1)
    assert (await raw_exchange(server.port, post)).startswith(b"HTTP/1.1 400 ")


async def test_a_refused_upgrade_is_answered_normally_then_closed(server):
    """The app may ignore an Upgrade (RFC 9110 §7.8): a normal answer, then the connection
    closes (it cannot carry more HTTP after an upgrade request)."""
    with pytest.raises(HandshakeRefused) as refused:
        await WsClient.connect(server.port, "/refuse")
    assert refused.value.status == 403
    h2c = (
        b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
    )
    answer = await raw_exchange(server.port, h2c)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"plain answer\n")


async def test_plain_requests_and_keep_alive_are_unaffected(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for _ in range(2):
        writer.write(b"GET /page HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head
        assert await reader.readexactly(len(b"plain answer\n")) == b"plain answer\n"
    writer.close()


# ---- messages -------------------------------------------------------------------------------


async def test_echo_text_and_binary_both_ways(server):
    client = await WsClient.connect(server.port, "/greet")
    assert await client.receive() == "hello"  # the server speaks first
    await client.send("grüße <b>")
    assert await client.receive() == "grüße <b>"
    payload = os.urandom(50_000)
    await client.send(payload)
    assert await client.receive() == payload
    await client.close()


def masked_text_frame(text: str) -> bytes:
    """A client's (masked) text frame, by hand (RFC 6455 §5.2), for payloads < 126 bytes."""
    payload = text.encode()
    mask = os.urandom(4)
    return (
        bytes([0x81, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


async def test_frames_sent_with_the_handshake_are_not_lost(server):
    """A client may send its first frame in the same packet as the upgrade request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(handshake() + masked_text_frame("early"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    frame = await asyncio.wait_for(reader.readexactly(7), 5)
    assert frame == b"\x81\x05early"  # the echo: server frames are not masked
    writer.close()


async def test_a_message_over_the_limit_closes_with_1009(server):
    client = await WsClient.connect(server.port, "/echo")
    await client.send("x" * (64 * 1024 + 1))
    closed = await client.receive()
    assert isinstance(closed, CloseConnection) and closed.code == 1009
    assert await client.eof()
    assert (await server.closed.get())[0] == 1009


# ---- liveness and closing -------------------------------------------------------------------


async def test_client_ping_gets_a_pong(server):
    client = await WsClient.connect(server.port, "/echo")
    client.writer.write(client.ws.send(Ping(payload=b"are you there")))
    event = await client.next_event()
    while isinstance(event, Ping):  # the server's own keep-alive pings may come first
        event = await client.next_event()
    assert isinstance(event, Pong) and event.payload == b"are you there"
    await client.close()


async def test_server_pings_and_closes_an_idle_peer(server):
    """Keep-alive pings every ping_interval; a peer that sends nothing is closed (1001)."""
    client = await WsClient.connect(server.port, "/echo")
    seen = []
    while True:  # read without answering pings: wsproto's client would, so read raw bytes
        data = await asyncio.wait_for(client.reader.read(65536), 5)
        if not data:
            break
        seen.append(data)
    raw = b"".join(seen)
    assert b"\x89" in raw  # at least one ping frame (FIN + opcode 9)
    assert b"\x88" in raw  # then a close frame
    code, reason = await server.closed.get()
    assert (code, reason) == (1001, "idle timeout")


async def test_an_answered_ping_keeps_the_connection(server):
    client = await WsClient.connect(server.port, "/echo")
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.6  # longer than idle_timeout
    while loop.time() < until:
        event = await client.next_event(timeout=2)  # answers pings as they come
        assert isinstance(event, Ping), event
    await client.send("still here")
    assert await client.receive() == "still here"
    await client.close()


async def test_close_handshake_from_either_side(server):
    client = await WsClient.connect(server.port, "/echo")
    answer = await client.close(1000)
    assert isinstance(answer, CloseConnection) and answer.code == 1000
    assert await server.closed.get() == (1000, "")
    client = await WsClient.connect(server.port, "/echo")
    await client.send("bye")  # the server closes
    closed = await client.receive()
    assert isinstance(closed, CloseConnection) and (closed.code, closed.reason) == (
        1000,
        "as you wish",
    )
    assert await client.eof()
    assert (await server.closed.get())[0] == 1000


async def test_a_vanished_client_ends_the_session_with_1006(server):
    client = await WsClient.connect(server.port, "/echo")
    await client.send("one")
    assert await client.receive() == "one"
    client.abort()
    assert (await server.closed.get())[0] == 1006
