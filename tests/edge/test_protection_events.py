"""The refusals an edge worker keeps for the control plane (verge protection events):
each refusal point records one event, the ring per service is bounded, and the worker's
``protection_events`` command hands them over and clears them. In process: a Worker whose
app is driven directly, no sockets."""

from __future__ import annotations

import json

import pytest

from verge.config import Config
from verge.control import protection as control_events
from verge.edge import protect
from verge.edge.protect import EVENTS_KEPT, take_events
from verge.edge.worker import Worker
from verge.http.message import Request

pytestmark = pytest.mark.timeout(60)

PROTECTION = {
    "rate_limits": [
        {"name": "api", "match": {"path": "/api/"}, "rate": "1/m"},
        {"name": "upload", "match": {"path": "/upload"}, "rate": "1/m", "action": "drop"},
    ],
    "deny": {"user_agents": ["(?i)sqlmap"]},
}


def make_worker(tmp_path, protection: dict, name: str = "site") -> Worker:
    config = Config.model_validate(
        {
            "services": [
                {
                    "name": name,
                    "hosts": ["*"],
                    "origins": ["http://127.0.0.1:9"],
                    "protection": protection,
                }
            ]
        }
    )
    return Worker(
        {
            "index": 0,
            "options": {"workers": 1, "cache_dir": str(tmp_path), "node": "n1"},
            "config": config.model_dump(mode="json"),
        }
    )


@pytest.fixture
def worker(tmp_path) -> Worker:
    return make_worker(tmp_path, PROTECTION)


def request(target: str, method: str = "GET", client: str = "192.0.2.7", **headers: str) -> Request:
    fields = [("Host", "shop.test"), *((k.replace("_", "-"), v) for k, v in headers.items())]
    return Request(
        method, target, headers=fields, client=client, hmap={k.lower(): v for k, v in fields}
    )


def take(worker: Worker) -> list[dict]:
    reply = worker.command({"op": "protection_events"})
    assert reply["ok"]
    return reply["events"]


def test_a_rate_limited_request_is_recorded_and_the_command_clears_it(worker):
    app = worker.app
    assert app.handle_fast(request("/api/a?x=1")) is None  # admitted (a miss: async path)
    refusal = app.handle_fast(request("/api/a?x=1", user_agent="curl/8", authorization="s3"))
    assert refusal.status == 429
    [event] = take(worker)
    assert event.pop("t") > 0
    assert event == {
        "service": "site",
        "client": "192.0.2.7",
        "method": "GET",
        "host": "shop.test",
        "target": "/api/a?x=1",
        "status": 429,
        "kind": "rate-limit",
        "detail": "api",
    }
    assert "s3" not in json.dumps(event)  # no header value is kept
    assert take(worker) == []  # taken once


async def test_deny_and_drop_are_recorded(worker):
    app = worker.app
    denied = app.handle_fast(request("/page", user_agent="sqlmap/1.7"))
    assert denied.status == 403
    assert app.handle_fast(request("/upload")) is None  # within the limit
    dropped = request("/upload")
    assert app.handle_fast(dropped) is None  # handle() drops the connection
    with pytest.raises(ConnectionResetError):
        await app.handle(dropped, Writer())
    events = take(worker)
    assert [(e["kind"], e["status"], e["detail"]) for e in events] == [
        ("deny", 403, "user-agent#0"),
        ("drop", 0, "upload"),
    ]


def test_the_ring_is_bounded_and_keeps_the_newest(worker):
    app = worker.app
    for i in range(EVENTS_KEPT + 50):
        app.handle_fast(request(f"/page?n={i}", user_agent="sqlmap"))
    events = []
    while batch := take(worker):  # several answers when one would be over the byte budget
        events += batch
    assert len(events) == EVENTS_KEPT
    assert (
        events[0]["target"] == "/page?n=50"
        and events[-1]["target"] == f"/page?n={EVENTS_KEPT + 49}"
    )


def test_texts_are_cut_to_their_bounds_and_made_printable(worker):
    app = worker.app
    long_target = "/page?q=" + "a" * 2000
    app.handle_fast(request(long_target, user_agent="sqlmap"))
    guard = app.runtimes["site"].protection
    guard.record(request("/x\x01y", method="GET"), 403, "deny", "why\x00" + "d" * 500)
    first, second = take(worker)
    assert first["target"] == long_target[: protect.MAX_EVENT_TARGET]
    assert second["target"] == "/x?y" and second["detail"] == "why?" + "d" * 196


def test_one_answer_stays_within_its_byte_budget_and_services_take_turns(worker):
    guard = worker.app.runtimes["site"].protection
    other = protect.ServiceProtection("other", guard.settings)
    for i in range(100):
        guard.record(request("/" + "a" * 500), 429, "rate-limit", "api")
        other.record(request(f"/o{i}"), 403, "deny", "cidr")
    taken = take_events([guard, other], budget=8 * 1024)
    assert 0 < len(taken) < 200
    assert len(json.dumps(taken)) <= 8 * 1024 + 2 * len(taken)
    services = [e["service"] for e in taken]
    assert services[:4] == ["site", "other", "site", "other"]
    while batch := take_events([guard, other]):
        taken += batch
    assert len(taken) == 200 and not guard.events and not other.events


def test_bounds_agree_with_the_control_plane():
    assert (
        protect.MAX_EVENT_CLIENT,
        protect.MAX_EVENT_METHOD,
        protect.MAX_EVENT_HOST,
        protect.MAX_EVENT_TARGET,
        protect.MAX_EVENT_DETAIL,
    ) == (
        control_events.MAX_CLIENT,
        control_events.MAX_METHOD,
        control_events.MAX_HOST,
        control_events.MAX_TARGET,
        control_events.MAX_DETAIL,
    )


def _waf_engine_missing() -> str:
    from verge.protect._modsec import Engine, EngineError
    from verge.protect.waf import WafUnavailable, crs_files

    try:
        crs_files()
        Engine().close()
    except (WafUnavailable, EngineError) as error:
        return f"WAF engine not installed ({error}); run scripts/waf-deps.sh"
    return ""


class Writer:
    """What the pipeline writes a refusal to (the protocol layer's writer, minus sockets)."""

    def __init__(self) -> None:
        self.keep_alive, self.bytes_sent, self.sent = True, 0, []

    async def send(self, response) -> None:
        self.sent.append(response)


async def test_a_waf_refusal_records_the_matched_rule_ids(tmp_path):
    missing = _waf_engine_missing()
    if missing:
        pytest.skip(missing)
    worker = make_worker(tmp_path, {"waf": {"paranoia": 1, "mode": "block"}})
    try:
        writer = Writer()
        probe = request("/search?q=1%27%20OR%20%271%27%3D%271")
        assert worker.app.handle_fast(probe) is None  # the WAF runs on the async path
        await worker.app.handle(probe, writer)
        assert writer.sent[0].status == 403
        [event] = take(worker)
        assert event["kind"] == "waf" and event["status"] == 403
        assert event["target"] == "/search?q=1%27%20OR%20%271%27%3D%271"
        assert "949110" in event["detail"].split(",")  # CRS's anomaly-score verdict
    finally:
        worker.app.runtimes["site"].protection.close()
