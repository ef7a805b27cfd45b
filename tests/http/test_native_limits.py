"""The native engine holds a request to the Python server's limits (ServerLimits): header
fields counted as the Python server counts them (bytes, not a fixed number of fields), the
body size, the body timeout (408), the send timeout (a client that does not read), and
`Expect: 100-continue` answered only once the application reads the body.

Real clients where they can say it (curl), raw TLS sockets (and hand-built HTTP/2 frames)
for the exact bytes and the slow or silent clients.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time

import hpack
import pytest

from tests.http.test_native_guard import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    RawH2,
    frame,
)
from tests.http.test_native_harness import (
    LATE_READ,
    curl,
    needs_native,
    read_until_closed,
    running,
    session_certs,
    statuses,
    url,
)
from verge.http.server import ServerLimits

pytestmark = [pytest.mark.timeout(60), needs_native]

BODY_TIMEOUT = 0.5
SEND_TIMEOUT = 0.5
MAX_BODY = 64 * 1024
LIMITS = ServerLimits(body_timeout=BODY_TIMEOUT, send_timeout=SEND_TIMEOUT, max_body_bytes=MAX_BODY)
HEAD = b"Host: shop.test\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.fixture(scope="session")
def native_certs(tmp_path_factory):
    return session_certs(tmp_path_factory)


@pytest.fixture
def native(native_certs, tmp_path):
    with running(native_certs, tmp_path, LIMITS) as harness:
        yield harness


def recv_some(sock, wait: float) -> bytes:
    """What arrives within ``wait`` seconds (b'' if nothing does)."""
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


# ----- header fields ------------------------------------------------------------------------


def test_150_header_fields_pass_on_both_protocols(native):
    fields = [arg for n in range(150) for arg in ("-H", f"X-Field-{n}: value {n}")]
    for version in ("--http1.1", "--http2"):
        out = curl(
            native, version, "-w", "%{http_code}", "-o", "/dev/null", *fields, url(native, "/echo")
        )
        assert out.stdout == "200", (version, out.stderr)
    first, second = native.app.seen
    assert sum(name.startswith("x-field-") for name in first.headers) == 150
    assert first.headers == second.headers


def tiny_fields(count: int) -> bytes:
    """``count`` fields of the smallest size (5 bytes each as max_header_bytes counts)."""
    return b"x:\r\n" * count


def test_the_field_count_is_capped_where_the_python_server_caps_it(native):
    """16 KiB of header bytes (the default) hold 3276 minimal fields: 3000 pass (hyper's own
    cap was 100), and past the bytes both engines answer 431."""
    with native.tls() as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\n" + HEAD + tiny_fields(3000) + b"\r\n")
        assert statuses(read_response_head(sock)) == [200]
    with native.tls() as sock:  # over the count the bytes allow: hyper's 431
        sock.sendall(b"GET /echo HTTP/1.1\r\n" + HEAD + tiny_fields(3300) + b"\r\n")
        assert statuses(read_until_closed(sock, 3)) == [431]
    with native.tls() as sock:  # under the count, over the bytes: the Python check's 431
        fields = b"".join(b"X-%04d: %s\r\n" % (n, b"v" * 60) for n in range(300))
        sock.sendall(b"GET /echo HTTP/1.1\r\n" + HEAD + fields + b"\r\n")
        assert statuses(read_until_closed(sock, 3)) == [431]
    assert len(native.app.seen) == 1


def test_the_field_cap_follows_max_header_bytes(native):
    native.server.limits.max_header_bytes = 64 * 1024
    native.call(native.server.apply_limits)
    with native.tls() as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\n" + HEAD + tiny_fields(12000) + b"\r\n")
        assert statuses(read_response_head(sock)) == [200]


def read_response_head(sock) -> bytes:
    """Bytes up to the end of a response head (the connection stays open)."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# ----- request bodies -----------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_refused_413_and_closed(native):
    chunk = b"%x\r\n%s\r\n" % (16384, b"a" * 16384)
    body = chunk * (MAX_BODY // 16384 + 1) + b"0\r\n\r\n"  # one chunk too many
    with native.tls() as sock:
        sock.sendall(b"POST /digest HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        sock.sendall(body)
        wire = read_until_closed(sock, 3)
    assert statuses(wire) == [413] and b"Connection: close" in wire
    assert native.app.seen[0].body is None  # the handler never got the whole body


def test_a_stalled_http11_body_gets_408_and_the_connection_closes(native):
    for framing, part in (
        (b"Content-Length: 1000\r\n", b"x" * 10),
        (b"Transfer-Encoding: chunked\r\n", b"a\r\n" + b"x" * 10 + b"\r\n"),
    ):
        with native.tls() as sock:
            sock.sendall(b"POST /digest HTTP/1.1\r\n" + HEAD + framing + b"\r\n" + part)
            started = time.monotonic()
            wire = read_until_closed(sock, 5)
            elapsed = time.monotonic() - started
        assert statuses(wire) == [408], wire
        assert wire.endswith(b"request body timeout\n")
        assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 1.5
    assert native.wait_connections(0)


def test_a_body_that_keeps_coming_is_not_cut(native):
    """The body timeout is for silence (as the Python server's): a byte every 0.2 s for
    over twice the timeout is served."""
    with native.tls() as sock:
        sock.sendall(b"POST /digest HTTP/1.1\r\n" + HEAD + b"Content-Length: 6\r\n\r\n")
        for byte in b"abcdef":
            time.sleep(0.2)
            sock.sendall(bytes([byte]))
        wire = read_response_head(sock)
    assert statuses(wire) == [200]
    assert native.app.seen[0].body == b"abcdef"


def test_a_stalled_http2_body_gets_408_and_the_connection_serves_on(native):
    conn = RawH2(native)
    try:
        post = hpack.Encoder().encode(
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "shop.test"),
                (":path", "/digest"),
            ]
        )
        conn.send(frame(HEADERS, END_HEADERS, 1, post) + frame(DATA, 0, 1, b"x" * 10))
        deadline = time.monotonic() + BODY_TIMEOUT + 3
        while time.monotonic() < deadline and not stream_ended(conn, 1):
            conn.poll(0.1)
        heads = [p for k, _, s, p in conn.frames if k == HEADERS and s == 1]
        assert heads and dict(hpack.Decoder().decode(heads[0]))[":status"] == "408"
        get = hpack.Encoder().encode(
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "shop.test"),
                (":path", "/fast"),
            ]
        )
        conn.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, get))
        while not stream_ended(conn, 3) and not conn.closed:
            conn.poll(1.0)
        assert any(k == HEADERS and s == 3 for k, _, s, _ in conn.frames)
    finally:
        conn.close()


