"""Protection events: edges post the requests they refused, tenants read their own services'
(`verge protection events SERVICE`).

The API tests run on SQLite and PostgreSQL (the ``api`` fixture): a node posts, a tenant reads
its own, another tenant gets 404, hostile or unbounded input gets 422, the newest N are kept.
The last test is end to end: a real control plane, a real edge joined to it, requests refused
by a rate limit, and the CLI as a subprocess.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import httpx
import pytest

from tests.cli import run_verge
from tests.control.conftest import Api
from tests.control.test_fleet import ADMIN, Fleet, get, wait_until
from verge.control import protection
from verge.edge.agent import ControlAgent

V1 = "/api/v1"
EVENTS = f"{V1}/nodes/self/protection-events"


def event(service: str = "a-web", n: int = 0, **extra: object) -> dict:
    return {
        "service": service,
        "t": 1_800_000_000.0 + n,
        "client": "192.0.2.7",
        "method": "GET",
        "host": "www.a.test",
        "target": f"/api/x?n={n}",
        "status": 429,
        "kind": "rate-limit",
        "detail": "api",
        **extra,
    }


def read(api: Api, service: str, token: str | None = None, **params: object):
    return api.get(f"{V1}/services/{service}/protection/events", token, params=params)


@pytest.fixture
def tenants(api: Api) -> tuple[str, str]:
    """Tenant tokens of A (owns a-web) and B (owns b-web)."""
    a = api.tenant("a", zones=("a.test",))
    b = api.tenant("b", zones=("b.test",))
    api.service("a-web", "www.a.test", token=a)
    api.service("b-web", "www.b.test", token=b)
    return a, b


def test_a_node_posts_and_each_tenant_reads_only_its_own(api: Api, tenants) -> None:
    a, b = tenants
    node = api.join("edge-1")
    posted = api.post(
        EVENTS,
        node,
        json={
            "events": [
                event(n=1),
                event("b-web", n=2, kind="waf", status=403, detail="942100,949110"),
                event(n=0, kind="drop", status=0),
                event(n=4, kind="challenge", status=307, detail="no cookie"),
                event("gone", n=3),
            ]
        },
    )
    assert posted.status_code == 200, posted.text
    assert posted.json() == {"accepted": 4, "skipped": 1}  # no service "gone"

    mine = read(api, "a-web", a)
    assert mine.status_code == 200, mine.text
    items = mine.json()["items"]
    assert [(e["target"], e["kind"], e["status"]) for e in items] == [
        ("/api/x?n=0", "drop", 0),
        ("/api/x?n=1", "rate-limit", 429),
        ("/api/x?n=4", "challenge", 307),
    ]  # by time
    assert items[1] == {
        "at": "2027-01-15T08:00:01Z",
        "node": "edge-1",
        "client": "192.0.2.7",
        "method": "GET",
        "host": "www.a.test",
        "target": "/api/x?n=1",
        "status": 429,
        "kind": "rate-limit",
        "detail": "api",
    }
    assert read(api, "b-web", a).status_code == 404  # B's service: as if it did not exist
    assert read(api, "a-web", b).status_code == 404
    assert [e["detail"] for e in read(api, "b-web", b).json()["items"]] == ["942100,949110"]
    assert len(read(api, "a-web").json()["items"]) == 3  # admin sees every tenant's
    assert read(api, "nope").status_code == 404


def test_only_nodes_post_and_only_operators_read(api: Api, tenants) -> None:
    a, _ = tenants
    node = api.join("edge-1")
    assert api.post(EVENTS, a, json={"events": [event()]}).status_code == 403
    assert api.post(EVENTS, json={"events": [event()]}).status_code == 403  # admin: not a node
    assert read(api, "a-web", node).status_code == 403
    assert api.client.get(f"{V1}/services/a-web/protection/events").status_code == 401


HOSTILE = [
    {"target": "/" + "a" * protection.MAX_TARGET},
    {"target": "/a\x00b"},
    {"host": "x\r\nSet-Cookie: a=b"},
    {"detail": "d" * (protection.MAX_DETAIL + 1)},
    {"client": "c" * (protection.MAX_CLIENT + 1)},
    {"method": "M" * (protection.MAX_METHOD + 1)},
    {"status": 1000},
    {"status": -1},
    {"kind": "evil"},
    {"t": -1},
    {"t": 1e300},
    {"service": "s" * 64},
    {"service": ""},
    {"status": 4.5},
    {"t": "soon"},
    {"target": ["/a"]},
]


def test_hostile_or_unbounded_input_is_refused(api: Api, tenants) -> None:
    node = api.join("edge-1")
    for bad in HOSTILE:
        answer = api.post(EVENTS, node, json={"events": [event(), event(**bad)]})
        assert answer.status_code == 422, (bad, answer.text)
    too_many = [event(n=i) for i in range(protection.MAX_EVENTS_PER_UPLOAD + 1)]
    assert api.post(EVENTS, node, json={"events": too_many}).status_code == 422
    assert api.post(EVENTS, node, json={"events": [event()], "more": 1}).status_code == 422
    assert api.post(EVENTS, node, json=[event()]).status_code == 422
    assert read(api, "a-web").json()["items"] == []  # nothing of a refused batch is stored
    newer = api.post(EVENTS, node, json={"events": [event(future_field="ignored")]})
    assert newer.json()["accepted"] == 1  # a newer edge's extra field is no reason to refuse
    for limit in (0, protection.EVENTS_KEPT + 1, "x"):
        assert read(api, "a-web", limit=limit).status_code == 422


def test_the_newest_events_are_kept_and_go_with_their_service(
    api: Api, tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = tenants
    monkeypatch.setattr(protection, "EVENTS_KEPT", 5)
    node = api.join("edge-1")
    for first in (0, 4):
        batch = {"events": [event(n=n) for n in range(first, first + 4)]}
        assert api.post(EVENTS, node, json=batch).json()["accepted"] == 4
    kept = [e["target"] for e in read(api, "a-web", limit=100).json()["items"]]
    assert kept == [f"/api/x?n={n}" for n in range(3, 8)]
    newest = [e["target"] for e in read(api, "a-web", limit=2).json()["items"]]
    assert newest == ["/api/x?n=6", "/api/x?n=7"]  # the newest 2, oldest first

    assert api.delete(f"{V1}/services/a-web", a).status_code == 204
    api.service("a-web", "www.a.test", token=a)  # a new service of the same name
    assert read(api, "a-web", a).json()["items"] == []


# ---- the edge agent: ships what the workers kept, drops what the control plane refuses ---------


class Supervisor:
    """The node the agent works for, as far as the agent sees it: its options and what its
    workers answer to ``protection_events`` (one answer per call, in order)."""

    def __init__(self, cache_dir, answers: list[list[dict]]) -> None:
        self.options = SimpleNamespace(cache_dir=str(cache_dir), node="edge-1")
        self.answers = answers

    async def broadcast(self, msg: dict) -> list[dict]:
        assert msg == {"op": "protection_events"}
        events = self.answers.pop(0) if self.answers else []
        return [{"ok": True, "events": events}]


async def test_the_agent_ships_events_and_drops_a_batch_the_control_plane_refuses(
    api: Api, tenants, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = event(n=1, status=5000)  # what an edge of another version might send
    node = Supervisor(tmp_path, [[bad], [bad, bad], [event(n=2)]])
    agent = ControlAgent(node, "http://control", None)  # type: ignore[arg-type]
    agent.credential = api.join("edge-1")
    agent.http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.client.app), base_url="http://control"
    )
    try:
        with caplog.at_level(logging.DEBUG, "verge.agent"):
            for _ in range(3):
                await agent._ship_protection_events()  # never raises for a 4xx: not retried
    finally:
        await agent.close()
    assert agent.pending_events == [] and agent.events_dropped == 3
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.WARNING, logging.DEBUG]  # warned once
    assert [e["target"] for e in read(api, "a-web").json()["items"]] == ["/api/x?n=2"]


# ---- end to end: a control plane, an edge, the CLI -----------------------------------------------


def verge(fleet: Fleet, *args: str) -> str:
    """Run a `verge` control command (token in the environment); its stdout."""
    out = run_verge([*args, "--control", fleet.control_url], {"VERGE_TOKEN": ADMIN})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.timeout(120)
def test_refusals_of_a_rate_limit_reach_verge_protection_events(fleet, origin) -> None:
    origin.route("/*", headers=[("Cache-Control", "max-age=60")], body=b"hi\n")
    limits = {"rate_limits": [{"name": "api", "match": {"path": "/api/"}, "rate": "1/m"}]}
    service = {
        "name": "shop",
        "hosts": ["shop.test"],
        "origins": [{"url": origin.url}],
        "protection": limits,
    }
    assert fleet.api.post(f"{V1}/services", json=service).status_code == 201
    fleet.start_edge("e1", fleet.join_token())
    url = fleet.edge_urls["e1"]
    wait_until(lambda: get(url, "/ready").status_code == 200, what="config applied")
    assert get(url, "/api/items?page=2").status_code == 200
    assert [get(url, "/api/items?page=2").status_code for _ in range(3)] == [429, 429, 429]

    table = wait_until(
        lambda: _with(verge(fleet, "protection", "events", "shop"), "429"),
        timeout=30,
        what="protection events shipped",
    )
    assert "/api/items?page=2" in table and "rate-limit" in table and "e1" in table
    assert "127.0.0.1" in table
    events = json.loads(verge(fleet, "protection", "events", "shop", "--json", "--limit", "2"))
    assert len(events) == 2
    assert {(e["kind"], e["detail"], e["status"], e["node"]) for e in events} == {
        ("rate-limit", "api", 429, "e1")
    }


def _with(text: str, needle: str) -> str | None:
    return text if needle in text else None
