"""Tenant isolation for every resource, hostname ownership, and purges a restart cannot fool.

Two tenants: A (zone demo.verge.test) owns a service, a certificate, a function, a KV
namespace, a purge, stats and tokens; B (zone b.verge.test) tries, with a tenant_admin and
with a read_only token, to list, read, change and delete each of them (404 for what B cannot
see, 403 for what its role may not do), and A's things stay as they were. Then the holes of
the attack report as regressions: hostname squatting (`*.verge.test`, a subdomain of A's
host), certificate takeover (B's `*.verge.test` certificate presented for A's hosts, checked
in the bundle and by SNI against a real edge in test_certs.py), a purge right after a
control-plane restart that expected no node, and tag purges reaching other tenants' objects
(checked against a real edge at the end).

The API tests run on SQLite and PostgreSQL (the ``api`` fixture).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.control.conftest import Api, api_for, service_body
from tests.control.test_certs import Ca
from verge.cache.purge import PurgeScope, TagIndex, scoped_tag
from verge.certs import ensure_ca
from verge.control.models import Node
from verge.edge.agent import job_targets

V1 = "/api/v1"
WASM = b"\0asm\x01\0\0\0"
A_HOSTS = ("demo.verge.test", "*.demo.verge.test")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return Ca(ensure_ca(tmp_path_factory.mktemp("ca")))


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Certificate keys are sealed; PostgreSQL stores need VERGE_SECRET for that."""
    monkeypatch.setenv("VERGE_SECRET", "tenancy-test-secret")


@dataclass
class World:
    api: Api
    a: str
    a_reader: str
    b: str
    b_reader: str
    a_token_id: str
    a_purge: int

    def pem(self, ca: Ca, *hosts: str) -> dict:
        cert, key = ca.issue(*hosts)
        return {"cert_pem": cert, "key_pem": key}


@pytest.fixture
def world(api: Api, ca: Ca) -> World:
    a = api.tenant("a", zones=("demo.verge.test",))
    a_reader = api.tenant("a", "read_only")
    b = api.tenant("b", zones=("b.verge.test",))
    b_reader = api.tenant("b", "read_only")
    api.service("a-web", *A_HOSTS, token=a)
    api.service("b-web", "b.verge.test", token=b)
    cert, key = ca.issue(*A_HOSTS)
    body = {"name": "a-cert", "cert_pem": cert, "key_pem": key}
    assert api.post(f"{V1}/certificates", a, json=body).status_code == 201
    function = {
        "name": "a-fn",
        "service": "a-web",
        "routes": ["/fn*"],
        "kv_namespace": "a-kv",
        "module_base64": base64.b64encode(WASM).decode(),
    }
    assert api.post(f"{V1}/functions", a, json=function).status_code == 201
    assert api.put(f"{V1}/kv/a-kv/greeting", a, content=b"hello").status_code == 200
    purge = api.post(f"{V1}/purge", a, json={"service": "a-web", "tags": ["home"]})
    assert purge.status_code == 202, purge.text
    node = api.join("edge-1")
    now = time.time()
    samples = [
        {"t": now, "service": "a-web", "requests": 5},
        {"t": now, "service": "b-web", "requests": 2},
    ]
    assert api.post(f"{V1}/nodes/self/stats", node, json={"samples": samples}).status_code == 200
    a_token_id = api.get(f"{V1}/tokens", a).json()["items"][0]["id"]
    return World(api, a, a_reader, b, b_reader, a_token_id, purge.json()["seq"])


@pytest.fixture(params=["tenant_admin", "read_only"])
def role(request: pytest.FixtureRequest) -> str:
    return request.param


def intruder(world: World, role: str) -> tuple[str, int]:
    """B's token of ``role`` and the status its writes to A's things get (404: not there for
    B; 403: B's role may not write at all)."""
    return (world.b, 404) if role == "tenant_admin" else (world.b_reader, 403)


# ---- B can neither see nor touch A's ... -------------------------------------------------------


