"""Edge functions and edge KV through the control-plane API (SQLite and PostgreSQL).

Deploy (versions, module checks), rollback, delete, what reaches the config bundle and the
node endpoints (modules by sha256, the KV change feed, function logs), tenant isolation.
"""

from __future__ import annotations

import base64
import hashlib
import threading

import pytest

from tests.control.conftest import Api
from verge.control import functions as fn_store

WASM_V1 = b"\0asm\x01\0\0\0" + b"v1"
WASM_V2 = b"\0asm\x01\0\0\0" + b"v2"


def deploy_body(name: str = "hello", module: bytes = WASM_V1, **extra: object) -> dict:
    return {
        "name": name,
        "service": "shop",
        "routes": ["/api/hello*"],
        "module_base64": base64.b64encode(module).decode(),
        **extra,
    }


def deploy(api: Api, token: str | None = None, **kw: object) -> dict:
    response = api.post("/api/v1/functions", token, json=deploy_body(**kw))  # type: ignore[arg-type]
    assert response.status_code == 201, response.text
    return response.json()


def bundle_functions(api: Api) -> list[dict]:
    return api.store.bundle()["config"]["functions"]


def test_deploy_versions_and_the_bundle(api: Api) -> None:
    api.service("shop")
    before = api.store.config_version()
    first = deploy(api, env={"SECRET": "s3"}, cpu_ms=20, memory_mb=32)
    assert first["version"] == 1 and first["service"] == "shop" and first["tenant"] == "default"
    assert first["module_sha256"] == hashlib.sha256(WASM_V1).hexdigest()
    assert first["env"] == ["SECRET"]  # names only: values may be secrets
    assert api.store.config_version() == before + 1
    (spec,) = bundle_functions(api)
    assert spec["module"] == f"sha256:{first['module_sha256']}"
    assert spec["env"] == {"SECRET": "s3"} and spec["cpu_ms"] == 20 and spec["memory_mb"] == 32

    second = deploy(api, module=WASM_V2)
    assert second["version"] == 2
    (spec,) = bundle_functions(api)
    assert spec["module"] == f"sha256:{second['module_sha256']}"
    got = api.get("/api/v1/functions/hello").json()
    assert got["version"] == 2
    assert [(v["version"], v["active"]) for v in got["versions"]] == [(2, True), (1, False)]
    listed = api.get("/api/v1/functions").json()
    assert listed["total"] == 1 and listed["items"][0]["version"] == 2
    actions = [e["action"] for e in api.get("/api/v1/audit").json()["items"]]
    assert actions.count("function.deploy") == 2


def test_rollback_switches_the_active_version(api: Api) -> None:
    api.service("shop")
    v1 = deploy(api)["module_sha256"]
    deploy(api, module=WASM_V2)
    version = api.store.config_version()
    r = api.post("/api/v1/functions/hello/rollback")
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    assert bundle_functions(api)[0]["module"] == f"sha256:{v1}"
    assert api.store.config_version() == version + 1
    r = api.post("/api/v1/functions/hello/rollback", json={"version": 2})
    assert r.json()["version"] == 2
    same = api.store.config_version()
    assert api.post("/api/v1/functions/hello/rollback", json={"version": 2}).status_code == 200
    assert api.store.config_version() == same  # already active: nothing changes
    r = api.post("/api/v1/functions/hello/rollback", json={"version": 9})
    assert r.status_code == 404 and r.json()["field"] == "version"
    api.post("/api/v1/functions/hello/rollback", json={"version": 1})
    r = api.post("/api/v1/functions/hello/rollback")
    assert r.status_code == 409 and "no version before 1" in r.json()["error"]
    audit = api.get("/api/v1/audit").json()["items"]
    assert any(e["action"] == "function.rollback" and e["detail"]["to"] == 1 for e in audit)


def test_delete_removes_every_version(api: Api) -> None:
    api.service("shop")
    deploy(api)
    assert api.delete("/api/v1/functions/hello").status_code == 204
    assert bundle_functions(api) == []
    assert api.get("/api/v1/functions/hello").status_code == 404
    assert api.delete("/api/v1/functions/hello").status_code == 404
    assert deploy(api)["version"] == 1  # the name is free again


