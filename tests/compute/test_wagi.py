"""The WAGI ABI as pure functions: environment in, CGI output parsed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verge.compute import wagi
from verge.compute.wagi import (
    Answer,
    BadOutput,
    CgiRequest,
    Pass,
    build_environ,
    encode_request,
    encode_response,
    parse_output,
    parse_request,
    parse_response,
)


def env_of(req: CgiRequest, **kwargs) -> dict[str, str]:
    return dict(build_environ(req, **kwargs))


def test_environ_carries_the_request():
    req = CgiRequest(
        "PUT",
        "/a%20b/c?x=1&y=%20",
        headers=[
            ("Host", "site.example:8443"),
            ("Content-Type", "application/json"),
            ("Content-Length", "2"),
            ("Accept", "a"),
            ("accept", "b"),
            ("X-Dash-Ed", "1"),
            ("Bad.Name", "dropped"),
        ],
        body=b"{}",
        scheme="https",
        host="site.example:8443",
        server_port=8443,
        remote_addr="2001:db8::1",
        route="/a b/...",
    )
    env = env_of(req, request_id="abc", function_env=(("SECRET", "x"),))
    assert env["REQUEST_METHOD"] == "PUT"
    assert env["PATH_INFO"] == "/a b/c" and env["X_RAW_PATH_INFO"] == "/a%20b/c"
    assert env["QUERY_STRING"] == "x=1&y=%20" and env["REQUEST_URI"] == "/a%20b/c?x=1&y=%20"
    assert env["SERVER_NAME"] == "site.example" and env["SERVER_PORT"] == "8443"
    assert env["CONTENT_TYPE"] == "application/json" and env["CONTENT_LENGTH"] == "2"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["HTTP_ACCEPT"] == "a, b" and env["HTTP_X_DASH_ED"] == "1"
    assert not any("BAD" in k for k in env)
    assert env["X_FULL_URL"] == "https://site.example:8443/a%20b/c?x=1&y=%20"
    assert env["X_MATCHED_ROUTE"] == "/a b/..." and env["REMOTE_ADDR"] == "2001:db8::1"
    assert env["VERGE_REQUEST_ID"] == "abc" and env["VERGE_PHASE"] == "request"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1" and env["SECRET"] == "x"


def test_function_env_overrides_and_ipv6_host():
    req = CgiRequest("GET", "/", host="[::1]:8080")
    env = build_environ(req, phase="response", function_env=(("SERVER_NAME", "mine"),))
    assert [v for k, v in env if k == "SERVER_NAME"] == ["mine"]
    assert dict(env)["VERGE_PHASE"] == "response"
    assert env_of(req)["SERVER_NAME"] == "[::1]"


@pytest.mark.parametrize("sep", ["\n", "\r\n"])
def test_answer_with_status_and_headers(sep):
    out = sep.join(
        [
            "Status: 404 Not Found",
            "Content-Type: text/html",
            "X-A: 1",
            "Content-Length: 99",
            "Connection: close",
            "",
            "<p>gone</p>",
        ]
    )
    assert parse_output(out.encode()) == Answer(
        404, [("Content-Type", "text/html"), ("X-A", "1")], b"<p>gone</p>"
    )


def test_default_status_and_location_redirect():
    assert parse_output(b"Content-Type: text/plain\n\nhi").status == 200
    assert parse_output(b"Location: /there\n\n") == Answer(302, [("Location", "/there")], b"")
    moved = parse_output(b"Status: 301\nLocation: /there\n\n")
    assert moved.status == 301
    assert parse_output(b"Status: 204\n\n") == Answer(204, [], b"")


def test_body_keeps_blank_lines_and_binary():
    out = parse_output(b"Content-Type: a/b\n\n\n\x00\xff\n\n")
    assert out.body == b"\n\x00\xff\n\n"


@pytest.mark.parametrize(
    "output, reason",
    [
        (b"just a body", "blank line"),
        (b"X-Only: header\n\nbody", "none of"),
        (b"Content-Type: text/plain\nno colon here\n\n", "malformed"),
        (b"Status: 99 Low\n\n", "bad Status"),
        (b"Status: abc\n\n", "bad Status"),
        (b"Content-Type: a\n" + b"X-Pad: " + b"p" * 70000 + b"\n\n", "header block"),
    ],
)
def test_bad_output(output, reason):
    with pytest.raises(BadOutput, match=reason):
        parse_output(output)


def test_pass_with_rewrite_and_header_edits():
    out = (
        b"X-Verge-Pass: 1\nX-Verge-Rewrite-Path: /v2/items?id=7\n"
        b"X-Verge-Set-Header: X-User: 42\nX-Verge-Set-Header: Accept: application/json\n"
        b"X-Verge-Remove-Header: cookie\n\nignored body"
    )
    result = parse_output(out)
    assert result == Pass(
        "/v2/items?id=7", [("X-User", "42"), ("Accept", "application/json")], ("cookie",)
    )
    target, headers = result.edit_request(
        "/items/7", [("Host", "h"), ("Accept", "*/*"), ("Cookie", "s=1"), ("X-User", "spoofed")]
    )
    assert target == "/v2/items?id=7"
    assert headers == [("Host", "h"), ("X-User", "42"), ("Accept", "application/json")]


def test_plain_pass_keeps_the_request():
    result = parse_output(b"X-Verge-Pass: true\n\n")
    assert result == Pass()
    assert result.edit_request("/same", [("A", "1")]) == ("/same", [("A", "1")])
    assert isinstance(parse_output(b"X-Verge-Pass: 0\nContent-Type: a\n\n"), Answer)


@pytest.mark.parametrize("value", ["http://other/abs", "relative", "/with space"])
def test_pass_rejects_non_origin_form_rewrite(value):
    with pytest.raises(BadOutput, match="origin-form"):
        parse_output(f"X-Verge-Pass: 1\nX-Verge-Rewrite-Path: {value}\n\n".encode())


def test_pass_rejects_bad_set_header():
    with pytest.raises(BadOutput, match="Name: value"):
        parse_output(b"X-Verge-Pass: 1\nX-Verge-Set-Header: novalue\n\n")


def test_control_headers_never_reach_the_client():
    answer = parse_output(b"Content-Type: a\nX-Verge-Set-Header: A: b\n\n")
    assert answer.headers == [("Content-Type", "a")]


def test_response_and_request_round_trip():
    raw = encode_response(503, [("Retry-After", "5")], b"later")
    assert raw == b"Status: 503 Service Unavailable\nRetry-After: 5\n\nlater"
    assert parse_response(raw) == Answer(503, [("Retry-After", "5")], b"later")
    assert encode_response(299, [], b"").startswith(b"Status: 299\n")
    req = encode_request("post", "https://api.example/x", [("A", "1")], b"body")
    assert parse_request(req) == ("POST", "https://api.example/x", [("A", "1")], b"body")
    assert parse_request(b"GET http://h/") == ("GET", "http://h/", [], b"")
    with pytest.raises(BadOutput):
        parse_request(b"\n\n")


# ----- the parsed-head memory (parse_head): a head means the same whether parsed or recalled


def reference_parse(data: bytes) -> Answer | Pass:
    """parse_output as it was before heads were remembered (split_head, then the fields)."""
    fields, body_at = wagi.split_head(data)
    names = [name.lower() for name, _ in fields]
    if wagi.PASS_HEADER in names and wagi._is_pass(fields):
        return wagi._parse_pass(fields)
    if "content-type" not in names and "location" not in names and "status" not in names:
        raise BadOutput("output has none of Content-Type, Location, Status")
    status, headers = 0, []
    for field_, low in zip(fields, names, strict=True):
        if low == "status":
            status = wagi.parse_status(field_[1])
        elif low not in wagi._NOT_ANSWERED:
            headers.append(field_)
    return Answer(status or (302 if "location" in names else 200), headers, data[body_at:])


def outcome_of(parse, data: bytes) -> object:
    try:
        return parse(data)
    except BadOutput as exc:
        return ("bad", str(exc))


LINES = st.sampled_from(
    [
        "Content-Type: text/plain",
        "Status: 404 Not Found",
        "Status: 99",
        "Location: /x",
        "X-Verge-Pass: 1",
        "X-Verge-Pass: no",
        "X-Verge-Rewrite-Path: /r?a=1",
        "X-Verge-Rewrite-Path: bad",
        "X-Verge-Set-Header: A: b",
        "X-Verge-Remove-Header: Cookie",
        "Connection: close",
        "Content-Length: 3",
        "X-Custom:  spaced  ",
        "no colon",
        "Bad Name: x",
        "",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(LINES, max_size=6),
    newline=st.sampled_from(["\n", "\r\n"]),
    body=st.binary(max_size=20),
)
def test_a_remembered_head_gives_what_parsing_it_gives(lines, newline, body):
    data = (newline.join(lines) + newline + newline).encode() + body
    wagi._MEANINGS.clear()
    fresh = outcome_of(parse_output, data)
    recalled = outcome_of(parse_output, data)
    assert fresh == recalled == outcome_of(reference_parse, data)
    end, sep = wagi._head_end(data)
    assert outcome_of(lambda _: wagi.parse_head(data[:end], data[end + sep :]), data) == fresh


def test_each_result_is_a_new_object():
    first = parse_output(b"Content-Type: a\nX-A: 1\n\none")
    first.headers.append(("X-Changed", "by the caller"))
    second = parse_output(b"Content-Type: a\nX-A: 1\n\ntwo")
    assert second == Answer(200, [("Content-Type", "a"), ("X-A", "1")], b"two")
    passed = parse_output(b"X-Verge-Pass: 1\nX-Verge-Set-Header: A: b\n\n")
    passed.set_headers.clear()
    assert parse_output(b"X-Verge-Pass: 1\nX-Verge-Set-Header: A: b\n\n").set_headers == [
        ("A", "b")
    ]


def test_the_memory_of_heads_is_bounded(monkeypatch):
    monkeypatch.setattr(wagi, "HEADS_KEPT", 8)
    wagi._MEANINGS.clear()
    for i in range(50):
        assert parse_output(f"Content-Type: a\nX-N: {i}\n\n".encode()).headers[1] == ("X-N", str(i))
        assert len(wagi._MEANINGS) <= 8
    long = b"Content-Type: a\nX-Pad: " + b"p" * wagi.HEAD_KEPT_BYTES + b"\n\n"
    assert parse_output(long).status == 200
    assert long[: long.index(b"\n\n") + 1] not in wagi._MEANINGS
