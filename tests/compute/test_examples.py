"""The examples for function authors (examples/functions): they build, and do what they say.

A newcomer copies these, so they are run like real functions: through the runtime with the
grants their comments tell to deploy with (an in-memory KV, a real fetch to a local origin),
and all three in a real `verge edge` configured the way examples/functions/README.md shows.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.compute.conftest import FUNCTIONS, ROOT, build_function_examples, compile_c
from verge.compute import wagi
from verge.compute.host import Capabilities, DictKV, FetchRequest, FetchResponse, HostServices

pytestmark = pytest.mark.timeout(90)

EXAMPLES = ("counter", "fetch_rewrite", "hello")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """examples/functions/*.c compiled with the tests' compile function (skips without clang)."""
    return build_function_examples(tmp_path_factory.mktemp("authored"))


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, follow_redirects=False) as client:
        yield client


def fetcher(client: httpx.Client):
    """A synchronous fetch like the edge's: the runtime has already checked the allow-list."""

    def fetch(request: FetchRequest) -> FetchResponse:
        response = client.request(
            request.method,
            request.url,
            headers=request.headers,
            content=request.body or None,
            timeout=request.timeout,
        )
        return FetchResponse(
            response.status_code, list(response.headers.multi_items()), response.content
        )

    return fetch


def get(target: str) -> wagi.CgiRequest:
    return wagi.CgiRequest("GET", target, headers=[("Host", "shop.example")], host="shop.example")


def test_make_functions_builds_what_the_tests_build(built, tmp_path):
    """`make functions` compiles every example, with the same compiler and flags as the tests."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "functions", f"FN_OUT={tmp_path}"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    made = {p.stem: p.read_bytes() for p in tmp_path.glob("*.wasm")}
    assert sorted(made) == sorted(EXAMPLES) == sorted(p.stem for p in FUNCTIONS.glob("*.c"))
    for name, binary in made.items():
        assert binary == built[name].read_bytes(), f"{name}: make and the tests build differently"


ALL_IMPORTS = r"""
#include <stdio.h>
#include "verge.h"

int main(void) {
    char out[64];
    int put = verge_kv_put("k", 1, "v1", 2);
    int got = verge_kv_get("k", 1, out, sizeof out);
    int deleted = verge_kv_delete("k", 1);
    int gone = verge_kv_get("k", 1, out, sizeof out);
    int fetched = verge_fetch("GET http://nowhere.invalid/\n\n", 28, out, sizeof out);
    printf("Content-Type: text/plain\n\n%d %d %d %d %d\n", put, got, deleted, gone, fetched);
    return 0;
}
"""


def header_constants() -> dict[str, int]:
    """verge.h's numeric #defines: VERGE_E_DENIED (-1) -> {"E_DENIED": -1}, (1024 * 1024) too."""
    found = {}
    header = (FUNCTIONS / "verge.h").read_text()
    for name, expr in re.findall(r"^#define VERGE_(\w+) (\([-\d *]+\)|-?\d+)", header, re.M):
        found[name] = math.prod(int(factor) for factor in expr.strip("()").split("*"))
    return found


def test_the_header_matches_what_the_host_defines(runtime, tmp_path):
    """Every import verge.h declares links, and its error codes and limits are host.py's."""
    from verge.compute import host

    source = tmp_path / "all_imports.c"
    source.write_text(ALL_IMPORTS)
    binary = compile_c([source], tmp_path)["all_imports"].read_bytes()
    caps = Capabilities.of(kv_namespace="ns", kv_write=True)
    fn = runtime.load(binary, name="all", caps=caps)  # an import the host lacks: ValueError
    inv = runtime.invoke(fn, get("/"), services=HostServices(kv=DictKV()))
    assert inv.result.body == f"0 2 0 {host.E_NOT_FOUND} {host.E_DENIED}\n".encode()
    names = [n for n in vars(host) if n.startswith("E_")]
    names += ["MAX_KEY_BYTES", "MAX_VALUE_BYTES", "MAX_FETCH_REQUEST_BYTES"]
    constants = header_constants()
    assert {n: constants.get(n) for n in names} == {n: getattr(host, n) for n in names}


def test_hello_answers_with_the_method_and_path(runtime, built):
    fn = runtime.load(built["hello"].read_bytes(), name="hello")
    inv = runtime.invoke(fn, get("/hello/world?x=1"))
    assert inv.ok, inv.error
    assert isinstance(inv.result, wagi.Answer) and inv.result.status == 200
    assert inv.result.body == b"hello from the edge: GET /hello/world\n"
    assert ("Content-Type", "text/plain; charset=utf-8") in inv.result.headers


def test_counter_counts_visits_in_its_kv_namespace(runtime, built):
    kv = DictKV()
    caps = Capabilities.of(kv_namespace="counters", kv_write=True)
    fn = runtime.load(built["counter"].read_bytes(), name="counter", caps=caps)
    services = HostServices(kv=kv)
    bodies = [runtime.invoke(fn, get("/count"), services=services).result.body for _ in range(3)]
    assert bodies == [b"visits: 1\n", b"visits: 2\n", b"visits: 3\n"]
    assert kv.data == {("counters", b"visits"): b"3"}
    kv.put("counters", b"visits", b"41")  # as `verge kv put counters visits 41` would
    assert runtime.invoke(fn, get("/count"), services=services).result.body == b"visits: 42\n"


def test_counter_without_its_grants_says_so_and_logs_why(runtime, built):
    kv = DictKV({("counters", b"visits"): b"7"})
    services = HostServices(kv=kv)
    read_only = runtime.load(
        built["counter"].read_bytes(), name="ro", caps=Capabilities.of(kv_namespace="counters")
    )
    inv = runtime.invoke(read_only, get("/count"), services=services)
    assert inv.result.body == b"visits: 8 (not saved)\n"
    assert inv.denied == ["kv_put"] and b"kv_put visits failed: -1" in inv.stderr
    assert kv.data == {("counters", b"visits"): b"7"}
    no_kv = runtime.load(built["counter"].read_bytes(), name="nokv")
    inv = runtime.invoke(no_kv, get("/count"), services=services)
    assert inv.result.status == 503 and b"kv_get visits failed: -1" in inv.stderr


def quotes(runtime, built, origin, fetch_hosts):
    caps = Capabilities.of(env={"UPSTREAM": origin.url}, fetch_hosts=fetch_hosts)
    return runtime.load(built["fetch_rewrite"].read_bytes(), name="quotes", caps=caps)


def test_fetch_rewrite_decorates_what_the_upstream_answered(runtime, built, origin, http):
    origin.route(
        "/quotes/today?lang=la", headers=[("Content-Type", "text/plain")], body=b"carpe diem\n"
    )
    fn = quotes(runtime, built, origin, [origin.url.removeprefix("http://")])
    services = HostServices(fetch=fetcher(http))
    inv = runtime.invoke(fn, get("/quotes/today?lang=la"), services=services)
    assert inv.ok and inv.subrequests == 1, inv.error
    answer = inv.result
    assert isinstance(answer, wagi.Answer) and answer.status == 200
    assert answer.body == b"[via the edge] carpe diem\n"
    assert ("Content-Type", "text/plain") in answer.headers
    assert ("X-Decorated", "fetch_rewrite") in answer.headers
    assert origin.requests[-1].headers["accept"] == "text/plain"


def test_fetch_rewrite_passes_to_the_origin_at_a_rewritten_path(runtime, built, origin, http):
    services = HostServices(fetch=fetcher(http))
    allowed = quotes(runtime, built, origin, [origin.url.removeprefix("http://")])
    inv = runtime.invoke(allowed, get("/quotes/missing?q=1"), services=services)  # a 404
    assert isinstance(inv.result, wagi.Pass)
    assert inv.result.target == "/fallback/quotes/missing?q=1"
    assert inv.result.set_headers == [("X-Fallback-Reason", "upstream status not 200")]
    assert origin.hits("/quotes/missing?q=1") == 1
    denied = quotes(runtime, built, origin, [])  # deployed without --fetch-host
    inv = runtime.invoke(denied, get("/quotes/today"), services=services)
    assert inv.result.target == "/fallback/quotes/today"
    assert inv.result.set_headers == [("X-Fallback-Reason", "host not allowed")]
    assert inv.denied == [f"fetch {origin.url}/quotes/today"]


def test_the_examples_run_in_a_real_edge(edge_factory, origin, built):
    """The YAML deployment of examples/functions/README.md, end to end with curl's view."""
    upstream = origin.url.removeprefix("http://")
    config = f"""
services:
  - name: shop
    hosts: ["*"]
    origins: ["{origin.url}"]
functions:
  - {{name: hello, service: shop, routes: ["/hello*"], module: {built["hello"]}}}
  - {{name: counter, service: shop, routes: [/count], module: {built["counter"]},
     kv_namespace: counters, kv_write: true}}
  - {{name: quotes, service: shop, routes: [/quotes/], module: {built["fetch_rewrite"]},
     env: {{UPSTREAM: "{origin.url}"}}, fetch_hosts: ["{upstream}"]}}
"""
    origin.route("/quotes/today", headers=[("Content-Type", "text/plain")], body=b"carpe diem\n")
    origin.route("/fallback/*", headers=[("Content-Type", "text/plain")], body=b"from origin\n")
    edge = edge_factory(config=config, workers=1)
    with edge.client() as client:
        hello = client.get("/hello/world")
        assert hello.status_code == 200
        assert hello.text == "hello from the edge: GET /hello/world\n"
        assert [client.get("/count").text for _ in range(2)] == ["visits: 1\n", "visits: 2\n"]
        quote = client.get("/quotes/today")
        assert quote.text == "[via the edge] carpe diem\n"
        assert quote.headers["x-decorated"] == "fetch_rewrite"
        fallback = client.get("/quotes/unknown")
        assert fallback.status_code == 200 and fallback.text == "from origin\n"
    fell_back = [r for r in origin.requests if r.path == "/fallback/quotes/unknown"]
    assert fell_back and fell_back[0].headers["x-fallback-reason"] == "upstream status not 200"
    assert origin.hits("/hello/world") == 0 and origin.hits("/count") == 0
