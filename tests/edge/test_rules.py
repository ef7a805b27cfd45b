"""What the config offers, end to end through a real `verge edge`: rules, services, origins, reloads.

Most tests share one edge (module scope) whose config has a rule per feature under its own
path prefix, in front of one shared origin; each test uses its own paths, so the origin's
per-path hit counts stay independent. Tests that need a particular origin set-up (dead or
failing origins, health checks) or change the config (reloads) start their own edge.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate

import httpx
import pytest

from tests.conftest import EdgeProcess, free_port
from tests.origin import RecordedRequest, Route, TestOrigin, make_origin

pytestmark = pytest.mark.timeout(60)

MAX_AGE = [("Cache-Control", "max-age=60")]

SITE = """
services:
  - name: site
    hosts: [127.0.0.1]
    origins: ["{origin}"]
    headers:
      request_add: {{X-Service: site}}
      response_add: {{X-Service: site}}
    rules:
      - path: /static/
        kind: static
        ignore_query: true
      - path: /cookies/
        ttl: 1m
        ignore_cookies: true
      - path: /dyn/
        kind: dynamic
      - path: /micro/
        kind: dynamic
        micro_cache: 1s
      - path: /api/
        kind: api
        key_headers: [X-Tenant]
      - path: /hdr/
        headers:
          request_add: {{X-Edge: verge}}
          request_remove: [X-Secret]
          response_add: {{X-Served-By: verge-edge}}
          response_remove: [X-Powered-By]
      - path: /old/
        redirect:
          to: https://new.example.com$path?$query
          status: 301
      - path: /moved/
        redirect:
          to: /new$path
          status: 302
  - name: alpha
    hosts: [a.test, "*.a.test"]
    origins: ["{origin}"]
  - name: beta
    hosts: [b.test]
    origins: ["{other}"]
