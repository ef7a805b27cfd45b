"""WebSocket (RFC 6455) on our HTTP/1.1 server, with wsproto doing the framing.

Why wsproto: framing, masking, fragmentation, UTF-8 checks and the close handshake are a
sans-I/O state machine there (python-hyper, like h11 and h2), which is this project's style;
this module only adds the I/O over :class:`verge.http.server.UpgradedStream`, the opening
handshake (checked against the request we already parsed), and the limits a public server
needs: a maximum message size (close 1009), keep-alive pings, and an idle timeout.

    ws = await accept(request, writer)      # None: refused (400/426 already sent)
    while (message := await ws.receive()) is not None:
        await ws.send(message)

One task reads (``receive``); any task may ``send`` or ``close``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from dataclasses import dataclass

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, generate_accept_token

log = logging.getLogger("verge.websocket")

CLOSE_GRACE = 2.0  # seconds the peer has to answer our close frame before the socket closes


@dataclass(slots=True)
class WebSocketLimits:
    max_message: int = 64 * 1024  # bytes of one (reassembled) message; more: close 1009
    ping_interval: float = 20.0  # a ping after this long without traffic from the peer
    idle_timeout: float = 60.0  # nothing (not even a pong) for this long: close 1001


def handshake_problem(request) -> tuple[int, str] | None:
    """Why this request cannot be upgraded to a WebSocket (status, reason), or None."""
    hmap = request.hmap
    if request.method != "GET" or request.version != "1.1":
        return 400, "a WebSocket handshake is an HTTP/1.1 GET"
    if hmap.get("upgrade", "").strip().lower() != "websocket":
        return 400, "Upgrade: websocket expected"
    if "upgrade" not in {t.strip().lower() for t in hmap.get("connection", "").split(",")}:
        return 400, "Connection: Upgrade expected"
    if hmap.get("sec-websocket-version", "").strip() != "13":
        return 426, "Sec-WebSocket-Version 13 expected"
    try:
        key = base64.b64decode(hmap.get("sec-websocket-key", "").strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def is_websocket_request(request) -> bool:
    return request.hmap.get("upgrade", "").strip().lower() == "websocket"


async def refuse(writer, status: int, reason: str) -> None:
    """Answer a handshake with an HTTP error (the server closes the connection after it)."""
    body = f"{reason}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    if status == 426:
        headers.append(("Sec-WebSocket-Version", "13"))
    writer.start(status, headers, content_length=len(body))
    await writer.write(body)


async def accept(
    request, writer, *, limits: WebSocketLimits | None = None, subprotocol: str | None = None
) -> WebSocket | None:
    """Complete the opening handshake, or refuse it (400/426 sent) and return None.

    ``subprotocol`` is echoed only if the client offered it.
    """
    problem = handshake_problem(request)
    if problem is not None:
        await refuse(writer, *problem)
        return None
    key = request.hmap["sec-websocket-key"].strip()
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", generate_accept_token(key.encode()).decode()),
    ]
    offered = {p.strip() for p in request.hmap.get("sec-websocket-protocol", "").split(",")}
    if subprotocol is not None and subprotocol in offered:
        headers.append(("Sec-WebSocket-Protocol", subprotocol))
    stream = writer.upgrade(headers)
    return WebSocket(stream, limits or WebSocketLimits())


class WebSocket:
    """One accepted server-side WebSocket. See the module docstring."""

    def __init__(self, stream, limits: WebSocketLimits) -> None:
        self.stream = stream
        self.limits = limits
        self.conn = Connection(ConnectionType.SERVER)
        self.close_code: int | None = None  # set once closed (1006: the socket just went)
        self.close_reason = ""
        self._parts: list[str | bytes] = []
        self._size = 0
        self._last_heard = time.monotonic()
        self._closer: asyncio.TimerHandle | None = None

    @property
    def open(self) -> bool:
        return self.conn.state is ConnectionState.OPEN and not self.stream.closed

    # ----- receiving ------------------------------------------------------------------------
    async def receive(self) -> str | bytes | None:
        """The next whole message, or None once the WebSocket is closed (see close_code)."""
        while True:
            for event in self.conn.events():
                message = self._on_event(event)
                if message is not None:
                    return message
            if self.close_code is not None:
                return None
            data = await self._read()
            if data is None:
                continue  # a ping went out; or the idle close started
            if not data:
                self._gone(1006)
                return None
            self._last_heard = time.monotonic()
            self.conn.receive_data(data)

    async def _read(self) -> bytes | None:
        """Bytes from the peer; None after a keep-alive ping or an idle close."""
        try:
            return await asyncio.wait_for(self.stream.read(), self.limits.ping_interval)
        except TimeoutError:
            pass
        if time.monotonic() - self._last_heard >= self.limits.idle_timeout:
            await self.close(1001, "idle timeout")
            self._gone(1001, "idle timeout")
        elif self.open:
            await self._send_event(Ping(payload=b"verge"))
        return None

    def _on_event(self, event) -> str | bytes | None:
        if isinstance(event, (TextMessage, BytesMessage)):
            return self._on_data(event)
        if isinstance(event, Ping):
            self._write(self.conn.send(event.response()))
        elif isinstance(event, CloseConnection):
            self._on_close(event)
        elif isinstance(event, Pong):
            pass  # _last_heard already moved when its bytes arrived
        return None

    def _on_data(self, event: Message) -> str | bytes | None:
        self._size += len(event.data.encode() if isinstance(event.data, str) else event.data)
        if self._size > self.limits.max_message:
            self._fail(CloseReason.MESSAGE_TOO_BIG, "message too big")
            return None
        self._parts.append(event.data)
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    def _on_close(self, event: CloseConnection) -> None:
        state = self.conn.state
        if state is ConnectionState.REMOTE_CLOSING:  # the peer closes: answer, then hang up
            self._write(self.conn.send(event.response()))
        elif state is ConnectionState.OPEN:  # wsproto found a protocol error in the input
            self._write(self.conn.send(CloseConnection(code=event.code, reason=event.reason)))
        self._gone(event.code, event.reason or "")
        self.stream.close()

    def _fail(self, code: int, reason: str) -> None:
        if self.conn.state is ConnectionState.OPEN:
            self._write(self.conn.send(CloseConnection(code=code, reason=reason)))
        self._gone(code, reason)
        self.stream.close()

    def _gone(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = int(code), reason

    # ----- sending --------------------------------------------------------------------------
    async def send(self, message: str | bytes) -> None:
        """Send one message; ConnectionError if the WebSocket is closed or closing."""
        if not self.open:
            raise ConnectionResetError("websocket closed")
        event = (
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )
        await self._send_event(event)

    async def ping(self, payload: bytes = b"") -> None:
        await self._send_event(Ping(payload=payload))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the socket closes when the peer answers (or after
        CLOSE_GRACE seconds)."""
        if self.conn.state is not ConnectionState.OPEN:
            return
        self._write(self.conn.send(CloseConnection(code=code, reason=reason)))
        if self._closer is None:
            loop = asyncio.get_running_loop()
            self._closer = loop.call_later(CLOSE_GRACE, self._hang_up, code, reason)
        try:
            await self.stream.drain()
        except ConnectionError:
            self._gone(1006)

    def _hang_up(self, code: int, reason: str) -> None:
        self._gone(code, reason)
        self.stream.close()

    async def _send_event(self, event) -> None:
        try:
            data = self.conn.send(event)
        except LocalProtocolError as exc:
            raise ConnectionResetError(f"websocket closed: {exc}") from None
        self._write(data)
        await self.stream.drain()

    def _write(self, data: bytes) -> None:
        if data:
            self.stream.write(data)
