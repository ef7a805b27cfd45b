"""HTTP/1.1 on the native HTTPS listener: ALPN http/1.1 (or none) served by hyper, requests
refused like the Python server's, and hostile framing never turning into a second request.

Raw TLS sockets send exactly the bytes under test; `RecordingApp` counts what reaches the
application.
"""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from tests.http.test_native_harness import (
    FILE_BYTES,
    curl,
    needs_native,
    read_until_closed,
    running,
    session_certs,
    statuses,
    url,
)

pytestmark = [pytest.mark.timeout(60), needs_native]


@pytest.fixture(scope="session")
def native_certs(tmp_path_factory):
    return session_certs(tmp_path_factory)


@pytest.fixture
def native(native_certs, tmp_path):
    with running(native_certs, tmp_path) as harness:
        yield harness


HEAD = b"Host: shop.test\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\n" + HEAD + b"\r\n"


def exchange(native, data: bytes) -> bytes:
    """Send ``data`` on a fresh HTTP/1.1 connection; everything read until it closes."""
    with native.tls() as sock:
        sock.sendall(data)
        return read_until_closed(sock, 3.0)


def test_keep_alive_serves_requests_in_turn_on_one_connection(native):
    with native.tls() as sock:
        for path in (b"/fast", b"/other", b"/fast"):
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\n" + HEAD + b"\r\n")
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
            assert b"\r\nContent-Length: " in head  # hyper writes fields title-cased
    assert [s.target for s in native.app.seen] == ["/fast", "/other", "/fast"]


def test_connection_close_and_http10_close_after_the_response(native):
    wire = exchange(native, b"GET /fast HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n\r\n")
    assert statuses(wire) == [200] and wire.endswith(b"fast\n")
    wire = exchange(native, b"GET /fast HTTP/1.0\r\n" + HEAD + b"\r\n")
    assert wire.startswith(b"HTTP/1.0 200 OK\r\n") and wire.endswith(b"fast\n")
    assert [s.version for s in native.app.seen] == ["1.1", "1.0"]


