"""The origin client and its keep-alive pool against real scripted origins on loopback.

Every test runs on both the default asyncio loop and uvloop (the ``run`` fixture). Each
origin is a small asyncio server whose handler writes raw HTTP bytes, so framing, early
closes and stalls are exactly what the test says; the server counts connections and the
requests it parsed (with httptools) so reuse can be checked from the origin's side.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest
import uvloop

from verge.http.client import (
    HIGH_WATER,
    ConnectError,
    FirstByteTimeout,
    IdleTimeout,
    Origin,
    OriginPool,
    ProtocolError,
    SizedBody,
    UpstreamError,
)

# --------------------------------------------------------------------------- harness


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """Run a scenario coroutine on a fresh loop of the given flavour (10 s cap)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(scenario: Callable[[], Awaitable[None]]) -> None:
        async def capped() -> None:
            async with asyncio.timeout(10):
                await scenario()

        with asyncio.Runner(loop_factory=factory) as loop_runner:
            loop_runner.run(capped())

    return runner


@dataclass
class Req:
    """A request as the origin parsed it."""

    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    conn_id: int = 0
    index: int = 0  # 1 for the first request on its connection
    reader: asyncio.StreamReader | None = None
    done: bool = False

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.target += url.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


Handler = Callable[[Req, asyncio.StreamWriter, "FakeOrigin"], Awaitable[bool | None]]


