"""A native HTTPS server in-process, for the native engine's protocol tests.

`NativeHarness` runs :class:`verge.http.native_h2.NativeH2Server` on an asyncio loop in a
thread of its own, in front of :class:`RecordingApp` (a small app that records every request
it is handed: the smuggling tests count them), so the tests drive it with blocking clients
(raw TLS sockets, the `h2` library, curl, openssl) without a whole edge. The tests of this
file check the harness itself: both ALPN protocols and no ALPN reach the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from verge.certs import dev_certificates
from verge.http import native_h2
from verge.http.response import FileBody, Response
from verge.http.server import HttpApp, ServerLimits, reuseport_socket, text_response
from verge.http.tls import CertSpec

needs_native = pytest.mark.skipif(
    not native_h2.available(),
    reason="verge.http._h2front is not built (run scripts/build-native.sh)",
)
pytestmark = [pytest.mark.timeout(60), needs_native]

FILE_BYTES = os.urandom(300 * 1024)
BIG_CHUNK = bytes(256 * 1024)
BIG_CHUNKS = 256  # /big: 64 MiB, far more than the socket buffers hold for a client not reading
LATE_READ = 0.3  # /late-digest waits this long before reading the body


@dataclass
class Seen:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes | None = None
    events: list[str] = field(default_factory=list)


class RecordingApp(HttpApp):
    """Records each request; answers by path (see `handle`). ``connection_gate`` is the
    per-address connection cap the server consults (verge.edge.protect.ConnectionGate)."""

    def __init__(self, file_path: Path) -> None:
        self.seen: list[Seen] = []
        self.file_path = file_path
        self.connection_gate = None
        self.errors: list[str] = []  # how /big ended when the client went away

    def _record(self, request) -> Seen:
        seen = Seen(request.method, request.target, request.version, dict(request.hmap))
        self.seen.append(seen)
        return seen

    def handle_fast(self, request):
        if request.path == "/fast" and request.body is None:
            self._record(request)
            return text_response(200, "fast\n")
        return None

    async def handle(self, request, writer) -> None:
        seen = self._record(request)
        if request.path == "/ws":
            await self._websocket_echo(request, writer)
            return
        if request.path == "/refuse":  # as a rate limit does: the body is never read
            await writer.send(text_response(429, "slow down\n"))
            return
        if request.path == "/big":
            await self._big(writer)
            return
        if request.path == "/late-digest":
            await asyncio.sleep(LATE_READ)
        body = await request.body.read_all(1 << 30) if request.body is not None else b""
        seen.body = body
        path = request.path
        if path in ("/digest", "/late-digest"):
            await writer.send(text_response(200, hashlib.sha256(body).hexdigest()))
        elif path == "/stream":
            writer.start(200, [("Content-Type", "text/plain")])
            for part in (b"one ", b"two ", b"three"):
                await writer.write(part)
            await writer.end()
        elif path == "/file":
            fd = os.open(self.file_path, os.O_RDONLY)
            headers = [("Content-Type", "application/octet-stream")]
            await writer.send(Response(200, headers, FileBody(fd, 1000, 200_000), 200_000))
        elif path == "/slow":
            await asyncio.sleep(0.5)
            await writer.send(text_response(200, "slow\n"))
        else:
            await writer.send(text_response(200, f"{request.method} {request.target}\n"))

    async def _big(self, writer) -> None:
        writer.start(200, [("Content-Type", "application/octet-stream")])
        try:
            for _ in range(BIG_CHUNKS):
                await writer.write(BIG_CHUNK)
        except (ConnectionError, asyncio.CancelledError) as exc:
            self.errors.append(type(exc).__name__)
            raise
        await writer.end()

    async def _websocket_echo(self, request, writer) -> None:
        """Accept any upgrade and echo bytes until the client closes (no WebSocket framing:
        the splice is what is tested)."""
        stream = writer.upgrade([("Upgrade", "websocket"), ("Connection", "Upgrade")])
        try:
            while data := await stream.read():
                stream.write(data)
                await stream.drain()
        finally:
            stream.close()


def session_certs(tmp_path_factory):
    """The test CA and a shop.test certificate, made once per session (files are reused)."""
    return dev_certificates(tmp_path_factory.getbasetemp() / "native-certs", hosts=["shop.test"])


class NativeHarness:
    """A NativeH2Server on its own loop thread; `call` runs a function on that loop."""

    def __init__(self, certs, tmp_path: Path, limits: ServerLimits | None = None) -> None:
        self.certs = certs
        self.ca = str(certs.ca.cert_file)
        tmp_path.mkdir(parents=True, exist_ok=True)
        file_path = tmp_path / "object.bin"
        file_path.write_bytes(FILE_BYTES)
        self.app = RecordingApp(file_path)
        self.limits = limits or ServerLimits()
        self.loop = asyncio.new_event_loop()
        self.server: native_h2.NativeH2Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        sock = reuseport_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = self.call(self._start, sock)

    def _start(self, sock: socket.socket) -> native_h2.NativeH2Server:
        shop = self.certs.hosts["shop.test"]
        spec = CertSpec(str(shop.cert_file), str(shop.key_file), ("shop.test",))
        return native_h2.NativeH2Server(self.app, sock, self.limits, [spec], spec)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop and return its result."""
        done: Future = Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(10)

    def context(self, alpn: list[str] | None = ("http/1.1",)) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def tls(self, alpn: list[str] | None = ("http/1.1",), timeout: float = 10) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return self.context(alpn).wrap_socket(raw, server_hostname="shop.test")

    def connections(self) -> int:
        return self.call(lambda: self.server.connections)

    def wait_connections(self, count: int, limit: float = 5.0) -> bool:
        """Wait until the server has ``count`` connections open (True) or ``limit`` passes."""
        deadline = time.monotonic() + limit
        while self.connections() != count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        server = self.server

        async def close() -> None:
            server.close()
            await server.wait_closed(5)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(15)
        server.native.join()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@contextlib.contextmanager
