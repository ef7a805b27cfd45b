"""The PROXY protocol on the plain-HTTP port: the balancer's header names the client that
rate limits, deny lists, the connection cap and logs see — read only from trusted peers,
required from them. In-process servers for the protocol, one real edge for the config."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from tests.conftest import EdgeProcess
from tests.origin import make_origin
from verge.cidr import CidrSet
from verge.http.server import HttpApp, ServerLimits, reuseport_socket, serve, text_response

pytestmark = pytest.mark.timeout(60)

GET = b"GET /who HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


class WhoApp(HttpApp):
    """Answers with the client address the server gave the request."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def handle_fast(self, request):
        return text_response(200, request.client)

    async def handle(self, request, writer) -> None:
        await writer.send(self.handle_fast(request))

    def report_protocol_error(self, client: str, status: int, message: str) -> None:
        self.refused.append(message)


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


@pytest.fixture
async def server():
    async def start(trusted: list[str]):
        app = WhoApp()
        limits = ServerLimits(proxy_from=CidrSet(trusted))
        started.append(await serve(app, reuseport_socket("127.0.0.1", 0), limits))
        return app, started[-1].sockets[0].getsockname()[1]
    started: list = []
    yield start
    for s in started:
        s.close()


async def test_a_trusted_balancer_names_the_client(server):
    _, port = await server(["127.0.0.0/8"])
    v1 = await exchange(port, b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 80\r\n" + GET)
    assert v1.startswith(b"HTTP/1.1 200") and v1.endswith(b"198.51.100.7")
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"  # v2 LOCAL: the peer stays the client
    assert (await exchange(port, local + GET)).endswith(b"127.0.0.1")
    # the header split over several reads, the request in the same read as its end
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for piece in (b"PROXY TCP6 2001:db8", b"::7 ::1 443 80", b"\r\n" + GET):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.01)  # (separate reads on the server, not an ordering need)
    assert (await asyncio.wait_for(reader.read(), 10)).endswith(b"2001:db8::7")
    writer.close()


@pytest.mark.parametrize("data", [
    GET,  # no header: required on this listener
    b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 080\r\n" + GET,
    b"PROXY TCP4 " + b"9" * 200 + b"\r\n" + GET,
])
async def test_a_missing_or_bad_header_closes_the_connection(server, data):
    app, port = await server(["127.0.0.0/8"])
    assert await exchange(port, data) == b""
    assert app.refused


async def test_an_untrusted_peer_may_not_name_a_client(server):
    app, port = await server(["10.0.0.0/8"])
    spoofed = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 80\r\n" + GET
    assert await exchange(port, spoofed) == b""
    assert app.refused == ["PROXY header from an untrusted peer"]


CONFIG = """
proxy_protocol: [127.0.0.1]
services:
  - name: site
    hosts: [127.0.0.1, t]
    origins: ["{origin}"]
    protection:
      rate_limits:
        - {{name: all, match: {{path: /}}, key: client_ip, rate: 1/m, burst: 0}}
      deny: {{cidrs: [203.0.113.0/24]}}
"""


def proxied(port: int, client: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 5000 {port}\r\n".encode() + GET)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_rate_limits_and_deny_lists_see_the_balancers_client(tmp_path):
    origin = make_origin()
    origin.route("/who", headers=[("Cache-Control", "max-age=60")], body=b"hello\n")
    edge = EdgeProcess(tmp_path, config=CONFIG.format(origin=origin.url)).start()
    try:
        assert proxied(edge.port, "203.0.113.9").startswith(b"HTTP/1.1 403")
        assert proxied(edge.port, "198.51.100.7").startswith(b"HTTP/1.1 200")
        assert proxied(edge.port, "198.51.100.7").startswith(b"HTTP/1.1 429")  # its own limit
        assert proxied(edge.port, "198.51.100.8").startswith(b"HTTP/1.1 200")  # not shared
        with edge.client() as plain, pytest.raises(httpx.TransportError):
            plain.get("/who")  # without a header: closed
    finally:
        edge.stop()
        origin.stop()
