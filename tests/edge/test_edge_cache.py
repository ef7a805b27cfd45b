"""End-to-end tests of `verge edge` with a real origin and real clients (httpx, curl)."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import time

import brotli
import httpx
import pytest
import zstandard

from tests.conftest import VERGE

pytestmark = pytest.mark.timeout(60)


def test_hit_after_miss(edge, origin):
    origin.route("/a.css", headers=[("Cache-Control", "max-age=60"), ("Content-Type", "text/css")],
                 body=b"body{}" * 10)
    with edge.client() as c:
        first = c.get("/a.css", headers={"Accept-Encoding": "identity"})
        second = c.get("/a.css", headers={"Accept-Encoding": "identity"})
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == b"body{}" * 10
    assert first.headers["cache-status"] == "verge; fwd=miss; stored"
    assert second.headers["cache-status"] == "verge; hit"
    assert int(second.headers["age"]) >= 0
    assert origin.hits("/a.css") == 1


def test_not_stored_without_freshness_or_validator(edge, origin):
    origin.route("/plain", body=b"x")
    with edge.client() as c:
        c.get("/plain")
        second = c.get("/plain")
    assert "fwd=miss" in second.headers["cache-status"]
    assert "stored" not in second.headers["cache-status"]
    assert origin.hits("/plain") == 2


def test_no_store_and_private_are_not_cached(edge, origin):
    origin.route("/ns", headers=[("Cache-Control", "no-store")], body=b"1")
    origin.route("/pv", headers=[("Cache-Control", "private, max-age=60")], body=b"2")
    with edge.client() as c:
        for _ in range(2):
            c.get("/ns")
            c.get("/pv")
    assert origin.hits("/ns") == 2
    assert origin.hits("/pv") == 2


async def test_hundred_concurrent_misses_make_one_origin_request(edge, origin):
    body = bytes(range(256)) * 400
    origin.route("/hot", headers=[("Cache-Control", "max-age=60")], body=body)
    gate = origin.gate("/hot")
    async with httpx.AsyncClient(base_url=edge.url, timeout=20,
                                 limits=httpx.Limits(max_connections=100)) as c:
        tasks = [asyncio.create_task(c.get("/hot")) for _ in range(100)]
        assert await asyncio.to_thread(origin.wait_for_hits, "/hot", 1)
        # every client is connected and waiting on the one fill before the origin answers
        await asyncio.sleep(0)
        gate.set()
        responses = await asyncio.gather(*tasks)
    assert all(r.status_code == 200 and r.content == body for r in responses)
    assert origin.hits("/hot") == 1
    statuses = {r.headers["cache-status"] for r in responses}
    assert any("collapsed" in s or s == "verge; hit" for s in statuses)


async def test_concurrent_misses_on_two_workers_make_one_origin_request(edge_factory, origin):
    """Collapsing across the workers of a node (verge.cache.filllock): the worker that does
    not hold the key's fill lock serves what the other one stored."""
    edge = edge_factory(origin_url=origin.url, workers=2)
    body = bytes(range(256)) * 40
    for round_ in range(3):
        path = f"/hot2-{round_}"
        origin.route(path, headers=[("Cache-Control", "max-age=60")], body=body)
        gate = origin.gate(path)
        async with httpx.AsyncClient(base_url=edge.url, timeout=20,
                                     limits=httpx.Limits(max_connections=100)) as c:
            tasks = [asyncio.create_task(c.get(path)) for _ in range(100)]
            assert await asyncio.to_thread(origin.wait_for_hits, path, 1)
            # no event says "every request has reached a worker": give them a moment, so
            # that both workers hold waiters while the fill is in flight
            await asyncio.sleep(0.3)
            gate.set()
            responses = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 and r.content == body for r in responses)
        assert origin.hits(path) == 1


def test_an_uncacheable_answer_lets_other_workers_go_to_the_origin(edge_factory, origin):
    """After an uncacheable fill the key is marked pass: no worker queues behind another."""
    edge = edge_factory(origin_url=origin.url, workers=2)
    origin.route("/private", headers=[("Cache-Control", "private")], body=b"mine")
    with edge.client() as c:
        answers = [c.get("/private") for _ in range(6)]
    assert all(r.content == b"mine" for r in answers)
    assert origin.hits("/private") == 6