def test_services(world: World, role: str) -> None:
    api, (b, denied) = world.api, intruder(world, role)
    assert [s["name"] for s in api.get(f"{V1}/services", b).json()["items"]] == ["b-web"]
    assert api.get(f"{V1}/services/a-web", b).status_code == 404
    put = api.put(
        f"{V1}/services/a-web",
        b,
        json=service_body("a-web", "b.verge.test"),
        headers={"If-Match": "*"},
    )
    assert put.status_code == denied
    assert api.delete(f"{V1}/services/a-web", b).status_code == denied
    origin = api.post(f"{V1}/services/a-web/origins", b, json={"url": "http://127.0.0.3"})
    assert origin.status_code == denied
    removed = api.delete(f"{V1}/services/a-web/origins", b, params={"url": "http://127.0.0.1:9"})
    assert removed.status_code == denied
    mine = api.get(f"{V1}/services/a-web", world.a).json()
    assert mine["version"] == 1 and mine["hosts"] == list(A_HOSTS)


PROTECTION = {
    "rate_limits": [{"name": "api", "match": {"path": "/api/"}, "rate": "100/s", "burst": 200}],
    "connections_per_ip": 256,
    "deny": {"cidrs": ["203.0.113.0/24"], "user_agents": ["(?i)sqlmap"]},
    "waf": {"paranoia": 1, "mode": "block", "exclude": [{"path": "/upload", "rules": [920420]}]},
    "challenge": {"match": {"path": "/"}, "when": "rate > 50/s", "kind": "cookie"},
}


def test_protection(world: World, role: str) -> None:
    """A tenant sets its own service's protection (round trip to the API and the edges'
    bundle); B can set it on neither A's service nor with a bounded-out value."""
    api, (b, denied) = world.api, intruder(world, role)
    body = service_body("a-web", *A_HOSTS, protection=PROTECTION)
    put = api.put(f"{V1}/services/a-web", world.a, json=body, headers={"If-Match": "1"})
    assert put.status_code == 200, put.text
    stored = api.get(f"{V1}/services/a-web", world.a).json()["protection"]
    assert stored["rate_limits"][0]["rate"] == "100/s" and stored["waf"]["exclude"] == \
        [{"path": "/upload", "rules": [920420]}]
    assert stored["challenge"] == {"match": {"path": "/", "methods": []}, "when": "rate > 50/s",
                                   "burst": None, "kind": "cookie", "ttl": 3600.0,
                                   "refuse_after": 5, "window": 60.0}
    bundle = api.get(f"{V1}/nodes/self/config", api.join("edge-2")).json()
    [service] = [s for s in bundle["config"]["services"] if s["name"] == "a-web"]
    assert service["protection"] == stored
    evil = service_body("a-web", "b.verge.test", protection={"rate_limits": []})
    assert api.put(f"{V1}/services/a-web", b, json=evil,
                   headers={"If-Match": "*"}).status_code == denied
    for hostile in (
        {"rate_limits": [{"name": "x", "rate": "lots/s"}]},
        {"rate_limits": [{"name": "x", "rate": "1/s", "burst": 2**64}]},
        {"deny": {"user_agents": ["(a*)*b" * 200]}},
        {"deny": {"cidrs": ["10.0.0.0/33"]}},
        {"waf": {"paranoia": 9}},
        {"rate_limits": [{"name": "x", "rate": "1/s"}, {"name": "x", "rate": "2/s"}]},
        {"challenge": {"when": "rate > 50/s", "ttl": 10**9}},
        {"challenge": {"when": "rate > " + "9" * 100 + "/s"}},
        {"challenge": {"when": "rate > 50/s", "kind": "captcha"}},
        {"challenge": {"when": "rate > 50/s", "refuse_after": 2**64}},
        {"challenge": {"when": "rate > 50/s"}, "rate_limits": [{"name": "challenge",
                                                              "rate": "1/s"}]},
    ):
        bad = service_body("b-web", "b.verge.test", protection=hostile)
        answer = api.put(f"{V1}/services/b-web", world.b, json=bad, headers={"If-Match": "*"})
        assert answer.status_code == 422, (hostile, answer.text)
    assert api.get(f"{V1}/services/a-web", world.a).json()["protection"] == stored


