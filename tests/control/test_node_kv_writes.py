"""Function KV writes from edges (`POST /nodes/self/kv`) on SQLite and PostgreSQL: applied
like API writes (kv seq, audit, change feed), idempotent per outbox write id, only into
namespaces an active function may write, bounded; and the agent's side: its outbox shipped,
a retried batch not applied twice, refusals dropped (with one warning) rather than retried.
"""

from __future__ import annotations

import base64
import logging
from types import SimpleNamespace

import httpx
import pytest

from tests.control.conftest import Api
from tests.control.test_functions_api import deploy
from tests.control.test_store import _run_together
from verge.control import functions as fn_store
from verge.edge.agent import ControlAgent

V1 = "/api/v1"
OUTBOX = "0123456789abcdef01234567"


def put(write_id: int, key: str, value: bytes | None, namespace: str = "site") -> dict:
    encoded = None if value is None else base64.b64encode(value).decode()
    return {
        "id": write_id,
        "namespace": namespace,
        "key": key,
        "value": encoded,
        "t": 1.0,
        "function": "writer",
    }


def send(api: Api, node: str, *writes: dict, outbox: str = OUTBOX):
    return api.post(f"{V1}/nodes/self/kv", node, json={"outbox": outbox, "writes": list(writes)})


@pytest.fixture
def writer(api: Api) -> str:
    """A node credential, with function `writer` granted kv_write on namespace `site`."""
    api.service("shop")
    deploy(api, name="writer", kv_namespace="site", kv_write=True)
    deploy(api, name="reader", kv_namespace="readonly", routes=["/r"])
    return api.join("edge-1")


def test_writes_apply_like_api_writes(api: Api, writer: str) -> None:
    assert api.put(f"{V1}/kv/site/a", content=b"from api").json()["seq"] == 1
    r = send(api, writer, put(1, "a", b"from edge"), put(2, "b", b"\x00\xff"), put(3, "c", None))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["results"] == [
        {"id": 1, "seq": 2},
        {"id": 2, "seq": 3},
        {"id": 3, "seq": None},
    ]  # deleting an absent key: nothing
    assert (answer["applied"], answer["refused"], answer["kv_seq"]) == (3, 0, 3)
    got = api.get(f"{V1}/kv/site/a")
    assert got.content == b"from edge" and got.headers["etag"] == '"2"'  # last writer wins
    assert api.get(f"{V1}/kv/site/b").content == b"\x00\xff"
    changes = api.get(f"{V1}/nodes/self/kv", writer, params={"after": 1}).json()["changes"]
    assert [(c["key"], c["seq"]) for c in changes] == [("a", 2), ("b", 3)]
    r = send(api, writer, put(4, "a", None))  # a deletion from the edge: a tombstone
    assert r.json()["results"] == [{"id": 4, "seq": 4}]
    assert api.get(f"{V1}/kv/site/a").status_code == 404
    (audit,) = [
        e
        for e in api.get(f"{V1}/audit").json()["items"]
        if e["action"] == "kv.node_write" and e["detail"]["puts"] == 2
    ]
    assert audit["object"] == "kv:site" and audit["actor"].startswith("node:edge-1")
    assert audit["detail"] == {
        "puts": 2,
        "deletes": 0,
        "bytes": 11,
        "functions": ["writer"],
        "seqs": [2, 3],
    }  # sizes, never values


def test_a_batch_sent_again_is_not_applied_twice(api: Api, writer: str) -> None:
    first = send(api, writer, put(1, "k", b"one"), put(2, "k", b"two"))
    assert first.json()["results"] == [{"id": 1, "seq": 1}, {"id": 2, "seq": 1}]  # coalesced
    api.put(f"{V1}/kv/site/k", content=b"api, later")  # seq 2
    again = send(api, writer, put(1, "k", b"one"), put(2, "k", b"two"), put(3, "n", b"new"))
    assert again.json()["results"] == [
        {"id": 1, "duplicate": True},
        {"id": 2, "duplicate": True},
        {"id": 3, "seq": 3},
    ]
    assert again.json()["duplicates"] == 2
    assert api.get(f"{V1}/kv/site/k").content == b"api, later"  # not turned back
    # ids count per outbox: another outbox (a node whose cache was wiped) starts at 1
    other = send(api, writer, put(1, "k", b"fresh outbox"), outbox="f" * 24)
    assert other.json()["results"] == [{"id": 1, "seq": 4}]
    # ... and per node: another node's outbox of the same id is its own
    second_node = api.join("edge-2")
    assert send(api, second_node, put(1, "z", b"z")).json()["results"] == [{"id": 1, "seq": 5}]


