"""The protect phase end to end: a real edge (verge edge --config) with a service's
`protection:` block in front of the test origin, real clients (httpx), /metrics.

Hostile input: SQL injection, XSS and traversal probes against their benign twins, a
spoofed X-Forwarded-For from an untrusted peer, a denied user agent."""

from __future__ import annotations

import re
import socket

import httpx
import pytest

from tests.conftest import EdgeProcess
from tests.origin import make_origin
from verge.protect.waf import CRS_DIR

pytestmark = pytest.mark.timeout(90)

CONFIG = """
services:
  - name: site
    hosts: [127.0.0.1]
    origins: ["{origin}"]
    protection:
      rate_limits:
        - {{name: api, match: {{path: /api/}}, key: client_ip, rate: 2/m, burst: 1, headers: true}}
        - {{name: login, match: {{path: /login, methods: [POST]}}, key: "header:X-Api-Key",
           rate: 1/m, penalty: 10m}}
        - {{name: watch, match: {{path: /watched/}}, rate: 1/m, action: log}}
      deny: {{user_agents: ["(?i)sqlmap"]}}
      waf: {{paranoia: 1, mode: {mode}}}
"""


@pytest.fixture(scope="module")
def shared_origin():
    """One origin and one edge per WAF mode for the module (each test uses its own paths
    and keys, so the edges' counts stay the tests' own)."""
    origin = make_origin()
    origin.route("/*", headers=[("Cache-Control", "max-age=60")], body=b"origin says hi\n")
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def edges(shared_origin, tmp_path_factory):
    if not (CRS_DIR / "REQUEST-901-INITIALIZATION.conf").exists():
        pytest.fail("the OWASP CRS is not installed: make waf-deps (scripts/waf-deps.sh)")
    started: dict[str, EdgeProcess] = {}
    yield started
    for edge in started.values():
        edge.stop()


@pytest.fixture
def protected(edges, shared_origin, tmp_path_factory):
    def start(mode: str = "block") -> EdgeProcess:
        if mode not in edges:
            config = CONFIG.format(origin=shared_origin.url, mode=mode)
            edges[mode] = EdgeProcess(tmp_path_factory.mktemp(mode), config=config).start()
        return edges[mode]
    return start


@pytest.fixture
def origin(shared_origin):  # (the tests below read what the shared origin saw)
    return shared_origin


def test_a_rate_limit_refuses_hits_and_misses_alike_with_the_draft_fields(protected, origin):
    edge = protected()
    with edge.client() as c:
        first, second = c.get("/api/a"), c.get("/api/a")
        assert (first.status_code, second.status_code) == (200, 200)
        assert second.headers["cache-status"].endswith("hit")  # hits are counted too
        # headers: true — allowed answers advertise the policy and what is left of it
        assert first.headers["ratelimit-policy"] == second.headers["ratelimit-policy"] \
            == '"api";q=2;w=60;verge-burst=1'
        assert first.headers["ratelimit"].startswith('"api";r=1;')
        assert second.headers["ratelimit"].startswith('"api";r=0;')
        refused = c.get("/api/a")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "30"
        assert refused.headers["ratelimit-policy"] == '"api";q=2;w=60;verge-burst=1'
        assert refused.headers["ratelimit"] == '"api";r=0;t=30'
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["violated-policies"] == ["api"]
        assert c.get("/other").status_code == 200  # outside the rule's path
        # X-Forwarded-For from an untrusted peer (no trusted_proxies) buys no fresh quota
        assert c.get("/api/a", headers={"X-Forwarded-For": "198.51.100.7"}).status_code == 429
    assert origin.hits("/api/a") == 1


FORM = "application/x-www-form-urlencoded"


def test_a_header_keyed_limit_with_a_penalty_box(protected, origin):
    edge = protected()

    def login(key: str):
        return c.post("/login", headers={"X-Api-Key": key, "Content-Type": FORM},
                      content=b"u=a")

    with edge.client() as c:
        assert login("k1").status_code == 200
        assert login("k1").status_code == 429
        boxed = login("k1")
        assert boxed.status_code == 429 and int(boxed.headers["retry-after"]) > 60  # 10 min box
        assert boxed.headers["connection"] == "close"  # a boxed client loses its connection
        assert login("k2").status_code == 200
        assert c.get("/login").status_code == 200  # GET is not in the rule's methods