def test_hostnames(world: World, role: str) -> None:
    api, (b, _denied) = world.api, intruder(world, role)
    seen = api.get(f"{V1}/hostnames", b).json()
    assert [item["host"] for item in seen["items"]] == ["b.verge.test"]
    assert seen["zones"] == [{"zone": "b.verge.test", "tenant": "b"}]
    assert "demo.verge.test" not in str(seen)
    claim = api.post(f"{V1}/services", b, json=service_body("b-x", "x.demo.verge.test"))
    assert claim.status_code == 403
    admin_view = api.get(f"{V1}/hostnames").json()
    assert {item["host"] for item in admin_view["items"]} == {*A_HOSTS, "b.verge.test"}


def test_certificates(world: World, role: str, ca: Ca) -> None:
    api, (b, denied) = world.api, intruder(world, role)
    assert api.get(f"{V1}/certificates", b).json()["items"] == []
    assert api.get(f"{V1}/certificates/a-cert", b).status_code == 404
    rotate = api.put(f"{V1}/certificates/a-cert", b, json=world.pem(ca, "b.verge.test"))
    assert rotate.status_code == denied
    assert api.delete(f"{V1}/certificates/a-cert", b).status_code == denied
    assert api.get(f"{V1}/certificates/a-cert", world.a).json()["version"] == 1


def test_functions(world: World, role: str) -> None:
    api, (b, denied) = world.api, intruder(world, role)
    assert api.get(f"{V1}/functions", b).json()["items"] == []
    for path in (f"{V1}/functions/a-fn", f"{V1}/functions/a-fn/logs"):
        assert api.get(path, b).status_code == 404
    assert api.post(f"{V1}/functions/a-fn/rollback", b).status_code == denied
    assert api.delete(f"{V1}/functions/a-fn", b).status_code == denied
    onto = {
        "name": "b-fn",
        "service": "a-web",
        "routes": ["/x"],
        "module_base64": base64.b64encode(WASM).decode(),
    }
    assert api.post(f"{V1}/functions", b, json=onto).status_code == denied
    assert api.get(f"{V1}/functions/a-fn", world.a).json()["version"] == 1


def test_kv_namespaces(world: World, role: str) -> None:
    api, (b, denied) = world.api, intruder(world, role)
    assert api.get(f"{V1}/kv", b).json()["items"] == []
    assert api.get(f"{V1}/kv/a-kv", b).status_code == 404
    assert api.get(f"{V1}/kv/a-kv/greeting", b).status_code == 404
    put = api.put(f"{V1}/kv/a-kv/greeting", b, content=b"mine now")
    assert put.status_code == (409 if role == "tenant_admin" else 403)
    assert api.delete(f"{V1}/kv/a-kv/greeting", b).status_code == denied
    assert api.get(f"{V1}/kv/a-kv/greeting", world.a).content == b"hello"


def test_purges(world: World, role: str) -> None:
    api, (b, denied) = world.api, intruder(world, role)
    assert api.get(f"{V1}/purge/{world.a_purge}", b).status_code == 404
    by_url = api.post(f"{V1}/purge", b, json={"urls": ["http://demo.verge.test/"]})
    assert by_url.status_code == (400 if role == "tenant_admin" else 403)
    by_service = api.post(f"{V1}/purge", b, json={"service": "a-web", "tags": ["home"]})
    assert by_service.status_code == denied
    by_prefix = api.post(
        f"{V1}/purge", b, json={"service": "b-web", "prefixes": ["http://demo.verge.test/"]}
    )
    assert by_prefix.status_code == (400 if role == "tenant_admin" else 403)
    assert api.get(f"{V1}/purge/{world.a_purge}", world.a_reader).status_code == 200