def test_revalidation_with_304_updates_headers(edge, origin):
    version = {"n": 0}

    def answer(req):
        from tests.origin import Route

        version["n"] += 1
        if req.headers.get("if-none-match") == '"v1"':
            return Route(status=304, headers=[("ETag", '"v1"'), ("Cache-Control", "max-age=0"),
                                              ("X-Version", str(version["n"]))])
        return Route(headers=[("ETag", '"v1"'), ("Cache-Control", "max-age=0"),
                              ("X-Version", str(version["n"]))], body=b"payload")

    origin.route("/r", handler=answer)
    with edge.client() as c:
        first = c.get("/r")
        second = c.get("/r")
    assert first.content == second.content == b"payload"
    assert second.headers["cache-status"] == "verge; fwd=stale; fwd-status=304"
    assert second.headers["x-version"] == "2"  # the 304's headers replaced the stored ones
    assert origin.requests[-1].headers.get("if-none-match") == '"v1"'


def test_client_conditional_gets_304_from_cache(edge, origin):
    origin.route("/c", headers=[("Cache-Control", "max-age=60"), ("ETag", '"abc"')], body=b"c" * 100)
    with edge.client() as c:
        c.get("/c")
        r = c.get("/c", headers={"If-None-Match": '"abc"'})
    assert r.status_code == 304
    assert r.content == b""
    assert origin.hits("/c") == 1


def test_range_requests(edge, origin):
    body = bytes(i % 251 for i in range(100_000))
    origin.route("/file.bin", headers=[("Cache-Control", "max-age=60")], body=body)
    with edge.client() as c:
        on_miss = c.get("/file.bin", headers={"Range": "bytes=10-19"})
        on_hit = c.get("/file.bin", headers={"Range": "bytes=-5"})
        bad = c.get("/file.bin", headers={"Range": "bytes=200000-"})
    assert on_miss.status_code == 206 and on_miss.content == body[10:20]
    assert on_miss.headers["content-range"] == "bytes 10-19/100000"
    assert on_hit.status_code == 206 and on_hit.content == body[-5:]
    assert bad.status_code == 416
    assert bad.headers["content-range"] == "bytes */100000"
    assert origin.hits("/file.bin") == 1


@pytest.mark.parametrize("stored", [False, True], ids=["miss", "hit"])
def test_if_range_and_conditionals_are_decided_alike_on_misses_and_hits(edge, origin, stored):
    """One decision (deliver.choose_answer) for a fill in flight and a stored entry: a Range
    whose If-Range does not match gets the whole body, a matching If-None-Match a 304."""
    body = bytes(i % 251 for i in range(50_000))
    path = f"/ifrange-{stored}.bin"
    headers = [("Cache-Control", "max-age=60"), ("ETag", '"v2"'),
               ("Last-Modified", "Tue, 01 Dec 2026 10:00:00 GMT")]
    origin.route(path, headers=headers, body=body)
    with edge.client() as c:
        if stored:
            assert c.get(path).status_code == 200
        stale_range = c.get(path, headers={"Range": "bytes=0-9", "If-Range": '"v1"'})
        origin.route(path + "?b", headers=headers, body=body)
        good_range = c.get(path + ("" if stored else "?b"),
                           headers={"Range": "bytes=0-9", "If-Range": '"v2"'})
        origin.route(path + "?c", headers=headers, body=body)
        not_modified = c.get(path + ("" if stored else "?c"),
                             headers={"If-None-Match": '"v2"'})
    assert stale_range.status_code == 200 and stale_range.content == body
    assert good_range.status_code == 206 and good_range.content == body[:10]
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == '"v2"'


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_compression_negotiated_and_cached(edge, origin, encoding):
    text = b"hello compressible world " * 200
    origin.route("/page.html", headers=[("Cache-Control", "max-age=60"),
                                        ("Content-Type", "text/html; charset=utf-8")], body=text)
    with edge.client() as c:
        c.get("/page.html", headers={"Accept-Encoding": "identity"})
        r = c.get("/page.html", headers={"Accept-Encoding": encoding})
        plain = c.get("/page.html", headers={"Accept-Encoding": "identity"})
    raw = r.read() if False else r.content  # httpx decodes gzip/br/zstd itself
    assert raw == text
    assert r.headers["content-encoding"] == encoding
    assert "accept-encoding" in r.headers["vary"].lower()
    assert "content-encoding" not in plain.headers
    assert "accept-encoding" in plain.headers["vary"].lower()
    assert origin.hits("/page.html") == 1


