"""Protection counters per service and rule: edges count, agents ship, tenants read their own.

The API tests run on SQLite and PostgreSQL (the ``api`` fixture): a node posts counts with its
stats samples (``POST /nodes/self/stats``, ``"protection"``), a retried upload counts once, a
tenant reads its own services' counts (``GET /services/NAME/protection/stats``) and another
tenant gets 404, hostile input gets 422. The agent's part (cumulative worker counters to
deltas, spooled with the stats) runs against the API in process. End to end: a real control
plane, a real edge joined to it with a GeoIP database, requests limited, blocked and denied
(by user agent and by country), the counts read back with the tenant's own token; and the
dashboard's plot of them in headless Chromium, where it is installed.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import pytest

from tests.browser import missing
from tests.control.conftest import Api
from tests.control.test_fleet import wait_until
from tests.control.test_protection_events import verge
from tests.edge.test_deny_countries import write_geo_db
from verge.control import protection
from verge.control.protection import ProtectionCounts
from verge.edge.agent import ControlAgent, protection_totals

V1 = "/api/v1"
STATS = f"{V1}/nodes/self/stats"
T0 = 1_800_000_000  # a bucket start (a multiple of 10 s)


def count(
    service: str = "a-web",
    t: float = T0 + 1,
    kind: str = "rate-limit",
    rule: str = "api",
    **counts: object,
) -> dict:
    return {
        "t": t,
        "service": service,
        "kind": kind,
        "rule": rule,
        **({"allowed": 5, "limited": 2, "blocked": 1} | counts),
    }


def upload(api: Api, node: str, counts: list[dict], key: str | None = None, samples=()):
    headers = {"Idempotency-Key": key} if key else {}
    return api.post(
        STATS, node, json={"samples": list(samples), "protection": counts}, headers=headers
    )


def read(api: Api, service: str, token: str | None = None, **params: object):
    params.setdefault("since", T0 - 100)
    return api.get(f"{V1}/services/{service}/protection/stats", token, params=params)


@pytest.fixture
def tenants(api: Api) -> tuple[str, str]:
    """Tenant tokens of A (owns a-web) and B (owns b-web)."""
    a = api.tenant("a", zones=("a.test",))
    b = api.tenant("b", zones=("b.test",))
    api.service("a-web", "www.a.test", token=a)
    api.service("b-web", "www.b.test", token=b)
    return a, b


def test_a_node_posts_counts_and_each_tenant_reads_only_its_own(api: Api, tenants) -> None:
    a, b = tenants
    node = api.join("edge-1")
    batch = [
        count(),
        count(t=T0 + 5, allowed=1, limited=0, blocked=0),  # the same bucket: summed
        count(t=T0 + 12),  # the next bucket
        count(kind="deny", rule="", allowed=0, limited=0, blocked=3),
        count("b-web", kind="waf", rule="", allowed=9, limited=1, blocked=1),
        count("gone"),  # no such service: skipped
    ]
    posted = upload(api, node, batch, key="k1")
    assert posted.status_code == 200, posted.text
    assert posted.json()["protection"] == {"accepted": 5, "skipped": 1, "duplicate": False}
    again = upload(api, node, batch, key="k1")  # a retry after a lost answer
    assert again.json()["protection"]["duplicate"] is True

    mine = read(api, "a-web", a)
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert (body["service"], body["step"], body["since"]) == ("a-web", 10, T0 - 100)
    assert body["rules"] == [
        {"kind": "deny", "rule": "", "allowed": 0, "limited": 0, "blocked": 3},
        {"kind": "rate-limit", "rule": "api", "allowed": 11, "limited": 4, "blocked": 2},
    ]
    assert body["series"] == [
        {"t": T0, "kind": "deny", "rule": "", "allowed": 0, "limited": 0, "blocked": 3},
        {"t": T0, "kind": "rate-limit", "rule": "api", "allowed": 6, "limited": 2, "blocked": 1},
        {
            "t": T0 + 10,
            "kind": "rate-limit",
            "rule": "api",
            "allowed": 5,
            "limited": 2,
            "blocked": 1,
        },
    ]
    assert read(api, "b-web", a).status_code == 404  # B's service: as if it did not exist
    assert read(api, "a-web", b).status_code == 404
    assert read(api, "b-web", b).json()["rules"] == [
        {"kind": "waf", "rule": "", "allowed": 9, "limited": 1, "blocked": 1}
    ]
    assert read(api, "a-web").json()["rules"] == body["rules"]  # admin sees every tenant's
    assert read(api, "nope").status_code == 404


def test_steps_and_ranges(api: Api, tenants) -> None:
    node = api.join("edge-1")
    other = api.join("edge-2")
    assert upload(api, node, [count(t=T0 + 10 * i) for i in range(9)]).status_code == 200
    assert upload(api, other, [count(t=T0 + 1)]).status_code == 200  # nodes add up
    per_minute = read(api, "a-web", step=60).json()["series"]
    assert all(point["t"] % 60 == 0 for point in per_minute)
    assert sum(point["allowed"] for point in per_minute) == 50
    window = read(api, "a-web", since=T0 + 20, until=T0 + 40).json()
    assert [p["t"] for p in window["series"]] == [T0 + 20, T0 + 30, T0 + 40]
    assert window["rules"][0]["allowed"] == 15
    for bad in ({"step": 0}, {"step": 86401}, {"since": "soon"}, {"until": -1}):
        assert read(api, "a-web", **bad).status_code == 422, bad


def test_stats_without_counts_and_counts_without_stats(api: Api, tenants) -> None:
    node = api.join("edge-1")
    sample = {"t": T0 + 1, "service": "a-web", "requests": 3}
    plain = api.post(STATS, node, json={"samples": [sample]})  # an edge of the last version
    assert plain.status_code == 200 and "protection" not in plain.json()
    alone = upload(api, node, [count()], key="k2")
    assert alone.json()["protection"]["accepted"] == 1
    stats = api.get(f"{V1}/stats", params={"service": "a-web", "since": T0 - 100}).json()
    assert sum(p["requests"] for p in stats["series"]) == 3


HOSTILE = [
    {"kind": "evil"},
    {"kind": "drop"},
    {"rule": "Api"},
    {"rule": "a/b"},
    {"rule": "r" * 64},
    {"rule": "x\x00"},
    {"allowed": -1},
    {"blocked": 2**41},
    {"limited": 1.5},
    {"limited": "many"},
    {"t": -1},
    {"t": 1e300},
    {"service": "s" * 64},
    {"service": ""},
]


def test_hostile_or_unbounded_input_is_refused(api: Api, tenants) -> None:
    node = api.join("edge-1")
    for bad in HOSTILE:
        answer = upload(api, node, [count(), count(**bad)])
        assert answer.status_code == 422, (bad, answer.text)
    too_many = [count() for _ in range(protection.MAX_COUNTS_PER_UPLOAD + 1)]
    assert upload(api, node, too_many).status_code == 422
    assert api.post(STATS, node, json={"samples": [], "protection": {"a": 1}}).status_code == 422
    assert read(api, "a-web").json()["rules"] == []  # nothing of a refused upload is stored
    newer = upload(api, node, [count(future_field="ignored")])
    assert newer.json()["protection"]["accepted"] == 1


def test_only_nodes_post_and_only_operators_read(api: Api, tenants) -> None:
    a, _ = tenants
    node = api.join("edge-1")
    assert upload(api, a, [count()]).status_code == 403
    assert read(api, "a-web", node).status_code == 403
    assert api.client.get(f"{V1}/services/a-web/protection/stats").status_code == 401


def test_counts_go_with_their_service_and_age_out(api: Api, tenants) -> None:
    a, _ = tenants
    node = api.join("edge-1")
    now = time.time()
    upload(api, node, [count(t=now - 9 * 86400), count(t=now)])
    assert len(read(api, "a-web", since=now - 10 * 86400).json()["series"]) == 2
    assert ProtectionCounts(api.store).prune(7.0) == 1
    assert len(read(api, "a-web", since=now - 10 * 86400).json()["series"]) == 1

    assert api.delete(f"{V1}/services/a-web", a).status_code == 204
    api.service("a-web", "www.a.test", token=a)  # a new service of the same name
    assert read(api, "a-web", a, since=now - 60).json() == {
        "service": "a-web",
        "since": int(now - 60),
        "step": 10,
        "rules": [],
        "series": [],
    }


# ---- the agent: cumulative worker counters to deltas, sent with the stats -----------------------


def worker_stats(allowed: int, limited: int, blocked: int, denied: int = 0, waf=None) -> dict:
    """One worker's answer to ``stats`` as far as the agent reads it."""
    return {
        "services": {},
        "protection": {
            "a-web": {
                "rules": {
                    "api": {"allowed": allowed, "limited": limited, "blocked": blocked},
                    "quiet": {"allowed": 0, "limited": 0, "blocked": 0},
                },
                "denied": denied,
                "waf": waf or {},
                "unapplied": [],
            }
        },
    }