def test_stats(world: World, role: str) -> None:
    api, (b, _denied) = world.api, intruder(world, role)
    since = {"since": time.time() - 60}
    assert api.get(f"{V1}/stats", b, params={**since, "service": "a-web"}).status_code == 404
    series = api.get(f"{V1}/stats", b, params=since).json()["series"]
    assert sum(point["requests"] for point in series) == 2  # b-web's only
    mine = api.get(f"{V1}/stats", world.a_reader, params=since).json()["series"]
    assert sum(point["requests"] for point in mine) == 5


def test_tokens(world: World, role: str) -> None:
    api, (b, denied) = world.api, intruder(world, role)
    assert {t["tenant"] for t in api.get(f"{V1}/tokens", b).json()["items"]} == {"b"}
    assert api.delete(f"{V1}/tokens/{world.a_token_id}", b).status_code == denied
    made = api.post(f"{V1}/tokens", b, json={"role": "read_only", "tenant": "a"})
    assert made.status_code == 403
    assert api.get(f"{V1}/services", world.a).status_code == 200  # A's token still works


def test_zones_and_tenants(world: World, role: str) -> None:
    api, (b, _denied) = world.api, intruder(world, role)
    assert [t["name"] for t in api.get(f"{V1}/tenants", b).json()["items"]] == ["b"]
    assert api.get(f"{V1}/tenants/a", b).status_code == 404
    assert api.get(f"{V1}/tenants/b", b).json()["zones"] == ["b.verge.test"]
    grab = api.post(f"{V1}/tenants/b/zones", b, json={"zones": ["verge.test"]})
    assert grab.status_code == 403  # only admins delegate zones, even to oneself
    assert api.post(f"{V1}/tenants/a/zones", b, json={"zones": ["x.test"]}).status_code == 403
    assert api.delete(f"{V1}/tenants/a/zones/demo.verge.test", b).status_code == 403
    assert (
        api.post(f"{V1}/tenants", b, json={"name": "c", "zones": ["verge.test"]}).status_code == 403
    )
    assert api.get(f"{V1}/tenants/a", world.a_reader).json()["zones"] == ["demo.verge.test"]


def test_audit_entries(world: World, role: str) -> None:
    api, (b, _denied) = world.api, intruder(world, role)
    entries = api.get(f"{V1}/audit", b, params={"limit": 1000}).json()["items"]
    assert entries and all("a-" not in e["object"] and e["object"] != "tenant:a" for e in entries)
    assert not any("demo.verge.test" in str(e["detail"]) for e in entries)
    theirs = api.get(f"{V1}/audit", world.a_reader, params={"limit": 1000}).json()["items"]
    assert {"service:a-web", "certificate:a-cert", f"purge:{world.a_purge}"} <= {
        e["object"] for e in theirs
    }


# ---- hostname squatting (the attack report) ---------------------------------------------------


def test_a_tenant_cannot_squat_a_wildcard_or_another_tenants_subdomain(world: World) -> None:
    api = world.api
    wide = api.post(f"{V1}/services", world.b, json=service_body("b-all", "*.verge.test"))
    assert wide.status_code == 403 and wide.json()["field"] == "hosts[0]"
    assert "outside your tenant's zones (b.verge.test)" in wide.json()["error"]
    sub = api.post(f"{V1}/services", world.b, json=service_body("b-sub", "shop.demo.verge.test"))
    assert sub.status_code == 403 and "a-web" not in sub.json()["error"]
    tld = api.post(f"{V1}/services", world.b, json=service_body("b-tld", "*.test"))
    assert tld.status_code == 403
    # A's own subdomains and wildcards below its zone: fine (no 409 for what A owns)
    api.service("a-shop", "shop.demo.verge.test", token=world.a)
    api.service("a-img", "*.img.demo.verge.test", token=world.a)
    # B's own zone, as a name or a wildcard
    api.service("b-img", "*.img.b.verge.test", "www.b.verge.test", token=world.b)


def test_a_tenant_cannot_add_a_foreign_host_to_its_service_by_update(world: World) -> None:
    current = world.api.get(f"{V1}/services/b-web", world.b)
    body = {**current.json(), "hosts": ["b.verge.test", "demo.verge.test"]}
    moved = world.api.put(
        f"{V1}/services/b-web", world.b, json=body, headers={"If-Match": current.headers["etag"]}
    )
    assert moved.status_code == 403 and moved.json()["field"] == "hosts[1]"


