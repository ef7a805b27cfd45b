"""The RTMP ingest server: asyncio streams around the sans-I/O :class:`RtmpSession`.

Publishers connect to ``rtmp://HOST:PORT/APP/NAME?key=KEY`` (FFmpeg sends ``NAME?key=KEY`` as
the publish name; OBS takes it as the stream key). Each publish is checked by ``authorize(app,
name, key)`` — a plain function or a coroutine function, so the key can come from config or
from the control plane — and a name that is already live is refused (the first publisher keeps
it; SRS and nginx-rtmp behave the same). Accepted streams are handed to the ``sink`` under
their path ``APP/NAME``: publish start, metadata, every audio/video tag, publish stop.

Each connection is one task reading with a timeout: garbage, a protocol error, an unsupported
codec, a publisher that stalls (no bytes for ``read_timeout``) or never gets to publishing
(``setup_timeout``) ends that connection alone, with one log line saying why; the sink hears
``on_unpublish`` for any stream that had started. Buffers are bounded: the stream reader's
limit, the session's message size limit, and writes wait for the peer (``write_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from verge.stream.rtmp.chunk import DEFAULT_MAX_MESSAGE_SIZE
from verge.stream.rtmp.session import (
    AudioTag,
    Closed,
    Error,
    Event,
    Metadata,
    Publish,
    RtmpSession,
    Unpublish,
    VideoTag,
)

log = logging.getLogger("verge.stream.ingest")

Authorize = Callable[[str, str, str | None], bool | Awaitable[bool]]
READ_SIZE = 64 * 1024


class IngestSink(Protocol):
    """Receives the live streams; ``stream`` is the path ``APP/NAME``. Calls must not block."""

    def on_publish(self, stream: str, publish: Publish) -> None: ...

    def on_metadata(self, stream: str, metadata: dict[str, Any]) -> None: ...

    def on_media(self, stream: str, tag: VideoTag | AudioTag) -> None: ...

    def on_unpublish(self, stream: str, reason: str) -> None: ...


class _End(Exception):
    """Ends one connection; the message is its log line's reason."""


