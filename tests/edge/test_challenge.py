"""The cookie challenge end to end: a real edge (``verge edge --config``, two workers) with
``protection.challenge`` in front of the test origin, real clients (httpx, with a cookie jar
like a browser or ``curl -b -c``, and without one like a flood tool), /metrics; then in
process, with the app's clocks injected: the events it records, the window ending, and the
services without a challenge paying nothing for it.

Every client is its own address: the edge trusts 127.0.0.1 as a proxy, so X-Forwarded-For
names the client (the rate limits' client address). The rates are per minute, so no test
waits: a client over its rate stays over it for the whole module.
"""

from __future__ import annotations

import http.cookiejar
import re
import stat

import httpx
import pytest

from tests.conftest import EdgeProcess
from tests.origin import make_origin
from verge.config import Config
from verge.edge import app as edge_app
from verge.edge import protect
from verge.edge.worker import Worker
from verge.http.message import Request
from verge.protect.challenge import COOKIE, SECRET_FILE

pytestmark = pytest.mark.timeout(90)

CONFIG = """
services:
  - name: site
    hosts: [127.0.0.1]
    origins: ["{origin}"]
    protection:
      trusted_proxies: [127.0.0.1/32]
      challenge: {{match: {{path: /}}, when: "rate > 2/m", kind: cookie, refuse_after: 2,
                  window: 1h}}
  - name: other
    hosts: [other.test]
    origins: ["{origin}"]
    protection:
      trusted_proxies: [127.0.0.1/32]
      challenge: {{when: "rate > 1/m"}}
  - name: js
    hosts: [js.test]
    origins: ["{origin}"]
    protection:
      trusted_proxies: [127.0.0.1/32]
      challenge: {{when: "rate > 1/m", kind: javascript}}
"""
CACHED = [("Cache-Control", "max-age=60"), ("Content-Type", "text/plain")]


@pytest.fixture(scope="module")
def origin():
    origin = make_origin()
    origin.route("/*", headers=CACHED, body=b"origin says hi\n")
    origin.route("/vary/*", headers=[*CACHED, ("Vary", "Cookie")], body=b"varies by cookie\n")
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def edge(origin, tmp_path_factory):
    edge = EdgeProcess(
        tmp_path_factory.mktemp("challenge"), config=CONFIG.format(origin=origin.url), workers=2
    ).start()
    yield edge
    edge.stop()