def test_wildcards_never_span_two_tenants_even_for_admins(world: World) -> None:
    api = world.api
    wide = api.post(f"{V1}/services", json={**service_body("wide", "*.verge.test"), "tenant": "b"})
    assert wide.status_code == 409 and "demo.verge.test" in wide.json()["error"]
    assert "a-web" in wide.json()["error"]  # admins may see which service
    # nor below another tenant's wildcard
    placed = api.post(
        f"{V1}/services", json={**service_body("odd", "odd.demo.verge.test"), "tenant": "b"}
    )
    assert placed.status_code == 409  # A's *.demo.verge.test covers it
    taken = api.post(f"{V1}/services", json=service_body("z", "demo.verge.test"))
    assert taken.status_code == 409 and "a-web" in taken.json()["error"]


def test_an_admin_sees_and_resolves_conflicts(world: World) -> None:
    api = world.api
    # a host an admin put in B's service inside A's zone (before A claimed it)
    api.service("b-legacy", "legacy.verge.test", token=None, tenant="b")
    added = api.post(f"{V1}/tenants/a/zones", json={"zones": ["legacy.verge.test"]})
    assert added.status_code == 200 and added.json()["zones"] == [
        "demo.verge.test",
        "legacy.verge.test",
    ]
    assert "b-legacy" in added.json()["conflicts"][0]
    report = api.get(f"{V1}/hostnames", params={"conflicts": "true"}).json()
    assert [(i["host"], [c["kind"] for c in i["conflicts"]]) for i in report["items"]] == [
        ("legacy.verge.test", ["in_foreign_zone"])
    ]
    assert report["conflicts"][0]["tenant"] == "b" and report["conflicts"][0]["zone"] == (
        "legacy.verge.test"
    )
    # A cannot claim it while B's service has it; the admin moves B's service to A
    refused = api.post(f"{V1}/services", world.a, json=service_body("a-l", "legacy.verge.test"))
    assert refused.status_code == 409 and "b-legacy" not in refused.json()["error"]
    current = api.get(f"{V1}/services/b-legacy")
    moved = api.put(
        f"{V1}/services/b-legacy",
        json={**current.json(), "tenant": "a"},
        headers={"If-Match": current.headers["etag"]},
    )
    assert moved.status_code == 200
    assert api.get(f"{V1}/hostnames", params={"conflicts": "true"}).json()["conflicts"] == []
    # taking a zone back leaves the tenant's hosts there, listed as outside its zones
    taken = api.delete(f"{V1}/tenants/a/zones/legacy.verge.test")
    assert taken.status_code == 200 and taken.json()["zones"] == ["demo.verge.test"]
    assert "outside every zone" in taken.json()["conflicts"][0]
    kinds = [c["kind"] for c in api.get(f"{V1}/hostnames").json()["conflicts"]]
    assert kinds == ["outside_zones"]
    assert api.delete(f"{V1}/tenants/a/zones/legacy.verge.test").status_code == 404


def test_zones_of_two_tenants_cannot_nest(world: World) -> None:
    api = world.api
    outer = api.post(f"{V1}/tenants", json={"name": "c", "zones": ["verge.test"]})
    assert outer.status_code == 409 and outer.json()["field"] == "zones[0]"
    assert "'a'" in outer.json()["error"] or "'b'" in outer.json()["error"]
    inner = api.post(f"{V1}/tenants/b/zones", json={"zones": ["x.demo.verge.test"]})
    assert inner.status_code == 409 and "tenant 'a'" in inner.json()["error"]
    same = api.post(f"{V1}/tenants/b/zones", json={"zones": ["demo.verge.test"]})
    assert same.status_code == 409
    assert api.get(f"{V1}/tenants/c").status_code == 404  # nothing half-made
    bad = api.post(f"{V1}/tenants", json={"name": "d", "zones": ["test"]})
    assert bad.status_code == 400 and bad.json()["field"] == "zones[0]"
    again = api.post(f"{V1}/tenants/a/zones", json={"zones": ["Demo.Verge.Test."]})
    assert again.status_code == 200 and again.json()["zones"] == ["demo.verge.test"]
    wider = api.post(f"{V1}/tenants", json={"name": "e", "zones": ["e.test", "w.e.test"]})
    assert wider.status_code == 201 and wider.json()["zones"] == ["e.test", "w.e.test"]


