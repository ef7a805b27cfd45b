"""HTTP/2 server with real clients over cleartext prior knowledge: curl (nghttp2) for the
request paths and flow control, the h2 library as a raw client for concurrency and the
denial-of-service protections (rapid reset, CONTINUATION flood, invalid frames)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import ssl

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame

from verge.http.h2server import (
    H2ServerProtocol,
    request_from_fields,
    request_problem,
    response_fields,
)
from verge.http.response import FileBody, Response
from verge.http.server import ServerLimits, text_response

BIG = os.urandom(5 * 1024 * 1024)
pytestmark = pytest.mark.timeout(60)


class FakeApp:
    """A tiny application with both entry points, like the edge's."""

    def __init__(self, tmp_path) -> None:
        self.file = tmp_path / "big.bin"
        self.file.write_bytes(BIG)
        self.errors: list[str] = []
        self.release = asyncio.Event()

    def handle_fast(self, request):
        path = request.path
        if path == "/fast":
            return text_response(200, f"fast {request.host} {request.version}")
        if path == "/big":
            return Response(200, [], BIG)
        if path == "/file":
            fd = os.open(self.file, os.O_RDONLY)
            return Response(200, [], FileBody(fd, 0, len(BIG)), len(BIG))
        return None

    async def handle(self, request, writer) -> None:
        if request.path == "/echo":
            body = await request.body.read_all(16 * 1024 * 1024)
            writer.start(
                200, [("Content-Type", "application/octet-stream")], content_length=len(body)
            )
            await writer.write(body)
        elif request.path == "/async":
            writer.start(200, [("X-Stream", "yes"), ("Transfer-Encoding", "chunked")])
            await writer.write(b"hello ")
            await writer.write(request.target.encode())
        elif request.path == "/wait":
            await self.release.wait()
            writer.start(200, [], content_length=4)
            await writer.write(b"done")
        elif request.path == "/boom":
            raise RuntimeError("app bug")
        else:
            writer.start(404, [], content_length=0)

    def report_error(self, request, exc) -> None:
        self.errors.append(repr(exc))

    def report_protocol_error(self, client, status, message) -> None:
        self.errors.append(message)


