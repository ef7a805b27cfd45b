"""Tiered cache: child edges fill misses from a shield edge, which collapses them (real processes)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import EdgeProcess

pytestmark = pytest.mark.timeout(90)

CACHEABLE = [("Cache-Control", "max-age=300"), ("Content-Type", "text/plain")]


@pytest.fixture
def edge_factory(tmp_path):
    """Edges with a cache directory each (separate hosts share no disk)."""
    started: list[EdgeProcess] = []

    def make(**kw) -> EdgeProcess:
        workdir = tmp_path / f"edge{len(started)}"
        workdir.mkdir()
        started.append(EdgeProcess(workdir, **kw))
        return started[-1].start()

    yield make
    for edge in started:
        edge.stop()


@pytest.fixture
def tier(edge_factory, origin):
    """A shield of two workers (collapsing across them: verge.cache.filllock) and three
    children."""
    shield = edge_factory(origin_url=origin.url, extra_args=("--name", "shield"), workers=2)
    children = [edge_factory(origin_url=origin.url,
                             extra_args=("--name", f"child-{i}", "--parent", shield.url))
                for i in range(3)]
    return shield, children


def test_three_children_missing_at_once_make_one_origin_request(tier, origin):
    """Three children and eight direct clients (spread over both shield workers by the
    kernel) miss at once: the origin sees one request."""
    shield, children = tier
    origin.route("/obj", headers=CACHEABLE, body=b"shielded\n")
    gate = origin.gate("/obj")
    with ThreadPoolExecutor(11) as pool:
        futures = [pool.submit(httpx.get, child.url + "/obj", timeout=20) for child in children]
        direct = [pool.submit(httpx.get, shield.url + "/obj", timeout=20) for _ in range(8)]
        assert origin.wait_for_hits("/obj", 1)
        gate.set()
        responses = [f.result() for f in futures]
        direct_responses = [f.result() for f in direct]
    assert [r.status_code for r in responses + direct_responses] == [200] * 11
    assert all(r.content == b"shielded\n" for r in responses + direct_responses)
    assert origin.hits("/obj") == 1
    # each tier has its member, the shield's (nearest the origin) first: the fill's, or a
    # waiter's on the other shield worker
    for r in responses:
        members = [m.strip() for m in r.headers["cache-status"].split(",")]
        assert len(members) == 2, r.headers["cache-status"]
        assert members[1] in ("verge; fwd=miss; stored", "verge; hit; detail=collapsed"), \
            members
    via = [r.headers["via"] for r in origin.requests if r.path == "/obj"]
    assert len(via) == 1 and via[0].endswith("1.1 shield")  # a child's, or a direct one
    again = httpx.get(children[0].url + "/obj", timeout=10)
    assert again.headers["cache-status"].endswith("verge; hit")


def test_the_same_object_goes_to_the_same_parent_and_dead_parents_are_skipped(
        edge_factory, origin):
    parents = [edge_factory(origin_url=origin.url, extra_args=("--name", f"p{i}")) for i in range(2)]
    args = ("--name", "c")
    for parent in parents:
        args += ("--parent", parent.url)
    child = edge_factory(origin_url=origin.url, extra_args=args)
    origin.route("/a*", headers=CACHEABLE, body=b"a\n")
    for i in range(6):
        assert httpx.get(child.url + f"/a{i}", timeout=10).status_code == 200
    held = [sum(1 for i in range(6) if httpx.get(p.url + f"/a{i}", timeout=10)
                .headers["cache-status"] == "verge; hit") for p in parents]
    assert sum(held) == 6  # every object is held by exactly one parent (its owner)
    for parent in parents:
        parent.kill9()
    r = httpx.get(child.url + "/a-after", timeout=10)
    assert r.status_code == 200 and r.headers["cache-status"] == "verge; fwd=miss; stored"
    assert origin.hits("/a-after") == 1


def test_a_loop_between_two_edges_ends_at_the_origin(edge_factory, origin):
    a = edge_factory(origin_url=origin.url, extra_args=("--name", "loop-a"))
    b = edge_factory(origin_url=origin.url, extra_args=("--name", "loop-b", "--parent", a.url))
    # a names b as its parent too, after b exists: restart a with the flag on its same ports
    a.stop()
    a.args += ["--parent", b.url]
    a.start()
    origin.route("/loop", headers=CACHEABLE, body=b"once\n")
    r = httpx.get(a.url + "/loop", timeout=10)
    assert r.status_code == 200 and r.content == b"once\n"
    assert origin.hits("/loop") == 1
