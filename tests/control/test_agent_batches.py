"""The edge agent's batches against the real API (SQLite and PostgreSQL): a batch the control
plane refuses with a 4xx is dropped with one warning, not retried forever (the spool of
stats, function logs and protection events would otherwise stop behind it), and requests
that matched no service are not reported as a service named ""."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import httpx
import pytest

from tests.control.conftest import Api
from verge.edge.agent import ControlAgent

V1 = "/api/v1"


class Node:
    """The node as the agent sees it: workers' cumulative counters per service."""

    def __init__(self, cache_dir, services: dict[str, list[int]]) -> None:
        self.options = SimpleNamespace(cache_dir=str(cache_dir), node="edge-1")
        self.services = services

    async def stats(self) -> list[dict]:
        return [{"services": self.services}]

    async def broadcast(self, msg: dict) -> list[dict]:
        return [{"ok": True, "records": [], "events": []}]


@pytest.fixture
async def agent(api: Api, tmp_path):
    api.service("a-web", "www.a.test")
    node = Node(tmp_path, {"a-web": [3, 1, 300, 3, 0, 0, 0, 0, 0], "": [5] * 9})
    agent = ControlAgent(node, "http://control", None)  # type: ignore[arg-type]
    agent.credential = api.join("edge-1")
    agent.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.client.app),
                                   base_url="http://control")
    yield agent
    await agent.close()


async def test_unrouted_requests_are_not_a_service_and_a_refused_batch_is_dropped(
        api: Api, agent: ControlAgent, caplog: pytest.LogCaptureFixture) -> None:
    assert [s["service"] for s in agent._samples(await agent.node.stats())] == ["a-web"]
    agent._last_snapshot = {}
    bad = json.dumps({"samples": [{"t": 1.0, "service": "a-web", "requests": -1}]})
    agent.spool.db.execute("INSERT INTO spool VALUES (?, ?)", ("stuck", bad))  # an old edge's
    with caplog.at_level(logging.DEBUG, "verge.agent"):
        await agent._stats_once()  # the refused batch goes; the good one behind it too
        await agent._stats_once()
    assert len(agent.spool) == 0
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.WARNING]  # warned once
    series = api.get(f"{V1}/stats", params={"service": "a-web"}).json()["series"]
    assert sum(point["requests"] for point in series) == 3  # the good batch arrived
