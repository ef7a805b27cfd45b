"""HTTP/3 server against aioquic's own QUIC + H3 client, certificate verified by the dev CA:
fast-path wire bytes, (head, body) tuples, FileResponse, the async writer path and request
bodies, plus SO_REUSEPORT sharing of the UDP port."""

from __future__ import annotations

import asyncio
import os

import pytest
from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

from verge.certs import dev_certificates
from verge.http.h3server import serve_h3, server_port
from verge.http.server import FileResponse, ServerLimits, simple_response

BIG = os.urandom(1024 * 1024)
pytestmark = pytest.mark.timeout(60)


class FakeApp:
    """A tiny application with both entry points, like the edge's."""

    def __init__(self, tmp_path) -> None:
        self.file = tmp_path / "big.bin"
        self.file.write_bytes(BIG)

    def handle_fast(self, request):
        if request.path == "/fast":
            body = f"fast {request.host} {request.version} {request.scheme}".encode()
            return simple_response(200, body, extra=b"X-Fast: yes\r\n")
        if request.path == "/tuple":
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
            return (head % len(BIG), BIG)
        if request.path == "/file":
            fd = os.open(self.file, os.O_RDONLY)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG)
            return FileResponse(head, fd, 0, len(BIG))
        return None

    async def handle(self, request, writer) -> None:
        if request.path == "/boom":
            raise RuntimeError("app bug")
        if request.path == "/echo":
            body = await request.body.read_all(1 << 24)
            writer.start(201, [("X-Echo", "yes")], content_length=len(body))
            await writer.write(body)
        else:
            writer.start(200, [("X-Stream", "yes"), ("Transfer-Encoding", "chunked")])
            await writer.write(b"hello ")
            await writer.write(request.target.encode())


class H3Client(QuicConnectionProtocol):
    """Minimal HTTP/3 client: one future per request stream resolving to (headers, body)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self._responses: dict[int, tuple[list, bytearray, asyncio.Future]] = {}

    def quic_event_received(self, event) -> None:
        for h3_event in self.http.handle_event(event):
            entry = self._responses.get(h3_event.stream_id)
            if entry is None:
                continue
            headers, body, done = entry
            if isinstance(h3_event, HeadersReceived):
                headers.extend(h3_event.headers)
            elif isinstance(h3_event, DataReceived):
                body.extend(h3_event.data)
            if h3_event.stream_ended and not done.done():
                done.set_result((dict(headers), bytes(body)))

    async def request(self, method: str, path: str, body: bytes = b"",
                      authority: str = "localhost") -> tuple[dict, bytes]:
        stream_id = self._quic.get_next_available_stream_id()
        done = self._loop.create_future()
        self._responses[stream_id] = ([], bytearray(), done)
        head = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        self.http.send_headers(stream_id, head, end_stream=not body)
        if body:
            self.http.send_data(stream_id, body, end_stream=True)
        self.transmit()
        return await done


@pytest.fixture
async def h3(tmp_path):
    certs = dev_certificates(tmp_path / "certs", hosts=["localhost"])
    files = certs.hosts["localhost"]
    server = await serve_h3(
        FakeApp(tmp_path),
        "127.0.0.1",
        0,
        str(files.cert_file),
        str(files.key_file),
        ServerLimits(max_body_bytes=300_000),
    )
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.load_verify_locations(str(certs.ca.cert_file))
    async with connect(
        "127.0.0.1", server_port(server), configuration=config, create_protocol=H3Client
    ) as client:
        yield client, server
    server.close()


async def test_fast_path_wire_bytes(h3):
    client, _ = h3
    headers, body = await client.request("GET", "/fast")
    assert headers[b":status"] == b"200"
    assert headers[b"x-fast"] == b"yes"
    assert body == b"fast localhost 3 https"


async def test_fast_path_tuple_and_file(h3):
    client, _ = h3
    for path in ("/tuple", "/file"):
        headers, body = await client.request("GET", path)
        assert headers[b":status"] == b"200"
        assert b"connection" not in headers
        assert headers[b"content-length"] == str(len(BIG)).encode()
        assert body == BIG


async def test_async_writer_path(h3):
    client, _ = h3
    headers, body = await client.request("GET", "/stream?x=1")
    assert headers[b":status"] == b"200"
    assert headers[b"x-stream"] == b"yes"
    assert b"transfer-encoding" not in headers
    assert body == b"hello /stream?x=1"


async def test_request_body_echo(h3):
    client, _ = h3
    payload = os.urandom(200_000)
    headers, body = await client.request("POST", "/echo", payload)
    assert headers[b":status"] == b"201"
    assert headers[b"x-echo"] == b"yes"
    assert body == payload


async def test_oversized_body_is_413(h3):
    client, _ = h3
    headers, body = await client.request("POST", "/echo", os.urandom(400_000))
    assert headers[b":status"] == b"413"
    assert b"too large" in body
    headers, _ = await client.request("GET", "/fast")  # the connection is still usable
    assert headers[b":status"] == b"200"


async def test_app_error_is_500(h3):
    client, _ = h3
    headers, body = await client.request("GET", "/boom")
    assert headers[b":status"] == b"500"
    assert body == b"internal error\n"


async def test_concurrent_streams(h3):
    client, _ = h3
    paths = [f"/stream?n={i}" for i in range(20)]
    results = await asyncio.gather(*(client.request("GET", p) for p in paths))
    assert [body for _, body in results] == [f"hello {p}".encode() for p in paths]


async def test_head_request_has_no_body(h3):
    client, _ = h3
    # aioquic's client checks content-length against DATA even for HEAD (it does not know the
    # method of a response), so that check is switched off for this request only.
    client.http._check_content_length = lambda stream: None
    headers, body = await client.request("HEAD", "/fast")
    assert headers[b"content-length"] == b"22"
    assert headers[b":status"] == b"200"
    assert body == b""


async def test_reuse_port_lets_two_servers_share_the_port(tmp_path):
    certs = dev_certificates(tmp_path / "certs", hosts=["localhost"])
    files = certs.hosts["localhost"]
    args = (str(files.cert_file), str(files.key_file), ServerLimits())
    app = FakeApp(tmp_path)
    first = await serve_h3(app, "127.0.0.1", 0, *args)
    second = await serve_h3(app, "127.0.0.1", server_port(first), *args)
    assert server_port(second) == server_port(first)
    second.close()
    first.close()
    with pytest.raises(OSError):
        lone = await serve_h3(app, "127.0.0.1", 0, *args, reuse_port=False)
        try:
            await serve_h3(app, "127.0.0.1", server_port(lone), *args, reuse_port=False)
        finally:
            lone.close()
