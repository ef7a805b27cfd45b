"""Timeouts on the native listener, from ServerLimits: the TLS handshake and an HTTP/1.1 head
(or an HTTP/2 header block) must arrive within `header_timeout` however slowly they drip,
and a connection with nothing in flight closes after `keepalive_timeout`, on both protocols.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.http.test_native_guard import (
    GOAWAY,
    HEADERS,
    RawH2,
    frame,
    request_block,
)
from tests.http.test_native_harness import (
    needs_native,
    read_until_closed,
    running,
    session_certs,
)
from verge.http.server import ServerLimits

pytestmark = [pytest.mark.timeout(60), needs_native]


@pytest.fixture(scope="session")
def native_certs(tmp_path_factory):
    return session_certs(tmp_path_factory)


HEADER_TIMEOUT = 0.6
KEEPALIVE_TIMEOUT = 1.0


@pytest.fixture
def native(native_certs, tmp_path):
    limits = ServerLimits(header_timeout=HEADER_TIMEOUT, keepalive_timeout=KEEPALIVE_TIMEOUT)
    with running(native_certs, tmp_path, limits) as harness:
        yield harness


def closed_after(sock, limit: float = 5.0) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping what it sends)."""
    started = time.monotonic()
    read_until_closed(sock, limit)
    return time.monotonic() - started


def test_a_silent_tls_handshake_is_cut(native):
    with socket.create_connection(("127.0.0.1", native.port), timeout=5) as raw:
        started = time.monotonic()
        assert raw.recv(1024) == b""  # no ClientHello: closed
        assert HEADER_TIMEOUT - 0.1 < time.monotonic() - started < HEADER_TIMEOUT + 1.5


def test_slowloris_head_is_cut_however_steadily_it_drips(native):
    head = b"GET /fast HTTP/1.1\r\nHost: shop.test\r\nX-Slow: " + b"a" * 100
    with native.tls() as sock:
        started = time.monotonic()
        sock.settimeout(0.1)
        cut = False
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    cut = True
                    break
            except TimeoutError:
                continue  # nothing from the server yet: next byte
            except OSError:
                cut = True
                break
        elapsed = time.monotonic() - started
    assert cut and elapsed < HEADER_TIMEOUT + 1.5
    assert native.app.seen == []


def test_http11_keep_alive_idles_out_but_serves_until_then(native):
    with native.tls() as sock:
        for _ in range(3):  # each request restarts the idle clock
            sock.sendall(b"GET /fast HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
            time.sleep(KEEPALIVE_TIMEOUT / 2)
        assert KEEPALIVE_TIMEOUT / 2 - 0.2 < closed_after(sock) < KEEPALIVE_TIMEOUT + 1.5


def test_a_request_in_flight_is_not_idle(native):
    """/slow answers after 0.5 s; with a shorter keep-alive the answer still arrives."""
    native.server.limits.keepalive_timeout = 0.2
    native.call(native.server.apply_limits)
    with native.tls() as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        assert closed_after(sock) < 1.5


def test_http2_idle_connection_gets_goaway_and_closes(native):
    conn = RawH2(native)
    try:
        started = time.monotonic()
        assert conn.wait_closed(KEEPALIVE_TIMEOUT + 2)
        assert time.monotonic() - started > KEEPALIVE_TIMEOUT - 0.2
        assert conn.goaway_code() == 0  # NO_ERROR: a graceful close
        assert any(kind == GOAWAY for kind, *_ in conn.frames)
    finally:
        conn.close()


def test_http2_header_block_that_never_ends_is_cut(native):
    native.server.limits.keepalive_timeout = 30  # so only the header timeout can close it
    native.call(native.server.apply_limits)
    conn = RawH2(native)
    try:
        conn.send(frame(HEADERS, 0, 1, request_block()))  # no END_HEADERS, nothing more
        started = time.monotonic()
        assert conn.wait_closed(HEADER_TIMEOUT + 3)
        assert time.monotonic() - started < HEADER_TIMEOUT + 2
    finally:
        conn.close()


def test_limits_are_checked_when_pushed(native):
    with pytest.raises(ValueError, match="unknown limit"):
        native.call(native.server.native.set_limits, {"keepalive_timout": 5})
    with pytest.raises(ValueError, match="positive"):
        native.call(native.server.native.set_limits, {"header_timeout": 0})