def test_curl_compressed_and_decoders(edge, origin):
    text = b'{"items": [' + b'{"id": 1, "name": "thing"},' * 100 + b"{}]}"
    origin.route("/api.json", headers=[("Cache-Control", "max-age=60"),
                                       ("Content-Type", "application/json")], body=text)
    out = subprocess.run(["curl", "-s", "--compressed", f"{edge.url}/api.json"],
                         capture_output=True, check=True)
    assert out.stdout == text
    for encoding, decode in (("gzip", gzip.decompress), ("br", brotli.decompress),
                             ("zstd", lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b))):
        raw = subprocess.run(["curl", "-s", "-H", f"Accept-Encoding: {encoding}",
                              f"{edge.url}/api.json"], capture_output=True, check=True).stdout
        assert decode(raw) == text


def test_vary_keeps_variants_apart(edge, origin):
    def answer(req):
        from tests.origin import Route

        lang = req.headers.get("accept-language", "en")
        return Route(headers=[("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")],
                     body=f"hello in {lang}".encode())

    origin.route("/v", handler=answer)
    with edge.client() as c:
        en1 = c.get("/v", headers={"Accept-Language": "en"})
        fr1 = c.get("/v", headers={"Accept-Language": "fr"})
        en2 = c.get("/v", headers={"Accept-Language": "en"})
        fr2 = c.get("/v", headers={"Accept-Language": "fr"})
    assert en1.content == en2.content == b"hello in en"
    assert fr1.content == fr2.content == b"hello in fr"
    assert en2.headers["cache-status"] == fr2.headers["cache-status"] == "verge; hit"
    assert origin.hits("/v") == 2


def test_post_body_streamed_and_unsafe_method_invalidates(edge, origin):
    origin.route("/item", headers=[("Cache-Control", "max-age=60")], body=b"old")
    origin.route("/echo", handler=lambda req: __import__("tests.origin", fromlist=["Route"]).Route(
        body=req.body, headers=[("X-Method", req.method)]))
    payload = bytes(range(256)) * 4096  # 1 MiB
    with edge.client() as c:
        c.get("/item")
        echoed = c.post("/echo", content=payload)
        assert echoed.content == payload and echoed.headers["x-method"] == "POST"
        assert c.get("/item").headers["cache-status"] == "verge; hit"
        put = c.put("/item", content=b"new")
        assert put.status_code == 200
        after = c.get("/item")
    assert "fwd=miss" in after.headers["cache-status"]
    assert origin.hits("/item") == 3  # GET, PUT, GET after invalidation


def test_other_methods_and_headers_pass_through(edge, origin):
    origin.route("/any", headers=[("X-Custom-Reply", "kept")], body=b"ok")
    with edge.client() as c:
        for method in ("DELETE", "PATCH", "OPTIONS"):
            r = c.request(method, "/any", headers={"X-Custom": "value"})
            assert r.status_code == 200 and r.headers["x-custom-reply"] == "kept"
    assert [r.method for r in origin.requests] == ["DELETE", "PATCH", "OPTIONS"]
    assert all(r.headers["x-custom"] == "value" for r in origin.requests)


def test_stale_if_error_serves_stale_when_origin_fails(edge_factory, origin):
    origin.route("/s", headers=[("Cache-Control", "max-age=0, stale-if-error=60"),
                                ("ETag", '"s1"')], body=b"stale but good")
    edge = edge_factory(origin_url=origin.url)
    with edge.client() as c:
        c.get("/s")
        origin.route("/s", status=503, body=b"down")
        r = c.get("/s")
    assert r.status_code == 200 and r.content == b"stale but good"
    assert "stale-if-error" in r.headers["cache-status"]


def test_all_origins_down_gives_502_with_clear_body(edge_factory):
    from tests.conftest import free_port

    edge = edge_factory(origin_url=f"http://127.0.0.1:{free_port()}")
    with edge.client() as c:
        r = c.get("/x")
    assert r.status_code == 502
    assert b"origin" in r.content