def test_head_gets_the_length_and_no_body(native):
    out = curl(native, "-I", url(native, "/fast"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 200 OK") and "Content-Length: 5" in out.stdout


def test_bodies_by_length_and_chunked_stream_to_the_app(native):
    body = os.urandom(700 * 1024)  # more than the native side queues ahead of the reader
    digest = hashlib.sha256(body).hexdigest()
    (native_path := native.app.file_path.parent / "upload.bin").write_bytes(body)
    by_length = curl(native, "--data-binary", f"@{native_path}", url(native, "/digest"))
    chunked = curl(
        native,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{native_path}",
        url(native, "/digest"),
    )
    assert by_length.stdout == digest and chunked.stdout == digest
    assert [len(s.body) for s in native.app.seen] == [len(body), len(body)]


CHUNKED_UPLOAD = (
    b"POST /digest HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)


def test_a_chunked_upload_keeps_its_connection_for_the_next_request(native):
    """The request after a chunked body is read on the same connection, whether it is sent
    after the answer or right behind the body."""
    digest = hashlib.sha256(b"hello world").hexdigest().encode()
    with native.tls() as sock:
        sock.sendall(CHUNKED_UPLOAD)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(digest)
        assert b"Connection: close" not in first
        sock.sendall(
            CHUNKED_UPLOAD + b"GET /fast HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n\r\n"
        )
        rest = read_until_closed(sock, 3)
    assert statuses(rest) == [200, 200] and rest.endswith(b"fast\n")
    assert [s.target for s in native.app.seen] == ["/digest", "/digest", "/fast"]
    assert [s.body for s in native.app.seen[:2]] == [b"hello world"] * 2


def test_curl_reuses_the_connection_after_a_chunked_upload(native):
    upload = native.app.file_path.parent / "upload.bin"
    upload.write_bytes(os.urandom(300 * 1024))
    out = curl(
        native,
        "-v",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{upload}",
        url(native, "/digest"),
        "--next",
        "--http1.1",
        "--cacert",
        native.ca,
        "--resolve",
        f"shop.test:{native.port}:127.0.0.1",
        url(native, "/fast"),
    )
    assert out.stdout == hashlib.sha256(upload.read_bytes()).hexdigest() + "fast\n", out.stderr
    assert re.search(r"Re-?using existing", out.stderr, re.IGNORECASE), out.stderr


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ],
)
def test_content_length_with_transfer_encoding_is_refused_either_way(native, fields):
    wire = exchange(native, b"POST /a HTTP/1.1\r\n" + HEAD + fields + b"\r\n0\r\n\r\n" + SMUGGLED)
    assert statuses(wire) == [400], wire
    assert native.app.seen == []


def test_streamed_and_file_responses(native):
    streamed = curl(native, "-D", "-", url(native, "/stream"))
    assert "Transfer-Encoding: chunked" in streamed.stdout
    assert streamed.stdout.endswith("one two three")
    got = curl(native, url(native, "/file"), text=False).stdout
    assert got == FILE_BYTES[1000:201_000]


def test_targets_are_normalised_and_absolute_form_sets_host(native):
    exchange(native, b"GET /a/../b%2Fc?x=%7e HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n\r\n")
    exchange(
        native, b"GET https://blog.test/abs HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n\r\n"
    )
    first, second = native.app.seen
    assert first.target == "/b%2Fc?x=~"
    assert second.target == "/abs" and second.headers["host"] == "blog.test"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /x HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HEAD + b"\r\n", 414),
        (b"GET /x HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
        (b"POST /x HTTP/1.1\r\n" + HEAD + b"Content-Length: 200000000\r\n\r\n", 413),
        (b"GET /a%00b HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
        (b"TRACE /x HTTP/1.1\r\n" + HEAD + b"\r\n", 405),
        (
            b"POST /x HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (b"POST /x HTTP/1.1\r\n" + HEAD + b"Transfer_Encoding: chunked\r\n\r\n", 400),
    ],
)
def test_refusals_match_the_python_server(native, request_bytes, status):
    wire = exchange(native, request_bytes)
    assert statuses(wire) == [status], wire[:200]
    assert native.app.seen == []


@pytest.mark.parametrize(
    "attack",
    [
        # CL then TE: both visible, refused
        b"POST /a HTTP/1.1\r\n" + HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        # TE then CL: refused too (patched hyper; it used to drop the CL and read chunked)
        b"POST /a HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        # two differing Content-Lengths
        b"POST /a HTTP/1.1\r\n" + HEAD + b"Content-Length: 5\r\nContent-Length: 41\r\n\r\n"
        b"hello" + SMUGGLED,
        # a bad chunk size, an overflowing one, a missing chunk CRLF
        b"POST /a HTTP/1.1\r\n"
        + HEAD
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n"
        + SMUGGLED,
        b"POST /a HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
        b"10000000000000001\r\nx\r\n0\r\n\r\n" + SMUGGLED,
        b"POST /a HTTP/1.1\r\n"
        + HEAD
        + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n"
        + SMUGGLED,
        # obs-fold hiding a Transfer-Encoding; a space before the colon
        b"POST /a HTTP/1.1\r\n" + HEAD + b"X-A: b\r\n Transfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
        b"POST /a HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLED,
        # a Content-Length with a sign, or a list
        b"POST /a HTTP/1.1\r\n" + HEAD + b"Content-Length: +5\r\n\r\nhello" + SMUGGLED,
        b"POST /a HTTP/1.1\r\n" + HEAD + b"Content-Length: 5, 5\r\n\r\nhello" + SMUGGLED,
        # chunked on HTTP/1.0
        b"POST /a HTTP/1.0\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    ],
)
def test_hostile_framing_is_refused_or_closed_never_a_second_request(native, attack):
    wire = exchange(native, attack)
    codes = statuses(wire)
    assert len(codes) <= 1, wire[:300]  # one answer at most, then the connection closed
    assert codes in ([], [400], [501], [200]), wire[:300]
    assert [s.target for s in native.app.seen if s.target == "/smuggled"] == []
    assert len(native.app.seen) <= 1


def test_bare_lf_is_one_request_at_most(native):
    wire = exchange(
        native, b"GET /fast HTTP/1.1\nHost: shop.test\nConnection: close\n\n" + SMUGGLED
    )
    assert statuses(wire) in ([], [400], [200])
    assert [s.target for s in native.app.seen] in ([], ["/fast"])