@pytest.fixture
async def server(tmp_path):
    loop = asyncio.get_running_loop()
    app = FakeApp(tmp_path)
    protocols: list[H2ServerProtocol] = []

    def factory():
        proto = H2ServerProtocol(app, ServerLimits(), loop)
        protocols.append(proto)
        return proto

    srv = await loop.create_server(factory, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield app, port, protocols
    srv.close()
    for proto in protocols:
        proto.close()


async def curl(port: int, path: str, *args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--http2-prior-knowledge",
        *args,
        f"http://127.0.0.1:{port}{path}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return out


class Client:
    """An h2 client connection on a raw socket."""

    async def connect(self, port: int) -> Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()
        return self

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def request(self, path: str) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "test")],
            end_stream=True,
        )
        return stream_id

    async def events(self) -> list:
        """The next batch of events; [] at EOF."""
        data = await self.reader.read(65536)
        if not data:
            return []
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        return events

    async def goaway(self) -> h2.events.ConnectionTerminated | None:
        """Read until GOAWAY (returned) or EOF (None)."""
        while True:
            try:
                events = await self.events()
            except (ConnectionError, h2.exceptions.ProtocolError):
                return None
            if not events:
                return None
            for event in events:
                if isinstance(event, h2.events.ConnectionTerminated):
                    return event

    async def responses(self, stream_ids) -> dict[int, tuple[int, bytes]]:
        pending, status, bodies = set(stream_ids), {}, {}
        while pending:
            events = await self.events()
            assert events, "connection closed early"
            for event in events:
                if isinstance(event, h2.events.ResponseReceived):
                    status[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                elif isinstance(event, h2.events.StreamEnded):
                    pending.discard(event.stream_id)
        return {sid: (status[sid], bodies.get(sid, b"")) for sid in stream_ids}

    async def close(self) -> None:
        self.writer.close()
        await asyncio.gather(self.writer.wait_closed(), return_exceptions=True)


async def assert_still_serving(port: int) -> None:
    client = await Client().connect(port)
    sid = client.request("/fast")
    client.flush()
    assert (await client.responses([sid]))[sid] == (200, b"fast test 2")
    await client.close()


def test_response_fields_drop_connection_fields_and_own_the_length():
    fields = response_fields(
        206, [("Content-Length", "9"), ("Connection", "keep-alive"), ("Transfer-Encoding", "x"),
              ("ETag", '"a"')], 3)
    assert fields == [(b"etag", b'"a"'), (b"content-length", b"3")]
    assert response_fields(304, [("ETag", '"a"')], 3) == [(b"etag", b'"a"')]


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl missing")


@needs_curl
async def test_curl_fast_and_async_paths(server):
    _, port, _ = server
    assert await curl(port, "/fast") == b"fast 127.0.0.1 2"
    out = await curl(port, "/async?x=1", "-i")
    assert out.startswith(b"HTTP/2 200")
    assert b"x-stream: yes" in out and b"transfer-encoding" not in out
    assert out.endswith(b"hello /async?x=1")
    assert (await curl(port, "/nothing", "-o", "/dev/null", "-w", "%{http_code}")) == b"404"
    assert (await curl(port, "/boom", "-o", "/dev/null", "-w", "%{http_code}")) == b"500"


@needs_curl
@pytest.mark.parametrize("path", ["/big", "/file"])
async def test_curl_5mib_body_flow_control(server, path):
    _, port, _ = server
    out = await curl(port, path)
    assert hashlib.sha256(out).digest() == hashlib.sha256(BIG).digest()


@needs_curl
async def test_curl_post_echo(server, tmp_path):
    _, port, _ = server
    upload = tmp_path / "up.bin"
    upload.write_bytes(BIG[: 3 * 1024 * 1024 + 17])
    out = await curl(port, "/echo", "--data-binary", f"@{upload}")
    assert out == upload.read_bytes()


async def test_100_concurrent_streams(server):
    _, port, _ = server
    client = await Client().connect(port)
    ids = [client.request(f"/async?n={i}") for i in range(100)]
    client.flush()
    answers = await client.responses(ids)
    assert all(answers[sid] == (200, f"hello /async?n={i}".encode()) for i, sid in enumerate(ids))
    await client.close()


async def test_big_body_to_h2_client_default_window(server):
    """The h2 client keeps the 64 KiB default window: the server must wait for updates."""
    _, port, _ = server
    client = await Client().connect(port)
    sid = client.request("/big")
    client.flush()
    assert (await client.responses([sid]))[sid] == (200, BIG)
    await client.close()


async def test_rapid_reset_flood_gets_goaway(server):
    app, port, _ = server
    client = await Client().connect(port)
    for _ in range(H2ServerProtocol.MAX_RESETS_PER_SECOND * 3):
        sid = client.request("/wait")
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
    client.flush()
    goaway = await client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert any("rapid reset" in e for e in app.errors)
    await client.close()
    await assert_still_serving(port)


async def test_continuation_flood_rejected(server):
    _, port, _ = server
    client = await Client().connect(port)
    block = client.conn.encoder.encode(
        [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "t")]
    )
    frames = [HeadersFrame(1, data=block)]  # no END_HEADERS
    frames += [ContinuationFrame(1, data=b"\x40\x01a\x01b" * 2000) for _ in range(100)]
    client.writer.write(b"".join(f.serialize() for f in frames))
    goaway = await client.goaway()
    assert goaway is not None and goaway.error_code in (
        ErrorCodes.ENHANCE_YOUR_CALM,
        ErrorCodes.PROTOCOL_ERROR,
    )
    await client.close()
    await assert_still_serving(port)


async def test_invalid_frame_gets_goaway(server):
    _, port, _ = server
    client = await Client().connect(port)
    # WINDOW_UPDATE with a zero increment on the connection: a connection error
    client.writer.write(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    goaway = await client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    await client.close()
    # garbage instead of the connection preface
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.read()) is not None  # closed, without crashing the loop
    writer.close()
    await assert_still_serving(port)


async def test_ping_flood_gets_goaway(server):
    _, port, _ = server
    client = await Client().connect(port)
    for i in range(H2ServerProtocol.MAX_PINGS_PER_SECOND * 2):
        client.conn.ping(i.to_bytes(8, "big"))
    client.flush()
    goaway = await client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.close()


async def test_graceful_goaway_finishes_open_streams(server):
    """close_gracefully(): GOAWAY(NO_ERROR, last stream), the open stream completes, then the
    server closes. Read as raw frames: h2's client refuses frames after a GOAWAY."""
    app, port, protocols = server
    client = await Client().connect(port)
    sid = client.request("/wait")
    client.flush()
    while not protocols or not protocols[-1]._streams:
        await asyncio.sleep(0.01)
    protocols[-1].close_gracefully()
    app.release.set()
    frames = parse_frames(await client.reader.read())  # until the server closes
    goaway = next(f for f in frames if isinstance(f, GoAwayFrame))
    assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == sid
    data = [f for f in frames if isinstance(f, DataFrame) and f.stream_id == sid]
    assert b"".join(f.data for f in data) == b"done" and "END_STREAM" in data[-1].flags
    await client.close()
    await assert_still_serving(port)


def parse_frames(data: bytes) -> list:
    frames, view = [], memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


