"""Live chat beside each stream: one WebSocket room per stream at ``/APP/NAME/chat``.

Why on the stream server: viewers of a stream reach it through the edges already (the edge
tunnels the WebSocket to its origin), so a room is simply the set of connections for one
stream name; no broker is needed for one stream server.

Protocol (JSON text frames). A client sends ``{"name": "...", "text": "..."}``; the server
sends ``{"type": "hello", ...}`` on join (viewer count, recent history, the limits), then
``{"type": "message", "name", "text", "ts"}`` for every message in the room (the sender's
own included), and ``{"type": "error", "error"}`` when a message is refused.

The server escapes ``name`` and ``text`` for HTML (a page may insert them as markup and
shows ``<b>`` literally), stamps ``ts`` (Unix ms, server clock), and enforces: a text of at
most ``max_text`` characters, ``rate`` messages per ``window`` seconds per connection (an
error frame each time; the ``strikes``-th violation closes with 1008), WebSocket messages of
at most ``max_frame`` bytes (1009), ``max_viewers`` connections per stream (503 before the
upgrade), and a bounded send queue per viewer: a viewer that cannot keep up is dropped,
never slowing the room down.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections import deque
from dataclasses import dataclass

from verge.http.websocket import WebSocket, WebSocketLimits, accept, refuse

log = logging.getLogger("verge.chat")

POLICY_VIOLATION = 1008


@dataclass(slots=True)
class ChatLimits:
    max_text: int = 500  # characters of one message's text
    max_name: int = 32  # characters of a display name
    max_frame: int = 4096  # bytes of one WebSocket message (JSON included)
    rate: int = 5  # messages per window per connection
    window: float = 10.0
    strikes: int = 3  # refused messages before the connection is closed
    max_viewers: int = 1000  # chat connections per stream
    queue: int = 64  # messages waiting for one viewer; a full queue drops that viewer
    history: int = 20  # recent messages a new viewer receives


class ChatInputError(ValueError):
    """A client message the room refuses (the reason goes back in an error frame)."""


def parse_message(raw: str | bytes, limits: ChatLimits) -> tuple[str, str]:
    """A client frame -> (name, text), stripped; ChatInputError when it is refused."""
    if isinstance(raw, bytes):
        raise ChatInputError("send JSON text frames")
    try:
        data = json.loads(raw)
    except ValueError:
        raise ChatInputError("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise ChatInputError('expected {"name": "...", "text": "..."}')
    name = data.get("name")
    name = name.strip() if isinstance(name, str) else ""
    text = data["text"].strip()
    if not text:
        raise ChatInputError("empty message")
    if len(text) > limits.max_text:
        raise ChatInputError(f"message longer than {limits.max_text} characters")
    return (name[: limits.max_name] or "anonymous"), text


def render_message(name: str, text: str, now: float | None = None) -> str:
    """The broadcast frame: name and text HTML-escaped, server timestamp in ms."""
    ts = int((time.time() if now is None else now) * 1000)
    return json.dumps(
        {"type": "message", "name": html.escape(name), "text": html.escape(text), "ts": ts},
        ensure_ascii=False,
    )


def error_frame(reason: str) -> str:
    return json.dumps({"type": "error", "error": reason})


class RateLimit:
    """At most ``rate`` events per sliding ``window`` seconds."""

    def __init__(self, rate: int, window: float) -> None:
        self.rate = rate
        self.window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.rate:
            return False
        self._times.append(now)
        return True


class Viewer:
    """One chat connection: its WebSocket, its bounded send queue and its limits' state."""

    def __init__(self, ws: WebSocket, limits: ChatLimits) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str] = asyncio.Queue(limits.queue)
        self.rate = RateLimit(limits.rate, limits.window)
        self.strikes = 0
        self.dropped = False

    def offer(self, frame: str) -> bool:
        """Queue a frame; False (and the viewer is dropped) when the queue is full."""
        if self.dropped:
            return False
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.dropped = True
            self.ws.stream.close()  # a slow reader must not hold the room's memory
            return False
        return True

    async def pump(self) -> None:
        """Send queued frames in order until the connection ends."""
        with contextlib.suppress(ConnectionError):
            while True:
                await self.ws.send(await self.queue.get())
                self.queue.task_done()


