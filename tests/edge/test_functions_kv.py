"""Function KV writes that last, and function counters that survive deployments.

In a worker (no processes): what a worker shows while its node's writes are on their way
(pending, applied, caught up with, refused), a restart, the outbox bound, and the counters
across redeploys. End to end (a real control plane and edges): a function's write reaches
the API and the other edge, concurrent writers agree, writes wait out a control-plane outage
and an edge restart, and deploying another function keeps the counters.
"""

from __future__ import annotations

import base64
import logging
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.compute.conftest import build_examples
from tests.control.test_fleet import Fleet, wait_until
from verge.compute import host
from verge.compute.host import Capabilities, HostServices, HostState, KVFull
from verge.edge.compute import KV_FILE, OUTBOX_FILE, EdgeCompute, EdgeKV, KVOutbox
from verge.http.message import Request
from verge.observe.metrics import EdgeMetrics, merge, render

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    return build_examples(tmp_path_factory.mktemp("fn-kv"))


# ----- in a worker -------------------------------------------------------------------------------


class NodeFiles:
    """The agent's side of a node's KV files (replica and outbox) and workers reading them."""

    def __init__(self, control) -> None:
        self.control = control
        self.replica = EdgeKV(control / KV_FILE, writer=True)
        self.outbox = KVOutbox(control / OUTBOX_FILE, create=True)
        self.seq = 0

    def worker(self) -> EdgeKV:
        return EdgeKV(self.control / KV_FILE, outbox=self.control / OUTBOX_FILE)

    def feed(self, key: bytes, value: bytes | None, seq: int) -> None:
        """The control plane's change feed brings one change (the agent applies it)."""
        encoded = None if value is None else base64.b64encode(value).decode()
        self.replica.apply(
            [{"seq": seq, "namespace": "site", "key": key.decode(), "value": encoded}]
        )
        self.outbox.forget_applied(self.replica.seq)

    def answer(self, results: list[dict], kv_seq: int) -> None:
        """The control plane's answer to the pending writes (by position)."""
        sent = self.outbox.pending()
        results = [{"id": write.id, **result} for write, result in zip(sent, results, strict=True)]
        self.outbox.settle(sent, results, kv_seq, self.replica.seq)


@pytest.fixture
def node(tmp_path):
    files = NodeFiles(tmp_path / "control")
    yield files
    files.replica.close()
    files.outbox.close()


def test_a_worker_shows_its_nodes_writes_until_the_control_plane_has_ordered_them(node):
    worker, sibling = node.worker(), node.worker()
    node.feed(b"k", b"old", 1)
    assert worker.refresh() == 1 and worker.get("site", b"k") == b"old"

    worker.put("site", b"k", b"mine", "fn")  # committed to the outbox, then in memory
    assert worker.get("site", b"k") == b"mine"
    assert node.outbox.newest("site", b"k") == (b"mine", None)
    sibling.refresh()  # another worker of the node sees it at its next refresh
    assert sibling.get("site", b"k") == b"mine"
    node.feed(b"k", b"theirs, earlier", 2)  # another writer's, ordered before ours
    worker.refresh()
    assert worker.get("site", b"k") == b"mine"  # the pending write is not turned back

    node.answer([{"seq": 3}], kv_seq=3)  # applied at seq 3; the replica is at 2
    worker.refresh()
    assert worker.get("site", b"k") == b"mine"
    node.feed(b"k", b"mine", 3)  # the feed brings it: the replica rules again
    assert node.outbox.size() == (0, 0)
    worker.refresh()
    assert worker.get("site", b"k") == b"mine"

    worker.put("site", b"k", b"mine again", "fn")
    node.answer([{"seq": 4}], kv_seq=4)
    node.feed(b"k", b"theirs, later", 5)  # another writer after ours: last writer wins
    for view in (worker, sibling):
        view.refresh()
        assert view.get("site", b"k") == b"theirs, later"

    worker.put("site", b"k", b"refused", "fn")
    worker.delete("site", b"gone", "fn")
    node.answer([{"error": "no grant"}, {"seq": None}], kv_seq=5)  # a deletion of nothing
    worker.refresh()
    assert worker.get("site", b"k") == b"theirs, later" and worker.get("site", b"gone") is None
    assert node.outbox.size() == (0, 0)


