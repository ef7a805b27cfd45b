"""Deployed.response: a function's small GET answers share one Response (and its renderings)."""

from __future__ import annotations

from types import SimpleNamespace

from verge.compute.wagi import Answer
from verge.edge.compute import ANSWER_SHARED_BYTES, ANSWERS_SHARED, Deployed
from verge.http.server import http1_bytes


def deployed() -> Deployed:
    return Deployed(SimpleNamespace(name="hello", routes=["/fn/*"]), None)


def hello(body: bytes = b"hello\n") -> Answer:
    return Answer(200, [("Content-Type", "text/plain")], body)


def test_the_same_small_get_answer_shares_its_response_and_rendering():
    fn = deployed()
    first = fn.response(hello(), "edge-1", "GET")
    assert first.status == 200 and first.body == b"hello\n"
    assert first.headers == [
        ("Content-Type", "text/plain"),
        ("Cache-Status", "edge-1; detail=function"),
    ]
    wire = http1_bytes(first)
    second = fn.response(hello(), "edge-1", "GET")
    assert second is first and http1_bytes(second) is wire


def test_other_answers_get_their_own_response():
    fn = deployed()
    first = fn.response(hello(), "edge-1", "GET")
    assert fn.response(hello(b"other\n"), "edge-1", "GET") is not first
    assert fn.response(hello(), "edge-2", "GET").headers[-1] == (
        "Cache-Status",
        "edge-2; detail=function",
    )
    teapot = Answer(418, [("Content-Type", "text/plain")], b"hello\n")
    assert fn.response(teapot, "edge-1", "GET").status == 418
    head = fn.response(hello(), "edge-1", "HEAD")
    assert head is not first and head is not fn.response(hello(), "edge-1", "HEAD")
    big = hello(b"x" * (ANSWER_SHARED_BYTES + 1))
    assert fn.response(big, "edge-1", "GET") is not fn.response(big, "edge-1", "GET")


def test_the_shared_responses_are_bounded():
    fn = deployed()
    for n in range(ANSWERS_SHARED * 3):
        fn.response(hello(str(n).encode()), "edge-1", "GET")
        assert len(fn.answers) <= ANSWERS_SHARED