def test_zone_changes_are_audited(world: World) -> None:
    api = world.api
    api.post(f"{V1}/tenants/b/zones", json={"zones": ["b2.test"]})
    api.delete(f"{V1}/tenants/b/zones/b2.test")
    entries = api.get(f"{V1}/audit", world.b_reader, params={"limit": 1000}).json()["items"]
    details = {e["action"]: e["detail"] for e in entries if e["object"] == "tenant:b"}
    assert details["tenant.create"] == {"zones": ["b.verge.test"]}
    assert details["tenant.zone.add"] == {"zones": ["b2.test"]}
    assert details["tenant.zone.remove"] == {"zones": ["b2.test"]}


# ---- certificate takeover ---------------------------------------------------------------------


def _bundle_hosts(api: Api) -> dict[str, list[str]]:
    return {c["name"]: c["hosts"] for c in api.store.bundle()["config"]["tls"]["certificates"]}


def test_a_wildcard_certificate_is_never_used_for_another_tenants_host(
    world: World, ca: Ca
) -> None:
    api = world.api
    wide = api.post(
        f"{V1}/certificates", world.b, json={"name": "b-wide", **world.pem(ca, "*.verge.test")}
    )
    assert wide.status_code == 201, wide.text
    assert wide.json()["hosts"] == ["*.verge.test"] and wide.json()["serving"] == ["b.verge.test"]
    hosts = _bundle_hosts(api)
    assert hosts["b-wide"] == ["b.verge.test"]
    assert sorted(hosts["a-cert"]) == sorted(A_HOSTS)
    # nor after B adds hosts: only B's own come in
    api.service("b-www", "www.b.verge.test", "*.img.b.verge.test", token=world.b)
    assert _bundle_hosts(api)["b-wide"] == ["b.verge.test"]  # www.b is two labels below
    assert api.get(f"{V1}/certificates/b-wide", world.b).json()["serving"] == ["b.verge.test"]


def test_certificates_naming_only_foreign_or_unowned_names_are_refused(
    world: World, ca: Ca
) -> None:
    api = world.api

    def upload(token: str | None, *hosts: str, **extra: str) -> httpx.Response:
        return api.post(
            f"{V1}/certificates", token, json={"name": "c", **world.pem(ca, *hosts), **extra}
        )

    assert upload(world.b, "demo.verge.test").status_code == 403  # A's host
    api.post(f"{V1}/tenants/a/zones", json={"zones": ["shop.verge.test"]})
    inside = upload(world.b, "new.shop.verge.test")  # nobody's host yet, but A's zone
    assert inside.status_code == 403 and "another tenant's zone" in inside.json()["error"]
    assert upload(world.b, "*.demo.verge.test").status_code == 403
    elsewhere = upload(world.b, "unrelated.test")
    assert elsewhere.status_code == 403 and elsewhere.json()["field"] == "cert_pem"
    by_admin = upload(None, "unrelated.test", tenant="b")  # would never be served
    assert by_admin.status_code == 422 and by_admin.json()["field"] == "cert_pem"
    fleet = upload(None, "*.verge.test")  # the fleet's own certificate: as before
    assert fleet.status_code == 201 and fleet.json()["tenant"] == "default"


def test_a_fleet_certificate_still_serves_hosts_without_their_own(world: World, ca: Ca) -> None:
    api = world.api
    body = {"name": "fleet", **world.pem(ca, "*.verge.test", "demo.verge.test")}
    assert api.post(f"{V1}/certificates", json=body).status_code == 201
    hosts = _bundle_hosts(api)
    assert hosts["fleet"] == ["*.verge.test"]  # demo.verge.test: A's certificate wins
    assert "demo.verge.test" in hosts["a-cert"]


