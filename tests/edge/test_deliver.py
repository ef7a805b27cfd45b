"""Table tests of the deliver phase (verge.edge.deliver.deliver): no sockets, a Source in,
a protocol-neutral Response out — the same decisions for stored entries and fills."""

from __future__ import annotations

import pytest

from verge.edge.deliver import Source, deliver
from verge.http.message import Request
from verge.http.response import Response

BODY = bytes(range(100))
ETAG = '"v1"'
LAST_MODIFIED = "Tue, 01 Dec 2026 00:00:00 GMT"
EXTRA = [("Age", "3"), ("Cache-Status", "verge; hit")]


def source(size: int | None = len(BODY), status: int = 200) -> tuple[Source, list]:
    reads: list[tuple[int, int | None]] = []

    def body(start: int, end: int | None):
        reads.append((start, end))
        return BODY[start:end]

    return Source(status, "OK", [("ETag", ETAG), ("Last-Modified", LAST_MODIFIED)], ETAG,
                  LAST_MODIFIED, 1_800_000_000.0, size, body), reads


CASES = [
    # (name, method, request fields, status, body, length, extra field expected)
    ("plain GET", "GET", {}, 200, BODY, 100, None),
    ("HEAD: the GET's length, no body", "HEAD", {}, 200, None, 100, None),
    ("If-None-Match match: 304", "GET", {"if-none-match": ETAG}, 304, None, None, None),
    ("If-None-Match other: 200", "GET", {"if-none-match": '"v0"'}, 200, BODY, 100, None),
    ("If-Modified-Since later: 304", "GET",
     {"if-modified-since": "Wed, 02 Dec 2026 00:00:00 GMT"}, 304, None, None, None),
    ("Range: 206", "GET", {"range": "bytes=10-19"}, 206, BODY[10:20], 10,
     ("Content-Range", "bytes 10-19/100")),
    ("suffix Range: 206", "GET", {"range": "bytes=-5"}, 206, BODY[95:], 5,
     ("Content-Range", "bytes 95-99/100")),
    ("HEAD with Range: 206 without a body", "HEAD", {"range": "bytes=0-0"}, 206, None, 1,
     ("Content-Range", "bytes 0-0/100")),
    ("Range past the end: 416", "GET", {"range": "bytes=500-"}, 416, None, 0,
     ("Content-Range", "bytes */100")),
    ("If-Range matching: 206", "GET", {"range": "bytes=0-4", "if-range": ETAG}, 206, BODY[:5],
     5, ("Content-Range", "bytes 0-4/100")),
    ("If-Range not matching: the whole 200", "GET", {"range": "bytes=0-4", "if-range": '"v0"'},
     200, BODY, 100, None),
    ("If-Range weak: the whole 200", "GET", {"range": "bytes=0-4", "if-range": 'W/"v1"'},
     200, BODY, 100, None),
    ("a Range the server ignores (not bytes): 200", "GET", {"range": "items=0-4"}, 200, BODY,
     100, None),
]


@pytest.mark.parametrize(("name", "method", "fields", "status", "body", "length", "extra"),
                         CASES, ids=[c[0] for c in CASES])
def test_deliver_decides_like_rfc_9110(name, method, fields, status, body, length, extra):
    src, _ = source()
    response = deliver(src, fields, method, EXTRA)
    assert isinstance(response, Response)
    assert (response.status, response.body, response.length) == (status, body, length)
    for field in EXTRA:
        assert field in response.headers  # Age and Cache-Status on every answer
    if extra is not None:
        assert extra in response.headers
    assert not any(n.lower() in ("content-length", "transfer-encoding", "connection")
                   for n, _ in response.headers)  # framing is the protocol's


def test_a_fill_of_unknown_length_serves_ranges_whole_and_reads_to_completion():
    src, reads = source(size=None)
    response = deliver(src, {"range": "bytes=0-4"}, "GET", EXTRA)
    assert response.status == 200  # the size is unknown: no range can be cut
    assert reads == [(0, None)]  # to the end: a fill's body until it is complete


def test_only_a_200_is_ranged_or_revalidated():
    src, _ = source(status=404)
    response = deliver(src, {"range": "bytes=0-4", "if-none-match": ETAG}, "GET", EXTRA)
    assert response.status == 404 and response.body == BODY


def test_hostile_ranges_do_not_slice_past_the_body():
    for value in ("bytes=0-99999999999999999999", "bytes=99-1", "bytes=--1", "bytes=" + "0-1," * 500):
        src, _ = source()
        response = deliver(src, {"range": value}, "GET", EXTRA)
        assert response.status in (200, 206, 416)
        if response.body is not None:
            assert len(response.body) == response.length <= len(BODY)


def test_request_replace_recomputes_the_derived_views():
    request = Request("GET", "/a?x=1", headers=[("Host", "A.test:80")])
    assert (request.path, request.query, request.host) == ("/a", "x=1", "a.test")
    changed = request.replace(target="/b", headers=[("Host", "b.test")])
    assert (changed.path, changed.query, changed.host, changed.hmap["host"]) == \
        ("/b", "", "b.test", "b.test")
    assert (request.path, request.host) == ("/a", "a.test")  # the original is left alone
    assert changed.replace().target == "/b" and changed.method == "GET"