def test_protection_totals_sum_workers_and_map_the_waf() -> None:
    waf = {"inspected": 10, "blocked": 2, "detected": 3, "timeouts": 0, "errors": 0}
    totals = protection_totals(
        [
            worker_stats(1, 2, 3, denied=4, waf=waf)["protection"],
            worker_stats(10, 0, 0)["protection"],
            {},
        ]
    )
    assert totals == {
        ("a-web", "rate-limit", "api"): (11, 2, 3),
        ("a-web", "rate-limit", "quiet"): (0, 0, 0),
        ("a-web", "deny", ""): (0, 0, 4),
        ("a-web", "waf", ""): (8, 3, 2),
    }


class Supervisor:
    """The node the agent works for, as far as its stats loop sees it: each ``stats``
    broadcast answers the next of ``answers`` (one snapshot per worker)."""

    def __init__(self, cache_dir, answers: list[list[dict]]) -> None:
        self.options = SimpleNamespace(cache_dir=str(cache_dir), node="edge-1")
        self.answers = answers

    async def stats(self) -> list[dict]:
        return self.answers.pop(0)

    async def broadcast(self, msg: dict) -> list[dict]:
        return [{"ok": True, "records": [], "events": []}]


async def test_the_agent_ships_deltas_with_its_stats(api: Api, tenants, tmp_path) -> None:
    node = Supervisor(
        tmp_path,
        [
            [worker_stats(3, 1, 1), worker_stats(2, 0, 0)],
            [worker_stats(3, 1, 1), worker_stats(2, 0, 0)],  # nothing new: nothing sent
            [worker_stats(4, 3, 2, denied=5), worker_stats(0, 0, 0)],  # worker 2 restarted
        ],
    )
    agent = ControlAgent(node, "http://control", None)  # type: ignore[arg-type]
    agent.credential = api.join("edge-1")
    agent.http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.client.app), base_url="http://control"
    )
    try:
        for _ in range(3):
            await agent._stats_once()
    finally:
        await agent.close()
    assert len(agent.spool) == 0  # everything accepted
    rules = read(api, "a-web", since=time.time() - 60).json()["rules"]
    assert rules == [
        {"kind": "deny", "rule": "", "allowed": 0, "limited": 0, "blocked": 5},
        # 5 then 4-5 (a restarted worker's lower sum adds nothing, never a negative)
        {"kind": "rate-limit", "rule": "api", "allowed": 5, "limited": 3, "blocked": 2},
    ]