# ---- purges: who is waited for, what they touch -----------------------------------------------


def _age_heartbeats(api: Api, seconds: float) -> None:
    """As after a control-plane outage: the store heard from no node for ``seconds``."""
    from datetime import timedelta

    from sqlalchemy import update

    from verge.control.models import utcnow

    with api.store.writing() as session:
        session.execute(
            update(Node).values(
                last_heartbeat=utcnow() - timedelta(seconds=seconds),
                joined_at=utcnow() - timedelta(seconds=seconds),
            )
        )


def test_a_purge_right_after_a_restart_waits_for_every_registered_node(api: Api) -> None:
    api.service("web", "www.test")
    one, two = api.join("edge-1"), api.join("edge-2")
    revoked = api.join("edge-gone")
    api.delete(f"{V1}/nodes/edge-gone")
    _age_heartbeats(api, 60)  # the control plane was down for a minute
    with api_for(api.store, api.admin) as restarted:  # a new app on the same store
        queued = restarted.post(f"{V1}/purge", json={"urls": ["http://www.test/x"]})
        assert queued.status_code == 202
        assert queued.json()["nodes"] == ["edge-1", "edge-2"]
        seq = queued.json()["seq"]
        status = restarted.get(f"{V1}/purge/{seq}").json()
        assert status["pending"] == ["edge-1", "edge-2"] and status["done"] is False
        assert status["down"] == ["edge-1", "edge-2"] and status["timed_out"] is False
        for credential in (one, two):  # the edges were serving all along; they apply it
            jobs = restarted.get(f"{V1}/nodes/self/purges", credential).json()["purges"]
            assert [job["seq"] for job in jobs] == [seq]
            restarted.get(f"{V1}/nodes/self/purges", credential, params={"after": seq})
        status = restarted.get(f"{V1}/purge/{seq}").json()
        assert status["acked"] == ["edge-1", "edge-2"] and status["done"] is True
        assert restarted.post(f"{V1}/nodes/self/heartbeat", revoked, json={}).status_code == 401


def test_a_purge_is_done_after_the_timeout_with_the_missing_nodes_listed(api: Api) -> None:
    api.service("web", "www.test")
    api.join("edge-1")
    seq = api.post(f"{V1}/purge", json={"urls": ["http://www.test/x"]}).json()["seq"]
    assert api.get(f"{V1}/purge/{seq}").json()["done"] is False
    api.store.purge_timeout = 0.0
    status = api.get(f"{V1}/purge/{seq}").json()
    assert status["done"] is True and status["timed_out"] is True
    assert status["pending"] == ["edge-1"]  # it applies it when it comes back


def test_a_tenants_tag_purge_carries_its_services_hosts(world: World) -> None:
    api = world.api
    node = api.join("edge-2")
    api.service("b-img", "*.img.b.verge.test", token=world.b)
    api.service("odd", "x.img.b.verge.test", tenant="b")  # same tenant, another service
    queued = api.post(f"{V1}/purge", world.b, json={"service": "b-img", "tags": ["home"]})
    seq = queued.json()["seq"]
    [job] = [
        j for j in api.get(f"{V1}/nodes/self/purges", node).json()["purges"] if j["seq"] == seq
    ]
    assert job["scope"] == {"hosts": ["*.img.b.verge.test"], "except": ["x.img.b.verge.test"]}
    unscoped = api.post(f"{V1}/purge", json={"tags": ["home"]}).json()["seq"]  # admin: all
    [job] = [
        j for j in api.get(f"{V1}/nodes/self/purges", node).json()["purges"] if j["seq"] == unscoped
    ]
    assert "scope" not in job
    bad = api.post(f"{V1}/purge", world.b, json={"service": "b-web", "tags": ["a\nb"]})
    assert bad.status_code == 400 and bad.json()["field"] == "tags[0]"