class NoCookies(http.cookiejar.CookieJar):
    """A client that keeps no cookie (what most flood tools are)."""

    def __init__(self) -> None:
        super().__init__(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def client(
    edge: EdgeProcess, address: str, *, cookies: bool = True, host: str | None = None, **kw
) -> httpx.Client:
    headers = {"X-Forwarded-For": address, **({"Host": host} if host else {})}
    return edge.client(headers=headers, **({} if cookies else {"cookies": NoCookies()}), **kw)


def challenged(response: httpx.Response) -> str:
    """The token a 307 challenge sets (after checking the challenge's shape)."""
    assert response.status_code == 307, response.text
    assert response.headers["cache-control"] == "no-store"
    cookie = response.headers["set-cookie"]
    match = re.fullmatch(
        rf"{COOKIE}=(\d+\.[\w-]{{43}}); Path=/; HttpOnly; SameSite=Lax; "
        r"Max-Age=3600",
        cookie,
    )
    assert match, cookie
    return match[1]


def test_under_the_rate_no_challenge_over_it_a_cookie_and_then_the_content(edge, origin):
    with client(edge, "198.51.100.1") as c:
        under = [c.get("/a/page"), c.get("/a/page")]
        assert [r.status_code for r in under] == [200, 200]
        assert all("set-cookie" not in r.headers for r in under)
        assert under[1].headers["cache-status"].endswith("hit")
        over = c.get("/a/page?x=1")
        token = challenged(over)
        assert over.headers["location"] == "/a/page?x=1"  # the same URL
        back = c.get(over.headers["location"])  # the jar sends the cookie back
        assert back.status_code == 200 and back.text == "origin says hi\n"
        again = c.get("/a/page")
        assert again.status_code == 200 and again.headers["cache-status"].endswith("hit")
        assert c.cookies[COOKIE] == token
    assert origin.hits("/a/page") == 1  # a passed challenge keeps hits hits
    with client(edge, "198.51.100.11", follow_redirects=True) as browser:
        answers = [browser.get("/a/page") for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert [len(r.history) for r in answers] == [0, 0, 1, 0]  # one challenge, then served


def test_a_client_that_never_keeps_the_cookie_ends_refused(edge):
    with client(edge, "198.51.100.2", cookies=False) as bot:
        statuses = [bot.get("/b/page").status_code for _ in range(4)]
        refused = bot.get("/b/page")
    assert statuses == [200, 200, 307, 307]
    assert refused.status_code == 429
    assert 3500 < int(refused.headers["retry-after"]) <= 3600  # the rest of its window
    assert refused.headers["connection"] == "close"
    assert refused.headers["cache-control"] == "no-store"


def test_forged_and_hostile_cookies_are_challenged_and_harmless(edge, origin):
    with client(edge, "198.51.100.4", cookies=False) as other_client:
        for _ in range(2):
            other_client.get("/c/page")
        someone_elses = challenged(other_client.get("/c/page"))
    forged_expiry = str(int(someone_elses.split(".")[0]) + 3600)
    cookies = [
        f"{COOKIE}={someone_elses}",  # a token of another client address
        f"{COOKIE}={forged_expiry}.{someone_elses.split('.')[1]}",  # its life extended
        f"{COOKIE}=1.forged",
        f"{COOKIE}=" + "A" * 10_000,  # 10 KB
        f"a=1; {COOKIE}={someone_elses}.{someone_elses}",  # dotted
    ]
    cookies.append(f"{COOKIE}=caf\xe9".encode("latin-1"))  # not ASCII
    for n, cookie in enumerate(cookies):  # each from an address of its own, over its rate
        with client(edge, f"198.51.100.{30 + n}", cookies=False) as c:
            for _ in range(2):
                assert c.get("/c/page").status_code == 200
            challenged(c.get("/c/page", headers={"Cookie": cookie}))
    with edge.client() as fresh:  # the edge is fine
        assert fresh.get("/c/page", headers={"X-Forwarded-For": "198.51.100.99"}).status_code == 200


def test_a_token_of_another_service_is_challenged(edge):
    address = "198.51.100.5"
    with client(edge, address, cookies=False) as site:
        for _ in range(2):
            site.get("/d/page")
        site_token = challenged(site.get("/d/page"))
    with client(edge, address, cookies=False, host="other.test") as other:
        assert other.get("/d/page").status_code == 200
        stolen = other.get("/d/page", headers={"Cookie": f"{COOKIE}={site_token}"})
        own = challenged(stolen)  # not passed: challenged for its own token
        assert own != site_token
        assert other.get("/d/page", headers={"Cookie": f"{COOKIE}={own}"}).status_code == 200


def test_the_cookie_reaches_neither_the_cache_variants_nor_the_origin(edge, origin):
    """An origin that varies by Cookie still serves a challenged client from the cache: the
    edge takes its cookie out (other cookies go on)."""
    with client(edge, "198.51.100.6") as c:
        c.cookies.set("theme", "dark", domain="127.0.0.1")
        assert c.get("/vary/page").status_code == 200  # a miss, stored for "theme=dark"
        assert c.get("/vary/page").headers["cache-status"].endswith("hit")
        challenged(c.get("/vary/page"))
        passed = c.get("/vary/page")
        assert passed.status_code == 200
        assert passed.headers["cache-status"].endswith("hit"), passed.headers["cache-status"]
        assert c.get("/vary/other").status_code == 200  # a miss that goes to the origin
    seen = [r.headers.get("cookie") for r in origin.requests if r.path.startswith("/vary/")]
    assert seen == ["theme=dark", "theme=dark"]
    assert all(COOKIE not in (r.headers.get("cookie") or "") for r in origin.requests)


def test_the_javascript_kind_sets_the_cookie_in_a_script(edge):
    with client(edge, "198.51.100.7", host="js.test") as c:
        assert c.get("/e/page").status_code == 200
        page = c.get("/e/page")
        assert page.status_code == 503 and page.headers["cache-control"] == "no-store"
        assert "set-cookie" not in page.headers
        token = re.search(rf'document\.cookie="{COOKIE}=([\d.\w-]+);', page.text)[1]
        assert c.get("/e/page", headers={"Cookie": f"{COOKIE}={token}"}).status_code == 200


def test_every_worker_passes_the_nodes_tokens_and_the_secret_is_private(edge):
    address = "198.51.100.8"
    with client(edge, address, cookies=False) as c:
        for _ in range(2):
            c.get("/f/page")
        token = challenged(c.get("/f/page"))
    for _ in range(12):  # new connections: the kernel spreads them over both workers
        with client(edge, address, cookies=False) as fresh:
            assert fresh.get("/f/page", headers={"Cookie": f"{COOKIE}={token}"}).status_code == 200
    path = edge.cache_dir / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert path.read_bytes().hex() not in "".join(edge.output)


def test_metrics_count_challenges_passes_and_refusals(edge):
    with client(edge, "198.51.100.9") as c:
        for _ in range(3):
            c.get("/g/page")  # the third is challenged, the jar keeps the cookie
        assert c.get("/g/page").status_code == 200
    with client(edge, "198.51.100.10", cookies=False) as bot:
        assert [bot.get("/g/page").status_code for _ in range(5)][-1] == 429
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text

    def count(outcome: str) -> float:
        line = re.search(
            rf'verge_rate_limit_requests_total\{{outcome="{outcome}",'
            rf'rule="challenge",service="site"\}} (\S+)',
            metrics,
        )
        return float(line[1])

    assert count("challenged") >= 1 and count("passed") >= 1 and count("refused") >= 1
    assert count("limited") >= count("challenged") + count("passed")


# ---- in process: events, the window, the hot path -----------------------------------------------


class Clocks:
    def __init__(self, monkeypatch) -> None:
        self.mono, self.wall = 1000.0, 1_700_000_000.0
        monkeypatch.setattr(edge_app, "_monotonic", lambda: self.mono)
        monkeypatch.setattr(protect, "_wall", lambda: self.wall)


def make_worker(tmp_path, protection: dict | None) -> Worker:
    services = [
        {
            "name": "site",
            "hosts": ["*"],
            "origins": ["http://127.0.0.1:9"],
            **({"protection": protection} if protection else {}),
        }
    ]
    config = Config.model_validate({"services": services})
    return Worker(
        {
            "index": 0,
            "options": {"workers": 1, "cache_dir": str(tmp_path), "node": "n1"},
            "config": config.model_dump(mode="json"),
        }
    )


def request(target: str = "/page", cookie: str | None = None) -> Request:
    fields = [("Host", "shop.test"), *([("Cookie", cookie)] if cookie else [])]
    return Request(
        "GET", target, headers=fields, client="192.0.2.7", hmap={k.lower(): v for k, v in fields}
    )


def test_challenges_and_refusals_are_recorded_and_the_window_ends(tmp_path, monkeypatch):
    clocks = Clocks(monkeypatch)
    worker = make_worker(
        tmp_path, {"challenge": {"when": "rate > 1/m", "refuse_after": 1, "window": "10m"}}
    )
    app = worker.app
    assert app.handle_fast(request()) is None  # under the rate: a miss, the async path
    challenge = app.handle_fast(request("/page?q=1"))
    assert challenge.status == 307
    token = dict(challenge.headers)["Set-Cookie"].split(";")[0]
    assert app.handle_fast(request(cookie="x=1; " + token)) is None  # passed: the async path
    assert app.handle_fast(request()).status == 307
    assert app.handle_fast(request()).status == 429
    clocks.mono += 600  # the window is over (and the rate back under: one more is served)
    assert app.handle_fast(request()) is None
    assert app.handle_fast(request()).status == 307
    events = worker.command({"op": "protection_events"})["events"]
    assert [(e["kind"], e["status"], e["detail"]) for e in events] == [
        ("challenge", 307, "no cookie"),
        ("challenge", 307, "no cookie"),
        ("challenge", 429, "refused after 1 unanswered"),
        ("challenge", 307, "no cookie"),
    ]
    assert events[0]["target"] == "/page?q=1"
    stats = worker.command({"op": "stats"})["stats"]["protection"]["site"]["rules"]
    assert stats["challenge"] == {
        "allowed": 3,
        "limited": 5,
        "blocked": 4,
        "challenged": 3,
        "passed": 1,
        "refused": 1,
    }
    secret = tmp_path / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_an_expired_token_is_challenged_again(tmp_path, monkeypatch):
    clocks = Clocks(monkeypatch)
    worker = make_worker(tmp_path, {"challenge": {"when": "rate > 1/m", "ttl": "1h"}})
    app = worker.app
    app.handle_fast(request())
    token = dict(app.handle_fast(request()).headers)["Set-Cookie"].split(";")[0]
    assert app.handle_fast(request(cookie=token)) is None
    clocks.wall += 3600
    assert app.handle_fast(request(cookie=token)).status == 307


def test_the_cookie_is_taken_out_of_the_request_that_goes_on(tmp_path, monkeypatch):
    Clocks(monkeypatch)
    worker = make_worker(tmp_path, {"challenge": {"when": "rate > 1/m"}})
    guard = worker.app.runtimes["site"].protection
    admitted = guard.admit(request(cookie=f"a=1; {COOKIE}=junk; b=2"), 0.0)
    assert admitted.refusal is None and admitted.strip_cookie  # under the rate: taken out
    stripped = guard.stripped(request(cookie=f"a=1; {COOKIE}=junk; b=2"))
    assert stripped.hmap["cookie"] == "a=1; b=2"
    assert "cookie" not in guard.stripped(request(cookie=f"{COOKIE}=junk")).hmap
    assert guard.admit(request(cookie="a=1"), 0.0).strip_cookie is False


def test_services_without_a_challenge_keep_the_plain_protect_phase(tmp_path):
    worker = make_worker(tmp_path, {"rate_limits": [{"name": "api", "rate": "5/s"}]})
    guard = worker.app.runtimes["site"].protection
    assert guard.challenge is None and "admit" not in vars(guard)
    assert "challenge" not in guard.stats()["rules"]
    admitted = guard.admit(request(cookie=f"{COOKIE}=x"), 0.0)
    assert admitted is protect.ADMITTED  # the cookie is nobody's business here
    assert not (tmp_path / SECRET_FILE).exists()  # no challenge, no secret made