def stream_ended(conn: RawH2, stream: int) -> bool:
    return any(
        s == stream and (k == RST_STREAM or (k in (HEADERS, DATA) and f & END_STREAM))
        for k, f, s, _ in conn.frames
    )


# ----- clients that do not read -------------------------------------------------------------


def test_an_http11_client_that_stops_reading_is_cut_after_the_send_timeout(native):
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", native.port))
    with native.context().wrap_socket(raw, server_hostname="shop.test") as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\n" + HEAD + b"\r\n")
        assert native.wait_connections(0, SEND_TIMEOUT + 8)  # never read a byte
    assert native.app.errors  # the writer heard that the client is gone


def test_an_http2_client_that_stops_reading_is_cut_after_the_send_timeout(native):
    conn = RawH2(native)
    try:
        big_window = (1 << 31) - 1
        conn.send(
            frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + big_window.to_bytes(4, "big"))
            + frame(WINDOW_UPDATE, 0, 0, (big_window - 65535).to_bytes(4, "big"))
        )
        get = hpack.Encoder().encode(
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "shop.test"),
                (":path", "/big"),
            ]
        )
        conn.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, get))
        assert native.wait_connections(0, SEND_TIMEOUT + 8)  # read nothing more
    finally:
        conn.close()
    assert native.app.errors


# ----- Expect: 100-continue -----------------------------------------------------------------


def test_100_continue_comes_when_the_application_reads(native):
    body = b"hello world"
    with native.tls() as sock:
        sock.sendall(
            b"POST /late-digest HTTP/1.1\r\n" + HEAD + b"Expect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        started = time.monotonic()
        assert recv_some(sock, LATE_READ / 2) == b""  # the application has not read yet
        assert recv_some(sock, 5) == CONTINUE
        assert time.monotonic() - started >= LATE_READ - 0.05
        sock.sendall(body)
        wire = read_response_head(sock)
    assert statuses(wire) == [200]
    assert wire.endswith(hashlib.sha256(body).hexdigest().encode())


@pytest.mark.parametrize(
    ("path", "length", "status"),
    [("/digest", MAX_BODY + 1, 413), ("/refuse", 100, 429)],
)
def test_a_request_refused_unread_never_gets_100_continue(native, path, length, status):
    with native.tls() as sock:
        sock.sendall(
            b"POST %s HTTP/1.1\r\n" % path.encode()
            + HEAD
            + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length
        )
        wire = read_until_closed(sock, 3)
    assert statuses(wire) == [status], wire
    assert b"100 Continue" not in wire


def test_curl_waits_for_100_continue_both_ways(native, tmp_path):
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"z" * 20_000)
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    expect = ("-H", "Expect: 100-continue", "--expect100-timeout", "10")
    sent = curl(native, "-v", *expect, "--data-binary", f"@{upload}", url(native, "/digest"))
    assert sent.stdout == digest and "HTTP/1.1 100 Continue" in sent.stderr
    refused = curl(native, "-v", *expect, "--data-binary", f"@{upload}", url(native, "/refuse"))
    assert refused.stdout == "slow down\n"
    assert "100 Continue" not in refused.stderr
    assert re.search(r"< HTTP/1.1 429", refused.stderr)