def test_bad_deployments_are_refused_with_the_field(api: Api) -> None:
    api.service("shop")
    r = api.post("/api/v1/functions", json=deploy_body(module=b"ELF\x7f not wasm"))
    assert r.status_code == 400 and r.json()["field"] == "module"
    r = api.post("/api/v1/functions", json={**deploy_body(), "module_base64": "!!not base64"})
    assert r.status_code == 400 and r.json()["field"] == "module_base64"
    r = api.post("/api/v1/functions", json=deploy_body(service="nope"))
    assert r.status_code == 404
    r = api.post("/api/v1/functions", json=deploy_body(routes=["no-slash"]))
    assert r.status_code == 400 and r.json()["field"] == "routes"
    r = api.post("/api/v1/functions", json=deploy_body(kv_write=True))
    assert r.status_code == 400 and r.json()["field"] == "kv_write"
    r = api.post("/api/v1/functions", json=deploy_body(kv_namespace="Bad_NS"))
    assert r.status_code == 400 and r.json()["field"] == "kv_namespace"
    r = api.post("/api/v1/functions", json=deploy_body(memory_mb=0))
    assert r.status_code == 400 and r.json()["field"] == "memory_mb"
    assert bundle_functions(api) == []


def test_a_module_over_the_limit_gets_413(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api.service("shop")
    monkeypatch.setattr(fn_store, "MAX_MODULE_BYTES", 1024)
    r = api.post("/api/v1/functions", json=deploy_body(module=b"\0asm" + bytes(2000)))
    assert r.status_code == 413 and r.json()["field"] == "module"


def test_nodes_fetch_modules_by_sha256(api: Api) -> None:
    api.service("shop")
    digest = deploy(api)["module_sha256"]
    node = api.join()
    r = api.get(f"/api/v1/nodes/self/modules/{digest}", node)
    assert r.status_code == 200 and r.content == WASM_V1
    assert r.headers["content-type"] == "application/wasm"
    assert api.get(f"/api/v1/nodes/self/modules/{'0' * 64}", node).status_code == 404
    assert api.get(f"/api/v1/nodes/self/modules/{digest}").status_code == 403  # admin token
    assert api.get("/api/v1/nodes/self/config", node).json()["config"]["functions"]


def test_tenants_deploy_only_onto_their_own_services(api: Api) -> None:
    alice = api.tenant("alice", zones=("shop.test",))
    bob = api.tenant("bob", zones=("bobshop.test",))
    api.service("shop", token=alice)
    api.service("bobshop", token=bob)
    mine = deploy(api, alice, kv_namespace="alice-data")
    assert mine["tenant"] == "alice"
    r = api.post("/api/v1/functions", bob, json=deploy_body(name="evil", service="shop"))
    assert r.status_code == 404  # another tenant's service does not exist for bob
    r = api.post("/api/v1/functions", bob, json=deploy_body(service="bobshop"))
    assert r.status_code == 409 and r.json()["field"] == "name"  # hello is alice's
    assert "another tenant" in r.json()["error"]
    r = api.post(
        "/api/v1/functions",
        bob,
        json=deploy_body("b", service="bobshop", kv_namespace="alice-data"),
    )
    assert r.status_code == 409 and r.json()["field"] == "kv_namespace"
    for path in ("/api/v1/functions/hello", "/api/v1/functions/hello/logs"):
        assert api.get(path, bob).status_code == 404
    assert api.post("/api/v1/functions/hello/rollback", bob).status_code == 404
    assert api.delete("/api/v1/functions/hello", bob).status_code == 404
    assert api.get("/api/v1/functions", bob).json()["total"] == 0
    assert api.get("/api/v1/functions", alice).json()["total"] == 1
    reader = api.tenant("alice", role="read_only")
    assert api.get("/api/v1/functions/hello", reader).status_code == 200
    assert api.post("/api/v1/functions", reader, json=deploy_body()).status_code == 403


def test_kv_put_get_list_delete(api: Api) -> None:
    r = api.put("/api/v1/kv/site/greeting", content=b"hello kv")
    assert r.status_code == 200 and r.json()["seq"] == 1, r.text
    api.put("/api/v1/kv/site/a/b%20c", content=b"\x00\xff")
    r = api.get("/api/v1/kv/site/greeting")
    assert r.content == b"hello kv" and r.headers["etag"] == '"1"'
    assert api.get("/api/v1/kv/site/a/b c").content == b"\x00\xff"
    keys = api.get("/api/v1/kv/site").json()
    assert [(k["key"], k["size"]) for k in keys["items"]] == [("a/b c", 2), ("greeting", 8)]
    assert api.get("/api/v1/kv/site", params={"prefix": "gr"}).json()["total"] == 1
    assert api.get("/api/v1/kv").json()["items"] == [
        {"namespace": "site", "tenant": "default", "keys": 2}
    ]
    r = api.delete("/api/v1/kv/site/greeting")
    assert r.status_code == 200 and r.json()["seq"] == 3
    assert api.get("/api/v1/kv/site/greeting").status_code == 404
    assert api.delete("/api/v1/kv/site/greeting").status_code == 404
    assert api.get("/api/v1/kv/nope").status_code == 404
    actions = {e["action"] for e in api.get("/api/v1/audit").json()["items"]}
    assert {"kv.put", "kv.delete", "kv.namespace.create"} <= actions


def test_kv_bounds_and_names(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    r = api.put("/api/v1/kv/site/big", content=bytes(fn_store.MAX_VALUE_BYTES + 1))
    assert r.status_code == 413 and r.json()["field"] == "value"
    r = api.put("/api/v1/kv/Not_A_Slug/k", content=b"v")
    assert r.status_code == 400 and r.json()["field"] == "namespace"
    r = api.put(f"/api/v1/kv/site/{'k' * 513}", content=b"v")
    assert r.status_code == 400 and r.json()["field"] == "key"


def test_kv_namespaces_belong_to_a_tenant(api: Api) -> None:
    alice, bob = api.tenant("alice"), api.tenant("bob")
    assert api.put("/api/v1/kv/alice-ns/k", alice, content=b"secret").status_code == 200
    assert api.get("/api/v1/kv/alice-ns/k", bob).status_code == 404
    assert api.get("/api/v1/kv/alice-ns", bob).status_code == 404
    assert api.delete("/api/v1/kv/alice-ns/k", bob).status_code == 404
    r = api.put("/api/v1/kv/alice-ns/k", bob, content=b"overwrite")
    assert r.status_code == 409 and r.json()["field"] == "namespace"
    assert api.get("/api/v1/kv", bob).json()["total"] == 0
    assert api.get("/api/v1/kv/alice-ns/k").content == b"secret"  # admins see everything
    assert api.put("/api/v1/kv/alice-ns/k2", content=b"by admin").status_code == 200
    assert api.get("/api/v1/kv/alice-ns/k2", alice).content == b"by admin"
    reader = api.tenant("alice", role="read_only")
    assert api.put("/api/v1/kv/alice-ns/k", reader, content=b"x").status_code == 403


def test_nodes_follow_the_kv_change_feed(api: Api) -> None:
    node = api.join()
    api.put("/api/v1/kv/site/a", content=b"1")
    api.put("/api/v1/kv/site/b", content=b"2")
    api.put("/api/v1/kv/site/a", content=b"3")
    api.delete("/api/v1/kv/site/b")
    changes = api.get("/api/v1/nodes/self/kv", node, params={"after": 0}).json()["changes"]
    # one row per key, its newest state: a=3 (seq 3), b deleted (seq 4)
    assert changes == [
        {"seq": 3, "namespace": "site", "key": "a", "value": base64.b64encode(b"3").decode()},
        {"seq": 4, "namespace": "site", "key": "b", "value": None},
    ]
    assert api.get("/api/v1/nodes/self/kv", node, params={"after": 4}).json()["changes"] == []
    assert api.get("/api/v1/nodes/self/kv", params={"after": 0}).status_code == 403

    timer = threading.Timer(0.2, lambda: api.put("/api/v1/kv/site/c", content=b"late"))
    timer.start()
    try:
        r = api.get("/api/v1/nodes/self/kv", node, params={"after": 4, "wait": 20})
    finally:
        timer.join()
    assert [c["key"] for c in r.json()["changes"]] == ["c"]


def test_function_logs_from_nodes(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fn_store, "LOGS_KEPT", 5)
    alice = api.tenant("alice", zones=("shop.test",))
    api.service("shop", token=alice)
    deploy(api, alice)
    node = api.join("edge-7")
    records = [
        {"function": "hello", "t": 1_700_000_000 + i, "outcome": "trap", "stderr": f"line {i}"}
        for i in range(8)
    ]
    r = api.post("/api/v1/nodes/self/function-logs", node, json={"records": records})
    assert r.status_code == 200 and r.json()["accepted"] == 8
    logs = api.get("/api/v1/functions/hello/logs", alice).json()["items"]
    assert [rec["stderr"] for rec in logs] == [f"line {i}" for i in range(3, 8)]  # newest 5
    assert logs[0]["node"] == "edge-7" and logs[0]["at"].startswith("2023-11-14T22:13:23")
    assert len(api.get("/api/v1/functions/hello/logs", params={"limit": 2}).json()["items"]) == 2
    bob = api.tenant("bob")
    assert api.get("/api/v1/functions/hello/logs", bob).status_code == 404
    assert (
        api.post("/api/v1/nodes/self/function-logs", alice, json={"records": []}).status_code == 403
    )


def test_response_phase_reaches_the_bundle(api: Api) -> None:
    api.service("shop")
    deployed = deploy(api, name="editor", phase="response")
    assert deployed["phase"] == "response"
    (spec,) = bundle_functions(api)
    assert spec["phase"] == "response"
    bad = api.post("/api/v1/functions", None, json=deploy_body(name="x", phase="later"))
    assert bad.status_code == 422 and "phase" in bad.text