class FakeOrigin:
    """A scripted origin. The handler writes the response; returning False closes."""

    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.closed = 0
        self.requests: list[Req] = []
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def origin(self) -> Origin:
        return Origin("https" if self.ssl_context else "http", "127.0.0.1", self.port)

    async def __aenter__(self) -> FakeOrigin:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # handlers blocked on a read see the end and return
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_closed(self, count: int) -> None:
        """Until the origin has seen ``count`` connections end."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.closed >= count)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        conn_id = self.connections
        try:
            for index in range(1, 1000):
                req = await self._read_request(reader)
                if req is None:
                    break
                req.conn_id, req.index, req.reader = conn_id, index, reader
                self.requests.append(req)
                keep = await self.handler(req, writer, self)
                await writer.drain()
                if keep is False:
                    break
        except (ConnectionError, httptools.HttpParserError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)
            self._writers.discard(writer)
            async with self._changed:
                self.closed += 1
                self._changed.notify_all()

    async def _read_request(self, reader: asyncio.StreamReader) -> Req | None:
        req = Req()
        parser = httptools.HttpRequestParser(req)
        while not req.done:
            data = await reader.read(65536)
            if not data:
                return None
            parser.feed_data(data)
        req.method = parser.get_method().decode()
        return req


async def stall_until_client_closes(req: Req) -> None:
    assert req.reader is not None
    assert await req.reader.read() == b""


def response(
    status: int = 200,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
    *,
    reason: str = "OK",
    version: str = "1.1",
    length: bool = True,
) -> bytes:
    """Raw response bytes; ``length`` adds Content-Length."""
    lines = [f"HTTP/{version} {status} {reason}"]
    lines += [f"{n}: {v}" for n, v in headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(pool: OriginPool, server: FakeOrigin, target: str = "/", method: str = "GET", **kw):
    return pool.request(server.origin, method, target, [("Host", "example.test")], **kw)


async def fetch(pool: OriginPool, server: FakeOrigin, target: str = "/", **kw) -> bytes:
    resp = await get(pool, server, target, **kw)
    assert resp.status == 200
    return await resp.read_all()


async def echo_target(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
    writer.write(response(body=f"{req.target} #{req.index}".encode()))


# --------------------------------------------------------------------------- Origin


@pytest.mark.parametrize(
    ("url", "expected", "authority"),
    [
        ("http://example.com", Origin("http", "example.com", 80), "example.com"),
        ("http://Example.COM:8080/x?y", Origin("http", "example.com", 8080), "example.com:8080"),
        ("https://cdn.example.com/", Origin("https", "cdn.example.com", 443), "cdn.example.com"),
        ("https://a.test:80", Origin("https", "a.test", 80), "a.test:80"),
        ("http://[::1]:81", Origin("http", "::1", 81), "[::1]:81"),
        ("http://127.0.0.1", Origin("http", "127.0.0.1", 80), "127.0.0.1"),
    ],
)
def test_origin_parse(url: str, expected: Origin, authority: str) -> None:
    origin = Origin.parse(url)
    assert origin == expected
    assert origin.authority == authority


@pytest.mark.parametrize(
    "url",
    [
        "",
        "example.com",
        "ftp://example.com",
        "http://",
        "http://:80",
        "http://exa mple.com",
        "http://host:99999",
        "http://host:0",
        "http://host:abc",
        "http://user:pw@host",
    ],
)
def test_origin_parse_rejects_junk(url: str) -> None:
    with pytest.raises(ValueError):
        Origin.parse(url)


def test_error_statuses() -> None:
    assert UpstreamError.status == 502
    assert ConnectError.status == 502
    assert ProtocolError.status == 502
    assert FirstByteTimeout.status == 504
    assert IdleTimeout.status == 504
    assert issubclass(FirstByteTimeout, UpstreamError)
    assert issubclass(IdleTimeout, UpstreamError)


# --------------------------------------------------------------------------- framing + reuse


def test_keepalive_reuse_and_headers_sent_as_given(run) -> None:
    async def scenario() -> None:
        async with FakeOrigin(echo_target) as server:
            pool = OriginPool()
            headers = [("Host", "site.test"), ("X-B", "2"), ("x-a", "1")]
            for i in range(3):
                resp = await pool.request(server.origin, "GET", f"/p{i}", headers)
                assert (resp.status, resp.reason, resp.version) == (200, "OK", "1.1")
                assert ("Content-Length", str(len(f"/p{i} #{i + 1}"))) in resp.headers
                assert await resp.read_all() == f"/p{i} #{i + 1}".encode()
                assert resp.complete
            assert server.connections == 1
            assert pool.stats["connects"] == 1 and pool.stats["reuses"] == 2
            assert server.requests[0].headers == headers
            await pool.close()

    run(scenario)


def test_chunked_response(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
        writer.write(response(headers=(("Transfer-Encoding", "chunked"),), length=False))
        for piece in (b"hello ", b"chunked ", b"world"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            assert await fetch(pool, server) == b"hello chunked world"
            assert await fetch(pool, server) == b"hello chunked world"
            assert server.connections == 1
            await pool.close()

    run(scenario)


def test_read_until_close_is_not_reused(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> bool:
        writer.write(response(length=False) + b"part one, ")
        await writer.drain()
        writer.write(b"part two")
        return False

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            resp = await get(pool, server)
            assert await resp.read_all() == b"part one, part two"
            assert resp.complete
            assert await fetch(pool, server) == b"part one, part two"
            assert server.connections == 2 and pool.stats["reuses"] == 0
            await pool.close()

    run(scenario)


def test_http10_origin(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> bool:
        extra = (("Connection", "keep-alive"),) if req.target == "/ka" else ()
        writer.write(response(body=b"old", headers=extra, version="1.0"))
        return True  # the origin would keep going; the client decides

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            resp = await get(pool, server)
            assert resp.version == "1.0"
            assert await resp.read_all() == b"old"
            assert await fetch(pool, server) == b"old"
            assert server.connections == 2  # HTTP/1.0 without keep-alive: closed
            assert await fetch(pool, server, "/ka") == b"old"
            assert await fetch(pool, server, "/ka") == b"old"
            assert server.connections == 3  # explicit keep-alive: reused
            await pool.close()

    run(scenario)


def test_connection_close_is_honoured(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> bool:
        writer.write(response(body=b"bye", headers=(("Connection", "close"),)))
        return True  # the origin leaves it open; the client must still not reuse it

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            assert await fetch(pool, server) == b"bye"
            await server.wait_closed(1)  # the client closed it
            assert await fetch(pool, server) == b"bye"
            assert server.connections == 2 and pool.idle_count() == 0
            await pool.close()

    run(scenario)


def test_request_connection_close_is_honoured(run) -> None:
    async def scenario() -> None:
        async with FakeOrigin(echo_target) as server:
            pool = OriginPool()
            headers = [("Host", "h"), ("Connection", "close")]
            resp = await pool.request(server.origin, "GET", "/", headers)
            await resp.read_all()
            await server.wait_closed(1)
            assert pool.idle_count() == 0
            await pool.close()

    run(scenario)


def test_head_and_bodiless_statuses(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
        # Content-Length describes the entity; none of these responses carries a body.
        status = {"/204": 204, "/304": 304}.get(req.target, 200)
        writer.write(response(status, headers=(("Content-Length", "1234"),), length=False))

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            for method, target, status in [
                ("HEAD", "/", 200),
                ("GET", "/204", 204),
                ("GET", "/304", 304),
                ("HEAD", "/", 200),
            ]:
                resp = await get(pool, server, target, method=method)
                assert resp.status == status
                assert resp.complete
                assert ("Content-Length", "1234") in resp.headers
                assert await resp.read_all() == b""
            assert server.connections == 1
            assert [r.method for r in server.requests] == ["HEAD", "GET", "GET", "HEAD"]
            await pool.close()

    run(scenario)


def test_interim_100_continue_is_skipped(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        writer.write(response(201, b"made", headers=(("X-Final", "yes"),), reason="Created"))

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            resp = await get(pool, server, method="POST", body=b"data")
            assert (resp.status, resp.reason) == (201, "Created")
            assert ("X-Final", "yes") in resp.headers
            assert not any(n == "Link" for n, _ in resp.headers)
            assert await resp.read_all() == b"made"
            await pool.close()

    run(scenario)


def test_async_iteration_and_context_manager(run) -> None:
    async def scenario() -> None:
        async with FakeOrigin(echo_target) as server:
            pool = OriginPool()
            async with await get(pool, server, "/it") as resp:
                assert b"".join([chunk async for chunk in resp]) == b"/it #1"
            assert pool.idle_count(server.origin) == 1
            await pool.close()

    run(scenario)


# --------------------------------------------------------------------------- pool lifecycle


def test_stale_keepalive_connection_is_retried_once(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> bool:
        if req.index == 2:  # the keep-alive race: the origin gave up on this connection
            return False
        writer.write(response(body=b"fresh"))
        return True

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            assert await fetch(pool, server) == b"fresh"
            assert await fetch(pool, server, method="POST", body=b"replayable") == b"fresh"
            assert pool.stats == pool.stats | {"connects": 2, "reuses": 1, "retries": 1}
            assert [(r.conn_id, r.index) for r in server.requests] == [(1, 1), (1, 2), (2, 1)]
            assert server.requests[2].body == b"replayable"
            await pool.close()

    run(scenario)


def test_stale_connection_with_streamed_body_is_not_retried(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> bool:
        if req.index == 2:
            return False
        writer.write(response(body=b"ok"))
        return True

    async def body() -> AsyncIterator[bytes]:
        yield b"once only"

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            await fetch(pool, server)
            with pytest.raises(ProtocolError, match="cannot be replayed"):
                await get(pool, server, method="PUT", body=body())
            assert pool.stats["retries"] == 0
            await pool.close()

    run(scenario)


def test_origin_closing_idle_connections(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> bool:
        writer.write(response(body=b"ok"))
        return False  # closes right after answering, without saying so

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            for n in range(1, 4):
                assert await fetch(pool, server) == b"ok"
                await server.wait_closed(n)
            assert server.connections == 3
            await pool.close()

    run(scenario)


def test_keepalive_expiry_closes_idle_connection(run) -> None:
    async def scenario() -> None:
        async with FakeOrigin(echo_target) as server:
            pool = OriginPool(keepalive_expiry=0.05)
            await fetch(pool, server)
            assert pool.idle_count() == 1
            await server.wait_closed(1)
            assert pool.stats["expired"] == 1 and pool.idle_count() == 0
            assert await fetch(pool, server, "/again") == b"/again #1"
            assert server.connections == 2
            await pool.close()

    run(scenario)


def test_max_idle_per_origin(run) -> None:
    async def scenario() -> None:
        async with FakeOrigin(echo_target) as server:
            pool = OriginPool(max_idle_per_origin=2)
            responses = [await get(pool, server, f"/{i}") for i in range(3)]
            for resp in responses:
                await resp.read_all()
            assert server.connections == 3
            await server.wait_closed(1)  # the oldest idle one was evicted
            assert pool.idle_count(server.origin) == 2
            await pool.close()
            await server.wait_closed(3)
            with pytest.raises(RuntimeError):
                await get(pool, server)

    run(scenario)


def test_releasing_an_unread_body_closes_the_connection(run) -> None:
    big = os.urandom(2 * 1024 * 1024)

    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
        writer.write(response(body=big if req.target == "/big" else b"small"))

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            resp = await get(pool, server, "/big")
            assert len(await resp.read_chunk()) > 0
            resp.release()
            await server.wait_closed(1)
            with pytest.raises(ProtocolError):
                await resp.read_all()
            assert await fetch(pool, server, "/small") == b"small"
            assert server.connections == 2
            await pool.close()

    run(scenario)


# --------------------------------------------------------------------------- errors


def test_first_byte_timeout(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")  # part of a head is not a head
        await stall_until_client_closes(req)

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool(first_byte_timeout=0.1)
            with pytest.raises(FirstByteTimeout) as info:
                await get(pool, server)
            assert info.value.status == 504
            assert f"127.0.0.1:{server.port}" in str(info.value) and "0.1s" in str(info.value)
            await server.wait_closed(1)
            await pool.close()

    run(scenario)


def test_idle_timeout_mid_body(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
        writer.write(response(body=b"x" * 1000)[:-900])
        await stall_until_client_closes(req)

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool(idle_timeout=0.1)
            resp = await get(pool, server)
            assert await resp.read_chunk() == b"x" * 100
            with pytest.raises(IdleTimeout) as info:
                await resp.read_chunk()
            assert info.value.status == 504 and "no body data" in str(info.value)
            with pytest.raises(IdleTimeout):  # the error sticks
                await resp.read_chunk()
            await server.wait_closed(1)
            await pool.close()

    run(scenario)


def test_body_shorter_than_content_length(run) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> bool:
        writer.write(response(body=b"y" * 100)[:-90])
        return False

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            resp = await get(pool, server)
            with pytest.raises(ProtocolError, match="after 10 of 100 bytes"):
                await resp.read_all()
            assert not resp.complete
            await pool.close()

    run(scenario)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "without a response"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", "inside the response head"),
        (b"SPDY/3 200 OK\r\n\r\n", "invalid response"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n", "exceeds 65536"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Many: aaaaaaaa\r\n" * 5000 + b"\r\n", "exceeds 65536"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n", "switched protocols"),
    ],
)
def test_bad_responses_are_protocol_errors(run, raw: bytes, message: str) -> None:
    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> bool:
        writer.write(raw)
        return False

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            with pytest.raises(ProtocolError, match=message) as info:
                await get(pool, server)
            assert info.value.status == 502
            await pool.close()

    run(scenario)


def test_connect_refused(run) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there

    async def scenario() -> None:
        pool = OriginPool()
        with pytest.raises(ConnectError, match="refused") as info:
            await pool.request(Origin("http", "127.0.0.1", port), "GET", "/", [])
        assert info.value.status == 502
        assert f"http://127.0.0.1:{port}" in str(info.value)
        assert pool.stats["connect_errors"] == 1
        await pool.close()

    run(scenario)


def test_connect_timeout(run) -> None:
    # A listener with a full accept queue drops further SYNs: connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)

    async def scenario() -> None:
        pool = OriginPool(connect_timeout=0.2)
        with pytest.raises(ConnectError, match="timed out connecting"):
            await pool.request(Origin("http", "127.0.0.1", port), "GET", "/", [])
        await pool.close()

    try:
        run(scenario)
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def test_dns_failure_is_a_connect_error(run) -> None:
    async def scenario() -> None:
        pool = OriginPool(connect_timeout=2)
        with pytest.raises(ConnectError):
            await pool.request(Origin("http", "no-such-host.invalid", 80), "GET", "/", [])
        await pool.close()

    run(scenario)


def test_invalid_request_is_rejected_before_sending() -> None:
    async def scenario() -> None:
        pool = OriginPool()
        origin = Origin("http", "127.0.0.1", 9)
        with pytest.raises(ValueError):
            await pool.request(origin, "GET", "/", [("X-Evil", "a\r\nInjected: 1")])
        with pytest.raises(ValueError):
            await pool.request(origin, "GET", "/a b", [])
        with pytest.raises(ValueError):
            await pool.request(origin, "GE T", "/", [])
        assert pool.stats["connects"] == 0

    asyncio.run(scenario())


# --------------------------------------------------------------------------- streaming


async def collect_body(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
    digest = hashlib.sha256(req.body).hexdigest().encode()
    writer.write(response(body=digest))


def test_streamed_chunked_upload_arrives_intact(run) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def body() -> AsyncIterator[bytes]:
        view = memoryview(payload)
        for start in range(0, len(payload), 100_000):
            yield bytes(view[start : start + 100_000])
            await asyncio.sleep(0)

    async def scenario() -> None:
        async with FakeOrigin(collect_body) as server:
            pool = OriginPool()
            resp = await get(pool, server, method="PUT", body=body())
            assert await resp.read_all() == hashlib.sha256(payload).hexdigest().encode()
            req = server.requests[0]
            assert req.header("Transfer-Encoding") == "chunked"
            assert req.header("Content-Length") is None
            # the connection is reusable after a streamed upload
            assert await fetch(pool, server, method="POST", body=b"abc") == (
                hashlib.sha256(b"abc").hexdigest().encode()
            )
            assert server.requests[1].header("Content-Length") == "3"
            assert server.connections == 1
            await pool.close()

    run(scenario)


def test_streamed_upload_with_content_length_goes_raw(run) -> None:
    async def body() -> AsyncIterator[bytes]:
        for piece in (b"abc", b"", b"defg"):
            yield piece

    async def scenario() -> None:
        async with FakeOrigin(collect_body) as server:
            pool = OriginPool()
            headers = [("Host", "h"), ("Content-Length", "999")]  # a caller's copy: ignored
            resp = await pool.request(server.origin, "POST", "/", headers, SizedBody(body(), 7))
            assert await resp.read_all() == hashlib.sha256(b"abcdefg").hexdigest().encode()
            assert server.requests[0].header("Transfer-Encoding") is None
            assert server.requests[0].body == b"abcdefg"
            await pool.close()

    run(scenario)


def test_upload_failure_is_raised_and_connection_dropped(run) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"start"
        raise RuntimeError("client went away")

    async def scenario() -> None:
        async with FakeOrigin(collect_body) as server:
            pool = OriginPool()
            with pytest.raises(RuntimeError, match="client went away"):
                await get(pool, server, method="POST", body=body())
            await server.wait_closed(1)
            assert pool.idle_count() == 0
            await pool.close()

    run(scenario)


def test_raw_upload_shorter_than_its_content_length(run) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"only five"

    async def scenario() -> None:
        async with FakeOrigin(collect_body) as server:
            pool = OriginPool()
            headers = [("Host", "h")]
            with pytest.raises(ProtocolError, match="9 bytes, Content-Length said 100"):
                await pool.request(server.origin, "PUT", "/", headers, SizedBody(body(), 100))
            await pool.close()

    run(scenario)


def test_upload_to_an_origin_that_stops_reading(run) -> None:
    async def scenario() -> None:
        async def endless() -> AsyncIterator[bytes]:
            piece = b"u" * 65536
            while True:
                yield piece

        async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.transport.pause_reading()  # never reads the body
            await closed.wait()
            writer.close()

        closed = asyncio.Event()
        server = await asyncio.start_server(deaf, "127.0.0.1", 0)
        origin = Origin("http", "127.0.0.1", server.sockets[0].getsockname()[1])
        pool = OriginPool(idle_timeout=0.1)
        with pytest.raises(IdleTimeout, match="stopped reading the request body"):
            await pool.request(origin, "PUT", "/", [("Host", "h")], endless())
        closed.set()
        await pool.close()
        server.close()

    run(scenario)


def test_early_response_while_upload_continues(run) -> None:
    async def scenario() -> None:
        head_received = asyncio.Event()
        body_received = asyncio.Event()
        origin_done = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            await head_received.wait()  # the upload only ends after request() returned
            yield b"second"

        async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response(body=b"early"))  # answers before the body is complete
            received = await reader.readuntil(b"0\r\n\r\n")
            assert b"second" in received
            body_received.set()
            await reader.readuntil(b"\r\n\r\n")  # the next request, on the same connection
            writer.write(response(body=b"next"))
            await reader.read()
            writer.close()
            origin_done.set()

        server = await asyncio.start_server(early, "127.0.0.1", 0)
        origin = Origin("http", "127.0.0.1", server.sockets[0].getsockname()[1])
        pool = OriginPool()
        resp = await pool.request(origin, "POST", "/", [("Host", "h")], body())
        assert resp.status == 200
        head_received.set()
        assert await resp.read_all() == b"early"  # released while the upload still runs
        await body_received.wait()
        second = await pool.request(origin, "GET", "/", [("Host", "h")])
        assert await second.read_all() == b"next"
        assert pool.stats["connects"] == 1 and pool.stats["reuses"] == 1
        await pool.close()
        await origin_done.wait()
        server.close()

    run(scenario)


def test_large_download_is_streamed_with_bounded_buffering(run) -> None:
    payload = os.urandom(5 * 1024 * 1024)

    async def handler(req: Req, writer: asyncio.StreamWriter, server: FakeOrigin) -> None:
        writer.write(response(body=payload))

    async def scenario() -> None:
        async with FakeOrigin(handler) as server:
            pool = OriginPool()
            resp = await get(pool, server)
            digest = hashlib.sha256()
            most_buffered = 0
            while chunk := await resp.read_chunk():
                digest.update(chunk)
                for _ in range(4):  # a consumer slower than loopback
                    await asyncio.sleep(0)
                    most_buffered = max(most_buffered, resp.buffered)
            assert digest.digest() == hashlib.sha256(payload).digest()
            assert pool.stats["pauses"] > 0
            # high-water mark plus at most one socket read
            assert most_buffered <= HIGH_WATER + 256 * 1024
            assert pool.idle_count() == 1  # auto-released at the end, reusable
            await pool.close()

    run(scenario)


# --------------------------------------------------------------------------- https


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_origin(run, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def scenario() -> None:
        async with FakeOrigin(echo_target, ssl_context=server_ctx) as server:
            pool = OriginPool(ssl=ssl.create_default_context(cafile=str(cert)))
            assert await fetch(pool, server, "/secure") == b"/secure #1"
            assert await fetch(pool, server, "/secure") == b"/secure #2"
            assert server.connections == 1
            await pool.close()

            untrusting = OriginPool(ssl=ssl.create_default_context())
            with pytest.raises(ConnectError, match="TLS"):
                await fetch(untrusting, server)
            await untrusting.close()

    run(scenario)