"""


# ---------------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------------


def until(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def seen_by_origin(origin: TestOrigin, target: str) -> list[RecordedRequest]:
    """The requests the origin received for exactly this target (path and query)."""
    return [r for r in list(origin.requests) if r.path == target]


def fresh_get(edge: EdgeProcess, path: str, **kw) -> httpx.Response:
    """GET on a new connection, so that with several workers requests spread over them."""
    with edge.client() as client:
        return client.get(path, **kw)


@pytest.fixture(scope="module")
def site_origin() -> Iterator[TestOrigin]:
    origin = make_origin()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def other_origin() -> Iterator[TestOrigin]:
    origin = make_origin()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, site_origin, other_origin) -> Iterator[EdgeProcess]:
    """One edge (one worker) with the SITE config, shared by the rule tests."""
    config = SITE.format(origin=site_origin.url, other=other_origin.url)
    edge = EdgeProcess(tmp_path_factory.mktemp("site"), config=config).start()
    yield edge
    edge.stop()


@pytest.fixture
def client(site) -> Iterator[httpx.Client]:
    with site.client() as c:
        yield c


@pytest.fixture
def second_origin() -> Iterator[TestOrigin]:
    origin = make_origin()
    yield origin
    origin.stop()


# ---------------------------------------------------------------------------------------------
# static rule
# ---------------------------------------------------------------------------------------------


def test_static_rule_default_ttl_when_origin_gives_no_freshness(client, site_origin):
    site_origin.route("/static/logo.png", headers=[("Content-Type", "image/png")], body=b"png")
    first = client.get("/static/logo.png")
    second = client.get("/static/logo.png")
    assert first.headers["cache-status"] == "verge; fwd=miss; stored"
    assert second.headers["cache-status"] == "verge; hit"
    assert first.content == second.content == b"png"
    assert site_origin.hits("/static/logo.png") == 1


def test_static_rule_origin_freshness_wins_over_default_ttl(client, site_origin):
    site_origin.route("/static/nostore.js", headers=[("Cache-Control", "no-store")], body=b"js")
    client.get("/static/nostore.js")
    second = client.get("/static/nostore.js")
    assert "stored" not in second.headers["cache-status"]
    assert site_origin.hits("/static/nostore.js") == 2


def test_static_rule_ignore_query_shares_one_entry(client, site_origin):
    site_origin.route(
        "/static/app.js*", headers=[("Content-Type", "text/javascript")], body=b"app()"
    )
    first = client.get("/static/app.js?v=1")
    others = [
        client.get(target)
        for target in ("/static/app.js?v=2", "/static/app.js", "/static/app.js?x=y&v=3")
    ]
    assert first.headers["cache-status"] == "verge; fwd=miss; stored"
    assert all(r.headers["cache-status"] == "verge; hit" for r in others)
    assert all(r.content == b"app()" for r in others)
    assert len([r for r in site_origin.requests if r.path.startswith("/static/app.js")]) == 1


def test_static_rule_ignores_cookies(client, site_origin):
    site_origin.route(
        "/static/theme.css",
        headers=[("Set-Cookie", "sid=secret; Path=/"), ("Content-Type", "text/css")],
        body=b"a{}",
    )
    first = client.get("/static/theme.css", headers={"Cookie": "sid=abc"})
    second = client.get("/static/theme.css", headers={"Cookie": "sid=def"})
    assert "cookie" not in seen_by_origin(site_origin, "/static/theme.css")[0].headers
    assert first.headers["cache-status"] == "verge; fwd=miss; stored"
    assert second.headers["cache-status"] == "verge; hit"
    assert "set-cookie" not in second.headers
    assert second.content == b"a{}"
    assert site_origin.hits("/static/theme.css") == 1


def test_ignore_cookies_on_a_default_rule(client, site_origin):
    site_origin.route("/cookies/page", headers=[*MAX_AGE, ("Set-Cookie", "track=1")], body=b"p")
    client.get("/cookies/page", headers={"Cookie": "track=0"})
    hit = client.get("/cookies/page", headers={"Cookie": "track=0"})
    assert "cookie" not in seen_by_origin(site_origin, "/cookies/page")[0].headers
    assert hit.headers["cache-status"] == "verge; hit"
    assert "set-cookie" not in hit.headers
    assert site_origin.hits("/cookies/page") == 1


def test_set_cookie_response_not_stored_without_ignore_cookies(client, site_origin):
    site_origin.route("/plain-cookie", headers=[*MAX_AGE, ("Set-Cookie", "sid=1")], body=b"c")
    client.get("/plain-cookie", headers={"Cookie": "sid=0"})
    second = client.get("/plain-cookie", headers={"Cookie": "sid=0"})
    assert second.headers["set-cookie"] == "sid=1"
    assert "stored" not in second.headers["cache-status"]
    assert seen_by_origin(site_origin, "/plain-cookie")[0].headers["cookie"] == "sid=0"
    assert site_origin.hits("/plain-cookie") == 2


# ---------------------------------------------------------------------------------------------
# dynamic rule: bypass and micro-caching
# ---------------------------------------------------------------------------------------------


def test_dynamic_rule_bypasses_the_cache(client, site_origin):
    site_origin.route("/dyn/cart", headers=MAX_AGE, body=b"cart")
    responses = [client.get("/dyn/cart") for _ in range(3)]
    assert all(r.status_code == 200 and r.content == b"cart" for r in responses)
    assert all(r.headers["cache-status"] == "verge; fwd=bypass" for r in responses)
    assert site_origin.hits("/dyn/cart") == 3


def dated(headers: list[tuple[str, str]], offset: float) -> Callable[[RecordedRequest], Route]:
    """A handler answering with these headers plus a Date ``offset`` seconds from now."""
    return lambda req: Route(
        headers=[*headers, ("Date", formatdate(time.time() + offset, usegmt=True))], body=b"news"
    )


@pytest.mark.parametrize(
    "origin_headers",
    [[("Cache-Control", "no-cache")], []],
    ids=["origin-no-cache", "origin-no-headers"],
)
def test_micro_cache_absorbs_a_burst_then_expires(client, site_origin, origin_headers):
    path = f"/micro/news-{len(origin_headers)}"
    # Date one second ahead: its whole-second truncation then cannot shorten the 1s lifetime
    # (see test_micro_cache_lifetime_not_eaten_by_the_origin_date)
    site_origin.route(path, handler=dated(origin_headers, 1.0))
    started = time.monotonic()
    burst = [client.get(path) for _ in range(3)]
    assert time.monotonic() - started < 0.5, "burst took too long to be within the micro-cache"
    assert all(r.content == b"news" for r in burst)
    assert burst[0].headers["cache-status"] == "verge; fwd=miss; stored"
    assert burst[1].headers["cache-status"] == burst[2].headers["cache-status"] == "verge; hit"
    assert site_origin.hits(path) == 1
    # once the second is over the entry is stale: the next request reaches the origin again
    assert until(lambda: client.get(path).status_code == 200 and site_origin.hits(path) == 2)
    assert time.monotonic() - started >= 0.8


def test_micro_cache_lifetime_not_eaten_by_the_origin_date(client, site_origin):
    path = "/micro/skewed"
    site_origin.route(path, handler=dated([], -1.5))  # origin clock 1.5 s behind
    burst = [client.get(path) for _ in range(2)]
    assert burst[1].headers["cache-status"] == "verge; hit"
    assert site_origin.hits(path) == 1


# ---------------------------------------------------------------------------------------------
# api rule: sorted query, headers in the key
# ---------------------------------------------------------------------------------------------


def test_api_rule_sorts_the_query(client, site_origin):
    site_origin.route("/api/list*", headers=MAX_AGE, body=b"[1,2]")
    first = client.get("/api/list?b=2&a=1")
    second = client.get("/api/list?a=1&b=2")
    other = client.get("/api/list?a=1&b=3")
    assert first.headers["cache-status"] == "verge; fwd=miss; stored"
    assert second.headers["cache-status"] == "verge; hit"
    assert "fwd=miss" in other.headers["cache-status"]
    assert site_origin.hits("/api/list?b=2&a=1") == 1
    assert site_origin.hits("/api/list?a=1&b=2") == 0


def test_api_rule_key_headers_keep_entries_apart(client, site_origin):
    site_origin.route(
        "/api/profile",
        handler=lambda req: Route(
            headers=MAX_AGE, body=("tenant " + req.headers.get("x-tenant", "none")).encode()
        ),
    )
    red = client.get("/api/profile", headers={"X-Tenant": "red"})
    blue = client.get("/api/profile", headers={"X-Tenant": "blue"})
    red_again = client.get("/api/profile", headers={"X-Tenant": "red"})
    blue_again = client.get("/api/profile", headers={"X-Tenant": "blue"})
    nobody = client.get("/api/profile")
    assert red.content == red_again.content == b"tenant red"
    assert blue.content == blue_again.content == b"tenant blue"
    assert nobody.content == b"tenant none"
    assert red_again.headers["cache-status"] == blue_again.headers["cache-status"] == "verge; hit"
    assert site_origin.hits("/api/profile") == 3


def test_unsafe_methods_invalidate_entries_stored_under_rule_keys(client, site_origin):
    """RFC 9111 §4.4 under the rule's own key: every key-header variant of /api/, and the
    one ignore_query entry of /static/ whatever query the POST had."""
    site_origin.route(
        "/api/cart",
        handler=lambda req: Route(
            headers=MAX_AGE, body=("cart " + req.headers.get("x-tenant", "none")).encode()
        ),
    )
    site_origin.route("/static/inv.js*", headers=MAX_AGE, body=b"v1")
    for tenant in ("red", "blue"):
        client.get("/api/cart", headers={"X-Tenant": tenant})
    client.get("/static/inv.js?v=1")
    site_origin.route("/api/cart", headers=[("Content-Type", "text/plain")], body=b"ok")
    assert client.post("/api/cart", content=b"add=1").status_code == 200
    assert client.delete("/static/inv.js?v=7").status_code < 400
    red = client.get("/api/cart", headers={"X-Tenant": "red"})
    blue = client.get("/api/cart", headers={"X-Tenant": "blue"})
    static = client.get("/static/inv.js?v=1")
    assert "fwd=miss" in red.headers["cache-status"]
    assert "fwd=miss" in blue.headers["cache-status"]
    assert "fwd=miss" in static.headers["cache-status"]


# ---------------------------------------------------------------------------------------------
# header rules
# ---------------------------------------------------------------------------------------------


def test_request_header_rules_reach_the_origin(client, site_origin):
    site_origin.route("/hdr/req", body=b"r")  # uncacheable: every request reaches the origin
    client.get("/hdr/req", headers={"X-Secret": "hunter2", "X-Edge": "spoofed", "X-Keep": "1"})
    seen = seen_by_origin(site_origin, "/hdr/req")[0].headers
    assert "x-secret" not in seen
    assert seen["x-edge"] == "verge"  # the rule's value replaces the client's
    assert seen["x-service"] == "site"  # service-wide request_add
    assert seen["x-keep"] == "1"


def test_response_header_rules_on_miss_and_hit(client, site_origin):
    site_origin.route(
        "/hdr/res",
        headers=[*MAX_AGE, ("X-Powered-By", "php"), ("X-Served-By", "origin"), ("X-Other", "kept")],
        body=b"x",
    )
    miss = client.get("/hdr/res")
    hit = client.get("/hdr/res")
    assert hit.headers["cache-status"] == "verge; hit"
    for response in (miss, hit):
        assert "x-powered-by" not in response.headers
        assert response.headers["x-served-by"] == "verge-edge"
        assert response.headers["x-service"] == "site"
        assert response.headers["x-other"] == "kept"


def test_response_header_rules_on_uncacheable_responses(client, site_origin):
    site_origin.route("/hdr/pass", headers=[("X-Powered-By", "php")], body=b"p")
    response = client.get("/hdr/pass")
    assert "stored" not in response.headers["cache-status"]
    assert "x-powered-by" not in response.headers
    assert response.headers["x-served-by"] == "verge-edge"


# ---------------------------------------------------------------------------------------------
# redirects
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, status, location",
    [
        ("/old/post?id=7&x=1", 301, "https://new.example.com/old/post?id=7&x=1"),
        ("/old/post", 301, "https://new.example.com/old/post"),
        ("/moved/a/b.html", 302, "/new/moved/a/b.html"),
    ],
)
def test_redirect_rule(client, site_origin, target, status, location):
    response = client.get(target)
    assert response.status_code == status
    assert response.headers["location"] == location
    assert not [r for r in site_origin.requests if r.path.startswith(("/old/", "/moved/"))]


def test_redirect_rule_applies_to_other_methods(client):
    response = client.post("/old/form?a=1", content=b"data")
    assert response.status_code == 301
    assert response.headers["location"] == "https://new.example.com/old/form?a=1"


# ---------------------------------------------------------------------------------------------
# services by Host
# ---------------------------------------------------------------------------------------------


def test_services_selected_by_host(client, site_origin, other_origin):
    site_origin.route("/who", headers=MAX_AGE, body=b"alpha")
    other_origin.route("/who", headers=MAX_AGE, body=b"beta")
    for _ in range(2):  # the second round is served from the cache, still kept apart
        assert client.get("/who", headers={"Host": "a.test"}).content == b"alpha"
        assert client.get("/who", headers={"Host": "B.TEST:8080"}).content == b"beta"
        assert client.get("/who", headers={"Host": "www.a.test"}).content == b"alpha"
    assert other_origin.hits("/who") == 1
    assert site_origin.hits("/who") == 2  # a.test and www.a.test are different URLs


def test_unknown_host_without_default_service_is_404(client, site_origin):
    response = client.get("/who-else", headers={"Host": "nobody.test"})
    assert response.status_code == 404
    assert b"no service" in response.content
    assert site_origin.hits("/who-else") == 0


# ---------------------------------------------------------------------------------------------
# request directives
# ---------------------------------------------------------------------------------------------


def test_request_no_cache_forces_revalidation(client, site_origin):
    def answer(req: RecordedRequest) -> Route:
        headers = [*MAX_AGE, ("ETag", '"n1"')]
        if req.headers.get("if-none-match") == '"n1"':
            return Route(status=304, headers=headers)
        return Route(headers=headers, body=b"nc")

    site_origin.route("/rd/no-cache", handler=answer)
    client.get("/rd/no-cache")
    assert client.get("/rd/no-cache").headers["cache-status"] == "verge; hit"
    forced = client.get("/rd/no-cache", headers={"Cache-Control": "no-cache"})
    assert forced.status_code == 200 and forced.content == b"nc"
    assert "fwd=" in forced.headers["cache-status"]
    assert site_origin.hits("/rd/no-cache") == 2
    assert seen_by_origin(site_origin, "/rd/no-cache")[1].headers["if-none-match"] == '"n1"'
    assert client.get("/rd/no-cache").headers["cache-status"] == "verge; hit"


def test_request_no_cache_reports_fwd_request(client, site_origin):
    site_origin.route("/rd/fwd-request", headers=[*MAX_AGE, ("ETag", '"f"')], body=b"f")
    client.get("/rd/fwd-request")
    forced = client.get("/rd/fwd-request", headers={"Cache-Control": "no-cache"})
    assert "fwd=request" in forced.headers["cache-status"]


def test_pragma_no_cache_is_deprecated_and_ignored(client, site_origin):
    site_origin.route("/rd/pragma", headers=MAX_AGE, body=b"p")
    client.get("/rd/pragma")
    again = client.get("/rd/pragma", headers={"Pragma": "no-cache"})
    assert again.headers["cache-status"] == "verge; hit"
    assert site_origin.hits("/rd/pragma") == 1


def test_only_if_cached(client, site_origin):
    site_origin.route("/rd/oic", headers=MAX_AGE, body=b"o")
    miss = client.get("/rd/oic", headers={"Cache-Control": "only-if-cached"})
    assert miss.status_code == 504
    assert site_origin.hits("/rd/oic") == 0
    client.get("/rd/oic")
    hit = client.get("/rd/oic", headers={"Cache-Control": "only-if-cached"})
    assert hit.status_code == 200 and hit.headers["cache-status"] == "verge; hit"
    assert site_origin.hits("/rd/oic") == 1


def test_request_max_age_zero_goes_to_origin(client, site_origin):
    site_origin.route("/rd/max-age", headers=MAX_AGE, body=b"m")
    client.get("/rd/max-age")
    assert (
        client.get("/rd/max-age", headers={"Cache-Control": "max-age=3600"}).headers["cache-status"]
        == "verge; hit"
    )
    zero = client.get("/rd/max-age", headers={"Cache-Control": "max-age=0"})
    assert "fwd=" in zero.headers["cache-status"]
    assert site_origin.hits("/rd/max-age") == 2


def test_request_min_fresh_beyond_lifetime_goes_to_origin(client, site_origin):
    site_origin.route("/rd/min-fresh", headers=MAX_AGE, body=b"m")
    client.get("/rd/min-fresh")
    client.get("/rd/min-fresh", headers={"Cache-Control": "min-fresh=120"})
    assert site_origin.hits("/rd/min-fresh") == 2


def test_request_no_store_is_not_stored(client, site_origin):
    site_origin.route("/rd/no-store", headers=MAX_AGE, body=b"s")
    first = client.get("/rd/no-store", headers={"Cache-Control": "no-store"})
    assert "stored" not in first.headers["cache-status"]
    second = client.get("/rd/no-store")
    assert second.headers["cache-status"] == "verge; fwd=miss; stored"
    assert site_origin.hits("/rd/no-store") == 2


# ---------------------------------------------------------------------------------------------
# stale-while-revalidate
# ---------------------------------------------------------------------------------------------


def test_stale_while_revalidate_serves_stale_then_refreshes(client, site_origin):
    versions = iter([b"v1", b"v2"])

    def answer(req: RecordedRequest) -> Route:
        body = next(versions, b"v3")
        if body == b"v1":  # stored already stale (Age > max-age) but inside the swr window
            return Route(
                headers=[("Cache-Control", "max-age=1, stale-while-revalidate=60"), ("Age", "5")],
                body=body,
            )
        return Route(headers=MAX_AGE, body=body)

    path = "/swr/item"
    site_origin.route(path, handler=answer)
    assert client.get(path).content == b"v1"
    gate = site_origin.gate(path)  # the refresh waits at the origin until we let it go
    try:
        stale = client.get(path)
        assert stale.content == b"v1"
        assert stale.headers["cache-status"] == "verge; hit; detail=stale-while-revalidate"
        assert int(stale.headers["age"]) >= 5
        assert site_origin.wait_for_hits(path, 2)
        again = client.get(path)  # the refresh is still in flight: stale again, no second one
        assert again.headers["cache-status"] == "verge; hit; detail=stale-while-revalidate"
    finally:
        gate.set()
    assert until(lambda: client.get(path).content == b"v2")
    refreshed = client.get(path)
    assert refreshed.headers["cache-status"] == "verge; hit"
    assert site_origin.hits(path) == 2


# ---------------------------------------------------------------------------------------------
# several origins: failover and health checks
# ---------------------------------------------------------------------------------------------

TWO_ORIGINS = """
services:
  - name: site
    hosts: ["*"]
    default: true
    origins: ["{first}", "{second}"]
    rules:
      - path: /
        kind: dynamic