class _Disk:
    """What job_targets reads of the edge's disk tier: the keys carrying a tag."""

    def __init__(self, tagged: dict[str, list[str]]) -> None:
        self.tagged = tagged

    def keys_with_tag(self, tag: str) -> list[tuple[str, str]]:
        return [(key, "") for key in self.tagged.get(tag, [])]


def test_the_edge_applies_a_scoped_tag_to_the_services_hosts_only() -> None:
    scope = {"hosts": ["b.verge.test", "*.img.b.verge.test"], "except": ["x.img.b.verge.test"]}
    keys = ["b.verge.test/", "a.img.b.verge.test/p", "x.img.b.verge.test/p", "demo.verge.test/"]
    disk = _Disk({"home": keys})
    job = {
        "seq": 1,
        "targets": [["tag", "home"], ["url", "b.verge.test/u"]],
        "soft": False,
        "scope": scope,
    }
    targets = job_targets(job, disk)  # type: ignore[arg-type]
    assert targets[:2] == [("url", "a.img.b.verge.test/p"), ("url", "b.verge.test/")]
    assert targets[2][0] == "tag" and targets[3] == ("url", "b.verge.test/u")
    index = TagIndex()
    for key in keys:
        index.add(key + "\0variant", ["home"])
    assert sorted(index.keys_for(targets[2][1])) == [
        "a.img.b.verge.test/p\0variant",
        "b.verge.test/\0variant",
    ]
    assert len(index.keys_for("home")) == 4  # unscoped, as before
    unscoped = {"seq": 2, "targets": [["tag", "home"]], "soft": False}
    assert job_targets(unscoped, disk) == [("tag", "home")]  # type: ignore[arg-type]
    everything = PurgeScope.from_json({"hosts": ["*"], "except": ["demo.verge.test"]})
    assert sorted(index.keys_for(scoped_tag("home", everything)))[0].startswith("a.img")
    assert not everything.contains("demo.verge.test")


@pytest.mark.timeout(120)
def test_a_tenants_tag_purge_leaves_other_tenants_objects_on_a_real_edge(tmp_path, origin) -> None:
    from tests.control.test_fleet import Fleet, get, wait_until

    origin.route(
        "/page", headers=[("Cache-Control", "max-age=600"), ("Surrogate-Key", "home")], body=b"page"
    )
    fleet = Fleet(tmp_path, origin.url)
    fleet.start_control()
    try:
        tokens = {}
        for name in ("a", "b"):
            body = {"name": name, "zones": [f"{name}.verge.test"]}
            assert fleet.api.post(f"{V1}/tenants", json=body).status_code == 201
            made = fleet.api.post(f"{V1}/tokens", json={"role": "tenant_admin", "tenant": name})
            tokens[name] = {"Authorization": f"Bearer {made.json()['token']}"}
            service = {
                "name": f"{name}-web",
                "hosts": [f"{name}.verge.test"],
                "origins": [{"url": origin.url}],
            }
            created = fleet.api.post(f"{V1}/services", json=service, headers=tokens[name])
            assert created.status_code == 201, created.text
        fleet.start_edge("e1", fleet.join_token())
        url = fleet.edge_urls["e1"]
        for host in ("a.verge.test", "b.verge.test"):
            wait_until(
                lambda host=host: get(url, "/page", host).status_code == 200, what="config applied"
            )
            assert get(url, "/page", host).headers["cache-status"] == "verge; hit"

        purge = fleet.api.post(
            f"{V1}/purge", json={"service": "a-web", "tags": ["home"]}, headers=tokens["a"]
        )
        assert purge.status_code == 202, purge.text
        seq = purge.json()["seq"]
        wait_until(lambda: fleet.api.get(f"{V1}/purge/{seq}").json()["done"], what="acked")
        assert "fwd=miss" in get(url, "/page", "a.verge.test").headers["cache-status"]
        assert get(url, "/page", "b.verge.test").headers["cache-status"] == "verge; hit"
    finally:
        fleet.stop()
