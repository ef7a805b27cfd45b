"""pipelined_requests: how many requests a large read carries, for the flood guard's weighing
before any is parsed (pure). A body never counts: an upload of an access log is full of
request lines and must not box its network."""

from __future__ import annotations

from verge.http.server import pipelined_requests

GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
LOG_LINES = b'127.0.0.1 - - [07/Dec/2026] "GET / HTTP/1.1" 200 12\n' * 500


def test_a_single_request_is_one():
    assert pipelined_requests(GET) == 1
    assert pipelined_requests(GET[:10]) == 1


def test_a_pipelined_batch_counts_every_request_and_an_unfinished_last_one():
    assert pipelined_requests(GET * 300) == 300
    assert pipelined_requests(GET * 300 + GET[:12]) == 301


def test_a_body_is_never_counted():
    for field in (b"Content-Length: %d" % len(LOG_LINES), b"Transfer-Encoding: chunked",
                  b"content-length: 1"):
        upload = b"POST /logs HTTP/1.1\r\nHost: x\r\n" + field + b"\r\n\r\n" + LOG_LINES
        assert pipelined_requests(upload) == 1, field
    body_later = GET * 3 + b"PUT /x HTTP/1.1\r\nCONTENT-LENGTH: 9999\r\n\r\n" + LOG_LINES
    assert pipelined_requests(body_later) == 4


def test_a_zero_length_announces_no_body():
    zero = b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    assert pipelined_requests(zero * 200) == 200  # a flood cannot hide behind it
    assert pipelined_requests(zero.replace(b": 0", b":  000 ") * 50) == 50
    for value in (b"1", b"10", b"0x0", b"-0", b"", b"0 0", b"9" * 5000):
        head = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
        assert pipelined_requests(head + LOG_LINES) == 1, value
    last_field = b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    assert pipelined_requests(GET * 2 + last_field + GET) == 4