"""


def test_failover_when_first_origin_refuses_connections(edge_factory, origin):
    origin.route("/page", body=b"live")
    dead = f"http://127.0.0.1:{free_port()}"
    edge = edge_factory(config=TWO_ORIGINS.format(first=dead, second=origin.url))
    with edge.client() as c:
        responses = [c.get("/page") for _ in range(4)]
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.content == b"live" for r in responses)
    assert origin.hits("/page") == 4


def test_failover_when_first_origin_answers_5xx(edge_factory, origin, second_origin):
    second_origin.route("/*", status=503, body=b"overloaded")
    origin.route("/page", body=b"good")
    edge = edge_factory(config=TWO_ORIGINS.format(first=second_origin.url, second=origin.url))
    with edge.client() as c:
        responses = [c.get("/page") for _ in range(4)]
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.content == b"good" for r in responses)
    assert second_origin.hits("/page") >= 1  # the first choice was tried, then failed over
    assert origin.hits("/page") == 4


HEALTH = """
services:
  - name: site
    hosts: ["*"]
    default: true
    origins: ["{sick}", "{well}"]
    health_check:
      path: /healthz
      interval: 0.2s
      timeout: 0.2s
      fails: 2
      passes: 1
    rules:
      - path: /
        kind: dynamic
"""


def test_health_check_takes_a_failing_origin_out_and_back(edge_factory, origin, second_origin):
    sick, well = second_origin, origin
    sick.route("/healthz", status=503, body=b"sick")
    well.route("/healthz", body=b"ok")
    sick.route("/page", body=b"sick")
    well.route("/page", body=b"well")
    edge = edge_factory(config=HEALTH.format(sick=sick.url, well=well.url))
    # checks run back to back: when check 3 starts, the first two have been recorded
    assert sick.wait_for_hits("/healthz", 3)
    with edge.client() as c:
        responses = [c.get("/page").content for _ in range(6)]
    assert responses == [b"well"] * 6
    assert sick.hits("/page") == 0
    # the origin recovers: one passing check puts it back into the rotation
    sick.route("/healthz", body=b"ok")
    assert sick.wait_for_hits("/healthz", sick.hits("/healthz") + 2)
    with edge.client() as c:
        responses = [c.get("/page").content for _ in range(6)]
    assert b"sick" in responses and b"well" in responses


# ---------------------------------------------------------------------------------------------
# config reload
# ---------------------------------------------------------------------------------------------

RELOADABLE = """
services:
  - name: site
    hosts: ["*"]
    default: true
    origins: ["{origin}"]
    rules:
      - path: /r/
        headers:
          response_add: {{X-Gen: "{gen}"}}
{extra}"""

REDIRECT_RULE = """      - path: /go/
        redirect: {to: /gone$path, status: 307}