def test_hostile_writes_are_refused_one_by_one(api: Api, writer: str) -> None:
    over = base64.b64encode(bytes(fn_store.MAX_VALUE_BYTES + 1)).decode()
    huge = base64.b64encode(bytes(3 * fn_store.MAX_VALUE_BYTES // 2)).decode()
    r = send(
        api,
        writer,
        put(1, "ok", b"fine"),
        put(2, "k", b"v", namespace="readonly"),  # granted, but not kv_write
        put(3, "k", b"v", namespace="nobody"),  # no function at all
        {**put(4, "big", None), "value": over},
        put(5, "k" * 513, b"v"),
        {**put(6, "bad", None), "value": "!!not base64"},
        put(7, "nul\x00key", b"v"),
        put(8, "k", b"v", namespace="Not_A_Slug"),
        {**put(9, "huge", None), "value": huge},
    )
    assert r.status_code == 200, r.text
    results = {result["id"]: result for result in r.json()["results"]}
    assert results[1] == {"id": 1, "seq": 1}
    assert (results[2]["status"], results[2]["field"]) == (403, "namespace")
    assert "kv_write on namespace 'readonly'" in results[2]["error"]
    assert (results[3]["status"], results[3]["field"]) == (403, "namespace")
    assert (results[4]["status"], results[4]["field"]) == (413, "value")
    assert results[4]["error"] == "the value is 1048577 bytes; at most 1048576"
    assert results[9] == {
        "id": 9,
        "error": "the value is over 1048576 bytes",
        "field": "value",
        "status": 413,
    }  # refused before decoding
    assert (results[5]["status"], results[5]["field"]) == (400, "key")
    assert (results[6]["status"], results[6]["field"]) == (400, "value")
    assert (results[7]["status"], results[7]["field"]) == (400, "key")
    assert (results[8]["status"], results[8]["field"]) == (400, "namespace")
    assert r.json()["refused"] == 8
    assert api.get(f"{V1}/kv/readonly/k").status_code == 404
    assert api.get(f"{V1}/kv").json()["total"] == 2  # site, readonly (its grant): no "nobody"
    refusal = [
        e for e in api.get(f"{V1}/audit").json()["items"] if e["action"] == "kv.node_write.refused"
    ]
    assert refusal and refusal[0]["detail"]["writes"] == 8
    # refused ids still count as sent: the batch again is all duplicates
    assert send(api, writer, put(2, "k", b"v", namespace="readonly")).json()["duplicates"] == 1


def test_the_grant_is_the_active_functions(api: Api, writer: str) -> None:
    deploy(api, name="writer", kv_namespace="site")  # v2 no longer writes
    r = send(api, writer, put(1, "k", b"v"))
    assert r.json()["results"][0]["status"] == 403
    api.post(f"{V1}/functions/writer/rollback")  # v1 again: writes
    assert send(api, writer, put(2, "k", b"v")).json()["results"] == [{"id": 2, "seq": 1}]
    assert api.delete(f"{V1}/functions/writer").status_code == 204
    assert send(api, writer, put(3, "k", b"w")).json()["results"][0]["status"] == 403


def test_only_nodes_and_only_well_formed_batches(api: Api, writer: str) -> None:
    assert send(api, api.admin, put(1, "k", b"v")).status_code == 403  # an operator token
    assert send(api, writer, put(1, "k", b"v"), outbox="not-hex").status_code == 422
    too_many = [put(i, f"k{i}", b"v") for i in range(1, fn_store.KV_NODE_WRITES + 2)]
    assert send(api, writer, *too_many).status_code == 422
    assert send(api, writer, {**put(1, "k", b"v"), "extra": 1}).status_code == 422
    assert send(api, writer, put(0, "k", b"v")).status_code == 422  # ids start at 1
    absurd = base64.b64encode(bytes(3 * fn_store.MAX_VALUE_BYTES)).decode()
    assert send(api, writer, {**put(1, "k", None), "value": absurd}).status_code == 422
    assert api.get(f"{V1}/kv/site/k").status_code == 404


# ----- the agent's side --------------------------------------------------------------------------


class Node:
    """The node as the agent sees it (no workers: their KV views are tested elsewhere)."""

    def __init__(self, cache_dir) -> None:
        self.options = SimpleNamespace(cache_dir=str(cache_dir), node="edge-1")
        self.broadcasts = 0

    async def broadcast(self, msg: dict) -> list[dict]:
        self.broadcasts += 1
        return [{"ok": True}]


class LostAnswers(httpx.AsyncBaseTransport):
    """The control plane applies the batch; the answer is lost (once per `lose`)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner, self.lose = inner, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.lose and request.url.path.endswith("/nodes/self/kv"):
            self.lose -= 1
            await response.aread()
            raise httpx.ReadError("connection reset by peer")
        return response


@pytest.fixture
async def agent(api: Api, writer: str, tmp_path):
    agent = ControlAgent(Node(tmp_path), "http://control", None)  # type: ignore[arg-type]
    agent.credential = writer
    agent.transport = LostAnswers(httpx.ASGITransport(app=api.client.app))
    agent.http = httpx.AsyncClient(transport=agent.transport, base_url="http://control")
    yield agent
    await agent.close()


async def test_the_agent_ships_the_outbox_once(api: Api, agent: ControlAgent) -> None:
    agent.outbox.add("site", b"a", b"1", "writer")
    agent.outbox.add("site", b"b", b"2", "writer")
    agent.transport.lose = 1
    with pytest.raises(httpx.ReadError):  # applied, but the agent does not know
        await agent._ship_kv_writes()
    assert api.get(f"{V1}/kv/site/a").content == b"1"
    agent.outbox.add("site", b"a", b"3", "writer")  # a newer write of a replaces the pending one
    await agent._ship_kv_writes()  # b again (a duplicate), a's newer value
    assert api.get(f"{V1}/kv/site/a").content == b"3"
    assert api.get(f"{V1}/kv/site/b").headers["etag"] == '"2"'  # b applied once
    assert not agent.outbox.has_pending() and agent.outbox.size()[0] == 2  # until the feed
    await agent._kv_once()  # the change feed brings them: the outbox lets go
    assert agent.outbox.size() == (0, 0) and agent.kv.seq == 3


async def test_refused_writes_are_dropped_and_reported(
    api: Api, agent: ControlAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent.outbox.add("readonly", b"k", b"v", "reader")
    agent.outbox.add("site", b"k", b"v", "writer")
    with caplog.at_level(logging.WARNING, "verge.agent"):
        await agent._ship_kv_writes()
    assert agent.outbox.size()[0] == 1 and not agent.outbox.has_pending()  # site/k: applied
    (warning,) = [r for r in caplog.records if "refused 1 function KV write" in r.getMessage()]
    assert "readonly" in warning.getMessage()
    (record,) = agent.pending_logs
    assert record["function"] == "reader" and record["outcome"] == "kv_write_refused"
    assert agent.node.broadcasts == 1  # workers drop the refused value from their view


async def test_a_batch_refused_as_a_whole_is_not_retried_forever(
    api: Api, agent: ControlAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent.outbox.add("site", b"k", b"v", "writer")
    monkeypatch.setattr(agent.outbox, "id", "NOT HEX")  # the control plane answers 422
    await agent._ship_kv_writes()
    assert agent.outbox.size() == (0, 0) and agent.kv_writes_dropped == 1
    assert api.get(f"{V1}/kv/site/k").status_code == 404


def test_api_and_node_writers_of_the_same_keys_at_once(api: Api, writer: str) -> None:
    """PostgreSQL locks rows: writers of the same keys through the API (put, delete) and
    from nodes (several keys per batch) must not wait on each other crosswise."""
    fns = fn_store.FunctionStore(api.store)
    admin, node = api.store.authenticate(api.admin), api.store.authenticate(writer)
    api.put(f"{V1}/kv/site/j", content=b"first")

    def work(i: int) -> object:
        if i % 3 == 0:
            return fns.kv_put(admin, "site", "k", b"api")["seq"]
        if i % 3 == 1:
            batch = [put(1, "j", b"node"), put(2, "k", b"node")]
            return fns.kv_node_writes(node, f"{i:024x}", batch)["kv_seq"]
        try:
            return fns.kv_delete(admin, "site", "j")["seq"]
        except fn_store.NotFound:
            return 0

    results = _run_together(12, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    changes = fns.kv_changes(0)
    assert len({c["seq"] for c in changes}) == len(changes) == 2  # j and k, each its newest
    assert max(c["seq"] for c in changes) == fns.kv_seq()