def test_pending_writes_survive_a_restart_and_a_full_outbox_fails_the_write(node, caplog):
    worker = node.worker()
    worker.outbox.max_writes = 2
    worker.put("site", b"a", b"1", "fn")
    worker.put("site", b"b", b"2", "fn")
    worker.put("site", b"a", b"3", "fn")  # replaces the pending write of a: still 2 queued
    writer = HostState(
        Capabilities.of(kv_namespace="site", kv_write=True), HostServices(kv=worker), 0, 1.0
    )
    with caplog.at_level(logging.ERROR, "verge.compute"):
        with pytest.raises(KVFull):
            worker.put("site", b"c", b"4", "fn")
        assert writer.kv_put(b"c", b"4") == host.E_FULL  # what the function sees
        assert writer.kv_delete(b"d") == host.E_FULL
    assert worker.get("site", b"c") is None  # not in memory either: it did not happen
    (logged,) = [r for r in caplog.records if "outbox is full" in r.getMessage()]  # once
    assert "E_FULL" in logged.getMessage()
    worker.outbox.max_bytes = 10
    worker.outbox.max_writes = 100
    assert writer.kv_put(b"e", b"x" * 10) == host.E_FULL
    assert writer.kv_put(b"\xff\xfe", b"v") == host.E_INVALID  # keys are text
    assert writer.kv_put(b"nul\0", b"v") == host.E_INVALID

    restarted = node.worker()  # (after kill -9: the outbox is committed, fsync'd)
    assert restarted.get("site", b"a") == b"3" and restarted.get("site", b"b") == b"2"
    assert [(w.key, w.value) for w in node.outbox.pending()] == [(b"b", b"2"), (b"a", b"3")]


def test_a_new_outbox_id_per_node_and_writes_in_memory_without_one(node, tmp_path):
    assert len(node.outbox.id) == 24 and node.worker().outbox.id == node.outbox.id
    alone = EdgeKV(tmp_path / "standalone" / KV_FILE, outbox=tmp_path / "standalone" / "x.db")
    alone.put("site", b"k", b"v")  # an edge without a control plane: memory only, as before
    assert alone.outbox is None and alone.get("site", b"k") == b"v"


async def test_counters_survive_deployments(modules, tmp_path):
    from verge.config import EdgeFunction

    compute = EdgeCompute(tmp_path)
    hello = EdgeFunction(name="a", service="s", routes=["/a"], module=str(modules["hello"]))
    other = EdgeFunction(name="b", service="s", routes=["/b"], module=str(modules["echo"]))
    request = Request("GET", "/a", headers=[("Host", "h")], client="127.0.0.1")

    async def run(times: int) -> None:
        for i in range(times):
            deployed = compute.match("s", "/a")
            assert (await compute.invoke(deployed, request, b"", f"r{i}")).ok

    try:
        compute.apply([hello])
        await run(3)
        compute.apply([hello, other])  # an unrelated deployment
        assert compute.stats()["a"]["invocations"] == 3
        compute.apply([hello, other])  # the same function again
        await run(1)
        first = compute.stats()["a"]
        assert first["invocations"] == 4 and first["versions"] == {
            first["version"]: {
                "invocations": 4,
                "errors": 0,
                "cpu_ms": first["cpu_ms"],
                "peak_memory": first["peak_memory"],
                "refused": 0,
            }
        }
        compute.apply([hello.model_copy(update={"module": str(modules["counter"])}), other])
        await run(2)  # a new module: its own version, the total goes on
        second = compute.stats()["a"]
        assert second["version"] != first["version"] and second["invocations"] == 6
        assert {v: c["invocations"] for v, c in second["versions"].items()} == {
            first["version"]: 4,
            second["version"]: 2,
        }
        compute.apply([other])  # a removed function is forgotten
        assert "a" not in compute.stats() and "a" not in compute.book.versions
        compute.apply([hello])
        assert compute.stats()["a"]["invocations"] == 0
    finally:
        compute.close()
    text = render(
        merge(
            [
                {**EdgeMetrics().snapshot(), "functions": {"a": second}},
                {**EdgeMetrics().snapshot(), "functions": {"a": second}},
            ]
        ),
        {},
    ).decode()
    assert 'verge_function_invocations_total{function="a"} 12.0' in text  # two workers
    assert (
        f'verge_function_version_invocations_total{{function="a",version="{first["version"]}"}} 8.0'
    ) in text


