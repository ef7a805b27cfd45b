"""with_fields: a rate-limited hit's copy with its RateLimit fields, memoised on the shared
Response, never mixing two clients' fields (pure, no sockets)."""

from __future__ import annotations

import os

from verge.edge.protect import VARIANTS_KEPT, with_fields
from verge.http.response import FileBody, Response
from verge.http.server import http1_bytes

HEAD = [("Content-Type", "text/plain"), ("Age", "1")]
POLICY = ("RateLimit-Policy", '"api";q=100;w=1')


def fields(remaining: int) -> tuple[tuple[str, str], ...]:
    return (POLICY, ("RateLimit", f'"api";r={remaining};t=0'))


def test_the_same_fields_give_the_same_rendered_copy_and_the_original_is_untouched():
    hit = Response(200, list(HEAD), b"hello")
    first = with_fields(hit, fields(5))
    assert with_fields(hit, fields(5)) is first
    assert http1_bytes(first) is http1_bytes(with_fields(hit, fields(5)))  # rendered once
    assert b'RateLimit: "api";r=5;t=0\r\n' in http1_bytes(first)
    assert hit.headers == HEAD and b"RateLimit" not in http1_bytes(hit)


def test_other_fields_get_their_own_copy():
    hit = Response(200, list(HEAD), b"hello")
    five, four = with_fields(hit, fields(5)), with_fields(hit, fields(4))
    assert five is not four
    assert b"r=4;" in http1_bytes(four) and b"r=4;" not in http1_bytes(five)


def test_the_memo_is_bounded():
    hit = Response(200, list(HEAD), b"hello")
    for remaining in range(VARIANTS_KEPT * 5):
        copy = with_fields(hit, fields(remaining))
        assert copy.headers[-1] == ("RateLimit", f'"api";r={remaining};t=0')
    assert hit.variants is not None and len(hit.variants) <= VARIANTS_KEPT


def test_a_file_body_is_never_shared_between_copies():
    fd = os.memfd_create("body")
    try:
        response = Response(200, list(HEAD), FileBody(fd, 0, 0, close_fd=False), 0)
        assert with_fields(response, fields(1)) is not with_fields(response, fields(1))
        assert response.variants is None
    finally:
        os.close(fd)
