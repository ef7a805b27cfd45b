"""Edge functions in the pipeline of a real `verge edge`: answer, pass with rewrite, limits."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.compute.conftest import build_examples

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    return build_examples(tmp_path_factory.mktemp("fn"))


@pytest.fixture
def fn_edge(edge_factory, origin, modules):
    config = f"""
services:
  - name: shop
    hosts: ["*"]
    origins: ["{origin.url}"]
functions:
  - name: hello
    service: shop
    routes: ["/api/hello*"]
    module: {modules["hello"]}
  - name: echo
    service: shop
    routes: [/echo/, /pass]
    module: {modules["echo"]}
    env: {{GREETING: hi}}
  - name: spin
    service: shop
    routes: [/spin]
    module: {modules["loop"]}
    cpu_ms: 50
  - name: bomb
    service: shop
    routes: [/bomb]
    module: {modules["membomb"]}
    memory_mb: 16
  - name: sandbox
    service: shop
    routes: [/sandbox]
    module: {modules["sandbox"]}
  - name: edit
    service: shop
    routes: [/pages/]
    module: {modules["edit"]}
    phase: response
"""
    return edge_factory(config=config, workers=1)


def test_a_c_function_answers_through_the_edge(fn_edge, origin):
    with fn_edge.client() as client:
        r = client.get("/api/hello/world")
        assert r.status_code == 200 and r.text == "hello from wasm\n"
        assert r.headers["cache-status"] == "verge; detail=function"
        posted = client.post("/echo/x?a=1", content=b"payload")
        assert posted.status_code == 201 and posted.headers["x-method"] == "POST"
        assert "GREETING=hi" in posted.text and posted.text.endswith("--body--\npayload")
        assert "QUERY_STRING=a=1" in posted.text
    assert origin.hits("/api/hello/world") == 0


def test_pass_rewrites_the_request_and_continues_to_the_origin(fn_edge, origin):
    origin.route("/rewritten?from=GET", headers=[("Cache-Control", "max-age=60")], body=b"origin\n")
    with fn_edge.client() as client:
        r = client.get("/pass", headers={"Cookie": "secret=1"})
        assert r.status_code == 200 and r.text == "origin\n"
        assert client.get("/pass").headers["cache-status"] == "verge; hit"
    seen = [req for req in origin.requests if req.path == "/rewritten?from=GET"]
    assert len(seen) == 1
    assert seen[0].headers["x-from-function"] == "yes" and "cookie" not in seen[0].headers


def test_runaway_functions_get_a_5xx_and_others_keep_their_latency(fn_edge):
    with fn_edge.client() as client:
        client.get("/api/hello")  # warm
        with ThreadPoolExecutor(3) as pool:
            spinning = [pool.submit(client.get, "/spin") for _ in range(2)]
            t0 = time.perf_counter()
            quick = client.get("/api/hello")
            quick_ms = (time.perf_counter() - t0) * 1000
            results = [f.result() for f in spinning]
        assert quick.status_code == 200 and quick_ms < 200
        for r in results:
            assert r.status_code == 503 and "spin" in r.text
        t0 = time.perf_counter()
        assert client.get("/spin").status_code == 503
        assert (time.perf_counter() - t0) * 1000 < 50 + 20 + 100  # limit + 20 ms + HTTP slack
        bomb = client.get("/bomb")
        assert bomb.status_code == 503 and "bomb" in bomb.text
        sandbox = client.get("/sandbox")
        assert sandbox.status_code == 200
        assert "passwd=NULL" in sandbox.text and "create=NULL" in sandbox.text
        assert "recv=-1" in sandbox.text
        assert client.get("/api/hello").status_code == 200  # the node is unaffected
    metrics = fn_edge.admin().get("/metrics").text
    assert 'verge_function_errors_total{function="spin"} 3.0' in metrics
    assert 'verge_function_invocations_total{function="hello"}' in metrics
    assert 'verge_function_cpu_seconds_total{function="spin"}' in metrics


def test_a_bad_module_is_reported_and_the_rest_deploys(edge_factory, origin, modules, tmp_path):
    broken = tmp_path / "broken.wasm"
    broken.write_bytes(b"\0asm not really")
    config = f"""
services:
  - name: shop
    hosts: ["*"]
    origins: ["{origin.url}"]
functions:
  - {{name: broken, service: shop, routes: [/broken], module: {broken}}}
  - {{name: hello, service: shop, routes: [/hello], module: {modules["hello"]}}}
"""
    edge = edge_factory(config=config)
    origin.route("/broken", body=b"from origin\n")
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        assert client.get("/hello").text == "hello from wasm\n"
        assert client.get("/broken").text == "from origin\n"
    assert any("broken not deployed" in line for line in edge.output)


def test_a_response_function_edits_what_the_cache_or_origin_answered(fn_edge, origin):
    origin.route("/pages/a.html", headers=[("Cache-Control", "max-age=60"),
                                           ("Content-Type", "text/html")], body=b"<h1>a</h1>")
    origin.route("/pages/b.txt", headers=[("Cache-Control", "max-age=60"),
                                          ("Content-Type", "text/plain")], body=b"plain\n")
    with fn_edge.client() as client:
        for _ in range(2):  # a miss, then a cache hit: both edited
            html = client.get("/pages/a.html")
            assert html.status_code == 200 and html.headers["x-edited"] == "yes"
            assert html.text == "<h1>a</h1><p>edited at the edge</p>"
        text = client.get("/pages/b.txt")
        assert text.text == "plain\n" and text.headers["x-edited"] == "no"
        again = client.get("/pages/b.txt")
        assert "hit" in again.headers["cache-status"]  # the pipeline's own headers pass through
    assert origin.hits("/pages/a.html") == 1 and origin.hits("/pages/b.txt") == 1


async def test_pure_functions_run_inline_and_runaways_fall_back_to_the_pool(modules, tmp_path):
    from verge.config import EdgeFunction
    from verge.edge.compute import INLINE_BACKOFF_S, EdgeCompute
    from verge.http.message import Request

    compute = EdgeCompute(tmp_path)
    compute.apply([
        EdgeFunction(name="hello", service="s", routes=["/hello"], module=str(modules["hello"])),
        EdgeFunction(name="spin", service="s", routes=["/spin"], module=str(modules["loop"]),
                     cpu_ms=50),
        EdgeFunction(name="fetcher", service="s", routes=["/f"], module=str(modules["hello"]),
                     fetch_hosts=["example.test"]),
    ])

    def request(path: str) -> Request:
        return Request("GET", path, headers=[("Host", "h")], client="127.0.0.1")

    hello = compute.match("s", "/hello")
    answered = await compute.invoke(hello, request("/hello"), b"", "id1")
    assert answered.outcome == "answer" and compute._pool is None  # no thread was needed
    spin = compute.match("s", "/spin")
    t0 = time.monotonic()
    stopped = await compute.invoke(spin, request("/spin"), b"", "id2")
    assert stopped.outcome == "timeout" and "50 ms" in stopped.error  # the full budget, on the pool
    assert compute._pool is not None
    assert t0 < spin.pool_until <= time.monotonic() + INLINE_BACKOFF_S
    assert spin.stats.invocations == 1 and spin.stats.errors == 1  # the inline try is not counted
    fetcher = compute.match("s", "/f")
    assert compute._invoke_inline(fetcher, None, "id3", None) is None  # may fetch: never inline
