"""Tests of the two origins the rest of the suite and the demo rely on.

``tests/origin.py`` is what every edge integration test stands on, so its routes, counters,
gates and odd framings must behave exactly as documented; ``verge/demo/origin.py`` is what a
new user sees first, so each endpoint's caching headers and validators are checked here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.origin import RecordedRequest, Route, TestOrigin, make_origin, origin_fixture
from verge.demo.origin import BIG_DEFAULT, big_bytes, serve_origin

origin = pytest.fixture(origin_fixture, name="origin")


# --------------------------------------------------------------------------- TestOrigin


def test_route_answers_with_status_headers_body_and_date(origin: TestOrigin) -> None:
    origin.route("/a?x=1", status=201, headers=[("X-Test", "yes")], body=b"hello")
    response = httpx.get(origin.url + "/a?x=1")
    assert response.status_code == 201
    assert response.headers["x-test"] == "yes"
    assert response.headers["content-length"] == "5"
    assert "date" in response.headers
    assert response.content == b"hello"


def test_unrouted_path_is_404_and_still_counted(origin: TestOrigin) -> None:
    origin.route("/a", body=b"a")
    response = httpx.get(origin.url + "/a?other=1")
    assert response.status_code == 404
    assert response.content
    assert origin.hits("/a?other=1") == 1
    assert origin.hits("/a") == 0


def test_hits_and_recorded_requests(origin: TestOrigin) -> None:
    origin.route("/p", body=b"p")
    with httpx.Client(base_url=origin.url) as client:
        client.get("/p", headers={"X-Custom": "one"})
        client.get("/p")
    assert origin.hits("/p") == 2
    first = origin.requests[0]
    assert (first.method, first.path, first.body) == ("GET", "/p", b"")
    assert first.headers["x-custom"] == "one"


def test_prefix_route_and_exact_route_wins(origin: TestOrigin) -> None:
    origin.route("/img/*", body=b"prefix")
    origin.route("/img/special", body=b"exact")
    with httpx.Client(base_url=origin.url) as client:
        assert client.get("/img/a.png?v=2").content == b"prefix"
        assert client.get("/img/special").content == b"exact"
    assert origin.hits("/img/a.png?v=2") == 1


def test_keep_alive_reuses_one_connection(origin: TestOrigin) -> None:
    origin.route("/k", body=b"k" * 1000)
    with httpx.Client(base_url=origin.url) as client:
        for _ in range(3):
            assert client.get("/k").status_code == 200
    assert origin.connections == 1
    with httpx.Client(base_url=origin.url) as client:
        client.get("/k")
    assert origin.connections == 2


def test_request_bodies_are_read_fully(origin: TestOrigin) -> None:
    origin.route("/up", status=204)

    def parts() -> Iterator[bytes]:
        yield b"abc" * 1000
        yield b"def"

    with httpx.Client(base_url=origin.url) as client:
        client.post("/up", content=b"x" * 100_000)
        client.put("/up", content=parts())  # an iterator goes out chunked
        client.get("/up")  # the connection is still in step after both bodies
    bodies = [r.body for r in origin.requests]
    assert bodies == [b"x" * 100_000, b"abc" * 1000 + b"def", b""]
    assert origin.requests[1].headers["transfer-encoding"] == "chunked"
    assert origin.connections == 1


def test_body_callable_and_handler(origin: TestOrigin) -> None:
    origin.route("/len", body=lambda req: str(len(req.body)).encode())

    def revalidate(req: RecordedRequest) -> Route:
        if req.headers.get("if-none-match") == '"v1"':
            return Route(status=304, headers=[("ETag", '"v1"')])
        return Route(headers=[("ETag", '"v1"')], body=b"full")

    origin.route("/r", handler=revalidate)
    with httpx.Client(base_url=origin.url) as client:
        assert client.post("/len", content=b"12345").content == b"5"
        assert client.get("/r").content == b"full"
        not_modified = client.get("/r", headers={"If-None-Match": '"v1"'})
    assert not_modified.status_code == 304
    assert not_modified.content == b""


def test_chunked_response(origin: TestOrigin) -> None:
    body = bytes(range(256)) * 200
    origin.route("/c", body=body, chunked=True)
    response = httpx.get(origin.url + "/c")
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert response.content == body


def test_head_has_length_but_no_body(origin: TestOrigin) -> None:
    origin.route("/h", body=b"12345")
    response = httpx.head(origin.url + "/h")
    assert response.headers["content-length"] == "5"
    assert response.content == b""


def test_delay_holds_the_response_head(origin: TestOrigin) -> None:
    origin.route("/slow", delay=0.2, body=b"s")
    started = time.monotonic()
    assert httpx.get(origin.url + "/slow").content == b"s"
    assert time.monotonic() - started >= 0.2


def test_gate_holds_until_set(origin: TestOrigin) -> None:
    origin.route("/g", body=b"released")
    gate = origin.gate("/g")
    results: list[httpx.Response] = []
    done = threading.Event()

    def fetch() -> None:
        results.append(httpx.get(origin.url + "/g"))
        done.set()

    worker = threading.Thread(target=fetch)
    worker.start()
    assert origin.wait_for_hits("/g", 1)
    assert not done.wait(0.1)  # held at the origin
    gate.set()
    worker.join(5)
    assert results[0].content == b"released"


def test_stall_after_sends_part_then_hangs(origin: TestOrigin) -> None:
    origin.route("/stall", body=b"a" * 10_000, stall_after=1000)
    received = bytearray()
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=0.5)) as client,
        client.stream("GET", origin.url + "/stall") as response,
    ):
        assert response.headers["content-length"] == "10000"
        with pytest.raises(httpx.ReadTimeout):
            for piece in response.iter_raw():
                received += piece
    assert bytes(received) == b"a" * 1000


def test_stop_releases_gated_requests() -> None:
    server = make_origin()
    server.route("/never", body=b"x")
    server.gate("/never")  # never set
    errors: list[Exception] = []

    def fetch() -> None:
        try:
            httpx.get(server.url + "/never", timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    worker = threading.Thread(target=fetch)
    worker.start()
    assert server.wait_for_hits("/never", 1)
    started = time.monotonic()
    server.stop()
    worker.join(5)
    assert not worker.is_alive()
    assert time.monotonic() - started < 2
    assert errors


# --------------------------------------------------------------------------- demo origin


@pytest.fixture
async def demo() -> AsyncIterator[httpx.AsyncClient]:
    server = await serve_origin("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield client
    server.close()
    await server.wait_closed()


def hits(response: httpx.Response) -> int:
    return int(response.headers["x-origin-hits"])


async def test_home_lists_the_endpoints(demo: httpx.AsyncClient) -> None:
    response = await demo.get("/")
    assert response.headers["content-type"].startswith("text/html")
    for path in ("/static/app.js", "/api/time", "/etag/", "/vary", "/tagged/", "/echo"):
        assert path in response.text


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/static/app.js", "application/javascript"),
        ("/static/style.css", "text/css"),
        ("/static/logo.svg", "image/svg+xml"),
    ],
)
async def test_static_assets_are_cacheable_and_validated(
    demo: httpx.AsyncClient, path: str, content_type: str
) -> None:
    first = await demo.get(path)
    assert first.headers["content-type"] == content_type
    assert first.headers["cache-control"] == "public, max-age=86400"
    etag, last_modified = first.headers["etag"], first.headers["last-modified"]
    by_etag = await demo.get(path, headers={"If-None-Match": etag})
    by_date = await demo.get(path, headers={"If-Modified-Since": last_modified})
    changed = await demo.get(path, headers={"If-None-Match": '"other"'})
    assert (by_etag.status_code, by_etag.content, by_etag.headers["etag"]) == (304, b"", etag)
    assert by_date.status_code == 304
    assert changed.status_code == 200
    assert [hits(r) for r in (first, by_etag, by_date, changed)] == [1, 2, 3, 4]


async def test_origin_hits_count_per_path(demo: httpx.AsyncClient) -> None:
    counts = [hits(await demo.get(p)) for p in ("/vary", "/vary", "/api/time", "/vary")]
    assert counts == [1, 2, 1, 3]


async def test_big_body_has_requested_size_and_deterministic_bytes(
    demo: httpx.AsyncClient,
) -> None:
    response = await demo.get("/static/big.bin", params={"size": 1_000_003})
    assert response.headers["content-length"] == "1000003"
    assert response.headers["etag"] == '"big-1000003"'
    assert response.content == big_bytes(1_000_003)
    again = await demo.get("/static/big.bin", params={"size": 1_000_003})
    assert hashlib.sha256(again.content).digest() == hashlib.sha256(response.content).digest()


async def test_big_body_default_is_10_mib_streamed(demo: httpx.AsyncClient) -> None:
    head = await demo.head("/static/big.bin")
    assert head.headers["content-length"] == str(BIG_DEFAULT) == str(10 * 1024 * 1024)
    received = 0
    async with demo.stream("GET", "/static/big.bin") as response:
        async for piece in response.aiter_raw():
            received += len(piece)
    assert received == BIG_DEFAULT


async def test_big_body_limits_and_revalidation(demo: httpx.AsyncClient) -> None:
    assert (await demo.get("/static/big.bin?size=1073741825")).status_code == 400
    assert (await demo.get("/static/big.bin?size=-1")).status_code == 400
    revalidated = await demo.get("/static/big.bin?size=5", headers={"If-None-Match": '"big-5"'})
    assert revalidated.status_code == 304
    assert (await demo.get("/static/big.bin?size=0")).content == b""


async def test_api_time_is_short_lived_json(demo: httpx.AsyncClient) -> None:
    response = await demo.get("/api/time")
    assert response.headers["cache-control"] == "public, max-age=5"
    assert abs(response.json()["epoch"] - time.time()) < 60


async def test_api_items_echo_the_normalised_query(demo: httpx.AsyncClient) -> None:
    response = await demo.get("/api/items?sort=name&utm=x&page=2")
    data = response.json()
    assert response.headers["cache-control"] == "public, max-age=30"
    assert (data["page"], data["sort"], data["query"]) == (2, "name", "page=2&sort=name")
    assert data["ignored"] == ["utm"]
    names = [item["name"] for item in data["items"]]
    assert names == sorted(names) and len(names) == 10
    assert (await demo.get("/api/items")).json()["query"] == "page=1&sort=id"
    assert (await demo.get("/api/items?page=0")).status_code == 400
    assert (await demo.get("/api/items?sort=colour")).status_code == 400


async def test_dynamic_hello_is_no_store_and_reads_the_cookie(demo: httpx.AsyncClient) -> None:
    response = await demo.get("/dynamic/hello", headers={"Cookie": "theme=dark; name=Ada"})
    assert response.headers["cache-control"] == "no-store"
    assert response.text.startswith("Hello, Ada!")
    assert (await demo.get("/dynamic/hello")).text.startswith("Hello, world!")


async def test_etag_endpoint_is_revalidated_every_time(demo: httpx.AsyncClient) -> None:
    first = await demo.get("/etag/abc")
    assert first.headers["etag"] == '"abc-v1"'
    assert "cache-control" not in first.headers
    assert "last-modified" not in first.headers
    second = await demo.get("/etag/abc", headers={"If-None-Match": 'W/"abc-v1"'})
    assert (second.status_code, second.content, hits(second)) == (304, b"", 2)
    assert (await demo.get("/etag/abc", headers={"If-None-Match": '"zzz"'})).status_code == 200
    assert (await demo.get("/etag/a%20b")).status_code == 400


async def test_vary_on_accept_language(demo: httpx.AsyncClient) -> None:
    french = await demo.get("/vary", headers={"Accept-Language": "de;q=0.5, fr-CH, en;q=0.8"})
    assert french.headers["vary"] == "Accept-Language"
    assert (french.text, french.headers["content-language"]) == ("Bonjour!\n", "fr")
    assert (await demo.get("/vary")).text == "Hello!\n"


async def test_tagged_has_surrogate_keys(demo: httpx.AsyncClient) -> None:
    response = await demo.get("/tagged/news")
    assert response.headers["surrogate-key"] == "tag-news all"
    assert response.headers["cache-control"] == "public, max-age=3600"


async def test_slow_waits_then_is_cacheable(demo: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await demo.get("/slow?ms=100")
    assert time.monotonic() - started >= 0.1
    assert response.headers["cache-control"] == "public, max-age=60"
    assert (await demo.get("/slow?ms=999999")).status_code == 400


async def test_status_codes_and_not_found(demo: httpx.AsyncClient) -> None:
    unavailable = await demo.get("/status/503")
    assert (unavailable.status_code, unavailable.text) == (503, "503 Service Unavailable\n")
    no_content = await demo.get("/status/204")
    assert (no_content.status_code, no_content.content) == (204, b"")
    assert (await demo.get("/status/302")).headers["location"] == "/"
    assert (await demo.get("/status/99")).status_code == 400
    missing = await demo.get("/no/such/thing")
    assert (missing.status_code, hits(missing)) == (404, 1)
    assert (await demo.post("/static/app.js", content=b"x")).status_code == 405


async def test_echo_streams_the_body_back(demo: httpx.AsyncClient) -> None:
    payload = big_bytes(3 * 1024 * 1024 + 17)
    response = await demo.put("/echo", content=payload, headers={"X-Probe": "1"})
    assert response.headers["x-echo-method"] == "PUT"
    assert ["X-Probe", "1"] in [list(pair) for pair in _echoed_headers(response)]
    assert response.headers["content-length"] == str(len(payload))
    assert response.content == payload


async def test_echo_chunked_upload_and_other_methods(demo: httpx.AsyncClient) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([i]) * 20_000

    response = await demo.post("/echo", content=parts())
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.content == b"".join(bytes([i]) * 20_000 for i in range(50))
    deleted = await demo.delete("/echo")
    assert (deleted.headers["x-echo-method"], deleted.content) == ("DELETE", b"")
    looked = await demo.get("/echo", headers={"X-Seen": "yes"})
    assert ["X-Seen", "yes"] in looked.json()["headers"]


def _echoed_headers(response: httpx.Response) -> list[list[str]]:
    return json.loads(response.headers["x-echo-headers"])


async def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = await reader.read()
    writer.close()
    return received


async def test_pipelined_requests_and_connection_close() -> None:
    server = await serve_origin("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    requests = (
        b"GET /api/time HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /vary HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    received = await asyncio.wait_for(_raw_exchange(port, requests), 5)
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert received.endswith(b"Hello!\n")  # then the server closed the connection
    garbage = await asyncio.wait_for(_raw_exchange(port, b"NOT HTTP\r\n\r\n"), 5)
    assert garbage.startswith(b"HTTP/1.1 400")
    server.close()
    await server.wait_closed()


async def test_expect_100_continue_on_echo() -> None:
    server = await serve_origin("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ping")
    final = await asyncio.wait_for(reader.read(), 5)
    assert final.startswith(b"HTTP/1.1 200 OK") and final.endswith(b"\r\n\r\nping")
    writer.close()
    server.close()
    await server.wait_closed()