def test_purge_by_url_tag_prefix_and_soft(edge, origin):
    for path, tag in (("/p/one", "red"), ("/p/two", "blue"), ("/q/three", "blue")):
        origin.route(path, headers=[("Cache-Control", "max-age=600"), ("Surrogate-Key", tag),
                                    ("ETag", '"e"')], body=path.encode())
    with edge.client() as c:
        for path in ("/p/one", "/p/two", "/q/three"):
            c.get(path)
            assert c.get(path).headers["cache-status"] == "verge; hit"

        def purge(*args):
            out = subprocess.run([*VERGE, "purge", "--admin", edge.admin_url, "--token",
                                  edge.token, "--json", *args], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        purge(f"{edge.url}/p/one")
        assert "fwd=miss" in c.get("/p/one").headers["cache-status"]
        assert c.get("/p/two").headers["cache-status"] == "verge; hit"
        purge("--tag", "blue")
        assert "fwd=miss" in c.get("/p/two").headers["cache-status"]
        assert "fwd=miss" in c.get("/q/three").headers["cache-status"]
        purge("--prefix", f"{edge.url}/p/")
        assert "fwd=miss" in c.get("/p/one").headers["cache-status"]
        purge("--soft", f"{edge.url}/q/three")
        soft = c.get("/q/three")
        assert "fwd=stale" in soft.headers["cache-status"]


def test_purge_requires_token(edge):
    r = httpx.post(edge.admin_url + "/purge", json={"urls": ["http://x/"]})
    assert r.status_code == 401
    bad = subprocess.run([*VERGE, "purge", "--admin", edge.admin_url, "--token", "wrong",
                          "http://x/"], capture_output=True, text=True)
    assert bad.returncode != 0


def test_restart_after_kill9_keeps_disk_cache(edge_factory, origin):
    body = b"z" * 300_000
    origin.route("/keep.bin", headers=[("Cache-Control", "max-age=600")], body=body)
    edge = edge_factory(origin_url=origin.url)
    with edge.client() as c:
        assert c.get("/keep.bin").content == body
    # the index is written off the request path: the client may have the last byte a few
    # ms before the object's meta file (the truth after a restart) is in place
    deadline = time.monotonic() + 10
    while not any((edge.cache_dir / "objects").rglob("*.meta")) and time.monotonic() < deadline:
        time.sleep(0.01)
    edge.kill9()
    edge.start()
    with edge.client() as c:
        r = c.get("/keep.bin")
    assert r.content == body
    assert r.headers["cache-status"] == "verge; hit"
    assert origin.hits("/keep.bin") == 1


def test_large_object_streams_and_hits_from_disk(edge, origin):
    body = bytes(range(256)) * (40 * 1024)  # 10 MiB
    origin.route("/big", headers=[("Cache-Control", "max-age=600")], body=body)
    with edge.client() as c:
        assert c.get("/big").content == body
        hit = c.get("/big")
    assert hit.content == body and hit.headers["cache-status"] == "verge; hit"


def test_metrics_and_health(edge, origin):
    origin.route("/m", headers=[("Cache-Control", "max-age=60")], body=b"m")
    with edge.client() as c:
        c.get("/m")
        c.get("/m")
    health = httpx.get(edge.admin_url + "/healthz")
    assert health.status_code == 200
    text = httpx.get(edge.admin_url + "/metrics").text
    assert 'verge_requests_total{cache="hit",status="200"} 1.0' in text
    assert "verge_origin_latency_seconds_bucket" in text
    assert "verge_cache_disk_bytes" in text


def test_purge_reaches_every_worker(edge_factory, origin):
    origin.route("/w", headers=[("Cache-Control", "max-age=600")], body=b"w")
    edge = edge_factory(origin_url=origin.url, workers=2)
    for _ in range(20):  # new connections spread over both workers
        with edge.client() as c:
            assert c.get("/w").status_code == 200
    with edge.admin() as a:
        result = a.post("/purge", json={"urls": [f"{edge.url}/w"]}).json()
    assert result["workers"] == 2
    before = origin.hits("/w")
    for _ in range(20):
        with edge.client() as c:
            c.get("/w")
    # after the purge each worker misses at most once (then its memory or the disk has it)
    assert 1 <= origin.hits("/w") - before <= 2


@pytest.mark.parametrize("sendfile", [False, True])
def test_disk_hit_to_a_slow_reader(edge_factory, origin, sendfile):
    """Disk hits (pread+write or zero-copy sendfile) survive a client slower than the socket."""
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB, over max_memory_object below
    origin.route("/slow.bin", headers=[("Cache-Control", "max-age=600")], body=body)
    config = f"""
cache:
  max_memory_object_bytes: 64KiB
  sendfile: {str(sendfile).lower()}
services:
  - name: s
    hosts: ["*"]
    default: true
    origins: ["{origin.url}"]
"""
    edge = edge_factory(config=config)
    with edge.client() as c:
        assert c.get("/slow.bin").content == body
    out = subprocess.run(["curl", "-s", "--limit-rate", "4M", "-D", "-", f"{edge.url}/slow.bin"],
                         capture_output=True, check=True).stdout
    head, _, received = out.partition(b"\r\n\r\n")
    assert b"Cache-Status: verge; hit" in head
    assert received == body


def test_access_log_has_one_json_line_per_request(edge_factory, origin):
    origin.route("/logged*", headers=[("Cache-Control", "max-age=60")], body=b"l")
    edge = edge_factory(origin_url=origin.url, access_log=True)
    with edge.client() as c:
        c.get("/logged")
        c.get("/logged?x=\"quoted\"")
        c.get("/logged")
    edge.stop()  # SIGTERM: workers flush their buffered lines
    lines = [json.loads(line) for line in edge.access_log.read_text().splitlines()]
    assert [line["cache"] for line in lines] == ["miss", "miss", "hit"]
    assert lines[1]["uri"] == "/logged?x=%22quoted%22"  # httpx percent-encodes
    assert all(line["status"] == 200 and line["method"] == "GET" for line in lines)


def test_http10_request_without_host_reaches_the_origin_with_one(edge, origin):
    """HTTP/1.0 clients may omit Host; the origin (HTTP/1.1) still gets one, and it caches."""
    import socket

    origin.route("/old", headers=[("Cache-Control", "max-age=60")], body=b"old client\n")
    for expected in ("verge; fwd=miss; stored", "verge; hit"):
        with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
            sock.sendall(b"GET /old HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"old client\n")
        assert f"Cache-Status: {expected}".encode() in reply
    assert origin.hits("/old") == 1
    assert origin.requests[-1].headers["host"] == origin.url.split("//")[1]


def test_a_service_is_keyed_by_its_name_whichever_name_or_address_was_used(edge_factory, origin):
    """One purge of the service's URL clears every copy: objects are stored under the
    service's first plain name whether the request said demo.test, www.demo.test or the
    edge's address (default service); a wildcard's sites keep their own objects."""
    config = f"""
services:
  - name: demo
    hosts: [demo.test, www.demo.test]
    default: true
    origins: ["{origin.url}"]
  - name: wild
    hosts: ["*.wild.test"]
    origins: ["{origin.url}"]
"""
    edge = edge_factory(config=config)
    origin.route("/named", headers=[("Cache-Control", "max-age=600")], body=b"named")
    address = edge.url.split("//")[1]
    with edge.client() as c:
        statuses = [c.get("/named", headers={"Host": host}).headers["cache-status"]
                    for host in ("demo.test", "www.demo.test", address)]
        assert statuses == ["verge; fwd=miss; stored", "verge; hit", "verge; hit"]
        with edge.admin() as a:  # the URL the demo banner prints: the edge's address
            assert a.post("/purge", json={"urls": [f"{edge.url}/named"]}).json()["ok"]
        again = c.get("/named", headers={"Host": "www.demo.test"}).headers["cache-status"]
        assert again == "verge; fwd=miss; stored"
        wild = [c.get("/named", headers={"Host": host}).headers["cache-status"]
                for host in ("a.wild.test", "b.wild.test")]
        assert wild == ["verge; fwd=miss; stored", "verge; fwd=miss; stored"]
    assert origin.hits("/named") == 4