class RtmpServer:
    """``async with RtmpServer(host, port, authorize, sink) as server: ... server.port``."""

    def __init__(
        self,
        host: str,
        port: int,
        authorize: Authorize,
        sink: IngestSink,
        *,
        read_timeout: float = 10.0,
        setup_timeout: float = 10.0,
        write_timeout: float = 10.0,
        max_connections: int = 256,
        apps: Collection[str] | None = None,
        chunk_size: int = 4096,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.host = host
        self.port = port
        self.authorize = authorize
        self.sink = sink
        self.read_timeout = read_timeout
        self.setup_timeout = setup_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.apps = apps
        self.chunk_size = chunk_size
        self.max_message_size = max_message_size
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._live: dict[str, _Connection] = {}

    @property
    def live(self) -> list[str]:
        """Paths (``APP/NAME``) being published right now."""
        return sorted(self._live)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, limit=READ_SIZE
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("rtmp ingest listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        """Stop listening and end every connection (sinks hear on_unpublish)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> RtmpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            log.warning("rtmp %s refused: %d connections already", _peer(writer), len(self._tasks))
            writer.close()
            return
        self._tasks.add(task)
        try:
            await _Connection(self, reader, writer).run()
        finally:
            self._tasks.discard(task)

    # Called by connections.

    def claim(self, path: str, connection: _Connection) -> bool:
        if path in self._live:
            return False
        self._live[path] = connection
        return True

    def release(self, path: str, connection: _Connection) -> None:
        if self._live.get(path) is connection:
            del self._live[path]


class _Connection:
    """One publisher's TCP connection."""

    def __init__(
        self, server: RtmpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = _peer(writer)
        self.session = RtmpSession(
            apps=server.apps, chunk_size=server.chunk_size, max_message_size=server.max_message_size
        )
        self.paths: dict[str, str] = {}  # stream name -> APP/NAME, while publishing
        self.bytes_in = 0
        self.started = time.monotonic()

    async def run(self) -> None:
        reason = "server shutting down"
        level = logging.INFO
        try:
            reason = await self._serve()
        except _End as end:
            reason, level = str(end), logging.WARNING
        except asyncio.CancelledError:
            reason = "server shutting down"
        except (ConnectionError, OSError) as exc:
            reason, level = f"connection error: {exc or type(exc).__name__}", logging.WARNING
        except Exception as exc:  # a bug must cost one connection, not the server
            log.exception("rtmp %s: internal error", self.peer)
            reason, level = f"internal error: {exc!r}", logging.ERROR
        finally:
            await self._finish(reason, level)

    async def _serve(self) -> str:
        deadline = self.started + self.server.setup_timeout
        while True:
            data = await self._read(deadline)
            if not data:
                events = self.session.connection_lost("publisher disconnected")
            else:
                self.bytes_in += len(data)
                events = self.session.feed(data)
            end = await self._dispatch(events)
            await self._flush()
            if end is not None:
                if isinstance(end, Error):
                    raise _End(end.reason)
                return end.reason

    async def _read(self, deadline: float) -> bytes:
        timeout = self.server.read_timeout
        if not self.paths:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise _End(f"no publish within {self.server.setup_timeout:g} s")
        try:
            async with asyncio.timeout(timeout):  # not wait_for: 3.11's can swallow a cancel
                return await self.reader.read(READ_SIZE)
        except TimeoutError:
            if self.paths:
                raise _End(f"stalled: no data for {timeout:g} s") from None
            raise _End(f"no publish within {self.server.setup_timeout:g} s") from None

    async def _dispatch(self, events: list[Event]) -> Closed | Error | None:
        queue = deque(events)
        while queue:
            event = queue.popleft()
            if isinstance(event, VideoTag | AudioTag):
                self._to_sink(self.server.sink.on_media, self.paths[event.name], event)
            elif isinstance(event, Metadata):
                self._to_sink(self.server.sink.on_metadata, self.paths[event.name], event.data)
            elif isinstance(event, Publish):
                queue.extend(await self._decide(event))
            elif isinstance(event, Unpublish):
                self._stop(event.name, event.reason)
            elif isinstance(event, Closed | Error):
                return event
        return None

    async def _decide(self, publish: Publish) -> list[Event]:
        path = f"{publish.app}/{publish.name}"
        if not await self._authorized(publish):
            problem = "missing stream key" if publish.key is None else "wrong stream key"
            return self.session.reject_publish(f"{problem} for {path}")
        if not self.server.claim(path, self):
            return self.session.reject_publish(f"{path} is already being published")
        self.paths[publish.name] = path
        self._to_sink(self.server.sink.on_publish, path, publish)
        log.info("rtmp %s publishing %s", self.peer, path)
        return self.session.accept_publish()

    async def _authorized(self, publish: Publish) -> bool:
        try:
            verdict = self.server.authorize(publish.app, publish.name, publish.key)
            if inspect.isawaitable(verdict):
                async with asyncio.timeout(self.server.setup_timeout):
                    verdict = await verdict
        except Exception as exc:  # an authorizer failing must not let the publisher in
            log.warning("rtmp authorize(%s/%s) failed: %r", publish.app, publish.name, exc)
            return False
        return verdict is True

    def _stop(self, name: str, reason: str) -> None:
        path = self.paths.pop(name, None)
        if path is None:
            return
        self.server.release(path, self)
        with contextlib.suppress(_End):
            self._to_sink(self.server.sink.on_unpublish, path, reason)

    def _to_sink(self, method: Callable[..., None], path: str, value: Any) -> None:
        try:
            method(path, value)
        except Exception as exc:
            log.exception("rtmp sink %s(%s) failed", getattr(method, "__name__", "?"), path)
            raise _End(f"sink error: {exc!r}") from exc

    async def _flush(self) -> None:
        data = self.session.data_to_send()
        if not data:
            return
        self.writer.write(data)
        try:
            async with asyncio.timeout(self.server.write_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise _End(f"peer not reading for {self.server.write_timeout:g} s") from None

    async def _finish(self, reason: str, level: int) -> None:
        for event in self.session.connection_lost(reason):
            if isinstance(event, Unpublish):
                self._stop(event.name, reason)
        for name in list(self.paths):  # in case the session ended without telling
            self._stop(name, reason)
        with contextlib.suppress(Exception):
            pending = self.session.data_to_send()
            if pending and not self.writer.is_closing():
                self.writer.write(pending)
        self.writer.close()
        # Best effort: a shutdown may cancel this wait too, and the log line must still follow.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        elapsed = time.monotonic() - self.started
        log.log(
            level,
            "rtmp %s ended after %.1f s, %d bytes in: %s",
            self.peer,
            elapsed,
            self.bytes_in,
            reason,
        )


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
