"""The demo origin as an application of verge.http.server: what it adds to every answer, the
path it routes and counts on, its socket and the ready line `verge up` waits for.

Each endpoint's caching headers and validators are tested in tests/test_origin_fixture.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import httpx
import pytest

from tests import test_origin_fixture
from verge.demo import origin as demo_origin
from verge.demo.origin import SERVER_NAME, serve_origin

demo = test_origin_fixture.demo  # the fixture: a demo origin and an httpx client on it


@pytest.mark.parametrize("path", ["/", "/no/such/thing", "/status/304", "/echo"])
async def test_every_answer_has_date_server_and_hits(demo: httpx.AsyncClient, path: str) -> None:
    response = await demo.get(path)
    assert response.headers["server"] == SERVER_NAME
    assert response.headers["date"].endswith(" GMT")
    assert response.headers["x-origin-hits"] == "1"


async def test_percent_encoded_path_is_routed_and_counted_decoded(
    demo: httpx.AsyncClient,
) -> None:
    plain = await demo.get("/static/app.js")
    encoded = await demo.get("/st%61tic/app.js")
    assert encoded.content == plain.content
    assert encoded.headers["x-origin-hits"] == "2"


async def test_connection_is_reused_after_an_echoed_body(demo: httpx.AsyncClient) -> None:
    seen: set[object] = set()
    for _ in range(3):
        response = await demo.post("/echo", content=b"payload")
        assert response.content == b"payload"
        seen.add(response.extensions["network_stream"].get_extra_info("client_addr"))
    assert len(seen) == 1


async def test_a_taken_port_is_refused_not_shared() -> None:
    server = await serve_origin("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(OSError):
        await serve_origin("127.0.0.1", port)
    server.close()
    await server.wait_closed()


class ReadyLine(logging.Handler):
    """The first log line, as an event to await."""

    def __init__(self) -> None:
        super().__init__()
        self.line = ""
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.seen.is_set():
            self.line = record.getMessage()
            self.seen.set()


async def test_serve_forever_logs_the_listening_line(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.INFO, logger=demo_origin.log.name)
    ready = ReadyLine()
    demo_origin.log.addHandler(ready)
    task = asyncio.create_task(demo_origin.serve_forever("127.0.0.1", port))
    try:
        await asyncio.wait_for(ready.seen.wait(), 5)
        line = json.loads(ready.line)
        assert (line["event"], line["url"]) == ("listening", f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/vary")).status_code == 200
    finally:
        demo_origin.log.removeHandler(ready)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
