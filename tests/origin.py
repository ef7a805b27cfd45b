"""A programmable HTTP/1.1 origin for integration tests.

Edge tests need a real origin whose every answer the test decides: status, headers, body,
how slowly and in what framing it arrives, whether it stalls half-way, and when a held
request may complete (gates, for request-collapsing tests). They also need to see what
reached the origin: per-path hit counts, the recorded requests, and how many TCP
connections were opened (keep-alive pool tests).

The server is the standard library's threading HTTP server speaking HTTP/1.1 with
keep-alive, running in a background thread of the test process on 127.0.0.1, port 0, so
both synchronous and asyncio tests can use it. ``stop()`` unblocks every handler that is
delayed, gated or stalled and closes every connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer

from verge.http.message import header_map

CHUNK_SIZE = 16 * 1024  # bytes per chunk when a route sends Transfer-Encoding: chunked
POLL = 0.05  # seconds between checks for stop() while a handler waits on a gate
BODILESS = (204, 304)


@dataclass
class RecordedRequest:
    """One request as the origin received it (body fully read)."""

    method: str
    path: str  # the request-target, query included
    headers: dict[str, str]  # lower-case names, repeated fields joined with ", "
    body: bytes


@dataclass
class Route:
    """How the origin answers a path; mutable, so a test can change it between requests."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Callable[[RecordedRequest], bytes] = b""
    delay: float = 0.0  # seconds before the response head
    chunked: bool = False  # send the body with Transfer-Encoding: chunked
    stall_after: int | None = None  # send that many body bytes, then hang until stop()
    handler: Callable[[RecordedRequest], Route] | None = None  # per-request answer


NOT_FOUND = Route(404, [("Content-Type", "text/plain")], b"no route\n")


def matches(pattern: str, target: str) -> bool:
    """Exact target, or a prefix when the pattern ends in '*'."""
    if pattern.endswith("*"):
        return target.startswith(pattern[:-1])
    return target == pattern


def best_match(patterns: dict[str, object], target: str) -> str | None:
    """The exact pattern for ``target``, else its longest matching prefix pattern."""
    if target in patterns:
        return target
    prefixes = [p for p in patterns if p.endswith("*") and matches(p, target)]
    return max(prefixes, key=len) if prefixes else None


class TestOrigin:
    """The origin: routes, gates and what it has seen. Use start()/stop() or ``with``."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        self._routes: dict[str, Route] = {}
        self._gates: dict[str, threading.Event] = {}
        self._hits: Counter[str] = Counter()
        self._changed = threading.Condition()  # guards the state above; notified on hits
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- programming the origin

    def route(self, path: str, **kw: object) -> Route:
        """Answer ``path`` (exact target incl. query, or a prefix ending in '*') so."""
        route = Route(**kw)  # type: ignore[arg-type]
        with self._changed:
            self._routes[path] = route
        return route

    def gate(self, path: str) -> threading.Event:
        """Hold responses for ``path`` (exact or 'prefix*') until the event is set."""
        with self._changed:
            return self._gates.setdefault(path, threading.Event())

    # ---- what the origin saw

    def hits(self, path: str) -> int:
        """Requests received for exactly this target (path incl. query)."""
        with self._changed:
            return self._hits[path]

    def wait_for_hits(self, path: str, count: int, timeout: float = 5.0) -> bool:
        """Block until ``hits(path) >= count`` (True) or the timeout passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._hits[path] >= count, timeout)

    # ---- life cycle

    def start(self) -> TestOrigin:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.origin = self
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": POLL}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._changed:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            _shut(sock)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> TestOrigin:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- used by the handler threads

    def _accepted(self, sock: socket.socket) -> None:
        with self._changed:
            self.connections += 1
            self._sockets.add(sock)

    def _closed(self, sock: socket.socket) -> None:
        with self._changed:
            self._sockets.discard(sock)

    def _received(self, request: RecordedRequest) -> Route:
        """Record the request and pick its route (NOT_FOUND when unrouted)."""
        with self._changed:
            self.requests.append(request)
            self._hits[request.path] += 1
            self._changed.notify_all()
            key = best_match(self._routes, request.path)
            route = self._routes[key] if key is not None else NOT_FOUND
        return route.handler(request) if route.handler is not None else route

    def _wait_gate(self, target: str) -> bool:
        """Wait for the gate on ``target``, if any; False when the origin is stopping."""
        with self._changed:
            key = best_match(self._gates, target)
            gate = self._gates[key] if key is not None else None
        if gate is None:
            return not self._stopping.is_set()
        while not gate.wait(POLL):
            if self._stopping.is_set():
                return False
        return not self._stopping.is_set()

    def _pause(self, seconds: float) -> bool:
        """Sleep; False (early) when the origin is stopping."""
        return not self._stopping.wait(seconds) if seconds > 0 else True


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() shuts the sockets instead of joining handler threads
    request_queue_size = 128  # collapsing tests open many connections at once
    origin: TestOrigin

    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # skip HTTPServer's getfqdn(): a DNS lookup
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        self.origin._accepted(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:  # type: ignore[no-untyped-def]
        self.origin._closed(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        pass  # clients hanging up mid-response are normal in edge tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def serve(self) -> None:
        origin = self.server.origin
        request = RecordedRequest(
            self.command, self.path, header_map(self.headers.items()), self.read_body()
        )
        route = origin._received(request)
        if not (origin._wait_gate(self.path) and origin._pause(route.delay)):
            self.close_connection = True
            return
        body = route.body(request) if callable(route.body) else route.body
        self.send_head(route, body)
        if self.command != "HEAD" and route.status not in BODILESS:
            self.send_body(route, body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = serve

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline(65537).split(b";")[0].strip(), 16)
            if size == 0:
                break
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after the chunk data
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields
        return b"".join(parts)

    def send_head(self, route: Route, body: bytes) -> None:
        names = {name.lower() for name, _ in route.headers}
        self.send_response_only(route.status)
        for name, value in route.headers:
            self.send_header(name, value)
        if "date" not in names:
            self.send_header("Date", self.date_time_string())
        framed = "content-length" in names or "transfer-encoding" in names
        if route.chunked and self.command != "HEAD":
            self.send_header("Transfer-Encoding", "chunked")
        elif not framed and route.status not in BODILESS:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()

    def send_body(self, route: Route, body: bytes) -> None:
        payload = body if route.stall_after is None else body[: route.stall_after]
        if route.chunked:
            for start in range(0, len(payload), CHUNK_SIZE):
                piece = payload[start : start + CHUNK_SIZE]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        else:
            self.wfile.write(payload)
        if route.stall_after is not None:
            self.close_connection = True
            self.server.origin._stopping.wait()  # hang: the client must time out
            return
        if route.chunked:
            self.wfile.write(b"0\r\n\r\n")


def make_origin() -> TestOrigin:
    """A started TestOrigin; the caller stops it."""
    return TestOrigin().start()


def origin_fixture() -> Iterator[TestOrigin]:
    """Fixture body: a started origin, stopped after the test.

    Register with ``origin = pytest.fixture(origin_fixture, name="origin")``.
    """
    origin = make_origin()
    try:
        yield origin
    finally:
        origin.stop()