# ---- end to end: a control plane, an edge with a GeoIP database, a tenant's token ----------------


def get(url: str, path: str, source: str = "127.0.0.1", **headers: str) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as client:
        return client.get(url + path, headers={"Host": "shop.a.test", **headers})


@pytest.mark.timeout(120)
def test_limited_and_blocked_requests_reach_the_tenants_counts(fleet, origin, tmp_path) -> None:
    origin.route("/*", headers=[("Cache-Control", "max-age=60")], body=b"hi\n")
    admin = fleet.api
    assert admin.post(f"{V1}/tenants", json={"name": "a", "zones": ["a.test"]}).status_code == 201
    assert admin.post(f"{V1}/tenants", json={"name": "b", "zones": ["b.test"]}).status_code == 201
    tokens = {}
    for tenant in ("a", "b"):
        made = admin.post(f"{V1}/tokens", json={"role": "tenant_admin", "tenant": tenant})
        tokens[tenant] = made.json()["token"]
    service = {
        "name": "shop",
        "hosts": ["shop.a.test"],
        "origins": [{"url": origin.url}],
        "protection": {
            "rate_limits": [
                {"name": "api", "match": {"path": "/api/"}, "rate": "1/m"},
                {"name": "watch", "match": {"path": "/watched/"}, "rate": "1/m", "action": "log"},
            ],
            "deny": {"user_agents": ["(?i)sqlmap"], "countries": ["FR"]},
        },
    }
    as_a = {"Authorization": f"Bearer {tokens['a']}"}
    assert admin.post(f"{V1}/services", json=service, headers=as_a).status_code == 201
    geo_db = write_geo_db(tmp_path / "geo.mmdb")
    fleet.start_edge("e1", fleet.join_token(), extra=("--geoip", str(geo_db)))
    url = fleet.edge_urls["e1"]
    wait_until(lambda: get(url, "/ready").status_code == 200, what="config applied")

    assert [get(url, "/api/x").status_code for _ in range(3)] == [200, 429, 429]
    assert [get(url, "/watched/x").status_code for _ in range(3)] == [200, 200, 200]
    assert get(url, "/page", **{"User-Agent": "sqlmap/1.7"}).status_code == 403
    assert get(url, "/page", source="127.0.0.2").status_code == 403  # France

    expected = [
        {"kind": "deny", "rule": "", "allowed": 0, "limited": 0, "blocked": 2},
        {"kind": "rate-limit", "rule": "api", "allowed": 1, "limited": 2, "blocked": 2},
        {"kind": "rate-limit", "rule": "watch", "allowed": 1, "limited": 2, "blocked": 0},
    ]
    path = f"{V1}/services/shop/protection/stats"

    def counted():
        answer = admin.get(path, headers=as_a, params={"since": time.time() - 600})
        assert answer.status_code == 200, answer.text
        rules = answer.json()["rules"]
        # the ready probe counts too: compare the refusals exactly, the allowed ones at least
        return rules if _matches(rules, expected) else None

    wait_until(counted, timeout=40, what="protection counts shipped")
    shown = json.loads(verge(fleet, "protection", "stats", "shop", "--json"))  # the CLI
    assert _matches(shown["rules"], expected)
    table = verge(fleet, "protection", "stats", "shop", "--minutes", "10")
    assert "rate-limit" in table and "watch" in table and "deny" in table
    as_b = {"Authorization": f"Bearer {tokens['b']}"}
    assert admin.get(path, headers=as_b).status_code == 404  # another tenant's service

    def refused_by_country():
        events = admin.get(f"{V1}/services/shop/protection/events", headers=as_a).json()
        seen = {(e["kind"], e["status"], e["detail"], e["client"]) for e in events["items"]}
        return ("deny", 403, "country:FR", "127.0.0.2") in seen

    wait_until(refused_by_country, timeout=30, what="the country refusal among the events")