# ----- end to end: a control plane and edges -----------------------------------------------------


class EdgeClient:
    """Requests to one edge for shop.test on one keep-alive connection."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Host": "shop.test"}, timeout=10)

    def ask(self, path: str) -> str:
        """The answer's text, or its status when not 200."""
        response = self.http.get(path)
        return response.text if response.status_code == 200 else str(response.status_code)


def deploy_writer(fleet: Fleet, modules, *edges: str, name: str = "writer") -> list[EdgeClient]:
    """Service `shop`, edges joined, function `name` (kvwrite.c) granted kv_write on `site`
    at /kvw; a client per edge once each answers."""
    service = {"name": "shop", "hosts": ["shop.test"], "origins": [{"url": fleet.origin_url}]}
    assert fleet.api.post("/api/v1/services", json=service).status_code == 201
    token = fleet.join_token()
    with ThreadPoolExecutor(len(edges)) as pool:  # (each start waits for its ready line)
        list(pool.map(lambda edge: fleet.start_edge(edge, token), edges))
    body = {
        "name": name,
        "service": "shop",
        "routes": ["/kvw"],
        "kv_namespace": "site",
        "kv_write": True,
        "module_base64": base64.b64encode(modules["kvwrite"].read_bytes()).decode(),
    }
    assert fleet.api.post("/api/v1/functions", json=body).status_code == 201
    clients = [EdgeClient(fleet.edge_urls[edge]) for edge in edges]
    for client in clients:
        wait_until(
            lambda client=client: client.ask("/kvw?op=get&key=none") == "get=-2\n",
            what="function deployed",
        )
    return clients


def api_value(fleet: Fleet, key: str) -> bytes | None:
    response = fleet.api.get(f"/api/v1/kv/site/{key}")
    return response.content if response.status_code == 200 else None


def test_a_function_write_reaches_the_api_and_the_other_edge(fleet, modules):
    e1, e2 = deploy_writer(fleet, modules, "e1", "e2")
    assert e1.ask("/kvw?op=put&key=greeting&value=hello") == "put=0\n"
    assert e1.ask("/kvw?op=get&key=greeting") == "get=hello\n"  # at once, in its worker
    wait_until(lambda: api_value(fleet, "greeting") == b"hello", what="write at the API")
    wait_until(
        lambda: e2.ask("/kvw?op=get&key=greeting") == "get=hello\n", what="write on the other edge"
    )

    fleet.api.put("/api/v1/kv/site/greeting", content=b"from-api")  # the API, as before
    for edge in (e1, e2):
        wait_until(
            lambda edge=edge: edge.ask("/kvw?op=get&key=greeting") == "get=from-api\n",
            what="API write on the edges",
        )

    assert e2.ask("/kvw?op=del&key=greeting") == "del=0\n"
    wait_until(lambda: api_value(fleet, "greeting") is None, what="deletion at the API")
    wait_until(
        lambda: e1.ask("/kvw?op=get&key=greeting") == "get=-2\n", what="deletion on the other edge"
    )

    assert e1.ask("/kvw?op=big&key=big&size=1048577") == "big=-5\n"  # over 1 MiB: refused
    assert e1.ask("/kvw?op=big&key=big&size=1048576") == "big=0\n"
    wait_until(lambda: api_value(fleet, "big") == b"x" * 1048576, what="1 MiB value")
    audit = fleet.api.get("/api/v1/audit", params={"limit": 200}).json()["items"]
    assert any(
        e["action"] == "kv.node_write" and e["detail"]["functions"] == ["writer"] for e in audit
    )


