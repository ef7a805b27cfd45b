"""Upgrade tunnels: WebSocket (any ``Upgrade``) through the edge to the route's origin.

What nginx does with ``proxy_set_header Upgrade $http_upgrade``: the request head goes to an
origin on a fresh connection of its own (an upgraded connection never returns to the
keep-alive pool) with ``Connection: Upgrade`` and ``Upgrade`` restored; the origin's ``101``
is relayed to the client, and from then on bytes are spliced both ways until either side
closes or the tunnel is idle too long. Buffers are bounded in both directions: a reader
waits while the other side's socket is slow. An origin that refuses the upgrade (any other
status) has its answer relayed as a normal response, and the client connection then closes.

The cache never sees a tunnel: it is detected in the edge's async path before the lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import httptools

from verge.http.tls import origin_client_context
from verge.http_semantics import HOP_BY_HOP

log = logging.getLogger("verge.tunnel")


@dataclass(slots=True)
class TunnelLimits:
    connect_timeout: float = 5.0
    head_timeout: float = 15.0  # the origin's answer to the upgrade request
    idle_timeout: float = 300.0  # no byte in either direction for this long: both closed
    max_head: int = 32 * 1024
    max_refusal_body: int = 1024 * 1024  # body of a non-101 answer, relayed whole
    read_size: int = 64 * 1024


class TunnelError(Exception):
    """The origin could not be reached or answered badly (status for the client)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def wants_tunnel(request, writer) -> bool:
    """A WebSocket upgrade on a connection that can be taken over (HTTP/1.1; other
    upgrades such as h2c are ignored, as RFC 9110 §7.8 allows)."""
    return "websocket" in request.hmap.get("upgrade", "").lower() and hasattr(writer, "upgrade")


@dataclass(slots=True)
class TunnelResult:
    status: int
    to_client: int = 0  # bytes relayed to the client after the head
    to_origin: int = 0


class _Head:
    """httptools callbacks collecting an origin's response head (and a small body)."""

    def __init__(self, max_head: int) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_done = False
        self.complete = False
        self._size = 0
        self._max = max_head

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4
        if self._size > self._max:
            raise TunnelError(502, "origin response head too large")
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


async def open_tunnel(
    request, writer, origins, headers: list[tuple[str, str]], limits: TunnelLimits | None = None
) -> TunnelResult:
    """Relay an Upgrade request to the first reachable origin and splice until closed.

    ``headers`` are the request headers as proxied (hop-by-hop already removed); the
    ``Upgrade`` value is taken from the client's request. Raises TunnelError before anything
    was sent to the client when no origin answers.
    """
    limits = limits or TunnelLimits()
    reader, upstream, state = await _connect(origins, limits)
    try:
        upstream.write(_request_head(request, headers, state))
        head, tail = await asyncio.wait_for(_read_head(reader, limits), limits.head_timeout)
    except TimeoutError:
        upstream.close()
        raise TunnelError(504, "origin did not answer the upgrade in time") from None
    except (OSError, httptools.HttpParserError, TunnelError) as exc:
        upstream.close()
        if isinstance(exc, TunnelError):
            raise
        raise TunnelError(502, f"origin failed during the upgrade: {exc}") from None
    if head.status != 101:
        upstream.close()
        await _relay_refusal(writer, head)
        return TunnelResult(head.status, len(head.body))
    client = writer.upgrade(_response_headers(head.headers))
    result = TunnelResult(101)
    try:
        if tail:
            client.write(tail)
            result.to_client += len(tail)
        await _splice(client, reader, upstream, limits, result)
    finally:
        upstream.close()
        client.close()
    return result


async def _connect(origins, limits: TunnelLimits):
    """A fresh connection to the first origin (in the set's failover order) that accepts:
    (reader, writer, the origin's state)."""
    last: Exception | None = None
    for state in origins.order():
        origin = state.origin
        ssl = None
        server_hostname = None
        if origin.scheme == "https":
            ssl = origin_client_context(origin.tls_ca, origin.tls_verify)
            server_hostname = origin.server_name
        try:
            reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=ssl,
                    server_hostname=server_hostname,
                    limit=limits.read_size,
                ),
                limits.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            last = exc
            log.info("tunnel: origin %s unreachable: %r", origin, exc)
            continue
        return reader, upstream, state
    raise TunnelError(502, f"no origin reachable for the upgrade: {last!r}")


def _request_head(request, headers: list[tuple[str, str]], state) -> bytes:
    if state.host_header is not None:
        headers = [(n, v) for n, v in headers if n.lower() != "host"]
        headers.append(("Host", state.host_header))
    elif not any(n.lower() == "host" for n, _ in headers):
        headers = [*headers, ("Host", state.origin.authority)]
    lines = [f"{request.method} {request.target} HTTP/1.1\r\n"]
    lines.extend(f"{n}: {v}\r\n" for n, v in headers)
    lines.append(f"Upgrade: {request.hmap['upgrade']}\r\nConnection: Upgrade\r\n\r\n")
    return "".join(lines).encode("latin-1")


async def _read_head(reader: asyncio.StreamReader, limits: TunnelLimits) -> tuple[_Head, bytes]:
    """The origin's answer: a 101 head (and the bytes after it), or a whole small response."""
    head = _Head(limits.max_head)
    parser = httptools.HttpResponseParser(head)
    received = 0
    while not head.complete:
        data = await reader.read(limits.read_size)
        if not data:
            if head.head_done:  # a close-delimited refusal body
                break
            raise TunnelError(502, "origin closed the connection during the upgrade")
        received += len(data)
        if received > limits.max_head + limits.max_refusal_body:
            raise TunnelError(502, "origin answer to the upgrade too large")
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            head.status = parser.get_status_code()
            return head, data[exc.args[0] :]
    head.status = parser.get_status_code()
    return head, b""


def _response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The origin's 101 fields for the client: Upgrade/Connection restored, no framing."""
    drop = HOP_BY_HOP | {"content-length"}
    kept = [(n, v) for n, v in headers if n.lower() not in drop]
    upgrade = next((v for n, v in headers if n.lower() == "upgrade"), "websocket")
    return [*kept, ("Upgrade", upgrade), ("Connection", "Upgrade")]


async def _relay_refusal(writer, head: _Head) -> None:
    drop = HOP_BY_HOP | {"content-length"}
    headers = [(n, v) for n, v in head.headers if n.lower() not in drop]
    writer.keep_alive = False
    writer.start(head.status, headers, content_length=len(head.body))
    await writer.write(bytes(head.body))


async def _splice(
    client,
    reader: asyncio.StreamReader,
    upstream: asyncio.StreamWriter,
    limits: TunnelLimits,
    result: TunnelResult,
) -> None:
    """Copy both ways until one side closes, fails, or the tunnel is idle too long."""
    loop = asyncio.get_running_loop()
    activity = [loop.time()]

    async def timed(read):
        while True:
            try:
                return await asyncio.wait_for(read(), limits.idle_timeout)
            except TimeoutError:
                if loop.time() - activity[0] >= limits.idle_timeout:
                    return b""

    async def client_to_origin() -> None:
        while data := await timed(client.read):
            activity[0] = loop.time()
            result.to_origin += len(data)
            upstream.write(data)
            await upstream.drain()

    async def origin_to_client() -> None:
        while data := await timed(lambda: reader.read(limits.read_size)):
            activity[0] = loop.time()
            result.to_client += len(data)
            client.write(data)
            await client.drain()

    tasks = [loop.create_task(client_to_origin()), loop.create_task(origin_to_client())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            with contextlib.suppress(ConnectionError, OSError):
                task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
