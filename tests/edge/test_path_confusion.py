"""Path confusion: every spelling of a path reaches the same rule, function, signature check,
cache key and origin path — the one the edge normalised (verge.uri, verge.http.target).

A real edge in front of the recording origin (tests/edge/rawhttp.py), with a signed rule on
/secret/, a cached rule on /static/, an edge function on /gate/ and a service that keeps
encoded slashes; requests are sent as exact bytes (like ``curl --path-as-is``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.compute.conftest import build_examples
from tests.conftest import EdgeProcess
from tests.edge.rawhttp import RecordingOrigin, exchange
from verge.edge.signing import sign_url
from verge.http.target import BadTarget, normalize_target

pytestmark = pytest.mark.timeout(90)

SECRET = "path-confusion-secret-0123"
CONFIG = """
services:
  - name: site
    hosts: [site.test]
    origins: ["{origin}"]
    rules:
      - path: /secret/
        signed: {{secret: {secret}}}
      - path: /static/
        ttl: 1h
        override: true
  - name: api
    hosts: [api.test]
    origins: ["{origin}"]
    encoded_slashes: keep
functions:
  - {{name: gate, service: site, routes: ["/gate/*"], module: {module}}}
"""


@pytest.fixture(scope="module")
def origin() -> Iterator[RecordingOrigin]:
    with RecordingOrigin(name="origin") as origin:
        yield origin


@pytest.fixture(scope="module")
def edge(tmp_path_factory, origin) -> Iterator[EdgeProcess]:
    modules = build_examples(tmp_path_factory.mktemp("fn"))
    config = CONFIG.format(origin=origin.url, secret=SECRET, module=modules["hello"])
    edge = EdgeProcess(tmp_path_factory.mktemp("edge"), config=config, workers=1).start()
    yield edge
    edge.stop()


def get(edge: EdgeProcess, target: str, host: str = "site.test", extra: str = ""):
    """One GET with the target exactly as written; (status, body, headers text)."""
    port = int(edge.url.rsplit(":", 1)[1])
    raw = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    answer = exchange(port, raw.encode("latin-1"), expect=1)
    assert answer.responses, f"no answer to {target!r}: {answer.raw!r}"
    response = answer.responses[0]
    return response.status, response.body, "\n".join(f"{n}: {v}" for n, v in response.headers)


# (target as sent, what must happen): "signed" = the signed rule's 403, "function" = the
# edge function answered, "400" = refused, else the path the origin must receive.
SECRET_FORMS = [
    "/secret/plan.txt",
    "/public/../secret/plan.txt",
    "/%73ecret/plan.txt",
    "/%73%65%63%72%65%74/plan.txt",
    "//secret/plan.txt",
    "///secret//plan.txt",
    "/secret/./plan.txt",
    "/./secret/plan.txt",
    "/%2e%2e/secret/plan.txt",
    "/public/%2E%2E/secret/plan.txt",
    "/public/.%2e/secret/plan.txt",
    "/../../secret/plan.txt",
    "http://site.test/public/../secret/plan.txt",
]
GATE_FORMS = ["/gate/a", "/%67ate/a", "/x/../gate/a", "//gate/a", "/gate/./a", "/GATE/../gate/a"]
REFUSED_FORMS = [
    "/secret%2Fplan.txt",  # an origin that decodes %2F would see /secret/plan.txt
    "/secret%2fplan.txt",
    "/secret%5Cplan.txt",
    "/secret\\plan.txt",
    "/public/..;/secret/plan.txt",  # Tomcat reads ..; as ..
    "/public/%2e%2e;/secret/plan.txt",
    "/secret/plan.txt%00.jpg",
    "/bad%zzescape",
    "/secret/plan.txt#frag",
]


@pytest.mark.parametrize("target", SECRET_FORMS)
def test_every_spelling_of_a_signed_path_needs_the_token(edge, origin, target):
    mark = origin.mark()
    status, body, _ = get(edge, target)
    assert status == 403, body
    assert b"signed token" in body
    assert origin.since(mark) == [], "the origin saw a request the signed rule refused"


def test_a_signed_url_for_the_normal_path_opens_every_spelling(edge, origin):
    signed = sign_url("http://site.test/secret/plan.txt", SECRET)
    query = signed.split("?", 1)[1]
    for target in ("/public/../secret/plan.txt", "/%73ecret/plan.txt", "//secret/plan.txt"):
        mark = origin.mark()
        status, body, _ = get(edge, f"{target}?{query}")
        assert status == 200, body
        [seen] = origin.since(mark) or [None]
        if seen is not None:  # (a cache hit after the first)
            assert seen.target == "/secret/plan.txt"  # token removed, path normalised


@pytest.mark.parametrize("target", GATE_FORMS)
def test_every_spelling_of_a_function_route_runs_the_function(edge, origin, target):
    mark = origin.mark()
    status, body, _ = get(edge, target)
    assert (status, body) == (200, b"hello from wasm\n")
    assert origin.since(mark) == []


@pytest.mark.parametrize("target", REFUSED_FORMS)
def test_what_an_origin_could_read_differently_is_refused(edge, origin, target):
    mark = origin.mark()
    status, body, _ = get(edge, target)
    assert status == 400, body
    assert origin.since(mark) == []


def test_a_dotted_path_is_fetched_and_stored_under_its_normal_form(edge, origin):
    """The report's case: a no-cache request for /static/x/../app.js stored the origin's
    answer for the raw path under /static/app.js. Now the origin gets /static/app.js."""
    mark = origin.mark()
    status, _, _ = get(edge, "/static/x/../app.js", extra="Cache-Control: no-cache\r\n")
    assert status == 200
    [seen] = origin.since(mark)
    assert seen.target == "/static/app.js"
    for spelling in ("/static/app.js", "/static/%61pp.js", "//static/./app.js"):
        status, body, head = get(edge, spelling)
        assert status == 200
        assert body.endswith(b"GET /static/app.js\n")  # the origin's answer for the normal path
        assert "Cache-Status: verge; hit" in head
    assert len(origin.since(mark)) == 1


def test_a_service_may_keep_encoded_slashes_still_encoded(edge, origin):
    mark = origin.mark()
    status, _, _ = get(edge, "/v4/projects/group%2fname/..//files", host="api.test")
    assert status == 200
    [seen] = origin.since(mark)
    assert seen.target == "/v4/projects/files"  # dots and slashes normalised ...
    mark = origin.mark()
    get(edge, "/v4/projects/group%2fname", host="api.test")
    [seen] = origin.since(mark)
    assert seen.target == "/v4/projects/group%2Fname"  # ... but %2F never decoded


@pytest.mark.parametrize(
    ("method", "target", "normal"),
    [
        ("GET", "/a/b?x=%7e&y=%2f", "/a/b?x=~&y=%2F"),
        ("GET", "/a?", "/a"),
        ("GET", "/caf\xc3\xa9", "/caf%C3%A9"),
        ("OPTIONS", "*", "*"),
        ("GET", "HTTP://Site.test:8080/a/../b?q", "/b?q"),
        ("GET", "https://site.test", "/"),
        ("GET", "/a/b/..", "/a/"),
    ],
)
def test_normal_forms(method, target, normal):
    assert normalize_target(method, target)[0] == normal


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "*", 400),
        ("CONNECT", "site.test:443", 405),
        ("TRACE", "/", 405),
        ("GET", "ftp://site.test/a", 400),
        ("GET", "http://user@site.test/a", 400),
        ("GET", "http://site test/a", 400),
        ("GET", "site.test/a", 400),
        ("GET", "/a%", 400),
    ],
)
def test_refused_targets(method, target, status):
    with pytest.raises(BadTarget) as refused:
        normalize_target(method, target)
    assert refused.value.status == status