class ChatRoom:
    """The viewers of one stream and its recent messages."""

    def __init__(self, stream: str, limits: ChatLimits) -> None:
        self.stream = stream
        self.limits = limits
        self.viewers: set[Viewer] = set()
        self.history: deque[str] = deque(maxlen=limits.history)

    def hello(self) -> str:
        limits = self.limits
        return json.dumps(
            {
                "type": "hello",
                "stream": self.stream,
                "viewers": len(self.viewers),
                "history": [json.loads(m) for m in self.history],
                "limits": {"text": limits.max_text, "rate": limits.rate, "window": limits.window},
            },
            ensure_ascii=False,
        )

    def broadcast(self, frame: str) -> int:
        """Queue a frame for every viewer; returns how many slow viewers were dropped."""
        self.history.append(frame)
        return sum(not viewer.offer(frame) for viewer in list(self.viewers))


class ChatHub:
    """All rooms of a stream server. ``serve`` runs one viewer's connection to its end."""

    def __init__(self, limits: ChatLimits | None = None) -> None:
        self.limits = limits or ChatLimits()
        self.rooms: dict[str, ChatRoom] = {}
        self._sockets: set[WebSocket] = set()

    def viewers(self, stream: str) -> int:
        room = self.rooms.get(stream)
        return len(room.viewers) if room else 0

    async def serve(self, request, writer, stream: str) -> None:
        room = self.rooms.get(stream)
        if room is not None and len(room.viewers) >= self.limits.max_viewers:
            await refuse(writer, 503, "this chat is full")
            return
        ws = await accept(
            request, writer, limits=WebSocketLimits(max_message=self.limits.max_frame)
        )
        if ws is None:
            return
        room = self.rooms.setdefault(stream, room or ChatRoom(stream, self.limits))
        viewer = Viewer(ws, self.limits)
        viewer.offer(room.hello())
        room.viewers.add(viewer)
        self._sockets.add(ws)
        sender = asyncio.get_running_loop().create_task(viewer.pump())
        try:
            while (raw := await ws.receive()) is not None:
                await self._on_frame(room, viewer, raw)
        finally:
            self._sockets.discard(ws)
            room.viewers.discard(viewer)
            if not room.viewers and self.rooms.get(stream) is room:
                del self.rooms[stream]
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def _on_frame(self, room: ChatRoom, viewer: Viewer, raw: str | bytes) -> None:
        try:
            name, text = parse_message(raw, self.limits)
            if not viewer.rate.allow(time.monotonic()):
                raise ChatInputError(
                    f"slow down: at most {self.limits.rate} messages per {self.limits.window:g} s"
                )
        except ChatInputError as exc:
            viewer.strikes += 1
            viewer.offer(error_frame(str(exc)))
            if viewer.strikes >= self.limits.strikes:
                log.info("chat %s: closing a connection from abuse (%s)", room.stream, exc)
                await self._close_after_queue(viewer, "too many refused messages")
            return
        dropped = room.broadcast(render_message(name, text))
        if dropped:
            log.info("chat %s: dropped %d slow viewer(s)", room.stream, dropped)

    async def _close_after_queue(self, viewer: Viewer, reason: str) -> None:
        """Let the error frame go out, then close with 1008."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await viewer.queue.join()
        await viewer.ws.close(POLICY_VIOLATION, reason)

    async def close(self) -> None:
        """Close every chat connection (server shutdown): 1001 going away."""
        for ws in list(self._sockets):
            with contextlib.suppress(ConnectionError):
                await ws.close(1001, "server shutting down")