def running(certs, tmp_path: Path, limits: ServerLimits | None = None):
    """A started NativeHarness, stopped on exit. Each test module declares its fixtures
    with this (fixtures imported from another module trip ruff's F811)."""
    harness = NativeHarness(certs, tmp_path, limits)
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture(scope="session")
def native_certs(tmp_path_factory):
    return session_certs(tmp_path_factory)


@pytest.fixture
def native(native_certs, tmp_path):
    with running(native_certs, tmp_path) as harness:
        yield harness


def statuses(wire: bytes) -> list[int]:
    """The status codes of the HTTP/1.x responses in ``wire`` (bodies here never contain
    'HTTP/1.')."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", wire)]


def curl(native, *args: str, text: bool = True) -> subprocess.CompletedProcess:
    """curl against the harness (shop.test resolved to it, its CA trusted); HTTP/1.1
    unless ``args`` say otherwise."""
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--http1.1",
            "--cacert",
            native.ca,
            "--resolve",
            f"shop.test:{native.port}:127.0.0.1",
            *args,
        ],
        capture_output=True,
        text=text,
        timeout=20,
    )


def url(native, path: str) -> str:
    return f"https://shop.test:{native.port}{path}"


def read_until_closed(sock: ssl.SSLSocket, limit: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or `limit` seconds of silence)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    return data


def test_alpn_h2_http11_and_none_all_reach_the_app(native):
    for alpn, expected in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1"), (None, None)):
        with native.tls(alpn) as sock:
            assert sock.selected_alpn_protocol() == expected
            if expected != "h2":
                sock.sendall(b"GET /fast HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
                assert read_until_closed(sock).startswith(b"HTTP/1.1 200 OK\r\n")
    assert [s.version for s in native.app.seen] == ["1.1", "1.1"]