def test_concurrent_writers_on_two_edges_agree(fleet, modules):
    edges = deploy_writer(fleet, modules, "e1", "e2")

    writers = [EdgeClient(str(edge.http.base_url)) for edge in edges]  # a second connection

    def write(i: int) -> str:
        return (edges if i % 4 < 2 else writers)[i % 2].ask(f"/kvw?op=put&key=race&value=v{i}")

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(write, range(40))) == {"put=0\n"}

    def agreed() -> bool:
        final = api_value(fleet, "race")
        return final is not None and all(
            edge.ask("/kvw?op=get&key=race") == f"get={final.decode()}\n" for edge in edges
        )

    wait_until(agreed, timeout=30, what="both edges and the API on one value")
    assert api_value(fleet, "race") in {f"v{i}".encode() for i in range(40)}
    # a write after that one (in the control plane's order) wins everywhere
    assert edges[0].ask("/kvw?op=put&key=race&value=later") == "put=0\n"
    wait_until(lambda: api_value(fleet, "race") == b"later", what="the later write applied")
    wait_until(agreed, timeout=30, what="the later write everywhere")


def test_writes_wait_out_a_control_plane_outage_and_an_edge_restart(fleet, modules):
    (edge,) = deploy_writer(fleet, modules, "e1")
    fleet.control.kill()
    assert edge.ask("/kvw?op=put&key=offline&value=queued") == "put=0\n"
    assert edge.ask("/kvw?op=incr&key=visits") == "incr=1 put=0\n"
    assert edge.ask("/kvw?op=incr&key=visits") == "incr=2 put=0\n"
    fleet.edges["e1"].kill()  # SIGKILL, the control plane still down
    fleet.start_edge("e1", None)
    edge = EdgeClient(fleet.edge_urls["e1"])
    assert edge.ask("/kvw?op=get&key=offline") == "get=queued\n"  # from the outbox
    assert edge.ask("/kvw?op=get&key=visits") == "get=2\n"
    fleet.start_control()
    wait_until(
        lambda: api_value(fleet, "offline") == b"queued",
        timeout=30,
        what="queued write applied after the outage",
    )
    wait_until(lambda: api_value(fleet, "visits") == b"2", what="counter applied")
    assert edge.ask("/kvw?op=incr&key=visits") == "incr=3 put=0\n"
    wait_until(lambda: api_value(fleet, "visits") == b"3", what="next write applied")


def test_deploying_another_function_keeps_the_counters(fleet, modules):
    (edge,) = deploy_writer(fleet, modules, "e1")
    for _ in range(3):
        assert edge.ask("/kvw?op=get&key=x") == "get=-2\n"
    admin = fleet.edges["e1"].ready_line.split("admin ")[1].split()[0]

    def invocations() -> str:
        metrics = httpx.get(admin + "/metrics", headers={"Authorization": "Bearer t"}).text
        return next(
            (
                line
                for line in metrics.splitlines()
                if line.startswith('verge_function_invocations_total{function="writer"}')
            ),
            "",
        )

    assert invocations().endswith(" 4.0")  # (deploy_writer asked once)
    hello = {
        "name": "hello",
        "service": "shop",
        "routes": ["/hello"],
        "module_base64": base64.b64encode(modules["hello"].read_bytes()).decode(),
    }
    assert fleet.api.post("/api/v1/functions", json=hello).status_code == 201
    wait_until(lambda: edge.ask("/hello") == "hello from wasm\n", what="hello deployed")
    assert invocations().endswith(" 4.0")
