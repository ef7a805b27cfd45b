"""Signed URLs through a real `verge edge`: rules with `signed:` (verge.edge.signing).

One edge (module scope) in front of one origin, with a signed rule per variant under its own
prefix; each test uses its own paths so the origin's per-path counts stay independent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import VERGE, EdgeProcess
from tests.origin import TestOrigin, make_origin
from verge.edge.signing import sign, sign_url, verify

pytestmark = pytest.mark.timeout(60)

SECRET = "test-secret-0123456789"
ENV_SECRET = "env-secret-abcdefghijk"
ENV_NAME = "VERGE_TEST_SIGNING_SECRET"
CACHEABLE = [("Cache-Control", "max-age=60"), ("Content-Type", "text/plain")]

CONFIG = """
services:
  - name: site
    hosts: [127.0.0.1]
    origins: ["{origin}"]
    rules:
      - path: /live/
        signed: {{secret: {secret}}}
      - path: /strict/
        signed: {{secret_env: {env}, param: sig, cookie: false}}
"""


@pytest.fixture(scope="module")
def origin() -> Iterator[TestOrigin]:
    origin = make_origin()
    origin.route("/*", headers=CACHEABLE, body=lambda r: f"body of {r.path}\n".encode())
    yield origin
    origin.stop()


def start_edge(workdir, origin_url: str, *extra: str) -> EdgeProcess:
    config = CONFIG.format(origin=origin_url, secret=SECRET, env=ENV_NAME)
    workdir.mkdir(exist_ok=True)
    return EdgeProcess(workdir, config=config, extra_args=extra).start()


@pytest.fixture(scope="module")
def edge(tmp_path_factory, origin) -> Iterator[EdgeProcess]:
    os.environ[ENV_NAME] = ENV_SECRET  # the edge inherits it (secret_env)
    try:
        workdir = tmp_path_factory.mktemp("signed")
        edge = start_edge(workdir, origin.url, "--access-log", str(workdir / "access.log"))
    finally:
        del os.environ[ENV_NAME]
    yield edge
    edge.stop()


@pytest.fixture
def client(edge) -> Iterator[httpx.Client]:
    with edge.client() as c:
        yield c


def token(prefix: str, ttl: float = 600, secret: str = SECRET) -> str:
    return sign(secret, prefix, int(time.time() + ttl))


def received(origin: TestOrigin, path: str) -> list:
    return [r for r in list(origin.requests) if r.path.split("?")[0] == path]


# ---------------------------------------------------------------------------------------------
# the token itself
# ---------------------------------------------------------------------------------------------


def test_a_token_grants_its_prefix_until_it_expires():
    good = sign(SECRET, "/live/show", 2_000)
    assert verify(SECRET, good, "/live/show.m3u8", 1_000) is None
    assert verify(SECRET, good, "/live/show/source/seg1.m4s", 1_999) is None
    assert verify(SECRET, good, "/live/show.m3u8", 2_000) == "token expired"
    assert verify(SECRET, good, "/live/other.m3u8", 1_000) == "token does not cover this path"
    assert verify(SECRET, good, "/live/show/../../admin", 1_000) == "token does not cover this path"
    assert verify("another-secret-0123456", good, "/live/show.m3u8", 1_000) == "bad token signature"
    assert verify(SECRET, "2000-garbage", "/live/show.m3u8", 1_000) == "malformed token"
    forged = good.replace("2000-", "9999-", 1)  # a later expiry is not covered by the HMAC
    assert verify(SECRET, forged, "/live/show.m3u8", 1_000) == "bad token signature"


# ---------------------------------------------------------------------------------------------
# through the edge
# ---------------------------------------------------------------------------------------------


def test_missing_expired_foreign_and_bad_tokens_get_403_without_reaching_the_origin(client, origin):
    cases = {
        "/live/a/none": None,
        "/live/a/expired": token("/live/a/", ttl=-5),
        "/live/a/elsewhere": token("/live/b/"),
        "/live/a/forged": token("/live/a/", secret="not-the-secret-0123"),
        "/live/a/garbage": "hello",
    }
    reasons = {}
    for path, tok in cases.items():
        response = client.get(path, params={"token": tok} if tok else None)
        assert response.status_code == 403, path
        assert "set-cookie" not in response.headers
        reasons[path] = response.text
    assert "needs a signed token" in reasons["/live/a/none"]
    assert "expired" in reasons["/live/a/expired"]
    assert "does not cover" in reasons["/live/a/elsewhere"]
    assert "signature" in reasons["/live/a/forged"]
    assert "malformed" in reasons["/live/a/garbage"]
    assert not any(received(origin, path) for path in cases)


def test_a_query_token_is_admitted_set_as_a_cookie_and_kept_from_the_origin(client, origin):
    tok = token("/live/show")
    response = client.get(
        "/live/show.m3u8",
        params={"a": "1", "token": tok, "b": "2"},
        headers={"Cookie": "theme=dark"},
    )
    assert response.status_code == 200, response.text
    assert response.text == "body of /live/show.m3u8?a=1&b=2\n"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"verge_token={tok}; Path=/live/; Max-Age=")
    assert 590 <= int(cookie.split("Max-Age=")[1].split(";")[0]) <= 600
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    (seen,) = received(origin, "/live/show.m3u8")
    assert seen.path == "/live/show.m3u8?a=1&b=2"  # the token is not forwarded
    assert seen.headers.get("cookie") == "theme=dark"


def test_the_cookie_alone_admits_relative_requests_and_never_reaches_the_origin(edge, origin):
    tok = token("/live/cookie/")
    with edge.client() as browser:  # httpx keeps cookies like a player's XHR would
        first = browser.get("/live/cookie/index.m3u8", params={"token": tok})
        assert first.status_code == 200
        segment = browser.get("/live/cookie/seg1.m4s")  # no query: the cookie carries the token
        assert segment.status_code == 200 and "set-cookie" not in segment.headers
    plain = httpx.get(
        edge.url + "/live/cookie/seg2.m4s", headers={"Cookie": f"a=1; verge_token={tok}; b=2"}
    )
    assert plain.status_code == 200
    (seen,) = received(origin, "/live/cookie/seg2.m4s")
    assert seen.headers.get("cookie") == "a=1; b=2"
    (seen,) = received(origin, "/live/cookie/seg1.m4s")
    assert "cookie" not in seen.headers


def test_the_token_is_not_part_of_the_cache_key(client, origin):
    path = "/live/keyed/seg7.m4s"
    first = client.get(path, params={"token": token("/live/keyed/")})
    second = client.get(path, params={"token": token("/live/keyed/seg7", ttl=900)})
    by_cookie = httpx.get(
        client.base_url.join(path), headers={"Cookie": f"verge_token={token('/live/')}"}
    )
    assert first.status_code == second.status_code == by_cookie.status_code == 200
    assert "fwd=miss" in first.headers["cache-status"]
    assert second.headers["cache-status"] == "verge; hit"
    assert second.headers["set-cookie"].startswith("verge_token=")  # a hit sets it too
    assert "set-cookie" not in by_cookie.headers
    assert by_cookie.headers["cache-status"] == "verge; hit"
    assert len(received(origin, path)) == 1
    anonymous = httpx.get(client.base_url.join(path))  # (the client above keeps the cookie)
    assert anonymous.status_code == 403  # stored, yet no token: no answer from the cache


def test_a_rule_without_cookies_takes_its_own_parameter_only(client, origin):
    tok = token("/strict/", secret=ENV_SECRET)
    assert client.get("/strict/x", params={"token": tok}).status_code == 403  # wrong parameter
    assert client.get("/strict/x", headers={"Cookie": f"verge_token={tok}"}).status_code == 403
    response = client.get("/strict/x", params={"sig": tok})
    assert response.status_code == 200 and "set-cookie" not in response.headers
    assert [r.path for r in received(origin, "/strict/x")] == ["/strict/x"]


def test_dot_segments_cannot_climb_out_of_the_granted_prefix(edge, origin):
    tok = token("/live/mine/")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(
            f"GET /live/mine/../theirs/x?token={tok} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403") and b"does not cover" in answer
    assert not received(origin, "/live/mine/../theirs/x")


def test_sign_url_prints_a_url_the_edge_admits(edge):
    url = f"{edge.url}/live/cli/show.m3u8?quality=hd"
    out = subprocess.run(
        [*VERGE, "sign-url", url, "--secret", SECRET, "--prefix", "/live/cli/", "--ttl", "5m"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    signed = out.stdout.strip()
    assert signed.startswith(url + "&token=")
    assert httpx.get(signed).status_code == 200
    other = signed.replace("/live/cli/show.m3u8", "/live/cli/other.m3u8")
    assert httpx.get(other).status_code == 200  # the prefix covers the whole directory
    bad = subprocess.run(
        [*VERGE, "sign-url", url, "--secret", "short"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0 and "16 characters" in bad.stderr


def test_a_child_edge_hands_the_token_to_its_parent(tmp_path, origin):
    parent = start_edge(tmp_path / "parent", origin.url, "--name", "shield")
    try:
        child = start_edge(
            tmp_path / "child", origin.url, "--name", "child", "--parent", parent.url
        )
        try:
            url = sign_url(child.url + "/live/tier/seg3.m4s", SECRET, prefix="/live/tier/")
            response = httpx.get(url)
            assert response.status_code == 200 and "set-cookie" in response.headers
            # filled through the parent: its Cache-Status member comes first
            assert response.headers["cache-status"].count("fwd=miss") == 2
            (seen,) = received(origin, "/live/tier/seg3.m4s")
            assert seen.path == "/live/tier/seg3.m4s" and "cookie" not in seen.headers
        finally:
            child.stop()
    finally:
        parent.stop()


def test_tokens_never_reach_the_access_log(edge, client, origin):
    """A token is a credential: neither a miss nor a memory hit logs it."""
    secret_token = token("/live/logged")
    for _ in range(3):
        assert client.get("/live/logged.m3u8", params={"token": secret_token}).status_code == 200
    log = edge.workdir / "access.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and log.read_text().count("/live/logged.m3u8") < 3:
        time.sleep(0.1)  # the worker flushes its access log about once a second
    text = log.read_text()
    assert text.count("/live/logged.m3u8") == 3
    leaked = [line for line in text.splitlines() if secret_token in line]
    assert not leaked, leaked