def test_log_rules_count_but_never_refuse(protected):
    edge = protected()
    with edge.client() as c:
        answers = [c.get("/watched/x") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert "ratelimit" not in answers[2].headers
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    assert 'verge_rate_limit_requests_total{outcome="limited",rule="watch",service="site"} 2.0' \
        in metrics
    assert 'verge_rate_limit_requests_total{outcome="blocked",rule="watch",service="site"} 0.0' \
        in metrics


def test_deny_lists_refuse_before_anything_else(protected, origin):
    edge = protected()
    with edge.client() as c:
        denied = c.get("/page", headers={"User-Agent": "sqlmap/1.7 (https://sqlmap.org)"})
        assert denied.status_code == 403 and "user-agent" in denied.text
        assert c.get("/page", headers={"User-Agent": "Mozilla/5.0"}).status_code == 200
    assert origin.hits("/page") == 1
    with edge.admin() as admin:
        assert 'verge_deny_list_requests_total{service="site"} 1.0' in admin.get("/metrics").text


PROBES = [  # (attack, benign twin)
    ("/search?q=1%27%20OR%20%271%27%3D%271", "/search?q=one%20or%20two"),
    ("/search?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E", "/search?q=script%20writing"),
    ("/files?name=..%2F..%2Fetc%2Fpasswd", "/files?name=etc-passwords.txt"),
]


@pytest.mark.parametrize(("attack", "twin"), PROBES)
def test_the_waf_blocks_probes_and_passes_their_twins(protected, origin, attack, twin):
    edge = protected()
    with edge.client() as c:
        blocked = c.get(attack)
        assert blocked.status_code == 403 and "firewall" in blocked.text
        assert c.get(twin).status_code == 200
    assert origin.hits(attack) == 0 and origin.hits(twin) == 1


def test_the_waf_inspects_bodies_of_passed_requests(protected, origin):
    edge = protected()
    with edge.client() as c:
        attack = c.post("/form", content=b"user=admin' OR '1'='1' --",
                        headers={"Content-Type": FORM})
        assert attack.status_code == 403
        benign = c.post("/form", content=b"user=admin&note=hello",
                        headers={"Content-Type": FORM})
        assert benign.status_code == 200
    assert [r.body for r in origin.requests if r.path == "/form"] == [b"user=admin&note=hello"]


def test_detect_mode_counts_but_serves(protected, origin):
    edge = protected(mode="detect")
    attack = PROBES[0][0]
    with edge.client() as c:
        assert c.get(attack).status_code == 200
    assert origin.hits(attack) == 1
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    assert 'verge_waf_requests_total{outcome="detected",service="site"} 1.0' in metrics
    assert 'verge_waf_requests_total{outcome="blocked",service="site"} 0.0' in metrics


TWO_WORKER_CONFIG = """
services:
  - name: site
    hosts: [127.0.0.1]
    origins: ["{origin}"]
    protection:
      rate_limits:
        - {{name: by-ip, match: {{path: /ip/}}, rate: 5/m, burst: 4}}
        - {{name: by-key, match: {{path: /key/}}, key: "header:X-Api-Key", rate: 5/m, burst: 4}}
"""


@pytest.mark.parametrize(("path", "headers"), [("/ip/a", {}), ("/key/a", {"X-Api-Key": "k"})])
def test_limits_are_exact_across_two_workers(edge_factory, origin, path, headers):
    """Each request on a new connection (the kernel would spread them over both workers):
    client-IP keys meet in one worker (the steering BPF program), header keys in the node's
    shared table — exactly the burst gets through, not one burst per worker."""
    origin.route("/*", headers=[("Cache-Control", "no-store")], body=b"ok\n")
    edge = edge_factory(config=TWO_WORKER_CONFIG.format(origin=origin.url), workers=2)
    fresh = httpx.Limits(max_keepalive_connections=0)
    with edge.client(limits=fresh) as c:
        statuses = [c.get(path, headers=headers).status_code for _ in range(12)]
    assert statuses.count(200) == 5 and statuses.count(429) == 7


CAPPED_CONFIG = """
services:
  - name: site
    hosts: [127.0.0.1]
    origins: ["{origin}"]
    protection: {{connections_per_ip: 3}}
"""


def unanswered(sock: socket.socket) -> bool:
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def test_a_connection_cap_per_address_and_a_raised_open_files_limit(edge_factory, origin):
    origin.route("/*", body=b"ok\n")
    edge = edge_factory(config=CAPPED_CONFIG.format(origin=origin.url))
    held = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(3)]
    try:
        for sock in held:  # the three are served
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
        extra = socket.create_connection(("127.0.0.1", edge.port))
        extra.sendall(b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert unanswered(extra)  # the fourth is closed (reset) unanswered
        extra.close()
    finally:
        for sock in held:
            sock.close()
    with edge.client() as c:  # closed connections no longer count
        assert c.get("/a").status_code == 200
    with edge.admin() as admin:
        metrics = admin.get("/metrics").text
    assert "verge_connections_refused_by_cap 1.0" in metrics
    limit = re.search(r"^verge_open_files_limit (\S+)$", metrics, re.MULTILINE)
    assert float(limit.group(1)) >= 1024


TWO_TENANTS_CONFIG = """
services:
  - name: strict
    hosts: [a.test]
    origins: ["{origin}"]
    protection: {{connections_per_ip: 2}}
  - name: open
    hosts: [b.test]
    origins: ["{origin}"]
"""


def ask(sock: socket.socket, host: str) -> int | None:
    """One GET for ``host`` on ``sock``: the status, or None when the edge closed unanswered."""
    sock.sendall(f"GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:  # the whole answer: the next one starts clean
        body += sock.recv(4096)
    return int(head[9:12])


def test_one_services_connection_cap_never_narrows_another_services(edge_factory, origin):
    """A tenant's ``connections_per_ip: 2`` must not cap the clients of the node's other
    services: the connections are accepted, the open service serves all four, and the
    strict one drops the connections beyond its own cap when they ask it."""
    origin.route("/*", body=b"ok\n")
    edge = edge_factory(config=TWO_TENANTS_CONFIG.format(origin=origin.url))
    held = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(4)]
    try:
        assert [ask(sock, "b.test") for sock in held] == [200] * 4
        assert [ask(sock, "a.test") for sock in held] == [None, None, 200, 200]
    finally:
        for sock in held:
            sock.close()
    with edge.admin() as admin:
        assert "verge_connections_refused_by_cap 2.0" in admin.get("/metrics").text