def _matches(rules: list[dict], expected: list[dict]) -> bool:
    if [(r["kind"], r["rule"]) for r in rules] != [(e["kind"], e["rule"]) for e in expected]:
        return False
    for got, want in zip(rules, expected, strict=True):
        if (got["limited"], got["blocked"]) != (want["limited"], want["blocked"]):
            return False
        if got["allowed"] < want["allowed"]:
            return False
    return True


# ---- the dashboard: the plot of one service's counters per rule ---------------------------------


@pytest.mark.timeout(120)
def test_the_dashboard_plots_a_services_counts_per_rule(tmp_path) -> None:
    if missing() is not None:
        pytest.skip(str(missing()))
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.browser import headless_chromium, wait_for
    from tests.control import test_dashboard as dash

    if not dash.VENDORED:
        pytest.skip("uPlot not vendored: run `make install` (scripts/vendor-web.sh)")
    proc, url = dash.start_control(tmp_path / "control.db")
    admin = httpx.Client(
        base_url=url, timeout=10, headers={"Authorization": f"Bearer {dash.ADMIN}"}
    )
    try:
        body = {"name": "shop", "hosts": ["shop.test"], "origins": [{"url": "http://127.0.0.1:9"}]}
        dash.expect(admin.post(f"{V1}/services", json=body), 201)
        join = dash.expect(admin.post(f"{V1}/tokens", json={"name": "j", "role": "join"}), 201)
        node = dash.expect(
            httpx.post(
                f"{url}{V1}/nodes/join",
                timeout=10,
                json={
                    "name": "edge-1",
                    "url": "http://127.0.0.1:9",
                    "admin_url": "http://127.0.0.1:9",
                },
                headers={"Authorization": f"Bearer {join['token']}"},
            ),
            200,
        )["credential"]
        now = time.time()
        counts = [
            count("shop", t=now - 25 - 10 * i, allowed=50, limited=20, blocked=15)
            for i in range(12)
        ]
        counts.append(
            count("shop", t=now - 25, kind="deny", rule="", allowed=0, limited=0, blocked=7)
        )
        dash.expect(
            httpx.post(
                f"{url}{STATS}",
                timeout=10,
                json={"samples": [], "protection": counts},
                headers={"Authorization": f"Bearer {node}"},
            ),
            200,
        )
        with headless_chromium(dash.WINDOW) as browser:
            dash.log_in(browser, url)
            dash.go(browser, "stats")
            assert browser.find_element(By.ID, "protection-hint").is_displayed()
            option = '#stats-service option[value="shop"]'
            wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, option), "services")
            Select(browser.find_element(By.ID, "stats-service")).select_by_value("shop")
            plot = '[data-protection="rate-limit/api"] canvas'
            wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, plot), "a plot")
            row = '#protection-table tr[data-rule="rate-limit/api"]'
            assert dash.cells(browser, row) == ["rate limit api", "600", "240", "180"]
            assert dash.cells(browser, '#protection-table tr[data-rule="deny/"]') == [
                "deny lists",
                "0",
                "0",
                "7",
            ]
            red = (0xDC, 0x26, 0x26)
            wait_for(
                browser,
                lambda: protection_pixels(browser, "rate-limit/api", red) > 50,
                "the blocked line drawn",
            )
            assert not browser.find_element(By.ID, "protection-hint").is_displayed()
            assert dash.severe_console_errors(browser) == []
    finally:
        admin.close()
        dash.stop_process(proc)


def protection_pixels(driver, key: str, rgb: tuple[int, int, int]) -> int:
    """Opaque pixels of one colour on a protection plot's canvas: the data was drawn."""
    return driver.execute_script(
        """
        const [key, r, g, b] = arguments;
        const canvas = document.querySelector(`[data-protection="${key}"] canvas`);
        if (!canvas || !canvas.width || !canvas.height) return 0;
        const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) {
          if (px[i + 3] > 200 && Math.abs(px[i] - r) + Math.abs(px[i + 1] - g)
              + Math.abs(px[i + 2] - b) < 60) n++;
        }
        return n;
    """,
        key,
        *rgb,
    )
