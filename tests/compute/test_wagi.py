"""The WAGI ABI as pure functions: environment in, CGI output parsed."""

from __future__ import annotations

import pytest

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