"""

BROKEN = """
services:
  - name: site
    hosts: ["*"]
    default: true
    origins: ["{origin}"]
    rules:
      - path: /r/
        ttl: soon
"""


def reloadable(origin: TestOrigin, gen: int, extra: str = "") -> str:
    return RELOADABLE.format(origin=origin.url, gen=gen, extra=extra)


def worker_request_counts(edge: EdgeProcess) -> list[int]:
    with edge.admin() as admin:
        workers = admin.get("/stats").json()["workers"]
    return [sum(n for _, _, n in w["requests"]) for w in workers]


def generations_seen(edge: EdgeProcess, path: str = "/r/page", connections: int = 16) -> set[str]:
    """X-Gen values from many fresh connections (spread over the workers by SO_REUSEPORT)."""
    return {fresh_get(edge, path).headers.get("x-gen", "none") for _ in range(connections)}


def assert_every_worker_served(edge: EdgeProcess, action: Callable[[], None]) -> None:
    before = worker_request_counts(edge)
    action()
    after = worker_request_counts(edge)
    assert len(after) == 2 and all(a > b for a, b in zip(after, before, strict=True)), (
        f"requests did not reach every worker: {before} -> {after}"
    )


@pytest.fixture
def reload_edge(edge_factory, origin) -> EdgeProcess:
    origin.route("/r/page", headers=[("Cache-Control", "max-age=600")], body=b"page")
    edge = edge_factory(config=reloadable(origin, 1), workers=2)
    assert generations_seen(edge) == {"1"}
    return edge


def config_path(edge: EdgeProcess):
    return edge.workdir / "verge.yaml"


def test_reload_applies_new_rules_in_every_worker(reload_edge, origin):
    config_path(reload_edge).write_text(reloadable(origin, 2, REDIRECT_RULE))
    with reload_edge.admin() as admin:
        reply = admin.post("/config/reload")
    assert reply.status_code == 200
    assert reply.json() == {"ok": True, "workers": 2}

    def check() -> None:
        # /r/page is cached in the workers: the hits carry the new header too
        assert generations_seen(reload_edge) == {"2"}
        for _ in range(8):
            moved = fresh_get(reload_edge, "/go/x")
            assert moved.status_code == 307 and moved.headers["location"] == "/gone/go/x"

    assert_every_worker_served(reload_edge, check)


def test_reload_needs_the_admin_token(site):
    assert httpx.post(site.admin_url + "/config/reload").status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx.post(site.admin_url + "/config/reload", headers=wrong).status_code == 401


def test_broken_config_on_reload_keeps_the_old_one(reload_edge, origin):
    config_path(reload_edge).write_text(BROKEN.format(origin=origin.url))
    with reload_edge.admin() as admin:
        reply = admin.post("/config/reload")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert f"{config_path(reload_edge)}:9:14:" in error
    assert "ttl" in error and "invalid duration" in error
    assert_every_worker_served(
        reload_edge, lambda: assert_equal(generations_seen(reload_edge), {"1"})
    )


def assert_equal(actual: object, expected: object) -> None:
    assert actual == expected


def test_sighup_reloads_and_rejects_a_broken_file(reload_edge, origin):
    config_path(reload_edge).write_text(reloadable(origin, 2))
    os.kill(reload_edge.proc.pid, signal.SIGHUP)
    assert until(lambda: generations_seen(reload_edge, connections=8) == {"2"})
    assert_every_worker_served(
        reload_edge, lambda: assert_equal(generations_seen(reload_edge), {"2"})
    )

    config_path(reload_edge).write_text(BROKEN.format(origin=origin.url))
    os.kill(reload_edge.proc.pid, signal.SIGHUP)
    assert until(lambda: any("config reload rejected" in line for line in reload_edge.output))
    rejected = next(line for line in reload_edge.output if "config reload rejected" in line)
    assert "verge.yaml:9:14:" in rejected
    assert_every_worker_served(
        reload_edge, lambda: assert_equal(generations_seen(reload_edge), {"2"})
    )


HOST_HEADER = """
services:
  - name: site
    hosts: ["*"]
    default: true
    origins:
      - url: "{origin}"
        host_header: {host}
    rules:
      - path: /
        kind: dynamic
