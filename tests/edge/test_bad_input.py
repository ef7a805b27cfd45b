"""Hostile and broken clients: the right status or a closed connection, and the worker lives on."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.timeout(60)

LIMITS = """
limits:
  header_timeout: 1s
  max_header_bytes: 8KiB
  max_url_bytes: 2KiB
  max_body_bytes: 1MiB
services:
  - name: site
    hosts: ["*"]
    default: true
    origins: ["{origin}"]
"""


@pytest.fixture
def strict_edge(edge_factory, origin):
    origin.route("/ok", headers=[("Cache-Control", "max-age=60")], body=b"fine")
    return edge_factory(config=LIMITS.format(origin=origin.url))


def exchange(edge, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", edge.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def still_serving(edge) -> None:
    with edge.client() as c:
        r = c.get("/ok")
    assert r.status_code == 200 and r.content == b"fine"


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("raw, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n", 413),
])
def test_malformed_and_smuggling_requests(strict_edge, raw, status):
    response = exchange(strict_edge, raw)
    assert status_of(response) == status
    assert b"Connection: close" in response
    still_serving(strict_edge)


def test_oversized_headers_get_431(strict_edge):
    raw = b"GET /ok HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"a" * 10_000 + b"\r\n\r\n"
    assert status_of(exchange(strict_edge, raw)) == 431
    still_serving(strict_edge)


def test_overlong_url_gets_414(strict_edge):
    raw = b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert status_of(exchange(strict_edge, raw)) == 414
    still_serving(strict_edge)


def test_slow_client_header_timeout(strict_edge):
    with socket.create_connection(("127.0.0.1", strict_edge.port), timeout=10) as s:
        s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n")  # never finishes its headers
        still_serving(strict_edge)  # others are served meanwhile
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert status_of(data) == 408


def test_pipelined_requests_answered_in_order(strict_edge, origin):
    origin.route("/p1", headers=[("Cache-Control", "max-age=60")], body=b"one")
    origin.route("/p2", body=b"two")  # uncacheable: goes through the async path
    raw = (b"GET /p1 HTTP/1.1\r\nHost: a\r\n\r\n"
           b"GET /p2 HTTP/1.1\r\nHost: a\r\n\r\n"
           b"GET /p1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    response = exchange(strict_edge, raw)
    bodies = [part for part in (b"one", b"two", b"one") if part in response]
    assert response.count(b"HTTP/1.1 200") == 3
    assert response.index(b"one") < response.index(b"two") < response.rindex(b"one")
    assert bodies


def test_chunked_request_body_is_forwarded(strict_edge, origin):
    from tests.origin import Route

    origin.route("/up", handler=lambda req: Route(body=req.body))
    raw = (b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    response = exchange(strict_edge, raw)
    assert status_of(response) == 200
    assert response.endswith(b"hello world") or b"hello world" in response


def test_http10_client_without_keepalive(strict_edge):
    response = exchange(strict_edge, b"GET /ok HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200
    assert response.endswith(b"fine")
