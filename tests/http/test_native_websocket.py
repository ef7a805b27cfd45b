"""WebSocket (HTTP/1.1 Upgrade) on the native listener: the 101 through hyper, then the
raw connection spliced to Python (`NativeUpgradedStream`), in-process and through a real
edge's tunnel (verge/edge/tunnel.py) to a WebSocket origin.
"""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request

from tests.conftest import EdgeProcess
from tests.http.test_native_harness import (
    needs_native,
    read_until_closed,
    running,
    session_certs,
)
from tests.http.test_websocket import EchoApp, WsClient
from verge.http.server import ServerLimits, reuseport_socket, serve
from verge.http.websocket import WebSocketLimits

pytestmark = [pytest.mark.timeout(60), needs_native]


@pytest.fixture(scope="session")
def native_certs(tmp_path_factory):
    return session_certs(tmp_path_factory)


@pytest.fixture
def native(native_certs, tmp_path):
    with running(native_certs, tmp_path) as harness:
        yield harness


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_upgraded_bytes_flow_both_ways_with_back_pressure(native):
    with native.tls() as sock:
        sock.sendall(UPGRADE + b"early bytes")  # sent before the 101: kept, not lost
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"\r\nUpgrade: websocket" in head and b"\r\nConnection: Upgrade" in head
        echoed = rest
        while len(echoed) < len(b"early bytes"):
            echoed += sock.recv(65536)
        assert echoed == b"early bytes"
        big = os.urandom(3 << 20)  # more than every buffer on the way
        sock.sendall(big[: 1 << 20])
        got = b""
        sent = 1 << 20
        while len(got) < len(big):
            got += sock.recv(1 << 20)
            if sent < len(big):
                sock.sendall(big[sent : sent + (1 << 20)])
                sent += 1 << 20
        assert got == big
        sock.shutdown(2)
    assert native.app.seen[-1].target == "/ws"


def test_a_non_upgrade_request_to_the_same_path_is_refused_by_the_app(native):
    with native.tls() as sock:  # no Upgrade header: writer.upgrade raises, the app errs (500)
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 500 ")


# ---- through a real edge: verge/edge/tunnel.py over the native listener ---------------------


@pytest.fixture
async def ws_origin():
    app = EchoApp(WebSocketLimits(max_message=4 << 20, ping_interval=30, idle_timeout=60))
    sock = reuseport_socket("127.0.0.1", 0)
    srv = await serve(app, sock, ServerLimits())
    app.port = sock.getsockname()[1]
    yield app
    srv.close()


@pytest.fixture
async def native_edge(ws_origin, native_certs, tmp_path):
    shop = native_certs.hosts["shop.test"]
    args = (
        "--https",
        "127.0.0.1:0",
        "--h2-engine",
        "native",
        "--tls-cert",
        str(shop.cert_file),
        "--tls-key",
        str(shop.key_file),
    )
    url = f"http://127.0.0.1:{ws_origin.port}"
    proc = await asyncio.to_thread(
        lambda: EdgeProcess(tmp_path, origin_url=url, extra_args=args).start()
    )
    proc.ca = str(native_certs.ca.cert_file)
    yield proc
    await asyncio.to_thread(proc.stop)


async def connect_tls(edge, target: str) -> WsClient:
    """WsClient.connect over TLS (ALPN http/1.1) to the edge's native listener."""
    ctx = ssl.create_default_context(cafile=edge.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", edge.https_port, ssl=ctx, server_hostname="shop.test"
    )
    ws = WSConnection(ConnectionType.CLIENT)
    writer.write(ws.send(Request(host="shop.test", target=target)))
    while True:
        data = await asyncio.wait_for(reader.read(65536), 10)
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                client = WsClient(reader, writer, ws, event)
                client._pending = list(ws.events())
                return client
            if isinstance(event, RejectConnection):
                raise AssertionError(f"refused: {event.status_code}")
        if not data:
            raise AssertionError("closed during the handshake")


async def test_websocket_through_the_edge_both_ways_and_closes(ws_origin, native_edge):
    client = await connect_tls(native_edge, "/greet")
    assert await client.receive() == "hello"
    await client.send("over TLS, ünïcode")
    assert await client.receive() == "over TLS, ünïcode"
    big = os.urandom(3 << 20)
    await client.send(big)
    assert await client.receive(timeout=30) == big
    answer = await client.close(1000)
    assert isinstance(answer, CloseConnection) and answer.code == 1000
    assert await asyncio.wait_for(ws_origin.closed.get(), 10) == (1000, "")


async def test_a_close_from_the_origin_reaches_the_tls_client(ws_origin, native_edge):
    client = await connect_tls(native_edge, "/echo")
    await client.send("bye")
    closed = await client.receive()
    assert isinstance(closed, CloseConnection) and closed.code == 1000
    assert await client.eof()