"""


def test_reload_applies_changed_origin_host_header(edge_factory, origin):
    origin.route("/h", body=b"h")
    edge = edge_factory(config=HOST_HEADER.format(origin=origin.url, host="one.test"))
    with edge.client() as c:
        c.get("/h")
    assert seen_by_origin(origin, "/h")[-1].headers["host"] == "one.test"
    config_path(edge).write_text(HOST_HEADER.format(origin=origin.url, host="two.test"))
    with edge.admin() as admin:
        assert admin.post("/config/reload").status_code == 200
    with edge.client() as c:
        c.get("/h")
    assert seen_by_origin(origin, "/h")[-1].headers["host"] == "two.test"


LIMITED = """
limits:
  max_url_bytes: {url_bytes}
services:
  - name: site
    hosts: ["*"]
    default: true
    origins: ["{origin}"]
"""


def test_reload_applies_changed_limits(edge_factory, origin):
    origin.route("/*", body=b"ok")
    edge = edge_factory(config=LIMITED.format(url_bytes="8KiB", origin=origin.url))
    long_path = "/" + "a" * 2000
    assert fresh_get(edge, long_path).status_code == 200
    config_path(edge).write_text(LIMITED.format(url_bytes="1KiB", origin=origin.url))
    with edge.admin() as admin:
        assert admin.post("/config/reload").status_code == 200
    assert fresh_get(edge, long_path).status_code == 414


def test_a_rule_can_send_its_paths_to_other_origins(edge_factory, origin):
    """/live/ on a stream server, the rest on the site's origin — one service, one hostname."""
    streams = make_origin()
    try:
        config = f"""
services:
  - name: site
    hosts: ["*"]
    origins: ["{origin.url}"]
    rules:
      - path: /live/
        origins: ["{streams.url}"]
"""
        edge = edge_factory(config=config)
        origin.route("/page", headers=MAX_AGE, body=b"page\n")
        streams.route("/live/a.m3u8", headers=[("Cache-Control", "max-age=1")], body=b"#EXTM3U\n")
        with edge.client() as client:
            assert client.get("/page").content == b"page\n"
            assert client.get("/live/a.m3u8").content == b"#EXTM3U\n"
        assert origin.hits("/live/a.m3u8") == 0 and streams.hits("/live/a.m3u8") == 1
        assert streams.hits("/page") == 0
    finally:
        streams.stop()
