"""The control-plane HTTP API, on SQLite and on PostgreSQL (every test runs on both).

Most tests drive the FastAPI app in-process (TestClient); long polls run in threads so a
change made meanwhile can wake them. ``test_real_server_process`` starts
``python -m verge.control.server`` as a child process and talks to it over loopback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.control.conftest import ORIGIN, Api, api_for, bearer, service_body
from verge.config import Config
from verge.control.store import Store

V1 = "/api/v1"


# ---- basics: health, OpenAPI, authentication, roles ------------------------------------------


def test_healthz_and_openapi_need_no_token(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    spec = api.client.get("/openapi.json").json()
    for path in ("/api/v1/services", "/api/v1/purge", "/api/v1/nodes/self/config"):
        assert path in spec["paths"]


def test_missing_wrong_and_revoked_tokens_get_401(api: Api) -> None:
    response = api.client.get(f"{V1}/services")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert "error" in response.json()
    wrong = api.admin[:-4] + "xxxx"
    assert api.get(f"{V1}/services", wrong).status_code == 401
    created = api.post(f"{V1}/tokens", json={"role": "admin", "name": "second"}).json()
    assert api.get(f"{V1}/services", created["token"]).status_code == 200
    assert api.delete(f"{V1}/tokens/{created['id']}").status_code == 204
    assert api.get(f"{V1}/services", created["token"]).status_code == 401


def test_roles_gate_endpoints(api: Api) -> None:
    reader = api.tenant("acme", "read_only")
    assert api.get(f"{V1}/services", reader).status_code == 200
    response = api.post(f"{V1}/services", reader, json=service_body("web"))
    assert response.status_code == 403 and "read_only" in response.json()["error"]
    join = api.post(f"{V1}/tokens", json={"role": "join"}).json()["token"]
    assert api.get(f"{V1}/services", join).status_code == 403
    node = api.join()
    assert api.get(f"{V1}/services", node).status_code == 403
    assert api.get(f"{V1}/nodes/self/config", api.admin).status_code == 403
    tenant_admin = api.tenant("acme")
    assert api.get(f"{V1}/nodes", tenant_admin).status_code == 403
    assert api.post(f"{V1}/tenants", tenant_admin, json={"name": "x"}).status_code == 403


def test_last_admin_token_cannot_be_revoked(api: Api) -> None:
    admin_id = api.get(f"{V1}/tokens").json()["items"][0]["id"]
    response = api.delete(f"{V1}/tokens/{admin_id}")
    assert response.status_code == 409 and "last admin" in response.json()["error"]


# ---- tenants and tokens ----------------------------------------------------------------------


def test_tenants_and_tokens(api: Api) -> None:
    created = api.post(f"{V1}/tenants", json={"name": "acme"})
    assert created.status_code == 201 and created.json()["name"] == "acme"
    duplicate = api.post(f"{V1}/tenants", json={"name": "acme"})
    assert duplicate.status_code == 409 and duplicate.json()["field"] == "name"
    bad = api.post(f"{V1}/tenants", json={"name": "Not A Slug"})
    assert bad.status_code == 422 and bad.json()["field"] == "name"

    token = api.post(f"{V1}/tokens", json={"name": "ci", "role": "tenant_admin", "tenant": "acme"})
    assert token.status_code == 201
    body = token.json()
    assert body["token"].startswith(f"vrg_{body['id']}_") and body["tenant"] == "acme"
    listed = api.get(f"{V1}/tokens").json()["items"]
    assert all("token" not in item for item in listed)
    needs_tenant = api.post(f"{V1}/tokens", json={"role": "tenant_admin"})
    assert needs_tenant.status_code == 400 and needs_tenant.json()["field"] == "tenant"
    assert api.post(f"{V1}/tokens", json={"role": "node"}).status_code == 400


def test_tenant_admin_manages_only_its_own_tokens(api: Api) -> None:
    acme = api.tenant("acme")
    other = api.tenant("other")
    reader = api.post(f"{V1}/tokens", acme, json={"role": "read_only"})
    assert reader.status_code == 201 and reader.json()["tenant"] == "acme"
    assert api.post(f"{V1}/tokens", acme, json={"role": "admin"}).status_code == 403
    assert api.post(f"{V1}/tokens", acme, json={"role": "join"}).status_code == 403
    foreign = api.post(f"{V1}/tokens", acme, json={"role": "read_only", "tenant": "other"})
    assert foreign.status_code == 403 and foreign.json()["field"] == "tenant"
    tenants = {item["tenant"] for item in api.get(f"{V1}/tokens", acme).json()["items"]}
    assert tenants == {"acme"}
    other_id = api.get(f"{V1}/tokens", other).json()["items"][0]["id"]
    assert api.delete(f"{V1}/tokens/{other_id}", acme).status_code == 404
    assert [t["name"] for t in api.get(f"{V1}/tenants", acme).json()["items"]] == ["acme"]


# ---- services: CRUD, ETags, validation, pagination ---------------------------------------------


def test_service_crud_with_etags(api: Api) -> None:
    created = api.post(f"{V1}/services", json=service_body("web", "a.test"))
    assert created.status_code == 201 and created.headers["etag"] == '"1"'
    assert created.json()["tenant"] == "default" and created.json()["version"] == 1
    got = api.get(f"{V1}/services/web")
    assert got.headers["etag"] == '"1"' and got.json()["hosts"] == ["a.test"]
    assert api.get(f"{V1}/services/web", headers={"If-None-Match": '"1"'}).status_code == 304

    changed = {**got.json(), "hosts": ["a.test", "b.test"]}  # GET output is a valid PUT body
    assert api.put(f"{V1}/services/web", json=changed).status_code == 428
    updated = api.put(f"{V1}/services/web", json=changed, headers={"If-Match": '"1"'})
    assert updated.status_code == 200 and updated.headers["etag"] == '"2"'
    stale = api.put(f"{V1}/services/web", json=changed, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    renamed = api.put(
        f"{V1}/services/web", json={**changed, "name": "other"}, headers={"If-Match": "*"}
    )
    assert renamed.status_code == 400 and renamed.json()["field"] == "name"

    assert api.delete(f"{V1}/services/web", headers={"If-Match": '"1"'}).status_code == 412
    assert api.delete(f"{V1}/services/web").status_code == 204
    assert api.get(f"{V1}/services/web").status_code == 404
    assert api.post(f"{V1}/services", json=service_body("again", "a.test")).status_code == 201


def test_validation_errors_name_the_field(api: Api) -> None:
    cases = [
        ({"origins": [{"url": "http://a.test/path"}]}, "origins[0].url"),
        ({"rules": [{"path": "/a"}, {"path": "/a"}]}, "rules[1].path"),
        ({"rules": [{"path": "/a", "ttl": "soon"}]}, "rules[0].ttl"),
        ({"colour": "blue"}, "colour"),
        ({"hosts": []}, "hosts"),
    ]
    for extra, field in cases:
        response = api.post(f"{V1}/services", json=service_body("web", **extra))
        assert response.status_code == 422, response.text
        assert response.json()["field"] == field and response.json()["error"]
    missing = api.post(f"{V1}/services", json={"name": "web", "hosts": ["a.test"]})
    assert missing.json()["field"] == "origins"
    assert api.get(f"{V1}/services?limit=0").json()["field"] == "limit"
    not_json = api.post(
        f"{V1}/services", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 422 and "JSON" in not_json.json()["error"]


def test_lists_are_paginated(api: Api) -> None:
    for name in ("s1", "s2", "s3"):
        api.service(name)
    page = api.get(f"{V1}/services?limit=2").json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
    assert [s["name"] for s in page["items"]] == ["s1", "s2"]
    rest = api.get(f"{V1}/services?limit=2&offset=2").json()
    assert [s["name"] for s in rest["items"]] == ["s3"]
    audit = api.get(f"{V1}/audit?limit=1").json()
    assert audit["total"] >= 4 and len(audit["items"]) == 1


def test_hosts_are_unique_across_tenants(api: Api) -> None:
    acme = api.tenant("acme", zones=("acme.test",))
    other = api.tenant("other", zones=("x.test",))
    api.service("acme-web", "www.acme.test", token=acme)
    clash = api.post(
        f"{V1}/services", other, json=service_body("other-web", "x.test", "www.acme.test")
    )
    assert clash.status_code == 403 and clash.json()["field"] == "hosts[1]"  # not its zone
    assert "acme-web" not in clash.json()["error"]  # no leak of another tenant's service
    as_admin = api.post(f"{V1}/services", json=service_body("z", "www.acme.test"))
    assert as_admin.status_code == 409 and "acme-web" in as_admin.json()["error"]


def test_tenant_tokens_cannot_take_every_host(api: Api) -> None:
    acme = api.tenant("acme")
    star = api.post(f"{V1}/services", acme, json=service_body("catch", "*"))
    assert star.status_code == 403 and star.json()["field"] == "hosts[0]"
    default = api.post(f"{V1}/services", acme, json=service_body("d", default=True))
    assert default.status_code == 403 and default.json()["field"] == "default"
    api.service("fallback", "*", default=True)
    second = api.post(f"{V1}/services", json=service_body("second", default=True))
    assert second.status_code == 409 and second.json()["field"] == "default"


def test_origins_can_be_added_and_removed(api: Api) -> None:
    api.service("web")
    added = api.post(f"{V1}/services/web/origins", json={"url": "http://127.0.0.2:80", "weight": 3})
    assert added.status_code == 201 and added.headers["etag"] == '"2"'
    assert [o["url"] for o in added.json()["origins"]] == [ORIGIN, "http://127.0.0.2:80"]
    assert api.post(f"{V1}/services/web/origins", json={"url": ORIGIN}).status_code == 409
    bad = api.post(f"{V1}/services/web/origins", json={"url": "ftp://x"})
    assert bad.status_code == 422 and bad.json()["field"] == "url"
    removed = api.delete(f"{V1}/services/web/origins", params={"url": ORIGIN})
    assert removed.status_code == 200 and removed.json()["version"] == 3
    last = api.delete(f"{V1}/services/web/origins", params={"url": "http://127.0.0.2"})
    assert last.status_code == 409
    assert (
        api.delete(f"{V1}/services/web/origins", params={"url": "http://nope"}).status_code == 404
    )


# ---- tenant isolation ------------------------------------------------------------------------


def test_a_tenant_can_neither_see_nor_change_nor_purge_another_tenants_service(api: Api) -> None:
    acme, other = api.tenant("acme", zones=("acme.test",)), api.tenant("other")
    api.service("acme-web", "www.acme.test", token=acme)
    acme_purge = api.post(f"{V1}/purge", acme, json={"urls": ["http://www.acme.test/a"]})
    assert acme_purge.status_code == 202
    seq = acme_purge.json()["seq"]

    assert api.get(f"{V1}/services", other).json()["items"] == []
    assert api.get(f"{V1}/services/acme-web", other).status_code == 404
    put = api.put(
        f"{V1}/services/acme-web",
        other,
        json=service_body("acme-web", "evil.test"),
        headers={"If-Match": "*"},
    )
    assert put.status_code == 404
    assert api.delete(f"{V1}/services/acme-web", other).status_code == 404
    assert (
        api.post(
            f"{V1}/services/acme-web/origins", other, json={"url": "http://127.0.0.3"}
        ).status_code
        == 404
    )
    by_url = api.post(f"{V1}/purge", other, json={"urls": ["http://www.acme.test/a"]})
    assert by_url.status_code == 400 and by_url.json()["field"] == "urls[0]"
    by_service = api.post(f"{V1}/purge", other, json={"service": "acme-web", "tags": ["t"]})
    assert by_service.status_code == 404
    unscoped = api.post(f"{V1}/purge", other, json={"tags": ["t"]})
    assert unscoped.status_code == 400 and unscoped.json()["field"] == "service"
    assert api.get(f"{V1}/purge/{seq}", other).status_code == 404
    assert api.get(f"{V1}/stats", other, params={"service": "acme-web"}).status_code == 404
    assert all("acme" not in e["object"] for e in api.get(f"{V1}/audit", other).json()["items"])

    # the owner still has it, unchanged
    mine = api.get(f"{V1}/services/acme-web", acme)
    assert mine.status_code == 200 and mine.json()["hosts"] == ["www.acme.test"]
    assert api.get(f"{V1}/purge/{seq}", acme).status_code == 200


def test_tenant_cannot_move_a_service_to_another_tenant(api: Api) -> None:
    acme = api.tenant("acme", zones=("web.test",))
    api.tenant("other")
    api.service("web", token=acme)
    moved = api.put(
        f"{V1}/services/web",
        acme,
        json={**service_body("web"), "tenant": "other"},
        headers={"If-Match": '"1"'},
    )
    assert moved.status_code == 403 and moved.json()["field"] == "tenant"
    by_admin = api.put(
        f"{V1}/services/web",
        json={**service_body("web"), "tenant": "other"},
        headers={"If-Match": '"1"'},
    )
    assert by_admin.status_code == 200 and by_admin.json()["tenant"] == "other"
    assert api.get(f"{V1}/services/web", acme).status_code == 404


# ---- nodes: join, heartbeat, config bundle -----------------------------------------------------


def test_join_heartbeat_and_node_list(api: Api) -> None:
    credential = api.join("edge-1", region="eu")
    beat = {
        "health": {"status": "ok"},
        "load": {"connections": 3},
        "config_version": 4,
        "purge_seq": 2,
    }
    assert api.post(f"{V1}/nodes/self/heartbeat", credential, json=beat).json() == {}
    [node] = api.get(f"{V1}/nodes").json()["items"]
    assert node["name"] == "edge-1" and node["status"] == "up" and node["region"] == "eu"
    assert (node["config_version"], node["purge_seq"], node["load"]) == (4, 2, {"connections": 3})
    assert node["last_heartbeat"].endswith("Z") and node["url"] == "http://127.0.0.1:18080"

    again = api.join("edge-1")  # re-joining replaces the credential
    assert api.post(f"{V1}/nodes/self/heartbeat", credential, json=beat).status_code == 401
    assert api.post(f"{V1}/nodes/self/heartbeat", again, json=beat).status_code == 200
    assert api.delete(f"{V1}/nodes/edge-1").status_code == 204
    assert api.post(f"{V1}/nodes/self/heartbeat", again, json=beat).status_code == 401
    assert api.get(f"{V1}/nodes").json()["items"][0]["status"] == "revoked"
    assert api.store.down_after == 6.0


def test_node_goes_down_without_heartbeats(api: Api) -> None:
    api.join("edge-1")
    api.store.down_after = 0.0
    time.sleep(0.01)
    assert api.get(f"{V1}/nodes").json()["items"][0]["status"] == "down"


def test_join_needs_a_join_token_and_a_valid_body(api: Api) -> None:
    reader = api.tenant("acme", "read_only")
    body = {"name": "e", "url": "http://127.0.0.1:1", "admin_url": "http://127.0.0.1:2"}
    assert api.post(f"{V1}/nodes/join", reader, json=body).status_code == 403
    bad = api.post(f"{V1}/nodes/join", json={**body, "url": "not a url"})
    assert bad.status_code == 422 and bad.json()["field"] == "url"
    assert api.post(f"{V1}/nodes/join", json={**body, "name": "self"}).status_code == 400


def test_config_bundle_holds_every_tenants_services(api: Api) -> None:
    credential = api.join()
    first = api.get(f"{V1}/nodes/self/config", credential).json()
    assert first["version"] == 1 and first["config"]["services"] == []
    api.service("web", token=api.tenant("acme", zones=("web.test",)))
    api.service("blog", token=api.tenant("other", zones=("blog.test",)))
    bundle = api.get(f"{V1}/nodes/self/config", credential, params={"after": 1}).json()
    assert bundle["version"] == 3
    config = Config.model_validate(bundle["config"])
    assert [s.name for s in config.services] == ["blog", "web"]
    assert config.service_for_host("web.test").name == "web"
    current = api.get(f"{V1}/nodes/self/config", credential, params={"after": 3})
    assert current.status_code == 204


def _timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


@pytest.fixture
def slow_poll_api(store: Store) -> Iterator[Api]:
    """The API with a database re-check so rare that only in-process wake-ups can be seen."""
    with api_for(store, poll_interval=60) as api:
        yield api


def test_config_long_poll_wakes_on_change(slow_poll_api: Api) -> None:
    api = slow_poll_api
    credential = api.join()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            api.get, f"{V1}/nodes/self/config", credential, params={"after": 1, "wait": 20}
        )
        time.sleep(0.2)
        assert not waiting.done()
        changed_at = time.monotonic()
        api.service("web")
        response = waiting.result(timeout=10)
        woke_after = time.monotonic() - changed_at
    assert response.status_code == 200 and response.json()["version"] == 2
    assert woke_after < 2.0
    timed_out, elapsed = _timed(
        lambda: api.get(f"{V1}/nodes/self/config", credential, params={"after": 2, "wait": 0.3})
    )
    assert timed_out.status_code == 204 and 0.25 < elapsed < 3


def test_purge_long_poll_wakes_on_purge(slow_poll_api: Api) -> None:
    api = slow_poll_api
    api.service("web", "www.test")
    credential = api.join()
    assert api.get(f"{V1}/nodes/self/purges", credential).json() == {"purges": []}
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            api.get, f"{V1}/nodes/self/purges", credential, params={"after": 0, "wait": 20}
        )
        time.sleep(0.2)
        assert not waiting.done()
        api.post(f"{V1}/purge", json={"tags": ["t1"]})
        response = waiting.result(timeout=5)
    [job] = response.json()["purges"]
    assert job["targets"] == [["tag", "t1"]] and job["soft"] is False


def test_long_poll_sees_changes_made_by_another_replica(store: Store, db_url: str) -> None:
    """Two control planes on one database: a change on B wakes a node waiting on A."""
    replica_store = Store(db_url)
    try:
        with api_for(store, poll_interval=0.1) as a:
            credential = a.join()
            with (
                api_for(replica_store, admin=a.admin, poll_interval=0.1) as b,
                ThreadPoolExecutor(2) as pool,
            ):
                config = pool.submit(
                    a.get, f"{V1}/nodes/self/config", credential, params={"after": 1, "wait": 20}
                )
                purges = pool.submit(
                    a.get, f"{V1}/nodes/self/purges", credential, params={"after": 0, "wait": 20}
                )
                time.sleep(0.3)
                b.service("web")
                b.post(f"{V1}/purge", json={"tags": ["x"]})
                assert config.result(timeout=5).json()["version"] == 2
                assert purges.result(timeout=5).json()["purges"][0]["seq"] == 1
    finally:
        replica_store.close()


# ---- purges -----------------------------------------------------------------------------------


def test_purge_targets_are_cache_keys(api: Api) -> None:
    api.service("shop", "shop.test", rules=[{"path": "/api/", "kind": "api"}])
    credential = api.join()
    body = {
        "urls": ["http://Shop.test/api/items?b=2&a=1", "https://shop.test/%7Ehome"],
        "prefixes": ["http://shop.test/static/"],
        "tags": ["product-7"],
        "soft": True,
    }
    queued = api.post(f"{V1}/purge", json=body)
    assert queued.status_code == 202 and queued.json()["nodes"] == ["edge-1"]
    [job] = api.get(f"{V1}/nodes/self/purges", credential).json()["purges"]
    assert job["soft"] is True
    assert job["targets"] == [
        ["url", "shop.test/api/items?a=1&b=2"],  # the api rule sorts the query
        ["prefix", "shop.test/api/items?a=1&b=2\n"],
        ["url", "shop.test/api/items?b=2&a=1"],
        ["prefix", "shop.test/api/items?b=2&a=1\n"],
        ["url", "shop.test/~home"],
        ["prefix", "shop.test/~home\n"],
        ["prefix", "shop.test/static/"],
        ["tag", "product-7"],
    ]
    empty = api.post(f"{V1}/purge", json={"urls": []})
    assert empty.status_code == 400 and "nothing to purge" in empty.json()["error"]
    elsewhere = api.post(f"{V1}/purge", json={"service": "shop", "urls": ["http://x.test/"]})
    assert elsewhere.status_code == 400 and elsewhere.json()["field"] == "urls[0]"


def test_purge_acknowledgements(api: Api) -> None:
    api.service("web", "www.test")
    one, two = api.join("edge-1"), api.join("edge-2")
    first = api.post(f"{V1}/purge", json={"urls": ["http://www.test/a"]}).json()
    second = api.post(f"{V1}/purge", json={"tags": ["b"]}).json()
    assert first["nodes"] == ["edge-1", "edge-2"] and second["seq"] == first["seq"] + 1
    status = api.get(f"{V1}/purge/{first['seq']}").json()
    assert status["acked"] == [] and status["pending"] == ["edge-1", "edge-2"]
    assert status["created_at"].endswith("Z")

    assert api.post(f"{V1}/nodes/self/purges/ack", one, json={"seq": 99}).json() == {}
    for seq in (first["seq"], second["seq"]):  # acks everything <= seq
        status = api.get(f"{V1}/purge/{seq}").json()
        assert status["acked"] == ["edge-1"] and status["pending"] == ["edge-2"]
    api.post(f"{V1}/nodes/self/purges/ack", two, json={"seq": first["seq"]})
    assert api.get(f"{V1}/purge/{first['seq']}").json()["pending"] == []
    assert api.get(f"{V1}/purge/{second['seq']}").json()["pending"] == ["edge-2"]
    third = api.post(f"{V1}/purge", json={"tags": ["c"]}).json()  # ack 99 was clamped
    assert api.get(f"{V1}/purge/{third['seq']}").json()["pending"] == ["edge-1", "edge-2"]
    api.delete(f"{V1}/nodes/edge-2")  # a revoked node is no longer waited for
    assert api.get(f"{V1}/purge/{second['seq']}").json()["pending"] == []
    assert api.get(f"{V1}/purge/12345").status_code == 404


# ---- stats and audit --------------------------------------------------------------------------


def _sample(t: float, service: str, requests: int, **extra: float) -> dict:
    return {
        "t": t,
        "service": service,
        "requests": requests,
        "hits": requests // 2,
        "bytes": 100 * requests,
        "status_2xx": requests,
        "status_3xx": 0,
        "status_4xx": 0,
        "status_5xx": 0,
        "origin_ms_sum": 10.0 * requests,
        "origin_count": requests,
        **extra,
    }


def test_stats_ingest_is_idempotent_and_queryable(api: Api) -> None:
    api.service("web")
    one, two = api.join("edge-1"), api.join("edge-2")
    base = (int(time.time()) // 60) * 60 - 60
    samples = [
        _sample(base + 1, "web", 10),
        _sample(base + 5, "web", 4),
        _sample(base + 21, "web", 6, misses=6),
    ]
    sent = api.post(
        f"{V1}/nodes/self/stats",
        one,
        json={"samples": samples},
        headers={"Idempotency-Key": "batch-1"},
    )
    assert sent.status_code == 200 and sent.json()["duplicate"] is False
    again = api.post(
        f"{V1}/nodes/self/stats",
        one,
        json={"samples": samples},
        headers={"Idempotency-Key": "batch-1"},
    )
    assert again.json()["duplicate"] is True
    api.post(
        f"{V1}/nodes/self/stats",
        two,
        json={"samples": [_sample(base + 2, "web", 1)]},
        headers={"Idempotency-Key": "batch-1"},
    )  # same key, other node: counted

    series = api.get(f"{V1}/stats", params={"service": "web", "since": base}).json()["series"]
    assert [(p["t"], p["requests"]) for p in series] == [(base, 15), (base + 20, 6)]
    assert series[0]["hits"] == 5 + 2 + 0 and series[0]["origin_ms_avg"] == 10.0
    assert series[0]["bytes"] == 1500 and series[0]["status_2xx"] == 15
    per_minute = api.get(f"{V1}/stats", params={"since": base, "step": 60}).json()["series"]
    assert [(p["t"], p["requests"]) for p in per_minute] == [(base, 21)]
    only_two = api.get(f"{V1}/stats", params={"node": "edge-2", "since": base}).json()["series"]
    assert [p["requests"] for p in only_two] == [1]
    bad = api.post(f"{V1}/nodes/self/stats", one, json={"samples": [{"t": 1, "requests": 1}]})
    assert bad.status_code == 422 and bad.json()["field"] == "samples[0].service"


def test_tenant_stats_are_scoped(api: Api) -> None:
    acme = api.tenant("acme", zones=("acme-web.test",))
    api.service("acme-web", token=acme)
    api.service("admin-web")
    node = api.join()
    now = time.time()
    api.post(
        f"{V1}/nodes/self/stats",
        node,
        json={"samples": [_sample(now, "acme-web", 3), _sample(now, "admin-web", 7)]},
    )
    mine = api.get(f"{V1}/stats", acme, params={"since": now - 60}).json()["series"]
    assert sum(p["requests"] for p in mine) == 3
    everything = api.get(f"{V1}/stats", params={"since": now - 60}).json()["series"]
    assert sum(p["requests"] for p in everything) == 10


def test_every_change_is_audited(api: Api) -> None:
    acme = api.tenant("acme", zones=("web.test", "new.test"))
    api.service("web", token=acme)
    api.put(
        f"{V1}/services/web",
        acme,
        json=service_body("web", "new.test"),
        headers={"If-Match": '"1"'},
    )
    api.post(f"{V1}/purge", acme, json={"urls": ["http://new.test/"]})
    api.delete(f"{V1}/services/web", acme)
    api.join("edge-1")
    entries = api.get(f"{V1}/audit").json()["items"]
    actions = [e["action"] for e in reversed(entries)]
    assert actions == [
        "token.create",
        "tenant.create",
        "token.create",
        "service.create",
        "service.update",
        "purge.create",
        "service.delete",
        "token.create",
        "node.join",
    ]
    update = next(e for e in entries if e["action"] == "service.update")
    assert update["object"] == "service:web" and update["actor"].startswith("token:tenant_admin#")
    assert update["detail"]["version"] == 2 and update["at"].endswith("Z")
    tenant_view = [e["action"] for e in api.get(f"{V1}/audit", acme).json()["items"]]
    assert "node.join" not in tenant_view and "service.delete" in tenant_view


# ---- a real server process -------------------------------------------------------------------


def _start_server(db_url: str, *extra: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`python -m verge.control.server` on port 0; (process, base URL, stderr lines so far)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "verge.control.server",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db_url,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**{k: v for k, v in os.environ.items() if k != "VERGE_ADMIN_TOKEN"},
             "VERGE_SECRET": "test-secret"},  # required with PostgreSQL
    )
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    line = proc.stdout.readline()
    match = re.fullmatch(r"verge control ready: (http://127\.0\.0\.1:\d+)\n", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"no ready line: {line!r} {''.join(errors)}")
    return proc, match.group(1), errors


def test_real_server_process(db_url: str) -> None:
    proc, url, errors = _start_server(db_url)
    try:
        assert url.rsplit(":", 1)[1] != "0"
        deadline = time.monotonic() + 5
        while not any(line.startswith("admin token: vrg_") for line in errors):
            assert time.monotonic() < deadline, errors
            time.sleep(0.02)
        admin = next(line for line in errors if line.startswith("admin token: ")).split()[-1]
        with httpx.Client(base_url=url, headers=bearer(admin), timeout=10) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            assert client.get("/").headers["content-type"].startswith("text/html")  # dashboard
            join = client.post(f"{V1}/tokens", json={"role": "join"}).json()["token"]
            node = client.post(
                f"{V1}/nodes/join",
                headers=bearer(join),
                json={"name": "e1", "url": "http://127.0.0.1:1", "admin_url": "http://127.0.0.1:2"},
            ).json()["credential"]
            with ThreadPoolExecutor(2) as pool:
                woken = pool.submit(
                    client.get,
                    f"{V1}/nodes/self/config",
                    headers=bearer(node),
                    params={"after": 1, "wait": 20},
                )
                parked = pool.submit(
                    client.get,
                    f"{V1}/nodes/self/purges",
                    headers=bearer(node),
                    params={"after": 0, "wait": 30},
                )
                time.sleep(0.3)
                assert client.post(f"{V1}/services", json=service_body("web")).status_code == 201
                assert woken.result(timeout=5).json()["version"] == 2
                stopped_at = time.monotonic()
                proc.send_signal(signal.SIGTERM)  # the parked long poll is answered at once
                assert parked.result(timeout=10).json() == {"purges": []}
                assert proc.wait(10) == 0 and time.monotonic() - stopped_at < 5
        assert any('"path": "/api/v1/services"' in line for line in errors)  # JSON access log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_server_takes_the_given_admin_token(db_url: str) -> None:
    proc, url, errors = _start_server(db_url, "--admin-token", "my-own-secret-token")
    try:
        response = httpx.get(f"{url}{V1}/tenants", headers=bearer("my-own-secret-token"))
        assert response.status_code == 200
        assert [t["name"] for t in response.json()["items"]] == ["default"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop too, no traceback
        assert proc.wait(10) == 0
    assert not any("admin token:" in line or "Traceback" in line for line in errors)


def test_server_reports_a_bad_store_or_address_and_exits(tmp_path) -> None:
    server = [sys.executable, "-m", "verge.control.server"]
    bad_store = subprocess.run(
        [*server, "--listen", "127.0.0.1:0", "--db", "postgresql://nobody@127.0.0.1:1/none"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad_store.returncode == 2
    assert bad_store.stderr.startswith("error: cannot use the store")
    bad_listen = subprocess.run(
        [*server, "--listen", "127.0.0.1:99999"], capture_output=True, text=True, timeout=30
    )
    assert bad_listen.returncode == 2 and "expected HOST:PORT" in bad_listen.stderr
