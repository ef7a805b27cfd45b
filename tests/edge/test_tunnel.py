"""WebSocket through a real edge process to a real origin: the Upgrade tunnel.

The origin is our HTTP server with a WebSocket echo application (in the test's loop); the
edge is `verge edge --origin ...` as a child process. Both directions, close propagation
from either side, refusals, an unreachable origin, and plain requests next to tunnels; and
in-process, the idle timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import dataclass

import httpx
import pytest
from wsproto.events import CloseConnection

from tests.conftest import EdgeProcess
from tests.http.test_websocket import EchoApp, HandshakeRefused, WsClient
from verge.edge.origins import OriginSet
from verge.edge.tunnel import TunnelLimits, open_tunnel
from verge.http.server import HttpApp, ServerLimits, reuseport_socket, serve
from verge.http.websocket import WebSocketLimits, accept, is_websocket_request

pytestmark = pytest.mark.timeout(60)


class Origin(EchoApp):
    """EchoApp, plus /headers: the request head the origin received, as one JSON message."""

    async def handle(self, request, writer) -> None:
        if request.path == "/headers" and is_websocket_request(request):
            ws = await accept(request, writer, limits=self.limits)
            await ws.send(json.dumps({"target": request.target, "headers": request.headers}))
            while await ws.receive() is not None:
                pass
            return
        await super().handle(request, writer)


@pytest.fixture
async def origin():
    app = Origin(WebSocketLimits(max_message=4 << 20, ping_interval=30, idle_timeout=60))
    sock = reuseport_socket("127.0.0.1", 0)
    srv = await serve(app, sock, ServerLimits())
    app.port = sock.getsockname()[1]
    yield app
    srv.close()


@pytest.fixture
async def edge(origin, tmp_path):
    url = f"http://127.0.0.1:{origin.port}"
    proc = await asyncio.to_thread(lambda: EdgeProcess(tmp_path, origin_url=url).start())
    yield proc
    await asyncio.to_thread(proc.stop)


async def test_messages_flow_both_ways_through_the_edge(origin, edge):
    client = await WsClient.connect(edge.port, "/greet", host="site.test")
    assert await client.receive() == "hello"  # origin -> client, unprompted
    await client.send("<b>hi</b> ünïcode")
    assert await client.receive() == "<b>hi</b> ünïcode"
    big = os.urandom(3 << 20)  # larger than every buffer on the way: back-pressure both ways
    await client.send(big)
    assert await client.receive(timeout=30) == big
    await client.close()


async def test_the_origin_sees_the_handshake_with_proxy_fields(origin, edge):
    client = await WsClient.connect(
        edge.port, "/headers?room=1", host="site.test", subprotocols=["chat.v1"]
    )
    seen = json.loads(await client.receive())
    headers = {n.lower(): v for n, v in seen["headers"]}
    assert seen["target"] == "/headers?room=1"
    assert headers["upgrade"] == "websocket" and headers["connection"] == "Upgrade"
    assert headers["host"] == "site.test"
    assert headers["sec-websocket-protocol"] == "chat.v1"
    assert "127.0.0.1" in headers["x-forwarded-for"] and headers["via"].startswith("1.1 ")
    await client.close()


async def test_a_close_from_the_client_reaches_the_origin(origin, edge):
    client = await WsClient.connect(edge.port, "/echo")
    await client.send("ping")
    assert await client.receive() == "ping"
    answer = await client.close(1000)
    assert isinstance(answer, CloseConnection) and answer.code == 1000
    assert await asyncio.wait_for(origin.closed.get(), 10) == (1000, "")


async def test_a_close_from_the_origin_reaches_the_client(origin, edge):
    client = await WsClient.connect(edge.port, "/echo")
    await client.send("bye")
    closed = await client.receive()
    assert isinstance(closed, CloseConnection)
    assert (closed.code, closed.reason) == (1000, "as you wish")
    assert await client.eof()  # the origin hung up, so did the edge


async def test_a_vanished_client_closes_the_origin_side(origin, edge):
    client = await WsClient.connect(edge.port, "/echo")
    await client.send("x")
    assert await client.receive() == "x"
    client.abort()
    assert (await asyncio.wait_for(origin.closed.get(), 10))[0] == 1006


async def test_a_refused_upgrade_is_relayed(origin, edge):
    with pytest.raises(HandshakeRefused) as refused:
        await WsClient.connect(edge.port, "/refuse")
    assert refused.value.status == 403 and refused.value.body == b"plain answer\n"


async def test_an_unreachable_origin_is_a_502(tmp_path):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proc = await asyncio.to_thread(
        lambda: EdgeProcess(tmp_path, origin_url=f"http://127.0.0.1:{dead}").start()
    )
    try:
        with pytest.raises(HandshakeRefused) as refused:
            await WsClient.connect(proc.port, "/echo")
        assert refused.value.status == 502
    finally:
        await asyncio.to_thread(proc.stop)


async def test_plain_requests_beside_tunnels_are_unaffected(origin, edge):
    client = await WsClient.connect(edge.port, "/echo")
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        for _ in range(2):  # one keep-alive connection, two requests
            response = await http.get("/page")
            assert response.status_code == 200 and response.text == "plain answer\n"
            assert "cache-status" in response.headers
        # a GET naming the same path without Upgrade is a normal request
        response = await http.get("/echo")
        assert response.status_code == 200 and response.text == "plain answer\n"
    await client.send("still open")
    assert await client.receive() == "still open"
    await client.close()


# ---- the tunnel in-process: limits that the edge process does not expose ---------------------


@dataclass(frozen=True)
class Spec:
    url: str
    weight: int = 1
    host_header: str | None = None

    def tls_options(self) -> dict:
        return {}


class TunnelApp(HttpApp):
    """A minimal proxy: every request is tunnelled with the given limits."""

    def __init__(self, origin_port: int, limits: TunnelLimits) -> None:
        self.origins = OriginSet([Spec(f"http://127.0.0.1:{origin_port}")], pool=None)
        self.limits = limits
        self.results: asyncio.Queue = asyncio.Queue()

    async def handle(self, request, writer) -> None:
        headers = [(n, v) for n, v in request.headers if n.lower() not in ("upgrade", "connection")]
        result = await open_tunnel(request, writer, self.origins, headers, self.limits)
        await self.results.put(result)


async def test_an_idle_tunnel_is_closed_on_both_sides(origin):
    app = TunnelApp(origin.port, TunnelLimits(idle_timeout=0.5))
    sock = reuseport_socket("127.0.0.1", 0)
    srv = await serve(app, sock, ServerLimits())
    try:
        client = await WsClient.connect(sock.getsockname()[1], "/echo")
        await client.send("once")
        assert await client.receive() == "once"
        started = asyncio.get_running_loop().time()
        assert await client.eof()  # nothing for idle_timeout: the tunnel closes the client...
        assert asyncio.get_running_loop().time() - started >= 0.4
        assert (await asyncio.wait_for(origin.closed.get(), 10))[0] == 1006  # ...and the origin
        result = await app.results.get()
        assert result.status == 101 and result.to_origin > 0 and result.to_client > 0
    finally:
        srv.close()