@needs_curl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
async def test_tls_alpn_h2_transport(tmp_path):
    """Handed a TLS transport negotiated with ALPN h2, the protocol serves as is."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await proc.wait() == 0
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: H2ServerProtocol(FakeApp(tmp_path), ServerLimits(), loop), "127.0.0.1", 0, ssl=ctx
    )
    port = srv.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-k",
        "--http2",
        "-w",
        " %{http_version}",
        f"https://127.0.0.1:{port}/async",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    srv.close()
    assert out == b"hello /async 2"


GOOD = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"t"), (b":path", b"/a")]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (GOOD + [(b"Accept", b"*/*")], "invalid field name"),
        (GOOD + [(b"", b"x")], "invalid field name"),
        (GOOD + [(b"x y", b"x")], "invalid field name"),
        (GOOD + [(b"connection", b"keep-alive")], "connection-specific"),
        (GOOD + [(b"transfer-encoding", b"chunked")], "connection-specific"),
        (GOOD + [(b"te", b"gzip")], "te other than trailers"),
        (GOOD + [(b"x-a", b"a\r\nb")], "CR, LF or NUL"),
        (GOOD + [(b"x-a", b"a\x00")], "CR, LF or NUL"),
        (GOOD + [(b"x-a", b" padded")], "whitespace"),
        ([GOOD[0], (b"accept", b"*/*"), *GOOD[1:]], "pseudo-header after"),
        (GOOD + [(b":path", b"/b")], "repeated pseudo-header"),
        (GOOD[:3] + [(b":status", b"200"), GOOD[3]], "unknown or repeated"),
        (GOOD[:3], "needs :method, :scheme and :path"),
        (GOOD[:3] + [(b":path", b"")], "invalid :path"),
        (GOOD[:3] + [(b":path", b"a")], "invalid :path"),
        (GOOD[:2] + [GOOD[3]], "needs :authority or host"),
        (GOOD + [(b"host", b"other")], "host differs"),
    ],
)
def test_malformed_requests_are_named(fields, reason):
    _, problem = request_from_fields(fields, "2", "127.0.0.1", "https")
    assert problem is not None and reason in problem


def test_well_formed_requests_pass():
    fields = [*GOOD, (b"te", b"trailers"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
              (b"x-empty", b"")]
    request, problem = request_from_fields(fields, "2", "127.0.0.1", "https")
    assert problem is None
    assert request.hmap["cookie"] == "a=1; b=2" and request.host == "t"
    options, problem = request_from_fields(
        [(b":method", b"OPTIONS"), (b":scheme", b"https"), (b":path", b"*"), (b"host", b"t")],
        "2", "127.0.0.1", "https")
    assert problem is None and options.target == "*"


@pytest.mark.parametrize(
    ("path", "target"),
    [(b"/public/../secret/x", "/secret/x"), (b"/%73ecret//x", "/secret/x"),
     (b"/a?b=%7e", "/a?b=~")],
)
def test_the_path_is_normalised_as_on_http1(path, target):
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", path), (b":authority", b"t")]
    request, problem = request_from_fields(fields, "2", "127.0.0.1", "https")
    assert problem is None and request.target == target


@pytest.mark.parametrize(
    ("method", "path", "authority", "status"),
    [(b"TRACE", b"/", b"t", 405), (b"GET", b"/a/..;/b", b"t", 400),
     (b"GET", b"/a%2", b"t", 400), (b"GET", b"/", b"a b", 400), (b"GET", b"/", b"u@t", 400)],
)
def test_unsafe_targets_and_authorities_are_refused(method, path, authority, status):
    fields = [(b":method", method), (b":scheme", b"https"), (b":path", path),
              (b":authority", authority)]
    request, problem = request_from_fields(fields, "2", "127.0.0.1", "https")
    assert request_problem(request, problem, ServerLimits())[0] == status


async def test_a_malformed_request_gets_a_400_and_the_connection_lives_on(server):
    _, port, _ = server
    client = await Client().connect(port)
    client.conn.config.validate_outbound_headers = False  # send what a broken client would
    client.conn.config.normalize_outbound_headers = False
    bad = client.conn.get_next_available_stream_id()
    client.conn.send_headers(bad, [(":method", "GET"), (":path", "/fast"), (":scheme", "http"),
                                   (":authority", "test"), ("Upper", "x")], end_stream=True)
    good = client.request("/fast")
    client.flush()
    answers = await client.responses([bad, good])
    assert answers[bad][0] == 400 and b"invalid field name" in answers[bad][1]
    assert answers[good][0] == 200
    await client.close()


def test_an_over_long_path_is_refused_like_on_http1():
    from verge.http.h2server import request_problem

    limits = ServerLimits(max_url_bytes=100)
    long_path = [*GOOD[:3], (b":path", b"/" + b"a" * 100)]
    request, malformed = request_from_fields(long_path, "2", "127.0.0.1", "https")
    assert request_problem(request, malformed, limits) == (414, "request URL too long")
    request, malformed = request_from_fields(GOOD, "2", "127.0.0.1", "https")
    assert request_problem(request, malformed, limits) is None
